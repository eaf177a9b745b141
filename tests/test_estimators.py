"""Each estimator on a tiny case whose right answer is known in closed form.

The model is pinned: its encoder returns the prior (mu 0, var 1) and its decoder a constant
distribution, so every importance weight is equal and the answers are exact formulas."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from vae_models import VAEConfig, infer_schema, inference
from vae_models.bundle import ModelBundle, load_bundle, save_bundle
from vae_models.data import hold_out_cells, plan_budget, training_samples
from vae_models.schema import ColumnSpec, TableSchema
from vae_models.vae import TableBatch, TabularVAE


def _raw_logvar(logvar: float, low: float, high: float) -> float:
    """The pre-squash output that `bounded_logvar` maps to `logvar`."""
    p = (logvar - low) / (high - low)
    return math.log(p / (1 - p))


def pinned_vae(
    num_mu: list[float],
    num_logvar: list[float],
    cat_probs: list[list[float]] = (),
    **config,
) -> TabularVAE:
    """A VAE whose q(z|x) is N(0, I) and whose p(x|z) is the given constant distribution."""
    cfg = VAEConfig(latent_dim=2, hidden_dims=[4], linear_skip=False, encoder_hide_rate=0.0, **config)
    sizes = [len(p) + 1 for p in cat_probs]  # + the unknown slot
    vae = TabularVAE(len(num_mu), sizes, cfg)
    low = vae.num_logvar_low.tolist()
    enc, dec = vae.encoder[-1], vae.decoder[-1]
    with torch.no_grad():
        nn.init.zeros_(enc.weight)
        enc.bias.copy_(torch.tensor([0.0] * 2 + [_raw_logvar(0.0, cfg.logvar_min, cfg.logvar_max)] * 2))
        nn.init.zeros_(dec.weight)
        raw = [_raw_logvar(lv, lo, cfg.logvar_max) for lv, lo in zip(num_logvar, low, strict=True)]
        logits = [v for p in cat_probs for v in [*np.log(p).tolist(), -40.0]]
        dec.bias.copy_(torch.tensor([*num_mu, *raw, *logits]))
    return vae.eval()


def test_log1p_column_is_imputed_with_its_mean_in_original_units():
    c, s, mu, logvar = 1.0, 0.8, 0.5, math.log(0.5)
    spec = ColumnSpec(
        "amount", "numeric", "float64", transform="log1p", center=c, scale=s, lognormal_mean=True
    )
    schema = TableSchema([spec])
    vae = pinned_vae([mu], [logvar])
    table = schema.encode(pd.DataFrame({"amount": [np.nan, np.nan]}))
    filled = inference.impute(vae, table, k=8, schema=schema).to_frame(schema)["amount"]
    # log1p(x) ~ N(c + s mu, s^2 sigma^2)  =>  E[x] = exp(c + s mu + s^2 sigma^2 / 2) - 1
    expected = math.exp(c + s * mu + s**2 * math.exp(logvar) / 2) - 1
    np.testing.assert_allclose(filled, expected, rtol=1e-4)
    assert expected > math.expm1(c + s * mu) * 1.1  # the old estimate (expm1 of the mean log) is off


def test_imputed_means_stay_within_the_range_seen_in_training():
    spec = ColumnSpec(
        "pixel",
        "numeric",
        "float64",
        transform="log1p",
        center=0.5,
        scale=0.3,
        low=0.0,
        high=16.0,
        lognormal_mean=True,
    )
    schema = TableSchema([spec])
    vae = pinned_vae([2.0], [5.0])  # a wide log-normal: its mean, exp(0.5 + 0.6 + 6.7) - 1, is ~2,400
    table = schema.encode(pd.DataFrame({"pixel": [np.nan]}))
    filled = inference.impute(vae, table, k=8, schema=schema).to_frame(schema)["pixel"]
    assert filled.iloc[0] == pytest.approx(16.0)
    fitted = infer_schema(pd.DataFrame({"v": [3.0, -1.0, 7.5, np.nan]})).numeric[0]
    assert (fitted.low, fitted.high) == (-1.0, 7.5)


@pytest.mark.parametrize("zero_inflated", [False, True])
def test_each_log1p_column_keeps_the_estimate_that_imputes_its_held_out_cells_better(zero_inflated):
    c, s, mu, logvar = 1.0, 0.8, 0.5, math.log(1.5)
    spec = ColumnSpec("amount", "numeric", "float64", transform="log1p", center=c, scale=s)
    schema = TableSchema([spec, ColumnSpec("other", "numeric", "float64")])
    vae = pinned_vae([mu, 0.0], [logvar, 0.0])
    rng = np.random.default_rng(4)
    log_amount = c + s * (mu + math.exp(logvar / 2) * rng.normal(size=4000))  # the model's own law
    amount = np.expm1(log_amount)
    if zero_inflated:  # most cells are really 0: the log-normal's tail overshoots them
        amount = np.where(rng.random(4000) < 0.6, 0.0, amount)
    table = schema.encode(pd.DataFrame({"amount": amount, "other": rng.normal(size=4000)}))
    held = hold_out_cells(table, 0.3, seed=0)
    chosen = inference.choose_log1p_estimates(vae, held, schema, k=4)
    assert chosen.numeric[0].lognormal_mean is (not zero_inflated)
    assert chosen.numeric[1] == schema.numeric[1]  # other columns untouched
    assert schema.numeric[0].lognormal_mean is False  # the given schema is not changed


def test_numeric_two_level_column_is_imputed_with_its_probability():
    schema = TableSchema(
        [
            ColumnSpec("x", "numeric", "float64"),
            ColumnSpec("sex", "binary", "float64", categories=[0.0, 1.0]),
            ColumnSpec("colour", "categorical", "object", categories=["blue", "red"]),
        ]
    )
    vae = pinned_vae([0.0], [0.0], cat_probs=[[0.7, 0.3], [0.4, 0.6]])
    df = pd.DataFrame({"x": [0.1, 0.2], "sex": [np.nan, 1.0], "colour": [None, "blue"]})
    out = inference.impute(vae, schema.encode(df), k=4, schema=schema).to_frame(schema)
    assert out["sex"].tolist() == pytest.approx([0.3, 1.0], abs=1e-5)  # P(1), not the arg-max 0
    assert out["colour"].tolist() == ["red", "blue"]  # text levels: the likeliest one


def test_quantised_columns_get_a_variance_floor_at_their_step():
    rng = np.random.default_rng(0)
    df = pd.DataFrame(
        {
            "count": rng.integers(0, 10, 500).astype(float),
            "pixel": rng.integers(0, 17, 500) / 16.0,
            "reading": rng.normal(size=500),
        }
    )
    schema = infer_schema(df)
    steps = {c.name: c.step for c in schema.numeric}
    assert steps == pytest.approx({"count": 1.0, "pixel": 1 / 16, "reading": 0.0})
    floors = schema.logvar_floors()
    scale = {c.name: c.scale for c in schema.numeric}
    assert floors[0] == pytest.approx(math.log((1.0 / scale["count"]) ** 2 / 12))
    assert floors[1] == pytest.approx(math.log((1 / 16 / scale["pixel"]) ** 2 / 12))
    assert floors[2] is None
    cfg = VAEConfig(latent_dim=2, hidden_dims=[4], num_logvar_min=floors)
    vae = TabularVAE(3, [], cfg)
    with torch.no_grad():
        vae.decoder[-1].bias[3:6] = -1e4  # the network asks for no variance at all
        vae.decoder_skip.bias[3:6] = -1e4
    with torch.no_grad():
        logvar = vae.generative(torch.zeros(1, 2)).num_logvar[0]
    np.testing.assert_allclose(logvar[:2], floors[:2], rtol=1e-5)
    assert logvar[2] == pytest.approx(cfg.logvar_min)  # continuous: the global floor


def test_heldout_metrics_match_the_gaussian_and_categorical_formulas():
    mu, logvar = 0.3, math.log(0.25)
    vae = pinned_vae([mu], [logvar], cat_probs=[[0.2, 0.8]])
    x = torch.tensor([[1.0], [-0.5]])
    batch = TableBatch(x, torch.zeros(2, 1), torch.tensor([[0], [1]]), torch.zeros(2, 1))
    h_num, h_cat = torch.ones(2, 1), torch.ones(2, 1)
    sums = inference.heldout_metrics(vae, batch, h_num, h_cat, k=4)
    var = math.exp(logvar)
    gauss = sum(0.5 * (math.log(2 * math.pi * var) + (v - mu) ** 2 / var) for v in (1.0, -0.5))
    assert sums.nll.item() == pytest.approx(gauss - math.log(0.2) - math.log(0.8), rel=1e-4)
    assert sums.sq.item() == pytest.approx((1.0 - mu) ** 2 + (-0.5 - mu) ** 2, rel=1e-5)
    assert (sums.cells.item(), sums.n_num.item(), sums.n_cat.item()) == (4, 2, 2)
    assert sums.wrong.item() == 1  # the likeliest level (1) is wrong for the first row only
    assert sums.ess.item() == pytest.approx(2 * 4, rel=1e-4)  # equal weights: k per row


def test_effective_sample_size_is_reported_per_row():
    vae = pinned_vae([0.0], [0.0])
    table = TableSchema([ColumnSpec("x", "numeric", "float64")]).encode(pd.DataFrame({"x": [np.nan, 1.0]}))
    np.testing.assert_allclose(inference.impute(vae, table, k=16).ess, 16.0, rtol=1e-4)  # equal weights
    torch.manual_seed(0)
    trained_like = TabularVAE(1, [], VAEConfig(latent_dim=2, hidden_dims=[4])).eval()
    ess = inference.impute(trained_like, table, k=16).ess
    assert ((ess >= 1.0 - 1e-4) & (ess <= 16.0 + 1e-4)).all()


def test_hold_out_cells_hides_a_share_and_every_row_keeps_a_cell():
    rng = np.random.default_rng(1)
    df = pd.DataFrame(
        {"a": rng.normal(size=4000), "b": rng.normal(size=4000), "c": rng.choice(["x", "y"], 4000)}
    )
    df.loc[:1999, ["a", "b"]] = np.nan  # half the rows have a single observed cell
    table = infer_schema(df).encode(df)
    held = hold_out_cells(table, 0.2, seed=3)
    observed = table.m_num.sum() + table.m_cat.sum()
    assert 0.12 * observed < held.cells < 0.2 * observed
    assert ((held.visible.m_num.sum(1) + held.visible.m_cat.sum(1)) >= 1).all()
    np.testing.assert_array_equal(held.visible.m_num + held.h_num, table.m_num)  # disjoint, complete
    np.testing.assert_array_equal(held.visible.m_cat + held.h_cat, table.m_cat)
    assert held.h_num[:2000].sum() == 0  # a single-cell row is never emptied
    again = hold_out_cells(table, 0.2, seed=3)
    np.testing.assert_array_equal(again.h_num, held.h_num)  # seeded


@pytest.mark.parametrize(
    ("rows", "batch", "steps", "per_epoch"),
    [
        (569, 32, 4000, 18),  # small: small batches, the step floor
        (5_000, 128, 4000, 40),
        (1_000_000, 1024, 4000, 977),
        (10_000_000, 1024, 9766, 9766),  # large: one pass, no more
        (10, 10, 4000, 1),
    ],
)
def test_step_budget_follows_the_documented_rule(rows, batch, steps, per_epoch):
    budget = plan_budget(rows)
    assert (budget.batch_size, budget.max_steps, budget.steps_per_epoch) == (batch, steps, per_epoch)
    validations = budget.max_steps / budget.val_every
    assert 4 <= validations <= 80
    args = budget.trainer_args()
    if budget.val_every < per_epoch:
        assert args["val_check_interval"] == budget.val_every
    else:  # on whole epochs
        assert args["check_val_every_n_epoch"] * per_epoch == budget.val_every


def test_step_budget_settings_override_the_rule():
    assert plan_budget(569, max_epochs=2).max_steps == 2 * 18
    fixed = plan_budget(569, batch_size=100, max_steps=77)
    assert (fixed.batch_size, fixed.max_steps, fixed.steps_per_epoch) == (100, 77, 6)


@pytest.mark.parametrize(
    ("rows", "architecture", "k"),
    [
        (569, "mlp", 8),
        (20_000, "mlp", 8),
        (1_000_000, "mlp", 4),
        (8_000_000, "mlp", 2),
        (16_000_000, "mlp", 1),
        (569, "conv", 1),
    ],
)
def test_auto_training_samples_follow_the_draw_budget(rows, architecture, k):
    """auto: the most K <= 8 with steps x batch x K within 2^24 draws; conv keeps the ELBO."""
    budget = plan_budget(rows)
    assert training_samples(budget, "auto", architecture) == k
    assert training_samples(budget, 3, architecture) == 3  # a K the user sets is used as it is


@pytest.mark.parametrize(("rows", "k"), [(569, 8), (20_000, 8), (100_000, 4), (1_000_000, 4)])
def test_a_longer_budget_keeps_the_tables_k(rows, k):
    """The impute preset's 12,000-step floor (and a user's longer max_steps) keep the K the
    table's default budget gets: K is sized by the table, not by how long the fit trains."""
    assert training_samples(plan_budget(rows, min_steps=12_000), "auto") == k
    assert training_samples(plan_budget(rows, max_steps=50_000), "auto") == k
    assert training_samples(plan_budget(rows, max_steps=10), "auto") == k


