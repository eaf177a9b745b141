"""One MLflow run per training: params, per-epoch metrics, held-out metrics, the GX result,
plots, and the pyfunc model registered as a new version of a named model."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata as md
import json
import logging
import os
import shutil
import socket
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature, infer_signature
from mlflow.types import DataType
from mlflow.types.schema import AnyType, ColSpec, Schema

from pipelines import atomic, names, plots, registry, search, training
from pipelines.config import Settings
from pipelines.credentials import redact
from pipelines.errors import TransientError
from pipelines.ingest import Snapshot
from pipelines.scoring import DEFAULT_PARAMS, score_frame
from pipelines.validation import ValidationReport
from vae_models.bundle import ModelBundle, save_bundle

log = logging.getLogger(__name__)
# the signature types inputs loosely on purpose (see model_signature): MLflow's hint about
# integer columns and missing values does not apply
warnings.filterwarnings(
    "ignore", message="Hint: Inferred schema contains integer column", category=UserWarning
)
CODE_ROOT = Path(__file__).resolve().parents[1]
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            value = json.dumps(v) if isinstance(v, list | dict) else v
            out[f"{prefix}{k}"] = redact(value) if isinstance(value, str) else value
    return out


def _is_local_store(uri: str) -> bool:
    return not uri.startswith(("http://", "https://", "databricks"))


def ensure_experiment(settings: Settings, name: str | None = None) -> str:
    """Point MLflow at the configured store and get or create the experiment (default: the
    configured one); returns its id."""
    uri = settings.tracking_uri
    registry.check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(settings.registry_uri)
    name = name or settings.mlflow.experiment
    try:
        exp = mlflow.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = settings.path(settings.mlflow.artifact_location).as_uri() if _is_local_store(uri) else None
        try:
            return mlflow.create_experiment(name, artifact_location=location)
        except MlflowException:  # created by a concurrent run
            return mlflow.get_experiment_by_name(name).experiment_id
    except MlflowException as exc:
        raise TransientError(
            f"cannot reach the MLflow tracking store {redact(uri)}: {redact(exc.message)}"
        ) from exc


def _file_md5(path: Path) -> str:
    h = hashlib.md5()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def snapshot_md5(path: Path) -> str:
    """Content hash of a snapshot directory: md5 over its files' relative paths and md5s."""
    outer = hashlib.md5()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        outer.update(f"{file.relative_to(path).as_posix()}:{_file_md5(file)}\n".encode())
    return outer.hexdigest()


