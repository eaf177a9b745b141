"""The configuration search: one fit per grid point, the best on held-out cells kept."""

from __future__ import annotations

import math

import mlflow
import pytest

from pipelines import search
from pipelines.config import grid_points, load_settings
from pipelines.errors import ConfigError
from tests.conftest import small_params
from vae_models.schema import infer_schema

GRID = {"model.beta": [1.0, 0.25], "model.latent_dim": [2]}


@pytest.fixture
def frames(flights):
    train_df, val_df = flights.iloc[:1200], flights.iloc[1200:1600]
    return train_df, val_df, infer_schema(train_df, key="rownames")


def test_the_grid_is_every_combination():
    assert grid_points({"model.beta": [1.0, 0.5], "model.latent_dim": [2, 4, 8]}) == [
        {"model.beta": b, "model.latent_dim": d} for b in (1.0, 0.5) for d in (2, 4, 8)
    ]
    assert grid_points({}) == [{}]


def test_a_space_of_other_settings_is_refused_naming_the_key(tmp_path):
    for space, words in (
        ("{train.patience: [1, 2]}", "'train.patience' is not a model setting"),
        ("{model.beta: [-1.0]}", "model.beta=-1.0 with this model section: Input should be greater than 0"),
        ("{model.beta: [1.0, 1.0]}", "'model.beta' lists a value twice"),
        ("{model.architecture: [mlp, conv]}", "model.architecture='conv' with this model section"),
        ("{model.latent_dim: []}", "'model.latent_dim' has no values to try"),
        ("{model.hidden_dims: [[64, 64]]}", "model.hidden_dims=[64, 64]: a grid value is a number"),
    ):
        with pytest.raises(ConfigError, match="train.search.space") as err:
            load_settings(small_params(tmp_path), [f"train.search.space={space}"])
        assert words in str(err.value)


def test_the_kept_fit_is_the_trial_with_the_best_held_out_score(tmp_path, frames):
    settings = load_settings(small_params(tmp_path, train={"max_epochs": 2, "search": {"space": GRID}}))
    found = search.fit_best(*frames, settings, checkpoint_dir=tmp_path / "ckpt")
    monitor = found.fit.monitor
    assert [sorted(t) for t in found.trials] == [sorted(["trial", *GRID, "scored_by", "score", "run_id"])] * 2
    assert {t["model.beta"] for t in found.trials} == {1.0, 0.25}
    # picked by the held-out cells' squared error (train.search.metric), at the weights each
    # fit kept by its monitor (their NLL)
    assert monitor == "val_heldout_nll"
    assert {t["scored_by"] for t in found.trials} == {"val_heldout_mse"}
    best = min(found.trials, key=lambda t: t["score"])
    assert found.fit.best["val_heldout_mse"] == best["score"]
    # the kept weights are that trial's model, and the returned settings say so
    assert found.fit.module.vae.config.beta == best["model.beta"] == found.settings.model.beta
    assert found.fit.module.vae.config.latent_dim == 2 == found.settings.model.latent_dim
    assert settings.model.latent_dim == 4  # the caller's settings are not changed
    # each trial checkpoints in a folder of its own (a retried search resumes each trial)
    assert len(list((tmp_path / "ckpt").glob("trial-*/last.ckpt"))) == 2


def test_no_new_trial_starts_after_max_minutes(tmp_path, frames):
    settings = load_settings(
        small_params(tmp_path, train={"max_epochs": 1, "search": {"space": GRID, "max_minutes": 1e-6}})
    )
    found = search.fit_best(*frames, settings)
    assert len(found.trials) == 1


def test_an_empty_space_is_one_plain_fit(tmp_path, frames):
    settings = load_settings(small_params(tmp_path, train={"max_epochs": 1}))
    found = search.fit_best(*frames, settings)
    assert found.trials == [] and found.settings is settings
    config = found.fit.module.vae.config
    assert (config.latent_dim, config.beta) == (settings.model.latent_dim, settings.model.beta) == (4, 1.0)


