"""Prefect flows: `retrain` (seed .. promote), `batch_score` (jobs over one table, optionally
fanned out over a Dask cluster as the `score-partitions` subflow) and `monitor` (drift).

Tasks are thin wrappers around the stage functions; parameters are plain JSON values (a
params file and `--set` overrides), so the same flows run from the CLI, a deployment or a test.
The training task is called directly in the flow (main thread: Lightning's signal handling).
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from pipelines import drift, ingest, registry, scoring, tracking, training, validation
from pipelines.config import Settings, load_settings
from pipelines.errors import DataError, VaeflowError
from pipelines.warehouse import iter_frames, parse_ref
from vae_models.schema import SchemaError

log = logging.getLogger(__name__)


def _transient(task, task_run, state) -> bool:
    """Retry what may pass on a second try (a dropped connection, a busy server), not the
    clear errors about the input or config (`VaeflowError`), which would fail again."""
    try:
        state.result()
    except VaeflowError:
        return False
    except Exception:
        return True
    return False


# tasks that touch the network (warehouse, tracking server): retried with backoff
NETWORK_RETRIES = {"retries": 2, "retry_delay_seconds": [2, 10], "retry_condition_fn": _transient}


@task(name="seed-warehouse", cache_policy=NO_CACHE, **NETWORK_RETRIES)
def seed_task(settings: Settings) -> str | None:
    ref = ingest.seed_warehouse(settings)
    return str(ref) if ref else None


@task(name="ingest", cache_policy=NO_CACHE, **NETWORK_RETRIES)
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


@task(name="train-evaluate-register", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def train_task(
    settings: Settings, snapshot_path: str, model_name: str, report: validation.ValidationReport
) -> tracking.TrainedVersion:
    tags = {"vaeflow.flow_run_id": str(flow_run.get_id() or "")}
    return tracking.train_and_register(
        ingest.Snapshot(Path(snapshot_path)), settings, model_name, report, tags
    )


def rescorer(settings: Settings, snapshot_path: str, name: str):
    """`score(version)`: the promotion metric of a registered version, computed on this
    snapshot's frozen evaluation split (the champion is re-scored, not trusted from its tags)."""
    snap = ingest.Snapshot(Path(snapshot_path))
    _, val_df, eval_df = training.snapshot_frames(snap)
    metric = settings.promotion.metric

    def score(version: str) -> float:
        bundle = _load_bundle(settings, f"models:/{name}/{version}")
        try:
            return training.evaluate(bundle, eval_df, val_df, settings).metrics[metric]
        except (DataError, SchemaError) as exc:
            # the old model cannot read today's table: it cannot stay champion
            log.warning("v%s cannot score the evaluation snapshot: %s", version, exc)
            return float("inf")

    return score


@task(name="promote", cache_policy=NO_CACHE, **NETWORK_RETRIES)
def promote_task(
    settings: Settings, name: str, version: str, snapshot_path: str
) -> registry.PromotionDecision:
    decision = registry.promote(
        registry.get_client(settings), name, version, settings, score=rescorer(settings, snapshot_path, name)
    )
    get_run_logger().info(
        "promotion of %s v%s: %s (%s)",
        name,
        version,
        "PROMOTED" if decision.promoted else "REFUSED",
        decision.reason,
    )
    return decision


@task(name="score-partition", cache_policy=NO_CACHE, **NETWORK_RETRIES)
def score_partition_task(
    settings: Settings, job: str, model_uri: str, source: str, part: scoring.Partition
) -> int:
    """One partition on one Dask worker: load the model from the registry, score, write Parquet."""
    import torch

    torch.set_num_threads(1)  # one thread per worker process: workers, not threads, scale out
    bundle = _load_bundle(settings, model_uri)
    return scoring.score_partition(bundle, job, source, part, settings)


@flow(name="score-partitions")
def score_partitions(
    settings: Settings, job: str, model_uri: str, source: str, parts: list[scoring.Partition]
) -> list[int]:
    """Score every partition in parallel on the flow's task runner (a Dask cluster)."""
    futures = [score_partition_task.submit(settings, job, model_uri, source, p) for p in parts]
    return [f.result() for f in futures]


