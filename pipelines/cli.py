"""The `vaeflow` command (see README: the contract users and scripts rely on).

What the terminal shows on failure: an expected error (`VaeflowError`) is one `error: ...`
line and exit code 2; an unexpected one is one line naming the file its full traceback was
written to, and exit code 1; an interrupt is exit 130 (SIGINT) or 143 (SIGTERM). After SIGTERM the command has
`VAEFLOW_TERM_GRACE_S` (30) seconds to end its runs and remove its temporary files; past that
it exits 143 at once, every thread's stack written to the error log folder. `--debug`
(anywhere on the line) or `VAEFLOW_DEBUG=1` also prints the traceback and Prefect's own.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from pipelines.credentials import redact
from pipelines.errors import VaeflowError

app = typer.Typer(
    name="vaeflow",
    help="Train, validate, register and score Variational Autoencoders on warehouse tables.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
stage_app = typer.Typer(help="Single pipeline stages, as dvc.yaml runs them.", no_args_is_help=True)
app.add_typer(stage_app, name="stage")
snapshot_app = typer.Typer(help="The data snapshots versions trained on, kept in DVC.", no_args_is_help=True)
app.add_typer(snapshot_app, name="snapshot")

Params = Annotated[str | None, typer.Option("--params", "-p", help="params file (default: ./params.yaml)")]
Sets = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="override a config value by dotted path, e.g. train.max_epochs=5"),
]
Source = Annotated[str, typer.Option("--source", help="a .parquet/.csv file, a table name, or URL#table")]
Key = Annotated[str | None, typer.Option("--key", help="key column: carried to every output, not modelled")]


def _settings(params: str | None, sets: list[str] | None):
    from pipelines.config import load_settings

    return load_settings(params, sets)


def _echo(title: str, value: object) -> None:
    typer.echo(f"{title:<22} {value}")


@app.command()
def run(params: Params = None, sets: Sets = None) -> None:
    """The whole pipeline on the configured default: retrain, then batch_score (as Prefect flow
    runs: on PREFECT_API_URL, or on a temporary server that stops with the command)."""
    from pipelines import orchestration

    settings = _settings(params, sets)
    with orchestration.prefect_api(needed=True):
        out = _compose("retrain", settings, params, sets)
        uri = f"models:/{out['model_name']}@champion"
        results = _compose("batch_score", settings, params, sets, model_uri=uri, source=out["source"])
    typer.echo("\nvaeflow run finished")
    _echo("warehouse", redact(settings.warehouse.url))
    _echo("snapshot (DVC)", out["snapshot"])
    _echo("MLflow tracking", redact(settings.mlflow.tracking_uri))
    _echo("MLflow run", out["run_id"])
    _echo("registered model", f"{out['model_name']} v{out['version']}")
    _echo(
        "promotion",
        ("promoted: " if out["promotion"]["promoted"] else "refused: ") + out["promotion"]["reason"],
    )
    for key, value in sorted(out["metrics"].items()):
        _echo(f"  {key}", f"{value:.4f}")
    for r in results:
        _echo(
            f"score {r['job']}",
            f"{r['rows']} rows -> {r['destination']} ({r['rows'] / max(r['seconds'], 1e-9):.0f} rows/s{_k(r)})",
        )
    typer.echo(f"\nbrowse runs: mlflow ui --backend-store-uri {redact(settings.tracking_uri)}")


def _k(result: dict) -> str:
    """', K=n importance samples per row' for the jobs that draw them."""
    k = result.get("importance_samples")
    return f", K={k} importance samples per row" if k else ""


@app.command()
def validate(
    source: Source,
    key: Key = None,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="(re)build the suite from this source")] = False,
    params: Params = None,
    sets: Sets = None,
) -> None:
    """Validate a source against its Great Expectations suite (gx/expectations/NAME.json)."""
    from pipelines import ingest, validation
    from vae_models.schema import SchemaError

    settings = _settings(params, sets)
    ref, df = ingest.load_source(settings, source, key)
    try:
        schema = ingest.table_schema(settings, df, key)
    except SchemaError as exc:
        from pipelines.errors import DataError

        raise DataError(f"{ref}: {exc}") from exc
    name = ingest.source_name(settings, ref)
    report = validation.validate_frame(df, schema, settings, name, rebuild=rebuild)
    typer.echo(report.text())


@app.command()
def train(
    source: Source,
    name: Annotated[
        str | None, typer.Option("--name", help="registered model name (default: SOURCE_vae)")
    ] = None,
    key: Key = None,
    params: Params = None,
    sets: Sets = None,
) -> None:
    """Ingest, validate, train, evaluate, register a new version and apply the promotion rule."""
    settings = _settings(params, sets)
    out = _compose("retrain", settings, params, sets, source=source, key=key, model_name=name)
    typer.echo(f"registered {out['model_name']} version {out['version']} (run {out['run_id']})")
    decision = out["promotion"]
    typer.echo(("promoted to champion: " if decision["promoted"] else "not promoted: ") + decision["reason"])
    typer.echo(json.dumps(out["metrics"], indent=2, sort_keys=True))


Reason = Annotated[
    str | None,
    typer.Option("--reason", help="why (recorded in the registry with your user name and the time)"),
]


@app.command()
def promote(
    name: Annotated[str, typer.Option("--name", help="registered model name")],
    version: Annotated[str | None, typer.Option("--version", help="default: the latest version")] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="make it champion without the metric gate, also after a rollback (needs --reason; "
            "a version that failed validation is still refused)",
        ),
    ] = False,
    reason: Reason = None,
    params: Params = None,
    sets: Sets = None,
) -> None:
    """Apply the promotion gate to a version (default: the latest); a rolled-back version needs --force."""
    from pipelines import registry
    from pipelines.names import model_name, slug

    if force and not (reason and reason.strip()):
        raise VaeflowError('--force needs --reason "why": it is recorded in the registry')
    settings = _settings(params, sets)
    model_name(name)  # also when --version is given: "invalid model name", not "malformed URI"
    client = registry.get_client(settings)
    if version is None:
        version = registry.latest_version(client, name)
    registry.resolve(client, f"models:/{name}/{version}")  # clear error for an unknown version
    snapshot = client.get_model_version(name, version).tags.get("vaeflow.snapshot")
    snap_path = (
        settings.path(settings.snapshot.dir) / snapshot if snapshot and snapshot == slug(snapshot) else None
    )
    score = None
    if not force and snap_path is not None and snap_path.is_dir():  # re-score both on its eval split
        from pipelines.stages import rescorer

        score = rescorer(settings, str(snap_path), name)
    decision = registry.promote(
        client, name, version, settings, score, force=force, reason=reason, by=registry.current_user()
    )
    typer.echo(
        f"{name} v{version}: {'promoted to champion' if decision.promoted else 'not promoted'} ({decision.reason})"
    )


@app.command()
def rollback(
    name: Annotated[str, typer.Option("--name", help="registered model name")],
    reason: Reason = None,
    params: Params = None,
    sets: Sets = None,
) -> None:
    """Move the champion alias back to the previous champion; the version rolled back stays out
    of promotion until `vaeflow promote --force --reason`."""
    from pipelines import registry
    from pipelines.names import model_name

    model_name(name)  # a bad name is the first thing to hear about
    if not (reason and reason.strip()):
        raise VaeflowError('rollback needs --reason "why": it is recorded in the registry')
    settings = _settings(params, sets)
    old, new = registry.rollback(
        registry.get_client(settings), name, settings, reason=reason, by=registry.current_user()
    )
    typer.echo(
        f"{name}: champion moved from v{old} back to v{new}; v{old} is marked rolled back and is not "
        f'promoted again until `vaeflow promote --name {name} --version {old} --force --reason "why"`'
    )


@app.command()
def score(
    job: Annotated[str, typer.Argument(help="impute | anomaly | embed | sample")],
    model: Annotated[str, typer.Option("--model", help="models:/NAME@champion or models:/NAME/VERSION")],
    dest: Annotated[str, typer.Option("--dest", help="output: .parquet/.csv file or table name")],
    source: Annotated[
        str | None, typer.Option("--source", help="input table (not needed for sample)")
    ] = None,
    params: Params = None,
    sets: Sets = None,
) -> None:
    """Run one batch job with a registered model and write the output atomically."""
    from pipelines.config import JOBS

    if job not in JOBS:
        raise VaeflowError(f"unknown job {job!r}: use one of {', '.join(JOBS)}")
    if job != "sample" and source is None:
        raise VaeflowError(f"job {job!r} needs --source")
    settings = _settings(params, sets)
    results = _compose(
        "batch_score",
        settings,
        params,
        sets,
        needs_api=settings.score.dask.enabled and job != "sample",  # Dask runs as Prefect tasks
        model_uri=model,
        source=source or settings.data.source,
        jobs=[job],
        dest=dest,
    )
    for r in results:
        typer.echo(f"{r['job']}: {r['rows']} rows -> {r['destination']} (model v{r['model_version']}{_k(r)})")


def _needs_prefect_server(command: str) -> None:
    if not os.environ.get("PREFECT_API_URL"):
        raise VaeflowError(
            f"vaeflow {command} needs a Prefect server: start one (prefect server start) and set PREFECT_API_URL"
        )


def _flow_parameters(params: str | None, sets: list[str] | None) -> dict:
    return {"params": str(Path(params).resolve()) if params else None, "overrides": sets}


@app.command()
def serve(params: Params = None, sets: Sets = None) -> None:
    """Serve the retrain, batch_score and monitor deployments in this process (needs a Prefect server)."""
    _needs_prefect_server("serve")
    from prefect import serve as prefect_serve

    from pipelines import orchestration
    from pipelines.flows import deployments

    orchestration.quiet_console(debug=_DEBUG)
    prefect_serve(*deployments(_settings(params, sets), _flow_parameters(params, sets)))


@app.command()
def deploy(
    pool: Annotated[str, typer.Option("--pool", help="process work pool (created when missing)")] = "vaeflow",
    params: Params = None,
    sets: Sets = None,
) -> None:
    """Register the retrain, batch_score and monitor deployments on a work pool, for workers
    (`prefect worker start --pool POOL`) on machines with vaeflow installed."""
    _needs_prefect_server("deploy")
    from prefect import deploy as prefect_deploy

    from pipelines import orchestration
    from pipelines.flows import deployments

    orchestration.ensure_process_pool(pool)
    parameters = _flow_parameters(params, sets)
    prefect_deploy(
        *deployments(_settings(params, sets), parameters, module_path=True),
        work_pool_name=pool,
        build=False,
        push=False,
        print_next_steps_message=False,
    )
    typer.echo(
        f"deployments retrain/nightly, batch_score/nightly, monitor/hourly registered on work pool {pool!r}; "
        f"start a worker where vaeflow is installed: prefect worker start --pool {pool}"
    )


# The config sections each `vaeflow stage` command reads (its own code and the stages it runs):
# dvc.yaml lists exactly these as the stage's params (tests/test_dvc_stages.py compares them),
# and reading any other one raises, so a change to what a stage reads cannot go unnoticed by DVC.
DVC_PARAMS: dict[str, tuple[str, ...]] = {
    "ingest": ("seed", "data", "snapshot", "schema", "warehouse"),
    "validate": ("validation", "data", "snapshot", "warehouse"),
    "train": (
        "model",
        "train",
        "evaluation",
        "score",
        "mlflow",
        "promotion",
        "data",
        "snapshot",
        "warehouse",
    ),
    "score": ("score", "mlflow", "data", "snapshot", "warehouse"),
}


@contextmanager
def _dvc_stage(name: str, params: str | None, sets: list[str] | None):
    """The settings of one DVC stage command: a view of only the sections dvc.yaml lists for it."""
    from pipelines.config import settings_view

    view = settings_view(f"DvcStage_{name}", *DVC_PARAMS[name])
    yield view.of(_settings(params, sets))


@stage_app.command("ingest")
def stage_ingest(params: Params = None, sets: Sets = None) -> None:
    """Seed the embedded warehouse if needed, then snapshot and split the configured source."""
    from pipelines import ingest, stages

    with _dvc_stage("ingest", params, sets) as settings:
        _configured_snapshot(settings)  # dvc.yaml can name its outputs: before any work
        stages.direct(stages.seed, settings)
        path = stages.direct(stages.snapshot, settings, settings.data.source, settings.data.key)
        typer.echo(f"snapshot {path}: {ingest.Snapshot(Path(path)).manifest['rows']}")


def _configured_snapshot(settings):
    """The snapshot of `data.source`, whose folder dvc.yaml names `data/snapshots/${data.source}`:
    the DVC stages need `data.source` to be a table name of the warehouse."""
    from pipelines import ingest
    from pipelines.warehouse import parse_ref

    snap = ingest.Snapshot(
        ingest.snapshot_path(settings, parse_ref(settings.data.source, settings.warehouse_url))
    )
    if snap.name != settings.data.source:
        raise VaeflowError(
            f"dvc.yaml names the DVC stages' outputs after data.source ({settings.data.source!r}), but its "
            f"snapshot is {snap.name!r}: the DVC stages need data.source to be a table name of the warehouse. "
            f"Load the file into the warehouse, or train it with `vaeflow train --source ...`"
        )
    return snap


@stage_app.command("validate")
def stage_validate(params: Params = None, sets: Sets = None) -> None:
    """Validate the configured source's snapshot; writes reports/NAME/validation.json and data_docs/."""
    from pipelines import atomic, stages

    with _dvc_stage("validate", params, sets) as settings:
        snap = _configured_snapshot(settings)
        report = stages.direct(stages.validate, settings, str(snap.path))
        atomic.write_text(
            settings.path("reports") / snap.name / "validation.json",
            json.dumps(report.to_dict(), indent=2) + "\n",
        )
        typer.echo(report.text())


