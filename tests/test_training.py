"""Training: a fit interrupted mid-way resumes from its last checkpoint (what a task retry does)."""

import lightning as L
import mlflow
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from pipelines import training
from pipelines.config import load_settings
from tests.conftest import small_params
from tests.helpers import linear_table
from vae_models import VAEConfig, infer_schema
from vae_models.data import hold_out_cells, table_loader
from vae_models.module import VAEModule


class EpochsRun(Callback):
    def __init__(self):
        self.epochs: list[int] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.epochs.append(trainer.current_epoch)


class CrashAtEpoch(Callback):
    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("worker lost")


@pytest.mark.parametrize("warmup", [0.1, 0.75])
def test_interrupted_fit_resumes_from_last_checkpoint(tmp_path, flights, warmup):
    """A crash after two epochs resumes at the third, also when it falls within the KL warm-up
    (0.75: the first three of four epochs), whose validations no checkpoint is selected from."""
    settings = load_settings(
        small_params(tmp_path, train={"max_epochs": 4, "patience": 10}, model={"kl_warmup": warmup})
    )
    train_df, val_df = flights.iloc[:2400], flights.iloc[2400:]
    schema = infer_schema(train_df, key="rownames")
    ckpt = tmp_path / "ckpt"
    with pytest.raises(RuntimeError, match="worker lost"):
        training.fit(train_df, val_df, schema, settings, checkpoint_dir=ckpt, callbacks=[CrashAtEpoch(2)])
    assert (ckpt / "last.ckpt").exists()
    ran = EpochsRun()
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/m.db")
    retry_run = client.create_run(client.create_experiment("retry")).info.run_id  # a retried task's new run
    run = training.MlflowRun(f"sqlite:///{tmp_path}/m.db", retry_run)
    resumed = training.fit(
        train_df, val_df, schema, settings, checkpoint_dir=ckpt, callbacks=[ran], mlflow_run=run
    )
    assert ran.epochs == [2, 3]  # epochs 0-1 were not redone
    assert [int(r["epoch"]) for r in resumed.history] == [0, 1, 2, 3]  # the loss curve is whole
    # ... and so is the retry's run: the validations before the crash are in it too
    assert sorted(m.step for m in client.get_metric_history(retry_run, "val_loss")) == [0, 1, 2, 3]
    assert resumed.best["step"] in {r["step"] for r in resumed.history}
    # the reported row is the kept checkpoint's, from after the warm-up (steps 10, 20, 30, 40)
    assert resumed.best["step"] == torch.load(resumed.best_checkpoint, weights_only=True)["global_step"]
    assert resumed.best["step"] >= warmup * resumed.budget.max_steps
    fresh = training.fit(train_df, val_df, schema, settings, checkpoint_dir=tmp_path / "other")
    assert [int(r["epoch"]) for r in fresh.history] == [0, 1, 2, 3]


def test_a_last_checkpoint_from_an_older_release_is_resumed_and_overwritten(tmp_path, flights):
    """A last.ckpt whose callback states the fit cannot restore (an older release's callbacks had
    other state keys) still resumes, and the next validations overwrite it: no last-v1.ckpt or
    best-v1.ckpt beside it, so a later retry does not resume from the stale file."""
    settings = load_settings(small_params(tmp_path, train={"max_epochs": 4, "patience": 10}))
    train_df, val_df = flights.iloc[:2400], flights.iloc[2400:]
    schema = infer_schema(train_df, key="rownames")
    ckpt = tmp_path / "ckpt"
    with pytest.raises(RuntimeError, match="worker lost"):
        training.fit(train_df, val_df, schema, settings, checkpoint_dir=ckpt, callbacks=[CrashAtEpoch(2)])
    old = torch.load(ckpt / "last.ckpt", weights_only=False)
    old["callbacks"] = {}  # states under keys today's callbacks do not have
    torch.save(old, ckpt / "last.ckpt")
    ran = EpochsRun()
    resumed = training.fit(train_df, val_df, schema, settings, checkpoint_dir=ckpt, callbacks=[ran])
    assert ran.epochs == [2, 3]
    assert sorted(p.name for p in ckpt.glob("*.ckpt")) == ["best.ckpt", "last.ckpt"]
    assert torch.load(ckpt / "last.ckpt", weights_only=True)["global_step"] == resumed.budget.max_steps


def test_an_auto_importance_weighted_fit_trains_and_keeps_the_k_its_budget_sets(tmp_path, flights):
    """model.n_importance=auto: 2 epochs of 10 batches of 256 rows are far within the draw
    budget, so the fit trains the MIWAE bound at the cap (8), and the saved model keeps that K."""
    from vae_models.bundle import ModelBundle, load_bundle, save_bundle

    settings = load_settings(small_params(tmp_path, model={"n_importance": "auto"}))
    train_df, val_df = flights.iloc[:2400], flights.iloc[2400:]
    schema = infer_schema(train_df, key="rownames")
    result = training.fit(train_df, val_df, schema, settings, checkpoint_dir=tmp_path / "ckpt")
    assert result.module.vae.config.n_importance == 8 and result.module.vae.train_k == 8
    path = save_bundle(ModelBundle(vae=result.module.vae, schema=result.schema), tmp_path / "model")
    assert load_bundle(path).vae.train_k == 8
    assert all(r["val_loss"] == r["val_loss"] for r in result.history)  # finite, not NaN


