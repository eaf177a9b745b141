"""The pipeline's stages as plain functions, and the compositions that chain them, written once.

Each stage takes the configuration and plain values and returns plain data; `@stage` records
its name and retry policy. A composition (`retrain`, `batch_score`, `monitor`) calls its stages
through a `step(stage, *args)` function:

- `direct` (single CLI commands without a Prefect API, DVC stages, tests): the stage in this
  process, retried by tenacity on `TransientError`s as its policy says;
- `flows.py` passes a step that runs each stage as a Prefect task (same name, same policy),
  so the Prefect flows are these compositions, not a second copy of them.

Nothing here imports Prefect, and training, tracking and validation (Lightning, GX) are imported
where they are used, so a scoring command starts fast.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines import ingest, names, registry, scoring
from pipelines.config import Settings, StageSettings, settings_view
from pipelines.errors import ConfigError, DataError, RegistryError, VaeflowError
from pipelines.orchestration import retrying
from pipelines.warehouse import iter_frames, parse_ref
from vae_models.schema import SchemaError

if TYPE_CHECKING:
    from pipelines import tracking, validation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Retry:
    """How often a stage is retried on a `TransientError`, and the waits between tries (s)."""

    retries: int = 0
    delays: tuple[float, ...] = ()


NETWORK = Retry(2, (2, 10))  # stages that touch the warehouse or the tracking server
# a retried training resumes from its last checkpoint: one retry, for a tracking server that
# stopped answering
TRAINING = Retry(1, (5,))


def stage(name: str, retry: Retry = Retry(), run_name: str | None = None) -> Callable[[Callable], Callable]:
    """Mark a function as a pipeline stage: its name, its retry policy and the name of each of
    its runs (a template of its parameters, e.g. "score-{job}"; default: the name).

    A stage that reads configuration takes it as its first parameter, `settings`, annotated
    with a `settings_view`: the config sections it reads. The stage may be called with the whole `Settings` (or a wider view); it
    receives that view, where reading any other section raises `UndeclaredSection`, and
    dvc.yaml's params for the stage are these sections (`fn.reads`)."""

    def mark(fn: Callable) -> Callable:
        view = _settings_view_of(fn)

        @functools.wraps(fn)
        def scoped(*args: Any, **kwargs: Any) -> Any:
            if view is not None:
                args = (view.of(args[0]), *args[1:])
            return fn(*args, **kwargs)

        scoped.stage_name, scoped.retry, scoped.run_name = name, retry, run_name or name
        scoped.reads = tuple(sorted(view.sections)) if view else ()
        return scoped

    return mark


def _settings_view_of(fn: Callable) -> type[StageSettings] | None:
    """The view a stage's first parameter, `settings`, is annotated with (None: no settings)."""
    first = next(iter(inspect.signature(fn).parameters.values()), None)
    if first is None or first.name != "settings":
        return None
    view = fn.__globals__.get(first.annotation) if isinstance(first.annotation, str) else first.annotation
    if not (isinstance(view, type) and issubclass(view, StageSettings)):
        raise TypeError(f"stage {fn.__qualname__}: its first parameter must be `settings: <a settings_view>`")
    return view


Step = Callable[..., Any]


def direct(fn: Callable, *args: Any) -> Any:
    """Run a stage in this process, retried as its policy says (only on `TransientError`s)."""
    policy: Retry = getattr(fn, "retry", Retry())
    if not policy.retries:
        return fn(*args)
    return retrying(fn, policy.retries, list(policy.delays), fn.stage_name)(*args)


# ---------------------------------------------------------------- stages
# Each stage's settings: the params.yaml sections it reads (dvc.yaml lists them as its params).

SeedSettings = settings_view("SeedSettings", "seed", "warehouse", module=__name__)
IngestSettings = settings_view("IngestSettings", "data", "schema", "snapshot", "warehouse", module=__name__)
ValidateSettings = settings_view("ValidateSettings", "validation", module=__name__)
TrainSettings = settings_view(
    "TrainSettings", "model", "train", "evaluation", "score", "mlflow", "snapshot", module=__name__
)
PromoteSettings = settings_view(
    "PromoteSettings", "promotion", "mlflow", "train", "evaluation", "score", module=__name__
)
ChampionSettings = settings_view("ChampionSettings", "mlflow", "train", module=__name__)
ScoreSettings = settings_view("ScoreSettings", "score", "mlflow", "warehouse", module=__name__)
MonitorSettings = settings_view(
    "MonitorSettings", "monitor", "mlflow", "score", "snapshot", "data", "warehouse", module=__name__
)