def test_a_network_built_without_a_budget_trains_the_elbo():
    assert VAEConfig().n_importance == 1
    vae = TabularVAE(2, [], VAEConfig(latent_dim=2, hidden_dims=[4], n_importance="auto"))
    assert vae.train_k == 1
    assert TabularVAE(2, [], VAEConfig(latent_dim=2, hidden_dims=[4], n_importance=5)).train_k == 5
    with pytest.raises(ValueError):
        VAEConfig(n_importance=0)


def test_a_bundle_written_before_the_skip_path_loads_unchanged(tmp_path):
    schema = TableSchema([ColumnSpec("x", "numeric", "float64"), ColumnSpec("y", "numeric", "float64")])
    old = TabularVAE(2, [], VAEConfig(latent_dim=2, hidden_dims=[4], linear_skip=False)).eval()
    path = save_bundle(ModelBundle(vae=old, schema=schema), tmp_path / "model")
    meta = json.loads((path / "model.json").read_text())
    for key in ("linear_skip", "kl_warmup", "num_logvar_min"):
        meta["config"].pop(key)
    meta["config"]["kl_warmup_epochs"] = 5  # as such bundles were written
    (path / "model.json").write_text(json.dumps(meta))
    loaded = load_bundle(path)
    assert loaded.vae.decoder_skip is None
    table = schema.encode(pd.DataFrame({"x": [0.5], "y": [-1.0]}))
    with torch.no_grad():
        a = old.inference(TableBatch(*table.tensors())).mu
        b = loaded.vae.inference(TableBatch(*table.tensors())).mu
    torch.testing.assert_close(a, b)


