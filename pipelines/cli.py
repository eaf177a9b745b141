"""The `vaeflow` command (see README: the contract users and scripts rely on)."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

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
    """The whole pipeline on the configured default: retrain, then batch_score."""
    from pipelines.flows import batch_score, retrain

    settings = _settings(params, sets)
    out = retrain(params=params, overrides=sets)
    uri = f"models:/{out['model_name']}@champion"
    results = batch_score(params=params, overrides=sets, model_uri=uri, source=out["source"])
    typer.echo("\nvaeflow run finished")
    _echo("warehouse", settings.warehouse_url)
    _echo("snapshot (DVC)", out["snapshot"])
    _echo("MLflow tracking", settings.tracking_uri)
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
            f"{r['rows']} rows -> {r['destination']} ({r['rows'] / max(r['seconds'], 1e-9):.0f} rows/s)",
        )
    typer.echo(f"\nbrowse runs: mlflow ui --backend-store-uri {settings.tracking_uri}")


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
    from pipelines.warehouse import parse_ref
    from vae_models.schema import SchemaError

    settings = _settings(params, sets)
    ref, df = ingest.load_source(settings, source, key)
    try:
        schema = ingest.table_schema(settings, df, key)
    except SchemaError as exc:
        from pipelines.errors import DataError

        raise DataError(f"{ref}: {exc}") from exc
    name = parse_ref(source, settings.warehouse_url).name
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
    from pipelines.flows import retrain

    _settings(params, sets)
    out = retrain(params=params, overrides=sets, source=source, key=key, model_name=name)
    typer.echo(f"registered {out['model_name']} version {out['version']} (run {out['run_id']})")
    decision = out["promotion"]
    typer.echo(("promoted to champion: " if decision["promoted"] else "not promoted: ") + decision["reason"])
    typer.echo(json.dumps(out["metrics"], indent=2, sort_keys=True))


@app.command()
def promote(
    name: Annotated[str, typer.Option("--name", help="registered model name")],
    version: Annotated[str | None, typer.Option("--version", help="default: the latest version")] = None,
    params: Params = None,
    sets: Sets = None,
) -> None:
    """Apply the promotion gate to a version (default: the latest)."""
    from pipelines import registry

    settings = _settings(params, sets)
    client = registry.get_client(settings)
    if version is None:
        registry.resolve(client, f"models:/{name}/1")  # clear error for an unknown model
        version = str(max(int(v.version) for v in client.search_model_versions(f"name='{name}'")))
    registry.resolve(client, f"models:/{name}/{version}")  # clear error for an unknown version
    snapshot = client.get_model_version(name, version).tags.get("vaeflow.snapshot")
    snap_path = settings.path(settings.snapshot.dir) / snapshot if snapshot else None
    score = None
    if snap_path is not None and snap_path.is_dir():  # re-score both on the challenger's eval split
        from pipelines.flows import rescorer

        score = rescorer(settings, str(snap_path), name)
    decision = registry.promote(client, name, version, settings, score)
    typer.echo(
        f"{name} v{version}: {'promoted to champion' if decision.promoted else 'not promoted'} ({decision.reason})"
    )


@app.command()
def rollback(
    name: Annotated[str, typer.Option("--name", help="registered model name")],
    params: Params = None,
    sets: Sets = None,
) -> None:
    """Move the champion alias back to the previous champion."""
    from pipelines import registry

    settings = _settings(params, sets)
    old, new = registry.rollback(registry.get_client(settings), name, settings)
    typer.echo(f"{name}: champion moved from v{old} back to v{new}")


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
    from pipelines.flows import batch_score

    if job not in JOBS:
        raise VaeflowError(f"unknown job {job!r}: use one of {', '.join(JOBS)}")
    if job != "sample" and source is None:
        raise VaeflowError(f"job {job!r} needs --source")
    settings = _settings(params, sets)
    results = batch_score(
        params=params,
        overrides=sets,
        model_uri=model,
        source=source or settings.data.source,
        jobs=[job],
        dest=dest,
    )
    for r in results:
        typer.echo(f"{r['job']}: {r['rows']} rows -> {r['destination']} (model v{r['model_version']})")


@app.command()
def serve(params: Params = None, sets: Sets = None) -> None:
    """Serve the retrain, batch_score and monitor deployments on their crons (needs a Prefect server)."""
    if not os.environ.get("PREFECT_API_URL"):
        raise VaeflowError(
            "vaeflow serve needs a Prefect server: start one (prefect server start) and set PREFECT_API_URL"
        )
    from prefect import serve as prefect_serve

    from pipelines.flows import batch_score, monitor, retrain

    settings = _settings(params, sets)
    parameters = {"params": str(Path(params).resolve()) if params else None, "overrides": sets}
    prefect_serve(
        retrain.to_deployment(name="nightly", cron=settings.schedule.retrain_cron, parameters=parameters),
        batch_score.to_deployment(name="nightly", cron=settings.schedule.score_cron, parameters=parameters),
        monitor.to_deployment(name="hourly", cron=settings.schedule.monitor_cron, parameters=parameters),
    )


@stage_app.command("ingest")
def stage_ingest(params: Params = None, sets: Sets = None) -> None:
    """Seed the embedded warehouse if needed, then snapshot and split the configured source."""
    from pipelines import ingest

    settings = _settings(params, sets)
    ingest.seed_warehouse(settings)
    snap = ingest.take_snapshot(settings, settings.data.source, settings.data.key)
    typer.echo(f"snapshot {snap.path}: {snap.manifest['rows']}")


@stage_app.command("validate")
def stage_validate(params: Params = None, sets: Sets = None) -> None:
    """Validate the configured source's snapshot; writes reports/NAME/validation.json."""
    import pandas as pd

    from pipelines import ingest, validation
    from pipelines.warehouse import parse_ref

    settings = _settings(params, sets)
    snap = ingest.Snapshot(
        settings.path(settings.snapshot.dir) / parse_ref(settings.data.source, settings.warehouse_url).name
    )
    df = pd.concat([snap.read(s) for s in ingest.SPLITS], ignore_index=True)
    report = validation.validate_frame(df, snap.schema, settings, snap.name)
    out = settings.path("reports") / snap.name / "validation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    typer.echo(report.text())