@stage("seed-warehouse", NETWORK)
def seed(settings: SeedSettings) -> str | None:
    """Load the packaged default data set into the embedded warehouse once."""
    ref = ingest.seed_warehouse(settings)
    return str(ref) if ref else None


@stage("ingest", NETWORK)
def snapshot(settings: IngestSettings, source: str, key: str | None) -> str:
    """Snapshot and split a source; returns the snapshot folder."""
    return str(ingest.take_snapshot(settings, source, key).path)


@stage("validate")
def validate(settings: ValidateSettings, snapshot_path: str) -> validation.ValidationReport:
    """Run the GX suite on a snapshot (all splits); raises with the report when it fails."""
    import pandas as pd

    from pipelines import validation

    snap = ingest.Snapshot(Path(snapshot_path))
    frames = [snap.read(s) for s in ingest.SPLITS]
    report = validation.validate_frame(pd.concat(frames, ignore_index=True), snap.schema, settings, snap.name)
    log.info(report.text())
    return report


@stage("train-evaluate-register", TRAINING, run_name="train-{model_name}")
def train(
    settings: TrainSettings,
    snapshot_path: str,
    model_name: str,
    report: validation.ValidationReport,
    tags: dict[str, str] | None = None,
) -> tracking.TrainedVersion:
    """Fit, evaluate, log and register a new version of `model_name`."""
    from pipelines import tracking

    return tracking.train_and_register(
        ingest.Snapshot(Path(snapshot_path)), settings, model_name, report, tags
    )


def rescorer(
    settings: PromoteSettings, snapshot_path: str, name: str
) -> Callable[[str], registry.Measurement]:
    """`score(version)`: the promotion metric of a registered version, computed on this
    snapshot's frozen evaluation split (the champion is re-scored, not trusted from its tags),
    with its per-row values, so the gate's SE is paired over the same rows."""
    from pipelines import training

    snap = ingest.Snapshot(Path(snapshot_path))
    _, val_df, eval_df = training.snapshot_frames(snap)
    metric = settings.promotion.metric

    def score(version: str) -> registry.Measurement:
        try:
            bundle, _ = registry.load_bundle(settings, f"models:/{name}/{version}")
            evaluation = training.evaluate(bundle, eval_df, val_df, settings)
        except (DataError, SchemaError, RegistryError) as exc:
            # the old model cannot be verified or cannot read today's table: it cannot stay champion
            log.warning("v%s cannot score the evaluation snapshot: %s", version, exc)
            return registry.Measurement(float("inf"))
        return registry.Measurement(
            evaluation.metrics[metric],
            rows=evaluation.per_row.get(metric),
            se=evaluation.metrics.get(f"{metric}_se"),
        )

    return score


@stage("promote", NETWORK, run_name="promote-{name}-v{version}")
def promote(
    settings: PromoteSettings, name: str, version: str, snapshot_path: str
) -> registry.PromotionDecision:
    """Apply the promotion gate to `version`, both versions re-scored on this snapshot."""
    client = registry.get_client(settings)
    return registry.promote(client, name, version, settings, score=rescorer(settings, snapshot_path, name))


@stage("champion-outputs")
def champion_outputs(settings: ChampionSettings, name: str, snapshot_name: str) -> str:
    """DVC's train outputs describe the registry's champion: its bundle in
    `train.model_dir/NAME` and its metrics (with `model_version`) in `reports/SNAPSHOT/metrics.json`
    (after a refused challenger, the champion's again). Returns the champion's version."""
    from pipelines import atomic, training
    from vae_models.bundle import save_bundle

    bundle, resolved = registry.load_bundle(settings, f"models:/{name}@{registry.CHAMPION}")
    model_dir = settings.path(settings.train.model_dir) / name
    with atomic.target_lock(model_dir):
        save_bundle(bundle, model_dir)
    metrics = dict(registry.get_client(settings).get_run(resolved.run_id).data.metrics)
    training.write_dvc_outputs(
        {**metrics, "model_version": float(resolved.version)}, settings.path("reports") / snapshot_name
    )
    return resolved.version