def test_the_skip_path_is_on_by_default_for_tables_only():
    assert TabularVAE(3, [2], VAEConfig()).decoder_skip is not None
    conv = TabularVAE(16, [], VAEConfig(architecture="conv", image_shape=(4, 4), conv_channels=[4]))
    assert conv.decoder_skip is None


def test_eval_heldout_cells_are_scored_against_the_mean_baseline():
    from pipelines.config import load_settings
    from pipelines.training import heldout_cell_metrics
    from tests.conftest import REPO

    settings = load_settings(REPO / "params.yaml", ["score.importance_samples=8"])
    rng = np.random.default_rng(2)
    schema = TableSchema([ColumnSpec("a", "numeric", "float64"), ColumnSpec("b", "numeric", "float64")])
    table = schema.encode(pd.DataFrame({"a": rng.normal(size=3000), "b": rng.normal(size=3000)}))
    logvar = math.log(2.0)
    metrics = heldout_cell_metrics(pinned_vae([0.0, 0.0], [logvar, logvar]), table, settings)
    # the pinned model predicts the column mean: its error is the baseline's, exactly
    assert metrics["eval_heldout_rmse_std"] == pytest.approx(metrics["eval_heldout_rmse_mean_baseline"])
    assert metrics["eval_heldout_rmse_mean_baseline"] == pytest.approx(1.0, abs=0.05)
    ms = metrics["eval_heldout_rmse_std"] ** 2  # N(0, 2) per cell: 0.5 (log 2 pi 2 + x^2 / 2)
    assert metrics["eval_heldout_nll_per_cell"] == pytest.approx(0.5 * (math.log(4 * math.pi) + ms / 2))
    assert metrics["eval_impute_ess_mean"] == pytest.approx(8.0, rel=1e-4)
    assert "eval_heldout_error" not in metrics  # no categorical column