def test_trials_are_mlflow_runs_nested_under_the_training_run(tmp_path, frames, monkeypatch):
    # a user's MLFLOW_EXPERIMENT_NAME must not pull the trials into another experiment
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "somewhere-else")
    settings = load_settings(small_params(tmp_path, train={"max_epochs": 1, "search": {"space": GRID}}))
    uri = settings.tracking_uri  # where each trial's validation curve goes
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("search")
    mlflow.set_tracking_uri(uri)
    parent = client.create_run(experiment).info.run_id
    with mlflow.start_run(run_id=parent):
        found = search.fit_best(*frames, settings, in_mlflow_run=True, run_tags={"vaeflow.owner": "test"})
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent}'")
    assert len(children) == 2 and {r.info.run_id for r in children} == {t["run_id"] for t in found.trials}
    monitor = found.fit.monitor
    for run in children:
        trial = next(t for t in found.trials if t["run_id"] == run.info.run_id)
        assert run.info.status == "FINISHED" and run.info.run_name == f"trial-{trial['trial']}"
        assert float(run.data.params["model.beta"]) == trial["model.beta"]
        assert run.data.metrics["search_score"] == pytest.approx(trial["score"])
        assert run.data.tags["vaeflow.owner"] == "test"  # the caller's tags (process tags in training)
        assert client.get_metric_history(run.info.run_id, monitor)  # the trial's own curve
    assert client.get_run(parent).data.metrics == {}  # the parent's metrics are the caller's to log


def test_a_failing_trial_is_skipped_and_a_search_where_all_fail_raises_the_error(
    tmp_path, frames, monkeypatch
):
    from pipelines import training

    real_fit = training.fit

    def fit(train_df, val_df, schema, settings, **kwargs):
        if settings.model.beta == 0.25:
            raise FloatingPointError("loss is nan")
        return real_fit(train_df, val_df, schema, settings, **kwargs)

    monkeypatch.setattr(training, "fit", fit)
    settings = load_settings(small_params(tmp_path, train={"max_epochs": 1, "search": {"space": GRID}}))
    found = search.fit_best(*frames, settings)
    assert found.settings.model.beta == 1.0
    assert [t.get("error") for t in sorted(found.trials, key=lambda t: t["model.beta"])] == [
        "loss is nan",
        None,
    ]

    everything_fails = {"model.beta": [0.25], "model.latent_dim": [2, 3]}
    settings = load_settings(small_params(tmp_path, train={"search": {"space": everything_fails}}))
    with pytest.raises(FloatingPointError, match="loss is nan"):
        search.fit_best(*frames, settings)


def test_trials_are_compared_by_the_unweighted_bound_when_the_monitor_is_val_loss(tmp_path, frames):
    # val_loss weights the KL by beta: compared as is, beta=0.25 would always look better
    settings = load_settings(
        small_params(
            tmp_path,
            train={"max_epochs": 1, "monitor": "val_loss", "search": {"space": GRID, "metric": "monitor"}},
        )
    )
    found = search.fit_best(*frames, settings)
    assert {t["scored_by"] for t in found.trials} == {"-val_bound"}
    assert all(math.isfinite(t["score"]) for t in found.trials)
    assert found.fit.best["val_bound"] == -min(t["score"] for t in found.trials)


def test_a_table_without_numeric_columns_is_compared_by_the_monitor(tmp_path, flights):
    cols = ["rownames", "carrier", "origin"]
    train_df, val_df = flights.iloc[:1200][cols], flights.iloc[1200:1600][cols]
    schema = infer_schema(train_df, key="rownames")
    assert not schema.numeric
    settings = load_settings(small_params(tmp_path, train={"max_epochs": 1, "search": {"space": GRID}}))
    found = search.fit_best(train_df, val_df, schema, settings)
    assert {t["scored_by"] for t in found.trials} == {"val_heldout_nll"}
    assert found.fit.best["val_heldout_nll"] == min(t["score"] for t in found.trials)