DaskRunner = Callable[[StageSettings, str, str, str, list[scoring.Partition]], None]


@stage("score", NETWORK, run_name="score-{job}")
def score(
    settings: ScoreSettings,
    job: str,
    model_uri: str,
    source: str | None,
    dest: str,
    run_partitions: DaskRunner | None = None,
) -> scoring.JobResult:
    """One batch job with a registered model, written to `dest` atomically. With
    `score.dask.enabled`, `run_partitions` scores the partitions (a Dask task runner)."""
    bundle, resolved = registry.load_bundle(settings, model_uri)
    partitions = None
    if settings.score.dask.enabled and job != "sample":
        if run_partitions is None:
            raise ConfigError("score.dask.enabled needs the Prefect flow batch_score (its Dask task runner)")

        def partitions(parts: list[scoring.Partition]) -> None:
            run_partitions(settings, job, resolved.uri, source, parts)

    result = scoring.run_job(
        bundle,
        job,
        source,
        dest,
        settings,
        model_version=resolved.version,
        run_id=resolved.run_id,
        run_partitions=partitions,
    )
    log.info(
        "%s: %d rows -> %s (%.0f rows/s, model v%s)",
        job,
        result.rows,
        result.destination,
        result.rows_per_second,
        result.model_version,
    )
    return result


@stage("score-partition", NETWORK, run_name="score-{job}-part-{part.index}")
def score_partition(
    settings: ScoreSettings, job: str, model_uri: str, source: str, part: scoring.Partition
) -> int:
    """One partition on one Dask worker: load the model from the registry, score, write Parquet."""
    import torch

    torch.set_num_threads(1)  # one thread per worker process: workers, not threads, scale out
    bundle, _ = registry.load_bundle(settings, model_uri)
    return scoring.score_partition(bundle, job, source, part, settings)


@stage("drift-report", NETWORK)
def drift_report(settings: MonitorSettings, source: str, run_tags: dict[str, str] | None = None) -> dict:
    """Compare a sample of `source` with the champion's training snapshot; log it to MLflow."""
    import mlflow

    from pipelines import drift, tracking
    from pipelines.credentials import redact

    client = registry.get_client(settings)
    name = settings.mlflow.model_name
    bundle, resolved = registry.load_bundle(settings, f"models:/{name}@{registry.CHAMPION}")
    ref = parse_ref(source, settings.warehouse_url)
    snapshot_name = client.get_run(resolved.run_id).data.tags.get("vaeflow.snapshot") or ingest.source_name(
        settings, ref
    )
    snap = ingest.Snapshot(settings.path(settings.snapshot.dir) / names.slug(snapshot_name))
    cfg = settings.monitor
    reference = snap.read("train")
    if len(reference) > cfg.sample_rows:
        reference = reference.sample(cfg.sample_rows, random_state=0).reset_index(drop=True)
    current = drift.reservoir_sample(iter_frames(ref, settings.score.chunk_size), cfg.sample_rows)
    if current.empty:
        raise DataError(f"{ref} has no rows; nothing to compare with the training reference")
    report = drift.drift_report(
        bundle,
        reference,
        current,
        column_threshold=cfg.column_threshold,
        null_threshold=cfg.null_threshold,
        max_drifted_share=cfg.max_drifted_share,
        latent_threshold=cfg.latent_threshold,
    )
    experiment_id = tracking.ensure_experiment(settings, f"{settings.mlflow.experiment}-monitor")
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"monitor-{name}") as run:
        mlflow.set_tags(
            {
                "vaeflow.model_name": name,
                "vaeflow.model_version": resolved.version,
                "vaeflow.source": redact(str(ref)),
                "vaeflow.drifted": str(report.drifted),
                **(run_tags or {}),
            }
        )
        mlflow.log_metrics(
            {
                "drifted_share": report.drifted_share,
                "latent_ks_max": report.latent_statistic,
                **{f"drift.{c}": d.statistic for c, d in report.columns.items()},
            }
        )
        mlflow.log_dict(report.to_dict(), "drift/report.json")
    log.info(report.text())
    return {
        "report": report.to_dict(),
        "drifted": report.drifted,
        "mlflow_run_id": run.info.run_id,
        "model_name": name,
        "model_version": resolved.version,
    }