@stage_app.command("train")
def stage_train(params: Params = None, sets: Sets = None) -> None:
    """Train, evaluate, register and promote from the configured source's snapshot."""
    from pipelines import flows, ingest, registry, tracking, validation

    settings = _settings(params, sets)
    from pipelines.warehouse import parse_ref

    snap = ingest.Snapshot(
        settings.path(settings.snapshot.dir) / parse_ref(settings.data.source, settings.warehouse_url).name
    )
    report_path = settings.path("reports") / snap.name / "validation.json"
    data = json.loads(report_path.read_text())
    report = validation.ValidationReport(data["suite"], data["data"], data["success"], [])
    trained = tracking.train_and_register(snap, settings, settings.mlflow.model_name, report)
    score = flows.rescorer(settings, str(snap.path), trained.name)
    decision = registry.promote(registry.get_client(settings), trained.name, trained.version, settings, score)
    typer.echo(f"registered {trained.name} v{trained.version}; {decision.reason}")


@stage_app.command("score")
def stage_score(params: Params = None, sets: Sets = None) -> None:
    """Run every configured batch job with the champion; writes reports/NAME/score.json."""
    from pipelines import registry, scoring
    from pipelines.flows import _load_bundle
    from pipelines.warehouse import parse_ref

    settings = _settings(params, sets)
    client = registry.get_client(settings)
    resolved = registry.resolve(client, f"models:/{settings.mlflow.model_name}@{registry.CHAMPION}")
    bundle = _load_bundle(settings, resolved.uri)
    name = parse_ref(settings.data.source, settings.warehouse_url).name
    summary = []
    for job in settings.score.jobs:
        dest = settings.score.dest_template.format(source=name, job=job)
        r = scoring.run_job(
            bundle,
            job,
            settings.data.source,
            dest,
            settings,
            model_version=resolved.version,
            run_id=resolved.run_id,
        )
        summary.append(
            {"job": job, "rows": r.rows, "destination": r.destination, "model_version": r.model_version}
        )
    out = settings.path("reports") / name / "score.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    typer.echo(json.dumps(summary, indent=2))


def main() -> None:
    """Entry point: one clear error line and exit code 2 for every `VaeflowError`."""
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "pipelines")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")  # stages run outside flows
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "alembic", "great_expectations"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        app()
    except VaeflowError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except FileNotFoundError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