def test_ddp_on_two_cpu_processes_trains_and_logs_once(tmp_path, flights):
    """Lightning DDP (ddp_spawn, 2 CPU processes, gloo): one model, metrics logged by rank 0 only."""

    settings = load_settings(
        small_params(
            tmp_path, train={"max_epochs": 2, "strategy": "ddp_spawn", "devices": 2, "accelerator": "cpu"}
        )
    )
    train_df, val_df = flights.iloc[:2400], flights.iloc[2400:]
    schema = infer_schema(train_df, key="rownames")
    uri = f"sqlite:///{tmp_path}/m.db"
    client = mlflow.MlflowClient(uri)
    # the run is created before the workers spawn, as tracking.train_and_register does
    run_id = client.create_run(client.create_experiment("ddp")).info.run_id
    run = training.MlflowRun(uri, run_id)
    result = training.fit(
        train_df, val_df, schema, settings, mlflow_run=run, checkpoint_dir=tmp_path / "ckpt"
    )
    assert result.epochs == 2 and [int(r["epoch"]) for r in result.history] == [0, 1]
    assert result.best_checkpoint and result.module.vae.encoder is not None
    assert len(client.get_metric_history(run_id, "val_loss")) == 2  # not 4: rank 1 stays quiet
    assert len(client.search_runs([client.get_experiment_by_name("ddp").experiment_id])) == 1


def test_the_impute_presets_monitor_falls_back_where_no_numeric_cell_is_held_out(tmp_path, flights, caplog):
    """train.monitor=val_heldout_mse (the impute preset's) scores numeric cells only: a table of
    categorical columns trains on the held-out NLL instead, and says so, rather than failing in
    early stopping; so does a table whose validated held-out rows hold no numeric cell."""
    settings = load_settings(
        small_params(tmp_path, train={"max_epochs": 2}), ["train.preset=impute", "train.min_steps=20"]
    )
    assert settings.train.monitor == "val_heldout_mse"
    cats = flights[["rownames", "carrier", "origin"]]
    schema = infer_schema(cats.iloc[:2400], key="rownames")
    assert not schema.numeric and len(schema.categorical) == 2
    with caplog.at_level("INFO", logger="pipelines.training"):
        result = training.fit(
            cats.iloc[:2400], cats.iloc[2400:], schema, settings, checkpoint_dir=tmp_path / "c"
        )
    assert result.monitor == "val_heldout_nll" and result.best["val_heldout_nll"] > 0
    assert "no numeric cell is among the held-out cells: monitoring val_heldout_nll" in caplog.text
    assert result.best_checkpoint  # early stopping and the checkpoint both ran on it
    numeric = infer_schema(flights.iloc[:2400], key="rownames")
    held = hold_out_cells(numeric.encode(flights.iloc[:2400]), 0.1)
    assert training.monitor_for("val_heldout_mse", held, held.sample_rows(20000)) == "val_heldout_mse"
    # a numeric cell held out on a row that validation does not sample is no numeric cell to score
    held.h_num[:] = 0.0
    held.h_num[held.sample_rows(20000)[-1], 0] = 1.0
    assert training.monitor_for("val_heldout_mse", held, held.sample_rows(20000)) == "val_heldout_mse"
    assert training.monitor_for("val_heldout_mse", held, held.sample_rows(5)) == "val_heldout_nll"


class _RisingAfterStart(VAEModule):
    """Logs val_heldout_nll = the global step: the first validations, inside the KL warm-up,
    score best, which an unguarded selection would keep (and then stop early)."""

    def validation_step(self, batch, batch_idx):
        self.log("val_heldout_nll", float(self.global_step), on_epoch=True, batch_size=1)


def test_model_selection_passes_over_the_kl_warm_up(tmp_path):
    """The kept checkpoint is the best validation after the KL warm-up (a warm-up validation is
    never kept, however well it scores) and early stopping's patience counts from there."""
    df = linear_table(256)
    schema = infer_schema(df)
    config = VAEConfig(latent_dim=2, hidden_dims=[8], kl_warmup=0.5)
    module = _RisingAfterStart(len(schema.numeric), schema.cat_sizes, config.model_dump())
    checkpoint = training.SelectAfterWarmUp(
        dirpath=tmp_path,
        filename="best",
        monitor="val_heldout_nll",
        save_last=True,
        save_on_train_epoch_end=False,
    )
    stop = training.StopAfterWarmUp(monitor="val_heldout_nll", patience=2, check_on_train_epoch_end=False)
    trainer = L.Trainer(
        max_steps=20,  # 8 batches of 32 per epoch; the warm-up is steps 0-9
        val_check_interval=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
        callbacks=[checkpoint, stop],
    )
    loader = table_loader(schema.encode(df), 32, shuffle=True)
    trainer.fit(module, loader, val_dataloaders=table_loader(schema.encode(df.head(32)), 32, shuffle=False))
    assert module.warm_up_steps() == 10
    kept = torch.load(checkpoint.best_model_path, weights_only=True)
    assert kept["global_step"] == 10  # the first validation after the warm-up, not step 1
    assert trainer.global_step == 12  # two validations without improvement after it: stopped
    history = [{"step": float(s), "val_heldout_nll": float(s)} for s in range(1, 13)]
    assert training.best_row(history, "val_heldout_nll", 10)["step"] == 10