# ---------------------------------------------------------------- compositions


def retrain(
    settings: Settings,
    *,
    source: str | None = None,
    key: str | None = None,
    model_name: str | None = None,
    step: Step = direct,
    run_tags: dict[str, str] | None = None,
) -> dict:
    """Seed (embedded default only), ingest, validate, train, evaluate, register, promote."""
    if source is None:
        source, key = settings.data.source, key or settings.data.key
        seeded = step(seed, settings)
        if seeded:
            log.info("warehouse table %s ready", seeded)
    ref = parse_ref(source, settings.warehouse_url)  # a bad name fails before any work
    name = names.model_name(
        model_name
        or (settings.mlflow.model_name if source == settings.data.source else names.default_model_name(ref))
    )
    snapshot_path = step(snapshot, settings, source, key)
    report = step(validate, settings, snapshot_path)
    trained = step(train, settings, snapshot_path, name, report, run_tags)
    decision = step(promote, settings, name, trained.version, snapshot_path)
    return {
        "model_name": name,
        "version": trained.version,
        "run_id": trained.run_id,
        "metrics": trained.metrics,
        "snapshot": snapshot_path,
        "promotion": asdict(decision),
        "source": source,
    }


def batch_score(
    settings: Settings,
    *,
    model_uri: str | None = None,
    source: str | None = None,
    jobs: list[str] | None = None,
    dest: str | None = None,
    step: Step = direct,
    run_partitions: DaskRunner | None = None,
) -> list[dict]:
    """Score one table with the champion: each job writes its own output table atomically."""
    model_uri = model_uri or f"models:/{settings.mlflow.model_name}@{registry.CHAMPION}"
    source = source or settings.data.source
    jobs = jobs or list(settings.score.jobs)
    if dest and len(jobs) > 1:
        raise VaeflowError(
            "--dest names one table; give one job, or leave --dest out to use score.dest_template"
        )
    name = parse_ref(source, settings.warehouse_url).name  # bad names fail before any work
    try:
        targets = {job: dest or settings.score.dest_template.format(source=name, job=job) for job in jobs}
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(
            f"score.dest_template {settings.score.dest_template!r} is not a template of {{source}} and {{job}}: {exc}"
        ) from exc
    refs = {job: parse_ref(target, settings.warehouse_url) for job, target in targets.items()}
    identities = [ref.identity for ref in refs.values()]
    if len(set(identities)) < len(identities):
        raise ConfigError(
            f"score.dest_template {settings.score.dest_template!r} gives several jobs one destination; "
            f"put {{job}} in it"
        )
    results = []
    for job, target in targets.items():
        if settings.score.dask.enabled and job != "sample":  # its partitions run as tasks of their own
            results.append(asdict(score(settings, job, model_uri, source, target, run_partitions)))
        else:
            results.append(asdict(step(score, settings, job, model_uri, source, target)))
    return results


def monitor(
    settings: Settings,
    *,
    source: str | None = None,
    step: Step = direct,
    retrain_on_drift: Callable[[], dict] | None = None,
    run_tags: dict[str, str] | None = None,
) -> dict:
    """Drift of the warehouse table against the champion's training data; retrain on drift."""
    source = source or settings.data.source
    result = step(drift_report, settings, source, run_tags)
    result["retrain"] = None
    if result["drifted"] and settings.monitor.retrain_on_drift:
        log.info("drift detected: triggering retrain")
        result["retrain"] = (retrain_on_drift or (lambda: retrain(settings, step=step)))()
    return result


STAGES = (seed, snapshot, validate, train, promote, champion_outputs, score, score_partition, drift_report)