@stage_app.command("train")
def stage_train(params: Params = None, sets: Sets = None) -> None:
    """Train, evaluate, register and promote from the configured source's snapshot."""
    from pipelines import stages, validation

    with _dvc_stage("train", params, sets) as settings:
        snap = _configured_snapshot(settings)
        report_path = settings.path("reports") / snap.name / "validation.json"
        report = validation.ValidationReport.from_dict(json.loads(report_path.read_text()))
        name = settings.mlflow.model_name
        trained = stages.direct(stages.train, settings, str(snap.path), name, report)
        decision = stages.direct(stages.promote, settings, trained.name, trained.version, str(snap.path))
        # DVC and the registry agree: the stage's outputs are the champion's
        champion = stages.direct(stages.champion_outputs, settings, trained.name, snap.name)
        typer.echo(f"registered {trained.name} v{trained.version}; {decision.reason}")
        typer.echo(f"{settings.train.model_dir}/{trained.name} and metrics.json: the champion, v{champion}")


@stage_app.command("score")
def stage_score(params: Params = None, sets: Sets = None) -> None:
    """Run every configured batch job with the champion; writes reports/NAME/score.json."""
    from pipelines import atomic

    with _dvc_stage("score", params, sets) as settings:
        name = _configured_snapshot(settings).name
        results = _compose("batch_score", settings, params, sets, needs_api=settings.score.dask.enabled)
        summary = [{k: r[k] for k in ("job", "rows", "destination", "model_version")} for r in results]
        atomic.write_text(
            settings.path("reports") / name / "score.json", json.dumps(summary, indent=2) + "\n"
        )
        typer.echo(json.dumps(summary, indent=2))


