"""Prefect flows: `retrain` (seed .. promote), `batch_score` (jobs over one table, optionally
fanned out over a Dask cluster as the `score-partitions` subflow) and `monitor` (drift).

The flows are the compositions of `stages.py`, each stage run as a Prefect task of the same
name and retry policy (retried only on `TransientError`s). Parameters are plain JSON values (a
params file and `--set` overrides), so the same flows run from the CLI, a deployment or a test.
Tasks are called directly in the flow, in its main thread (Lightning's signal handling).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import Task, flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from pipelines import run_summaries as summaries
from pipelines import scoring, stages
from pipelines.config import Settings, load_settings
from pipelines.credentials import redact
from pipelines.errors import DataValidationError, is_transient
from pipelines.warehouse import parse_ref

log = logging.getLogger(__name__)


def _transient(task, task_run, state) -> bool:
    """Prefect's retry condition: retry what may pass on a second try (`TransientError`: an
    unreachable server, a busy lock), never clear input or config errors or bugs."""
    try:
        state.result()
    except BaseException as exc:
        return is_transient(exc)
    return False


# tasks that touch the network (warehouse, tracking server): retried with backoff
NETWORK_RETRIES = {
    "retries": stages.NETWORK.retries,
    "retry_delay_seconds": list(stages.NETWORK.delays),
    "retry_condition_fn": _transient,
}


def as_task(fn: Callable) -> Task:
    """A stage as a Prefect task: its name, its retry policy, no result caching."""
    policy: stages.Retry = fn.retry
    return task(
        fn,
        name=fn.stage_name,
        task_run_name=fn.run_name,
        cache_policy=NO_CACHE,
        retries=policy.retries,
        retry_delay_seconds=list(policy.delays) or 0,
        retry_condition_fn=_transient,
    )


TASKS: dict[Callable, Task] = {fn: as_task(fn) for fn in stages.STAGES}


def _as_task_run(fn: Callable, *args: Any) -> Any:
    """The `step` of the compositions inside a flow: each stage a task run, its result (or a
    failed validation) published as an artifact of the flow run."""
    try:
        result = TASKS[fn](*args)
    except DataValidationError as exc:
        data = Path(args[1]).name if fn is stages.validate else fn.stage_name
        _markdown(
            summaries.artifact_key("validation", data), summaries.failed_validation_markdown(data, str(exc))
        )
        raise
    publish(fn, result)
    return result


def _markdown(key: str, text: str) -> None:
    """Publish a markdown artifact; a Prefect API that fails here does not fail the flow."""
    try:
        create_markdown_artifact(markdown=text, key=key, description=text.splitlines()[0].lstrip("# "))
    except Exception as exc:  # noqa: BLE001 - the stage's work is done and recorded elsewhere
        log.warning("could not publish the Prefect artifact %s: %s", key, redact(exc))


def publish(fn: Callable, result: Any) -> None:
    """A stage's result as a Prefect artifact: the GX result, the registered version, the
    promotion decision, the drift report (scored tables: `batch_score`)."""
    if fn is stages.validate:
        report = result.to_dict()
        _markdown(summaries.artifact_key("validation", report["data"]), summaries.validation_markdown(report))
    elif fn is stages.train:
        _markdown(
            summaries.artifact_key("training", result.name),
            summaries.training_markdown(result.name, result.version, result.run_id, result.metrics),
        )
    elif fn is stages.promote:
        decision = asdict(result)
        _markdown(
            summaries.artifact_key("promotion", decision["name"]), summaries.promotion_markdown(decision)
        )
    elif fn is stages.drift_report:
        model = f"{result['model_name']} v{result['model_version']}"
        _markdown(
            summaries.artifact_key("drift", result["model_name"]),
            summaries.drift_markdown(result["report"], model),
        )


def _run_tags() -> dict[str, str]:
    return {"vaeflow.flow_run_id": str(flow_run.get_id() or "")}


@flow(name="score-partitions")
def score_partitions(
    settings: stages.ScoreSettings, job: str, model_uri: str, source: str, parts: list[scoring.Partition]
) -> list[int]:
    """Score every partition in parallel on the flow's task runner (a Dask cluster)."""
    futures = [TASKS[stages.score_partition].submit(settings, job, model_uri, source, p) for p in parts]
    return [f.result() for f in futures]


def dask_runner(settings: stages.ScoreSettings):
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


def _on_dask(
    settings: stages.ScoreSettings, job: str, model_uri: str, source: str, parts: list[scoring.Partition]
) -> None:
    score_partitions.with_options(task_runner=dask_runner(settings))(settings, job, model_uri, source, parts)


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
    return stages.retrain(
        settings, source=source, key=key, model_name=model_name, step=_as_task_run, run_tags=_run_tags()
    )


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
    results = stages.batch_score(
        settings,
        model_uri=model_uri,
        source=source,
        jobs=jobs,
        dest=dest,
        step=_as_task_run,
        run_partitions=_on_dask,
    )
    table = summaries.scored_table(results)
    name = parse_ref(source or settings.data.source, settings.warehouse_url).name  # no URL, no credentials
    try:
        create_table_artifact(
            table=table,
            key=summaries.artifact_key("scored", name),
            description=redact(
                ", ".join(f"{r['job']}: {r['rows']} rows -> {r['destination']}" for r in table)
            ),
        )
    except Exception as exc:  # noqa: BLE001 - the tables are written; the artifact is a report
        log.warning("could not publish the Prefect artifact of the scored tables: %s", redact(exc))
    return results


@flow(name="monitor", log_prints=True)
def monitor(params: str | None = None, overrides: list[str] | None = None, source: str | None = None) -> dict:
    """Drift of the warehouse table against the champion's training data; retrain on drift."""
    settings = load_settings(params, overrides)
    return stages.monitor(
        settings,
        source=source,
        step=_as_task_run,
        retrain_on_drift=lambda: retrain(params=params, overrides=overrides),
        run_tags=_run_tags(),
    )


def after_retrain() -> list:
    """A deployment trigger: run when a `retrain` flow run completes (scheduled, triggered by
    `monitor`, or started by hand), so batch scoring uses the model that retrain just promoted."""
    from prefect.events import DeploymentEventTrigger

    return [
        DeploymentEventTrigger(
            name="score after retrain",
            expect={"prefect.flow-run.Completed"},
            match_related={"prefect.resource.role": "flow", "prefect.resource.name": "retrain"},
        )
    ]


def deployments(settings: Settings, parameters: dict[str, Any], *, module_path: bool = False) -> list:
    """`retrain/nightly`, `batch_score/nightly` (after each retrain, and on `schedule.score_cron`
    if set) and `monitor/hourly`. With `module_path`, each names its flow by module
    (`pipelines.flows.retrain`), for a worker that has vaeflow installed."""
    from prefect.deployments.runner import EntrypointType

    schedule = settings.schedule
    kind = {"entrypoint_type": EntrypointType.MODULE_PATH} if module_path else {}
    return [
        retrain.to_deployment(name="nightly", cron=schedule.retrain_cron, parameters=parameters, **kind),
        batch_score.to_deployment(
            name="nightly",
            cron=schedule.score_cron,
            triggers=after_retrain() if schedule.score_after_retrain else None,
            parameters=parameters,
            **kind,
        ),
        monitor.to_deployment(name="hourly", cron=schedule.monitor_cron, parameters=parameters, **kind),
    ]
