import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch

from tests.helpers import linear_table, train_small
from vae_models import VAEConfig, infer_schema
from vae_models.data import table_loader
from vae_models.module import VAEModule
from vae_models.vae import TableBatch, TabularVAE


def _batch(df):
    schema = infer_schema(df)
    return schema, TableBatch(*schema.encode(df).tensors())


def test_missing_cell_contributes_no_gradient_to_its_head():
    df = linear_table(1)
    df.loc[0, "x2"] = np.nan
    schema, batch = _batch(linear_table(50))
    batch = TableBatch(*schema.encode(df).tensors())
    vae = TabularVAE(len(schema.numeric), schema.cat_sizes, VAEConfig(latent_dim=2, hidden_dims=[8]))
    vae.loss(batch).loss.backward()
    last = vae.decoder[-1]
    j = [c.name for c in schema.numeric].index("x2")
    n = vae.n_num
    assert torch.all(last.weight.grad[j] == 0) and torch.all(last.weight.grad[n + j] == 0)
    k = [c.name for c in schema.numeric].index("x1")
    assert torch.any(last.weight.grad[k] != 0)  # an observed cell does get a gradient


def test_value_hidden_behind_mask_does_not_change_the_loss():
    schema, batch = _batch(linear_table(20))
    vae = TabularVAE(len(schema.numeric), schema.cat_sizes, VAEConfig(latent_dim=2, hidden_dims=[8]))
    m_num = batch.m_num.clone()
    m_num[:, 0] = 0
    a = TableBatch(batch.x_num * m_num, m_num, batch.x_cat, batch.m_cat)
    x_num = a.x_num.clone()
    x_num[:, 0] = 123.0  # garbage in a masked cell
    b = TableBatch(x_num, m_num, batch.x_cat, batch.m_cat)
    torch.manual_seed(0)
    la = vae.loss(a).loss
    torch.manual_seed(0)
    lb = vae.loss(b).loss
    assert torch.equal(la, lb)


def test_importance_weighted_bound_is_above_elbo_and_tightens_with_k():
    module, schema = train_small(linear_table(600), epochs=3)
    batch = TableBatch(*schema.encode(linear_table(2000, seed=1)).tensors())
    torch.manual_seed(0)
    with torch.no_grad():
        bounds = [module.vae.loss(batch, k=k).bound.mean().item() for k in (1, 5, 50)]
    assert bounds[0] < bounds[1] < bounds[2]


def test_training_is_deterministic_under_a_seed():
    df = linear_table(300)
    a, _ = train_small(df, epochs=2, seed=7)
    b, _ = train_small(df, epochs=2, seed=7)
    c, _ = train_small(df, epochs=2, seed=8)
    wa, wb, wc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)


def test_nan_loss_stops_training_with_a_clear_error():
    schema, batch = _batch(linear_table(20))
    module = VAEModule(
        len(schema.numeric), schema.cat_sizes, VAEConfig(latent_dim=2, hidden_dims=[8]).model_dump()
    )
    with torch.no_grad():
        module.vae.decoder[-1].bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="learning_rate"):
        module.training_step(tuple(batch), 0)


def test_iwae_objective_trains():
    L.seed_everything(0, verbose=False)
    module, schema = train_small(linear_table(400), epochs=3, n_importance=5)
    batch = TableBatch(*schema.encode(linear_table(200, seed=3)).tensors())
    with torch.no_grad():
        assert torch.isfinite(module.vae.loss(batch).loss)


def _digits_frame(n: int = 400):
    from sklearn.datasets import load_digits

    data = load_digits()
    return pd.DataFrame(data.data[:n], columns=[f"p{i}" for i in range(64)]).astype("float64")


def test_conv_architecture_reads_pixel_columns_as_an_image_and_trains():
    df = _digits_frame()
    df.iloc[0, 10] = np.nan  # a missing pixel is a masked cell, as in tables
    module, schema = train_small(
        df,
        epochs=15,
        default_kind="numeric",
        architecture="conv",
        image_shape=(8, 8),
        conv_channels=[8, 16],
        hidden_dims=[32],
    )
    vae = module.vae
    assert vae.encoder.__class__.__name__ == "ConvEncoder"
    batch = TableBatch(*schema.encode(df.head(64)).tensors())
    out = vae.loss(batch, k=4)
    assert torch.isfinite(out.loss)
    assert vae.generative(torch.zeros(3, 64, 2)).num_mu.shape == (3, 64, 64)
    # the network does learn: the trained bound beats an untrained network's
    fresh = TabularVAE(64, [], vae.config)
    torch.manual_seed(0)
    assert out.bound.mean() > fresh.loss(batch, k=4).bound.mean()