@snapshot_app.command("restore")
def snapshot_restore(
    model: Annotated[str, typer.Argument(help="models:/NAME/VERSION or models:/NAME@alias")],
    to: Annotated[
        Path | None,
        typer.Option("--to", help="an absent or empty folder (default: restored/NAME/vVERSION/SNAPSHOT)"),
    ] = None,
    params: Params = None,
    sets: Sets = None,
) -> None:
    """Check out the snapshot a version trained on (its `vaeflow.dvc_md5`), verified by hash.

    From the project's DVC cache, or pulled from the default DVC remote when missing there."""
    from pipelines import lineage

    restored = lineage.restore_version(_settings(params, sets), model, to)
    typer.echo(
        f"{restored.name} v{restored.version}: snapshot {restored.dvc_hash} restored into {restored.path}"
    )


def _compose(name: str, settings, params: str | None, sets: list[str] | None, needs_api: bool = False, **kw):
    """Run the composition `name` (retrain, batch_score): as the Prefect flow when a server is
    configured (or `needs_api` starts a temporary one for this command), else in-process
    (`stages.py`, the same stages and retries, no server)."""
    from pipelines import orchestration

    with orchestration.prefect_api(needs_api) as on_prefect:
        if on_prefect:
            from pipelines import flows

            orchestration.quiet_console(debug=_DEBUG)
            return getattr(flows, name)(params=params, overrides=sets, **kw)
        from pipelines import stages

        return getattr(stages, name)(settings, **kw)