def params_hash(settings: Settings) -> str:
    """sha256 of the validated configuration (what was trained, not how the file was written:
    a preset's values are in the sections it set, so train.preset and train.presets are left out)."""
    dump = settings.model_dump(mode="json", by_alias=True, exclude={"train": {"preset", "presets"}})
    text = json.dumps(dump, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def lineage_tags(snapshot: Snapshot, settings: Settings) -> dict[str, str]:
    """Where a version came from: code (git commit), data (snapshot hash, and DVC's hash of
    this very snapshot, committed to the DVC cache and pushed: see `lineage`), configuration
    (params hash)."""
    from pipelines import lineage

    tags = {"vaeflow.snapshot_md5": snapshot_md5(snapshot.path), "vaeflow.params_hash": params_hash(settings)}
    tags["vaeflow.code_version"] = md.version("vaeflow")
    commit = git_commit(CODE_ROOT) or git_commit(settings.root)  # the code that ran, else the project
    if commit:
        tags["vaeflow.git_commit"] = commit
    tags.update(lineage.snapshot_tags(snapshot.path, settings))
    return tags


def git_commit(root: Path) -> str | None:
    """HEAD of the git checkout at `root` (None outside one); a dirty tree gets a `+dirty` suffix."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        )
        commit = out.stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return f"{commit}+dirty" if commit and dirty else commit or None
    except (OSError, subprocess.SubprocessError):
        return None


def _pip_requirements() -> list[str]:
    """What the logged model needs to load and predict (its code is `vae_models`, shipped with
    it): installable pins, without a local build tag such as torch's `+cpu`."""
    names = ["torch", "numpy", "pandas", "pydantic", "mlflow"]
    return [f"{n}=={md.version(n).split('+')[0]}" for n in names]


def model_signature(bundle: ModelBundle, reference: pd.DataFrame) -> ModelSignature:
    """Inputs: the key and the modelled columns, each present, typed as the training data holds
    them: `double` for float columns (a null is NaN), `string`, `boolean`, and `any` for
    integer columns, which MLflow cannot type when they may hold nulls at scoring time (a null
    makes pandas store them as floats, and MLflow never casts int64 to double); outputs: the
    default (anomaly) job's columns, every job's in the model's metadata (`job_outputs`);
    params: job, k, seed, rows."""
    frame = reference[bundle.schema.input_columns].reset_index(drop=True)
    inferred = infer_signature(frame, score_frame(bundle, frame.head(5), "anomaly"), params=DEFAULT_PARAMS)
    integer = (DataType.long, DataType.integer)
    inputs = Schema(
        [
            ColSpec(AnyType() if c.type in integer else c.type, c.name, required=True)
            for c in inferred.inputs.inputs
        ]
    )
    return ModelSignature(inputs=inputs, outputs=inferred.outputs, params=inferred.params)


def job_outputs(bundle: ModelBundle) -> dict[str, str]:
    """What `predict` returns for each `params["job"]` (the model's metadata)."""
    schema = bundle.schema
    key = f"`{schema.key}`, " if schema.key else ""
    codes = ", ".join(f"z_{j}" for j in range(bundle.vae.config.latent_dim))
    return {
        "impute": "the input columns with every missing modelled cell filled (observed cells unchanged)",
        "anomaly": f"{key}anomaly_score (-log p(x) per observed cell, higher = more unusual), "
        "is_anomaly (score above the threshold calibrated on validation rows)",
        "embed": f"{key}{codes} (posterior means, float32)",
        "sample": f"params['rows'] synthetic rows of the modelled columns: {', '.join(schema.names)}",
    }


# the configuration that shapes the model (the rest of the train stage's sections: the run's
# config/settings.json, which holds exactly what the stage reads)
MODEL_PARAMS = (
    "model.",
    "train.preset",  # its values are logged as the model.* / train.* params they set
    "train.batch_size",
    "train.max_steps",
    "train.min_steps",
    "train.max_epochs",
    "train.max_minutes",
    "train.heldout_cells",
    "train.heldout_k",
    "train.heldout_rows",
    "train.monitor",
    "train.patience",
    "train.gradient_clip_val",
    "train.seed",
    "snapshot.val_fraction",
    "snapshot.eval_fraction",
    "snapshot.seed",
    "evaluation.importance_samples",
    "evaluation.false_alarm_rate",
    "score.importance_samples",
    "train.search.",
)


def model_params(settings: Settings) -> dict[str, Any]:
    """The run's params: the settings that change the model or its evaluation (not paths,
    servers or progress bars)."""
    dump = settings.model_dump(mode="json", by_alias=True, exclude={"train": {"presets"}})
    return {k: v for k, v in _flatten(dump).items() if k.startswith(MODEL_PARAMS)}


def best_metrics(result: training.FitResult) -> dict[str, float]:
    """The kept weights' validation: `best_epoch`, `best_step` and `best_<metric>` for each
    validation metric of that row (the run page's last `val_*` values are the last validation's)."""
    row = result.best
    out = {f"best_{k}": v for k, v in row.items() if k.startswith("val_")}
    if row:
        out.update(best_epoch=row["epoch"], best_step=row["step"])
    return out


def log_datasets(snapshot: Snapshot, splits: dict[str, pd.DataFrame]) -> None:
    """Each split as an MLflow dataset input of the active run (MLflow's Datasets tab): the
    snapshot's split file as source, its md5 as digest, the schema and row count as profile."""
    import mlflow.data

    split_names = {"training": "train", "validation": "val", "evaluation": "eval"}
    for context, frame in splits.items():
        path = snapshot.split_path(split_names[context])
        digest = _file_md5(path)[:16]
        with warnings.catch_warnings():  # a local path is "a LocalArtifactDatasetSource" two ways
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(frame, source=str(path), name=snapshot.name, digest=digest)
        mlflow.log_input(dataset, context=context)


def version_description(
    snapshot: Snapshot,
    settings: Settings,
    report: ValidationReport,
    metrics: dict[str, float],
    result: training.FitResult,
    data_md5: str,
) -> str:
    """The model version's description: what it is, what it trained on, how it scored."""
    m = settings.model
    manifest = snapshot.manifest
    lines = [
        f"Tabular VAE: latent {m.latent_dim}, hidden {m.hidden_dims}"
        f"{', linear skip' if m.linear_skip else ''}; {len(snapshot.schema.numeric)} numeric and "
        f"{len(snapshot.schema.categorical)} categorical columns.",
        f"Data: snapshot `{snapshot.name}` of {redact(manifest.get('source', '?'))} "
        f"({int(metrics.get('eval_rows', 0))} evaluation rows), snapshot md5 {data_md5[:12]}.",
        f"Training: {int(result.best.get('step', 0))} of {result.budget.max_steps} steps kept "
        f"(batch {result.budget.batch_size}, {result.module.vae.train_k} sample(s) per row, "
        f"selected on {result.monitor}).",
        f"Validation: {'passed' if report.success else 'FAILED'} ({len(report.outcomes)} expectations).",
        "Evaluation: "
        + ", ".join(
            f"{k} {metrics[k]:.4g}"
            for k in ("eval_nll_per_cell", "eval_heldout_rmse_std", "eval_heldout_rmse_mean_baseline")
            if k in metrics
        )
        + ".",
    ]
    return "\n".join(lines)


@dataclass
class TrainedVersion:
    name: str
    version: str
    run_id: str
    metrics: dict[str, float]
    bundle_path: Path


def train_and_register(
    snapshot: Snapshot,
    settings: Settings,
    model_name: str,
    report: ValidationReport,
    tags: dict[str, str] | None = None,
) -> TrainedVersion:
    """Fit, evaluate and log one training run, then register it as a new model version.

    The run ends FINISHED, FAILED (an error; a tracking server that stops answering is a
    `TransientError`) or KILLED (interrupted or terminated); a run whose process was killed
    outright is ended KILLED by the next training on the same host (`reap_orphaned_runs`)."""
    model_name = names.model_name(model_name)
    experiment_id = ensure_experiment(settings)
    reap_orphaned_runs(settings)
    run_tags = {
        "vaeflow.model_name": model_name,
        "vaeflow.snapshot": snapshot.name,
        "vaeflow.source": redact(snapshot.manifest["source"]),
        **process_tags(),
        **(tags or {}),
    }
    run_tags.update(lineage_tags(snapshot, settings))
    with tracking_errors(settings):
        client = mlflow.MlflowClient(tracking_uri=settings.tracking_uri)
        run_id = client.create_run(experiment_id, run_name=f"train-{model_name}", tags=run_tags).info.run_id
    try:
        with tracking_errors(settings):
            return _train_in_run(snapshot, settings, model_name, report, run_id, run_tags)
    except BaseException as exc:
        end_interrupted_run(settings, run_id, exc)
        raise


def _log_model(
    bundle: ModelBundle, bundle_path: Path, reference: pd.DataFrame, model_name: str, snapshot: str
):
    """The pyfunc model: this code file, `vae_models` as its code, the bundle as its artifact."""
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=str(MODEL_CODE),
        code_paths=[str(CODE_ROOT / "vae_models")],
        artifacts={"bundle": str(bundle_path)},
        signature=model_signature(bundle, reference),
        input_example=reference.head(5)[bundle.schema.input_columns].reset_index(drop=True),
        pip_requirements=_pip_requirements(),
        metadata={"job_outputs": job_outputs(bundle)},
        registered_model_name=model_name,
        tags={"vaeflow.snapshot": snapshot},
    )


