"""Choose the VAE configuration on the held-out cells: one fit per point of `train.search.space`.

Optuna's `GridSampler` walks the grid (every combination once, in a seeded order) within
`train.search.max_minutes`; each trial is a `training.fit` with those `model.*` values, scored
by the value of its kept weights on the fit's monitor (held-out cells' NLL by default: the
imputation target), and, inside an MLflow run, an MLflow run nested under it (Optuna's
`MLflowCallback`): the trial's values as params, its validation curve and its score. The best
trial's fit is the result; the others are dropped.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from pipelines import training
from vae_models.config import VAEConfig
from vae_models.schema import TableSchema

if TYPE_CHECKING:
    from pipelines.config import Settings, StageSettings

log = logging.getLogger(__name__)


@dataclass
class SearchResult:
    fit: training.FitResult
    settings: Settings | StageSettings  # the settings with the winner's model.* values
    trials: list[dict[str, Any]]  # each trial's values, score and MLflow run id, in order run


def grid(space: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the space's values."""
    keys = list(space)
    return [dict(zip(keys, values, strict=True)) for values in itertools.product(*space.values())]


def with_model(settings: Settings | StageSettings, values: dict[str, Any]) -> Settings | StageSettings:
    """`settings` with `model.FIELD` values replaced (validated as a model config)."""
    fields = {key.removeprefix("model."): value for key, value in values.items()}
    model = VAEConfig.model_validate({**settings.model.model_dump(), **fields})
    return settings.model_copy(update={"model": model})


@contextmanager
def _experiment(experiment_id: str | None) -> Iterator[None]:
    """MLflow's nested runs go to the active experiment, not their parent's: point it there."""
    previous = os.environ.get("MLFLOW_EXPERIMENT_ID")
    if experiment_id is not None:
        os.environ["MLFLOW_EXPERIMENT_ID"] = experiment_id
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
        else:
            os.environ["MLFLOW_EXPERIMENT_ID"] = previous


def fit_best(
    train_df: pd.DataFrame,
    val_df: pd.DataFrame,
    schema: TableSchema,
    settings: Settings | StageSettings,
    *,
    checkpoint_dir: Path | None = None,
    in_mlflow_run: bool = False,
) -> SearchResult:
    """Fit each configuration of `train.search.space` (one fit, without a search, when it has
    a single point) and keep the best on the held-out cells. With `in_mlflow_run` (an active
    MLflow run), each trial is a nested run. A trial's checkpoints are under
    `checkpoint_dir/trial-<hash of its values>` (default: `train.checkpoint_dir`), so a
    retried search resumes each trial and no trial resumes another's."""
    points = grid(settings.train.search.space)
    if len(points) <= 1:
        chosen = with_model(settings, points[0]) if points[0] else settings
        run = _active_run(chosen) if in_mlflow_run else None
        result = training.fit(train_df, val_df, schema, chosen, mlflow_run=run, checkpoint_dir=checkpoint_dir)
        return SearchResult(result, chosen, [])

    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base = checkpoint_dir or settings.path(settings.train.checkpoint_dir)
    fits: dict[int, tuple[training.FitResult, Settings | StageSettings]] = {}
    trials: list[dict[str, Any]] = []

    def objective(trial: optuna.Trial) -> float:
        values = {
            key: trial.suggest_categorical(key, choices)
            for key, choices in settings.train.search.space.items()
        }
        chosen = with_model(settings, values)
        run = _active_run(chosen) if in_mlflow_run else None
        if run is not None:
            import mlflow

            mlflow.set_tags(
                {"mlflow.runName": f"trial-{trial.number}", "vaeflow.search_trial": str(trial.number)}
            )
        key = hashlib.sha1(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:12]
        result = training.fit(
            train_df,
            val_df,
            schema,
            chosen,
            mlflow_run=run,
            checkpoint_dir=base / f"trial-{key}",
        )
        fits[trial.number] = (result, chosen)
        score = result.best.get(result.monitor, math.inf)
        trials.append(
            {"trial": trial.number, **values, result.monitor: score, "run_id": run.run_id if run else None}
        )
        log.info("search trial %d %s: %s %.5g", trial.number, values, result.monitor, score)
        return score if math.isfinite(score) else math.inf

    space = settings.train.search.space
    study = optuna.create_study(
        direction="minimize", sampler=optuna.samplers.GridSampler(space, seed=settings.train.seed)
    )
    cfg = settings.train.search
    timeout = cfg.max_minutes * 60 if cfg.max_minutes else None
    if in_mlflow_run:
        import mlflow
        from optuna_integration.mlflow import MLflowCallback

        monitor = settings.train.monitor
        callback = MLflowCallback(
            metric_name=f"search_{monitor}", create_experiment=False, mlflow_kwargs={"nested": True}
        )
        with _experiment(mlflow.active_run().info.experiment_id), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
            study.optimize(
                callback.track_in_mlflow()(objective),
                n_trials=len(points),
                timeout=timeout,
                callbacks=[callback],
            )
    else:
        study.optimize(objective, n_trials=len(points), timeout=timeout)
    best = study.best_trial.number
    result, chosen = fits[best]
    log.info("search: trial %d of %d kept %s", best, len(fits), study.best_trial.params)
    return SearchResult(result, chosen, trials)


def _active_run(settings: Settings | StageSettings) -> training.MlflowRun:
    import mlflow

    return training.MlflowRun(settings.tracking_uri, mlflow.active_run().info.run_id)