def test_conv_architecture_rejects_a_table_of_the_wrong_shape():
    with pytest.raises(ValueError, match="needs 64 numeric"):
        TabularVAE(10, [], VAEConfig(architecture="conv", image_shape=(8, 8)))
    with pytest.raises(ValueError, match="image_shape"):
        VAEConfig(architecture="conv")


def _two_epochs(df: pd.DataFrame, config: VAEConfig, callback: L.Callback) -> VAEModule:
    """Two epochs of shuffled batches of 128 rows on the CPU with `callback`, nothing saved."""
    schema = infer_schema(df)
    module = VAEModule(len(schema.numeric), schema.cat_sizes, config.model_dump())
    trainer = L.Trainer(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=[callback],
    )
    trainer.fit(module, table_loader(schema.encode(df), 128, shuffle=True))
    return module


def test_train_loss_is_each_epochs_row_weighted_mean_and_callbacks_see_it():
    """Logged once per epoch (not per step), yet equal to the mean of every row's step loss and
    visible to callbacks' on_train_epoch_end (which the loss-curve history uses)."""

    class Record(L.Callback):
        def __init__(self):
            self.steps, self.epochs = [], []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.steps.append((trainer.current_epoch, float(outputs["loss"]), batch[0].shape[0]))

        def on_train_epoch_end(self, trainer, pl_module):
            self.epochs.append(float(trainer.callback_metrics["train_loss"]))

    record = Record()
    _two_epochs(
        linear_table(300), VAEConfig(latent_dim=2, hidden_dims=[8]), record
    )  # batches of 128, 128, 44
    for epoch, logged in enumerate(record.epochs):
        steps = [(loss, n) for e, loss, n in record.steps if e == epoch]
        assert [n for _, n in steps] == [128, 128, 44]
        expected = sum(loss * n for loss, n in steps) / 300
        assert logged == pytest.approx(expected, rel=1e-6)
    assert record.epochs[0] != record.epochs[1]


@pytest.mark.parametrize(("schedule", "last"), [("constant", 5e-3), ("cosine", 5e-5)])
def test_the_learning_rate_follows_the_schedule_to_the_last_step(schedule, last):
    """cosine: from model.learning_rate down to 1% of it at the budget's last step."""
    module, _ = train_small(linear_table(400), epochs=3, lr_schedule=schedule)
    assert module.trainer.global_step == 12  # 4 batches of 128 rows x 3 epochs
    assert module.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(last)


@pytest.mark.parametrize("k", [1, 4])
def test_a_trimmed_loss_leaves_the_worst_fitting_row_out_of_the_gradient(k):
    """model.trim_fraction: a row far off the data gets no gradient, and the loss is exactly the
    mean of the other rows' losses (21 rows, trim 0.05: the 0.95 quantile is the second worst)."""
    df = linear_table(21)
    df.loc[7, ["x1", "x2", "x3"]] = [40.0, -80.0, 30.0]  # off the x2 = 2 x1 line, and far out
    schema = infer_schema(linear_table(500))
    batch = TableBatch(*schema.encode(df).tensors())
    vae = TabularVAE(len(schema.numeric), schema.cat_sizes, VAEConfig(latent_dim=2, hidden_dims=[8]))
    grads = {}
    for trim in (0.0, 0.05):
        x_num = batch.x_num.clone().requires_grad_(True)
        torch.manual_seed(0)
        out = vae.loss(TableBatch(x_num, *batch[1:]), k=k, trim=trim)
        out.loss.backward()
        grads[trim] = x_num.grad.abs().sum(1)
        if trim:
            others = torch.arange(21) != 7
            with torch.no_grad():  # kl_weight 1: each row's loss is minus its bound
                assert out.loss.item() == pytest.approx(-out.bound[others].mean().item(), rel=1e-5)
    assert grads[0.0][7] > 0 and grads[0.05][7] == 0
    assert (grads[0.05][torch.arange(21) != 7] > 0).all()  # every other row still trains


def test_trimming_starts_after_the_kl_warm_up():
    """Every row trains during the warm-up (the first kl_warmup share of the steps); after it, the
    module trims `trim_fraction` of each batch."""
    seen = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(pl_module.trim_fraction())

    config = VAEConfig(latent_dim=2, hidden_dims=[8], kl_warmup=0.5, trim_fraction=0.1)
    module = _two_epochs(linear_table(512), config, Record())
    assert seen == [0.0] * 4 + [0.1] * 4  # 8 steps, warm-up over after 4
    module.eval()
    assert module.trim_fraction() == 0.0  # never outside training


def test_a_trim_fraction_of_half_or_more_is_refused():
    with pytest.raises(ValueError, match="trim_fraction"):
        VAEConfig(trim_fraction=0.5)