_DEBUG = False
# bounded waits on an MLflow tracking server that stops answering (MLflow's defaults retry for
# minutes), no download progress bars, and no Prefect server started behind the command's back
_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # not "Creating initial MLflow database tables..."
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # "View run at <URI>" would print credentials
    "PREFECT_SERVER_EPHEMERAL_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "pipelines",
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",  # stages run outside flows
}


def _log_file() -> Path:
    """A new file in the error log folder (`VAEFLOW_LOG_DIR`, else ~/.cache/vaeflow/errors)."""
    folder = Path(os.environ.get("VAEFLOW_LOG_DIR") or Path.home() / ".cache" / "vaeflow" / "errors")
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


def _traceback_file(exc: BaseException) -> Path | None:
    """Write the (redacted) traceback of an unexpected error where the user can find it."""
    try:
        path = _log_file()
        text = "".join(traceback.format_exception(exc))
        path.write_text(redact(f"vaeflow {' '.join(sys.argv[1:])}\n\n{text}"))
        return path
    except OSError:
        return None


_TERMINATING = threading.Event()


def _terminate(signum: int, frame: Any) -> None:
    """SIGTERM: unwind (runs end KILLED, temporary files go), within the grace period."""
    if not _TERMINATING.is_set():
        _TERMINATING.set()
        threading.Thread(
            target=_exit_after_grace, args=(signum,), name="vaeflow-term-grace", daemon=True
        ).start()
    raise SystemExit(128 + signum)


