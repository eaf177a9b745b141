"""The configuration search: one fit per grid point, the best on held-out cells kept."""

from __future__ import annotations

import mlflow
import pytest

from pipelines import search
from pipelines.config import load_settings
from pipelines.errors import ConfigError
from tests.conftest import small_params
from vae_models.schema import infer_schema

GRID = {"model.beta": [1.0, 0.25], "model.latent_dim": [2]}


@pytest.fixture
def frames(flights):
    train_df, val_df = flights.iloc[:1200], flights.iloc[1200:1600]
    return train_df, val_df, infer_schema(train_df, key="rownames")


def test_the_grid_is_every_combination():
    assert search.grid({"model.beta": [1.0, 0.5], "model.latent_dim": [2, 4, 8]}) == [
        {"model.beta": b, "model.latent_dim": d} for b in (1.0, 0.5) for d in (2, 4, 8)
    ]
    assert search.grid({}) == [{}]


def test_a_space_of_other_settings_is_refused_naming_the_key(tmp_path):
    for space, words in (
        ("{train.patience: [1, 2]}", "'train.patience' is not a model setting"),
        ("{model.beta: [-1.0]}", "model.beta=-1.0: Input should be greater than 0"),
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
    assert [sorted(t) for t in found.trials] == [sorted(["trial", *GRID, monitor, "run_id"])] * 2
    assert {t["model.beta"] for t in found.trials} == {1.0, 0.25}
    best = min(found.trials, key=lambda t: t[monitor])
    assert found.fit.best[monitor] == best[monitor]
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


def test_trials_are_mlflow_runs_nested_under_the_training_run(tmp_path, frames):
    settings = load_settings(small_params(tmp_path, train={"max_epochs": 1, "search": {"space": GRID}}))
    uri = settings.tracking_uri  # where each trial's validation curve goes
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("search")
    mlflow.set_tracking_uri(uri)
    parent = client.create_run(experiment).info.run_id
    with mlflow.start_run(run_id=parent):
        found = search.fit_best(*frames, settings, in_mlflow_run=True)
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent}'")
    assert len(children) == 2 and {r.info.run_id for r in children} == {t["run_id"] for t in found.trials}
    monitor = found.fit.monitor
    for run in children:
        trial = next(t for t in found.trials if t["run_id"] == run.info.run_id)
        assert run.info.status == "FINISHED"
        assert float(run.data.params["model.beta"]) == trial["model.beta"]
        assert run.data.metrics[f"search_{monitor}"] == pytest.approx(trial[monitor])
        assert client.get_metric_history(run.info.run_id, monitor)  # the trial's own curve
    assert client.get_run(parent).data.metrics == {}  # the parent's metrics are the caller's to log
