"""Prefect flows: `retrain` (seed .. promote) and `batch_score` (jobs over one table).

Tasks are thin wrappers around the stage functions; parameters are plain JSON values (a
params file and `--set` overrides), so the same flows run from the CLI, a deployment or a test.
The training task is called directly in the flow (main thread: Lightning's signal handling).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from pipelines import ingest, registry, scoring, tracking, validation
from pipelines.config import Settings, load_settings
from pipelines.warehouse import parse_ref

NETWORK_RETRIES = {"retries": 2, "retry_delay_seconds": [2, 10]}


@task(name="seed-warehouse", cache_policy=NO_CACHE, **NETWORK_RETRIES)
def seed_task(settings: Settings) -> str | None:
    ref = ingest.seed_warehouse(settings)
    return str(ref) if ref else None


@task(name="ingest", cache_policy=NO_CACHE)
def ingest_task(settings: Settings, source: str, key: str | None) -> str:
    return str(ingest.take_snapshot(settings, source, key).path)


@task(name="validate", cache_policy=NO_CACHE)
def validate_task(settings: Settings, snapshot_path: str) -> validation.ValidationReport:
    snap = ingest.Snapshot(Path(snapshot_path))
    frames = [snap.read(s) for s in ingest.SPLITS]
    import pandas as pd

    report = validation.validate_frame(pd.concat(frames, ignore_index=True), snap.schema, settings, snap.name)
    get_run_logger().info(report.text())
    return report


@task(name="train-evaluate-register", cache_policy=NO_CACHE)
def train_task(
    settings: Settings, snapshot_path: str, model_name: str, report: validation.ValidationReport
) -> tracking.TrainedVersion:
    tags = {"vaeflow.flow_run_id": str(flow_run.get_id() or "")}
    return tracking.train_and_register(
        ingest.Snapshot(Path(snapshot_path)), settings, model_name, report, tags
    )


@task(name="promote", cache_policy=NO_CACHE, **NETWORK_RETRIES)
def promote_task(settings: Settings, name: str, version: str) -> registry.PromotionDecision:
    decision = registry.promote(registry.get_client(settings), name, version, settings)
    get_run_logger().info(
        "promotion of %s v%s: %s (%s)",
        name,
        version,
        "PROMOTED" if decision.promoted else "REFUSED",
        decision.reason,
    )
    return decision


@task(name="score", cache_policy=NO_CACHE)
def score_task(
    settings: Settings, job: str, model_uri: str, source: str | None, dest: str
) -> scoring.JobResult:
    resolved = registry.resolve(registry.get_client(settings), model_uri)
    bundle = _load_bundle(settings, resolved.uri)
    result = scoring.run_job(
        bundle, job, source, dest, settings, model_version=resolved.version, run_id=resolved.run_id
    )
    get_run_logger().info(
        "%s: %d rows -> %s (%.0f rows/s, model v%s)",
        job,
        result.rows,
        result.destination,
        result.rows_per_second,
        result.model_version,
    )
    return result


def _load_bundle(settings: Settings, uri: str):
    import mlflow

    from pipelines.errors import RegistryError

    mlflow.set_tracking_uri(settings.tracking_uri)
    try:
        model = mlflow.pyfunc.load_model(uri)
    except Exception as exc:  # missing artifacts, unreachable store
        raise RegistryError(f"cannot load {uri}: {exc}") from exc
    return model.unwrap_python_model().bundle


@flow(name="retrain", log_prints=True)
def retrain(
    params: str | None = None,
    overrides: list[str] | None = None,
    source: str | None = None,
    key: str | None = None,
    model_name: str | None = None,
) -> dict:
    """Seed (embedded default only), ingest, validate, train, evaluate, register, promote."""
    settings = load_settings(params, overrides)
    logger = get_run_logger()
    if source is None:
        source, key = settings.data.source, key or settings.data.key
        seeded = seed_task(settings)
        if seeded:
            logger.info("warehouse table %s ready", seeded)
    name = model_name or (
        settings.mlflow.model_name
        if source == settings.data.source
        else f"{parse_ref(source, settings.warehouse_url).name}_vae"
    )
    snapshot_path = ingest_task(settings, source, key)
    report = validate_task(settings, snapshot_path)
    trained = train_task(settings, snapshot_path, name, report)
    decision = promote_task(settings, name, trained.version)
    return {
        "model_name": name,
        "version": trained.version,
        "run_id": trained.run_id,
        "metrics": trained.metrics,
        "snapshot": snapshot_path,
        "promotion": asdict(decision),
        "source": source,
    }


@flow(name="batch_score", log_prints=True)
def batch_score(
    params: str | None = None,
    overrides: list[str] | None = None,
    model_uri: str | None = None,
    source: str | None = None,
    jobs: list[str] | None = None,
    dest: str | None = None,
) -> list[dict]:
    """Score one table with the champion: each job writes its own output table atomically."""
    settings = load_settings(params, overrides)
    model_uri = model_uri or f"models:/{settings.mlflow.model_name}@{registry.CHAMPION}"
    source = source or settings.data.source
    jobs = jobs or list(settings.score.jobs)
    if dest and len(jobs) > 1:
        from pipelines.errors import VaeflowError

        raise VaeflowError(
            "--dest names one table; give one job, or leave --dest out to use score.dest_template"
        )
    name = parse_ref(source, settings.warehouse_url).name  # bad names fail before any work
    targets = {job: dest or settings.score.dest_template.format(source=name, job=job) for job in jobs}
    for target in targets.values():
        parse_ref(target, settings.warehouse_url)
    return [asdict(score_task(settings, job, model_uri, source, target)) for job, target in targets.items()]
