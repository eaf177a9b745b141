"""Choose the VAE configuration on the held-out cells: one fit per point of `train.search.space`.

Optuna's `GridSampler` walks the grid (every combination once, in a seeded order; no new trial
after `train.search.max_minutes`); each trial is a `training.fit` with those `model.*` values,
scored at its kept weights by `train.search.metric` (default: the held-out cells' squared
error, the imputation target) and, inside an MLflow run, is an MLflow run nested under it (in its
experiment): the trial's values as params, its validation curve and `search_score`. The best
trial's fit is the result; the others are dropped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from pipelines import training
from pipelines.config import grid_points, model_with
from pipelines.errors import TransientError, VaeflowError
from vae_models.schema import TableSchema

if TYPE_CHECKING:
    from pipelines.config import Settings, StageSettings

log = logging.getLogger(__name__)

TRANSIENT = (TransientError, ConnectionError, TimeoutError)  # retried by the stage, not skipped


@dataclass
class SearchResult:
    fit: training.FitResult
    settings: Settings | StageSettings  # the settings with the winner's model.* values
    trials: list[dict[str, Any]]  # each trial's values, score and MLflow run id, in order run


def with_model(settings: Settings | StageSettings, values: dict[str, Any]) -> Settings | StageSettings:
    """`settings` with a grid point's `model.FIELD` values."""
    return settings.model_copy(update={"model": model_with(settings.model, values)})


def fit_best(
    train_df: pd.DataFrame,
    val_df: pd.DataFrame,
    schema: TableSchema,
    settings: Settings | StageSettings,
    *,
    checkpoint_dir: Path | None = None,
    in_mlflow_run: bool = False,
    run_tags: dict[str, str] | None = None,
) -> SearchResult:
    """Fit each configuration of `train.search.space` (one fit, without a search, when it has
    a single point) and keep the best on the held-out cells. With `in_mlflow_run` (an active
    MLflow run), each trial is a nested run tagged with `run_tags`. A trial's checkpoints are
    under `checkpoint_dir/trial-<number>-<hash of its values>` (default: `train.checkpoint_dir`;
    the grid's order is seeded), so a retried search resumes each trial and no trial resumes
    another's. A trial that fails with anything but a transient error is logged and skipped;
    when none gives a finite score, the first error is raised."""
    cfg = settings.train.search
    space = cfg.space
    points = grid_points(space)
    if len(points) <= 1:
        chosen = with_model(settings, points[0]) if points[0] else settings
        run = _active_run(chosen) if in_mlflow_run else None
        result = training.fit(train_df, val_df, schema, chosen, mlflow_run=run, checkpoint_dir=checkpoint_dir)
        return SearchResult(result, chosen, [])

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base = checkpoint_dir or settings.path(settings.train.checkpoint_dir)
    parent = _parent_run() if in_mlflow_run else None
    fits: dict[int, tuple[training.FitResult, Settings | StageSettings]] = {}
    trials: list[dict[str, Any]] = []
    errors: list[Exception] = []

    def objective(trial: optuna.Trial) -> float:
        values = {key: trial.suggest_categorical(key, choices) for key, choices in space.items()}
        chosen = with_model(settings, values)
        folder = base / f"trial-{trial.number}-{_digest(values)}"
        with _trial_run(parent, trial.number, values, run_tags) as run_id:
            record: dict[str, Any] = {"trial": trial.number, **values, "run_id": run_id}
            trials.append(record)
            run = training.MlflowRun(chosen.tracking_uri, run_id) if run_id else None
            try:
                result = training.fit(train_df, val_df, schema, chosen, mlflow_run=run, checkpoint_dir=folder)
            except TRANSIENT:
                raise
            except Exception as exc:  # this configuration failed (e.g. diverged): try the others
                log.warning("search trial %d %s failed: %s", trial.number, values, exc)
                record["error"] = str(exc)
                errors.append(exc)
                _end_failed(run_id)
                return math.inf
            scored_by, score = trial_score(result, cfg.metric)
            record.update(scored_by=scored_by, score=score)
            if run_id:
                import mlflow

                mlflow.log_metric("search_score", score)
                mlflow.set_tag("vaeflow.search_scored_by", scored_by)
        fits[trial.number] = (result, chosen)
        log.info("search trial %d %s: %s %.5g", trial.number, values, scored_by, score)
        return score

    study = optuna.create_study(
        direction="minimize", sampler=optuna.samplers.GridSampler(space, seed=settings.train.seed)
    )
    study.optimize(objective, n_trials=len(points), timeout=cfg.max_minutes * 60 if cfg.max_minutes else None)
    if not math.isfinite(study.best_value):
        if errors:
            raise errors[0]
        raise VaeflowError("no configuration of train.search.space gave a finite validation score")
    best = study.best_trial.number
    result, chosen = fits[best]
    log.info("search: trial %d of %d kept %s", best, len(trials), study.best_trial.params)
    return SearchResult(result, chosen, trials)


def trial_score(result: training.FitResult, metric: str = "monitor") -> tuple[str, float]:
    """(metric, value) a trial is compared by, at its kept weights: `metric` (e.g.
    val_heldout_mse), or, when it is "monitor" or the fit has no such value (no numeric
    column), the fit's monitor; for `val_loss`, which weights the KL by beta and would favour
    a small beta, the unweighted bound."""
    value = result.best.get(metric, math.nan) if metric != "monitor" else math.nan
    if math.isfinite(value):
        return metric, value
    if result.monitor == "val_loss":
        name, value = "-val_bound", -result.best.get("val_bound", math.nan)
    else:
        name, value = result.monitor, result.best.get(result.monitor, math.nan)
    return name, value if math.isfinite(value) else math.inf


def _digest(values: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _parent_run() -> tuple[str, str]:
    import mlflow

    active = mlflow.active_run()
    return active.info.run_id, active.info.experiment_id


@contextmanager
def _trial_run(
    parent: tuple[str, str] | None, number: int, values: dict[str, Any], tags: dict[str, str] | None
) -> Iterator[str | None]:
    """A nested MLflow run for one trial (in the parent's experiment, named, with the values as
    params); None without a parent."""
    if parent is None:
        yield None
        return
    import mlflow

    with mlflow.start_run(
        experiment_id=parent[1],
        run_name=f"trial-{number}",
        nested=True,
        tags={**(tags or {}), "vaeflow.search_trial": str(number)},
    ) as run:
        mlflow.log_params(values)
        yield run.info.run_id


def _end_failed(run_id: str | None) -> None:
    if run_id:
        import mlflow

        mlflow.set_tag("vaeflow.search_error", "the fit failed; see the training log")
        mlflow.end_run("FAILED")


def _active_run(settings: Settings | StageSettings) -> training.MlflowRun:
    import mlflow

    return training.MlflowRun(settings.tracking_uri, mlflow.active_run().info.run_id)