def _train_in_run(
    snapshot: Snapshot,
    settings: Settings,
    model_name: str,
    report: ValidationReport,
    run_id: str,
    run_tags: dict[str, str],
) -> TrainedVersion:
    train_df, val_df, eval_df = training.snapshot_frames(snapshot)
    schema = snapshot.schema
    with mlflow.start_run(run_id=run_id):
        mlflow.log_params(
            {"data.rows_train": len(train_df), "data.rows_val": len(val_df), "data.rows_eval": len(eval_df)}
        )
        log_datasets(snapshot, {"training": train_df, "validation": val_df, "evaluation": eval_df})
        # keyed by data and config, not by run: a retried task resumes from its last checkpoint
        attempt = f"{run_tags['vaeflow.snapshot_md5'][:12]}-{run_tags['vaeflow.params_hash'][:12]}"
        ckpt_dir = settings.path(settings.train.checkpoint_dir) / model_name / attempt
        found = search.fit_best(
            train_df,
            val_df,
            schema,
            settings,
            checkpoint_dir=ckpt_dir,
            in_mlflow_run=True,
            run_tags=process_tags(),
        )
        result, settings = found.fit, found.settings  # the settings with the kept trial's model.*
        budget = result.budget
        per_epoch = budget.val_every >= budget.steps_per_epoch
        if found.trials:  # the kept trial's validation curve on this run too
            training.history_to_mlflow(
                training.MlflowRun(settings.tracking_uri, run_id), result.history, per_epoch
            )
            mlflow.log_dict({"trials": found.trials}, "search/trials.json")
        mlflow.log_params(
            {
                **model_params(settings),
                "train.batch_size_used": budget.batch_size,
                "train.max_steps_used": budget.max_steps,
                "model.n_importance_used": result.module.vae.train_k,
                "search.trials": len(found.trials),
            }
        )
        mlflow.log_dict(_flatten(settings.model_dump(mode="json", by_alias=True)), "config/settings.json")
        mlflow.set_tag("vaeflow.metric_step", "epoch" if per_epoch else "global_step")
        bundle = ModelBundle(vae=result.module.vae, schema=result.schema)
        evaluation = training.evaluate(bundle, eval_df, val_df, settings)
        bundle.extra.update(
            anomaly_threshold=evaluation.anomaly_threshold,
            false_alarm_rate=settings.evaluation.false_alarm_rate,
            run_id=run_id,
        )
        metrics = {**evaluation.metrics, **best_metrics(result), "epochs_trained": float(result.epochs)}
        mlflow.log_metrics(metrics)
        mlflow.log_dict(report.to_dict(), "validation/gx_result.json")
        mlflow.log_metric("validation.warnings", len(report.warnings))  # non-blocking GX failures
        if report.data_docs and Path(report.data_docs).is_dir():
            mlflow.log_artifacts(report.data_docs, "validation/data_docs")
        mlflow.log_dict(bundle.schema.to_dict(), "schema.json")
        mlflow.set_tag("vaeflow.validation", "passed" if report.success else "failed")
        reports_dir = settings.path("reports") / snapshot.name
        for path in plots.make_plots(
            result.history,
            bundle,
            eval_df,
            evaluation.column_errors,
            reports_dir,
            anomaly_scores=evaluation.extra.get("anomaly_scores"),
            threshold=evaluation.anomaly_threshold,
            max_rows=settings.evaluation.latent_plot_rows,
            k=settings.score.importance_samples,
            seed=settings.train.seed,
        ):
            mlflow.log_artifact(str(path), artifact_path="plots")
        training.write_dvc_outputs(metrics, reports_dir)
        model_dir = settings.path(settings.train.model_dir) / model_name
        with atomic.target_lock(model_dir):  # another training of this model must not swap it now
            bundle_path = save_bundle(bundle, model_dir)
            info = _log_model(bundle, bundle_path, eval_df.head(1000), model_name, snapshot.name)
    version = str(info.registered_model_version)
    client = registry.get_client(settings)
    # the checksums first: a version without them is never loaded, one without `validation`
    # never promoted
    registry.record_artifacts(client, settings, model_name, version)
    for key, value in {
        **run_tags,
        "validation": "passed" if report.success else "failed",
        **{f"metric.{k}": f"{v:.6g}" for k, v in metrics.items()},
    }.items():
        client.set_model_version_tag(model_name, version, key, str(value))
    client.update_model_version(
        model_name,
        version,
        description=version_description(
            snapshot, settings, report, metrics, result, run_tags["vaeflow.snapshot_md5"]
        ),
    )
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # registered: nothing left to resume
    log.info("registered %s version %s (run %s)", model_name, version, run_id)
    return TrainedVersion(model_name, version, run_id, metrics, bundle_path)