def _exit_after_grace(signum: int) -> None:
    """End the process if its cleanup outlives VAEFLOW_TERM_GRACE_S, leaving every thread's stack."""
    time.sleep(float(os.environ.get("VAEFLOW_TERM_GRACE_S") or 30))
    where = "no stack dump (error log folder not writable)"
    try:
        path = _log_file()
        with path.open("w") as f:
            f.write(
                f"vaeflow {redact(' '.join(sys.argv[1:]))}: cleanup after signal {signum} did not finish\n\n"
            )
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        where = f"every thread's stack in {path}"
    except OSError:
        pass
    sys.stderr.write(f"error: terminated (signal {signum}); cleanup did not finish in time ({where})\n")
    sys.stderr.flush()
    os._exit(128 + signum)


def main() -> None:
    """Entry point: one `error:` line for every failure, exit 2 for expected ones."""
    import click

    global _DEBUG
    args = sys.argv[1:]
    _DEBUG = "--debug" in args or os.environ.get("VAEFLOW_DEBUG", "") not in ("", "0", "false")
    args = [a for a in args if a != "--debug"]
    for name, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "alembic", "great_expectations", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    signal.signal(signal.SIGTERM, _terminate)  # so runs end KILLED and temp files go
    code = 0
    try:
        app(args=args, prog_name="vaeflow", standalone_mode=False)
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.ClickException as exc:
        exc.show()
        code = exc.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt):
        typer.echo("error: interrupted", err=True)
        code = 130
    except SystemExit as exc:  # SIGTERM
        if exc.code == 128 + signal.SIGTERM:
            typer.echo("error: terminated (SIGTERM)", err=True)
        code = exc.code if isinstance(exc.code, int) else 1
    except (VaeflowError, FileNotFoundError) as exc:
        if _DEBUG:
            traceback.print_exception(exc)
        typer.echo(f"error: {redact(exc)}", err=True)
        code = 2
    except Exception as exc:
        if _DEBUG:
            traceback.print_exception(exc)
        where = _traceback_file(exc)
        first = (redact(exc).strip().splitlines() or [""])[0][:300]
        shown = f"full traceback in {where}" if where else "run again with --debug for the traceback"
        typer.echo(f"error: unexpected {type(exc).__name__}: {first} ({shown})", err=True)
        code = 1
    sys.stdout.flush()
    sys.exit(code)


if __name__ == "__main__":
    main()