def dask_runner(settings: Settings):
    """prefect-dask's DaskTaskRunner: an existing scheduler by address, or a local cluster."""
    from prefect_dask import DaskTaskRunner

    cfg = settings.score.dask
    if cfg.address:
        return DaskTaskRunner(address=cfg.address)
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": cfg.n_workers,
            "threads_per_worker": 1,
            "processes": True,
            "dashboard_address": None,
        }
    )


@task(name="score", cache_policy=NO_CACHE, **NETWORK_RETRIES)
def score_task(
    settings: Settings, job: str, model_uri: str, source: str | None, dest: str
) -> scoring.JobResult:
    return _score(settings, job, model_uri, source, dest)


def _score(settings: Settings, job: str, model_uri: str, source: str | None, dest: str) -> scoring.JobResult:
    resolved = registry.resolve(registry.get_client(settings), model_uri)
    bundle = _load_bundle(settings, resolved.uri)
    run_partitions = None
    if settings.score.dask.enabled and job != "sample":

        def run_partitions(parts: list[scoring.Partition]) -> None:
            flow_ = score_partitions.with_options(task_runner=dask_runner(settings))
            flow_(settings, job, resolved.uri, source, parts)

    result = scoring.run_job(
        bundle,
        job,
        source,
        dest,
        settings,
        model_version=resolved.version,
        run_id=resolved.run_id,
        run_partitions=run_partitions,
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
    mlflow.set_registry_uri(settings.tracking_uri)  # one store for runs and registry, as everywhere
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
    decision = promote_task(settings, name, trained.version, snapshot_path)
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
        raise VaeflowError(
            "--dest names one table; give one job, or leave --dest out to use score.dest_template"
        )
    name = parse_ref(source, settings.warehouse_url).name  # bad names fail before any work
    targets = {job: dest or settings.score.dest_template.format(source=name, job=job) for job in jobs}
    for target in targets.values():
        parse_ref(target, settings.warehouse_url)
    results = []
    for job, target in targets.items():
        if settings.score.dask.enabled and job != "sample":  # fans out to its own subflow on Dask
            results.append(asdict(_score(settings, job, model_uri, source, target)))
        else:
            results.append(asdict(score_task(settings, job, model_uri, source, target)))
    return results


@task(name="drift-report", cache_policy=NO_CACHE, **NETWORK_RETRIES)
def drift_task(settings: Settings, source: str) -> dict:
    """Compare a sample of `source` with the champion's training snapshot; log the report to MLflow."""
    import mlflow

    client = registry.get_client(settings)
    name = settings.mlflow.model_name
    resolved = registry.resolve(client, f"models:/{name}@{registry.CHAMPION}")
    bundle = _load_bundle(settings, resolved.uri)
    ref = parse_ref(source, settings.warehouse_url)
    snapshot_name = client.get_run(resolved.run_id).data.tags.get("vaeflow.snapshot", ref.name)
    snap = ingest.Snapshot(settings.path(settings.snapshot.dir) / snapshot_name)
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
                "vaeflow.source": tracking.redact(str(ref)),
                "vaeflow.drifted": str(report.drifted),
                "vaeflow.flow_run_id": str(flow_run.get_id() or ""),
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
    get_run_logger().info(report.text())
    return {"report": report.to_dict(), "drifted": report.drifted, "mlflow_run_id": run.info.run_id}


@flow(name="monitor", log_prints=True)
def monitor(params: str | None = None, overrides: list[str] | None = None, source: str | None = None) -> dict:
    """Drift of the warehouse table against the champion's training data; retrain on drift."""
    settings = load_settings(params, overrides)
    source = source or settings.data.source
    result = drift_task(settings, source)
    result["retrain"] = None
    if result["drifted"] and settings.monitor.retrain_on_drift:
        get_run_logger().info("drift detected: triggering retrain")
        result["retrain"] = retrain(params=params, overrides=overrides)
    return result