# ---------------------------------------------------------------- runs that end


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` (clock ticks since boot), to tell it from a later
    process with the same pid; None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def process_tags() -> dict[str, str]:
    """Which process owns a run: host, pid and the pid's start time."""
    return {
        "vaeflow.host": socket.gethostname(),
        "vaeflow.pid": str(os.getpid()),
        "vaeflow.pid_start": _process_start(os.getpid()) or "",
    }


def reap_orphaned_runs(settings: Settings, experiment: str | None = None) -> list[str]:
    """End KILLED every RUNNING run of this host whose process is gone (a SIGKILL, a lost
    machine); returns their run ids. Runs of other hosts are left alone."""
    if _process_start(os.getpid()) is None:  # no /proc (macOS, Windows): liveness cannot be told
        return []
    host = socket.gethostname()
    client = mlflow.MlflowClient(tracking_uri=settings.tracking_uri)
    exp = client.get_experiment_by_name(experiment or settings.mlflow.experiment)
    if exp is None:
        return []
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`vaeflow.host` = '{host.replace(chr(39), '')}'",
        max_results=1000,
    )
    reaped = []
    for run in runs:
        tags = run.data.tags
        pid = int(tags.get("vaeflow.pid", "0") or 0)
        if pid and _process_start(pid) is not None and _process_start(pid) == tags.get("vaeflow.pid_start"):
            continue  # still running
        client.set_tag(run.info.run_id, "vaeflow.ended_by", f"process {pid} ended without closing the run")
        client.set_terminated(run.info.run_id, "KILLED")
        reaped.append(run.info.run_id)
        log.warning("run %s of process %d (gone) ended as KILLED", run.info.run_id, pid)
    return reaped


def end_interrupted_run(settings: Settings, run_id: str, exc: BaseException) -> None:
    """Best effort: KILLED for an interrupt or termination, FAILED for an error (MLflow's own
    context ends it FAILED too; a tracking server that is down cannot be told, and the next
    training on this host ends the run instead)."""
    status = "KILLED" if isinstance(exc, KeyboardInterrupt | SystemExit) else "FAILED"
    with contextlib.suppress(Exception):
        mlflow.MlflowClient(tracking_uri=settings.tracking_uri).set_terminated(run_id, status)


@contextlib.contextmanager
def tracking_errors(settings: Settings):
    """A tracking store that stops answering mid-run becomes a `TransientError` naming it."""
    try:
        yield
    except MlflowException as exc:
        if _unreachable(exc):
            raise TransientError(
                f"the MLflow tracking store {redact(settings.tracking_uri)} stopped answering: "
                f"{redact(exc.message).splitlines()[0][:300]}"
            ) from exc
        raise


def _unreachable(exc: BaseException) -> bool:
    text = str(exc)
    signs = (
        "Max retries exceeded",
        "Connection refused",
        "ConnectionError",
        "timed out",
        "database is locked",
    )
    return any(sign in text for sign in signs)
