"""Train: build the Lightning Trainer, fit on a snapshot, evaluate on its frozen eval split.

Each validation's metrics go to MLflow from `ValidationHistory` (at the epoch); held-out
metrics, plots, the validation report and the model bundle are logged into the same run by
`tracking.py`.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint

from pipelines.config import Settings
from pipelines.ingest import Snapshot
from vae_models import inference
from vae_models.bundle import ModelBundle
from vae_models.data import Budget, HeldOut, hold_out_cells, plan_budget, table_loader, training_samples
from vae_models.module import VAEModule
from vae_models.schema import EncodedTable, TableSchema
from vae_models.vae import TableBatch, TabularVAE

log = logging.getLogger(__name__)


class _LightningNoise(logging.Filter):
    """Lightning's advertisements and restated settings, not what the run is doing."""

    NOISE = ("💡 Tip", "was configured so validation will run")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOISE[0]) and self.NOISE[1] not in str(record.msg)


def _quiet_lightning() -> None:
    """One line per Lightning message: `lightning` adds a console handler of its own, which
    prints each line a second time when the application logs to the console already."""
    if logging.getLogger().handlers:
        logging.getLogger("lightning").handlers.clear()
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _LightningNoise) for f in rank_zero.filters):
        rank_zero.addFilter(_LightningNoise())
    # torch deprecates a call inside Lightning's own code: nothing a user can change
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


_quiet_lightning()


class _AfterWarmUp(Callback):
    """Acts on the validations from the end of the KL warm-up on (`VAEModule.warm_up_steps`):
    until the KL weight reaches beta the network trains another objective, and on a small table
    a checkpoint from then can score the held-out cells best yet be a poor density model
    (measured: wine's anomaly AUROC 0.487 from a step-100 checkpoint, 0.776 after the warm-up)."""

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step >= pl_module.warm_up_steps():
            super().on_validation_end(trainer, pl_module)


class SelectAfterWarmUp(_AfterWarmUp, ModelCheckpoint):
    """Lightning's ModelCheckpoint, keeping the best validation after the KL warm-up."""


class StopAfterWarmUp(_AfterWarmUp, EarlyStopping):
    """Lightning's EarlyStopping, counting the validations after the KL warm-up."""


@dataclass(frozen=True)
class MlflowRun:
    """Where a fit's validation metrics go: a run of an MLflow tracking store."""

    tracking_uri: str
    run_id: str


class ValidationHistory(Callback):
    """One row per validation: epoch, global step, the mean training loss over the steps since
    the previous validation, and the validation metrics.

    Rows are appended to a JSON-lines file on rank 0 (the history survives spawned DDP workers
    and a resumed fit), logged to `run` when given (MLflow step = the epoch when validations
    fall at epoch ends, else the global step; the run's `vaeflow.metric_step` tag says which),
    and written as one log line each, so a fit whose output is not a terminal shows progress."""

    def __init__(
        self, path: Path, monitor: str, max_steps: int, per_epoch: bool, run: MlflowRun | None = None
    ) -> None:
        self.path, self.monitor, self.max_steps = Path(path), monitor, max_steps
        self.per_epoch, self.run = per_epoch, run
        self._loss: torch.Tensor | None = None
        self._batches = 0

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A fit resumed from a checkpoint (a retried task, in a new run): its validations so
        far go to this run too, so `best_*` always names a step the run shows."""
        if self.run is not None and trainer.is_global_zero:
            for row in self.rows():
                self._to_mlflow(row)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = (outputs["loss"] if isinstance(outputs, dict) else outputs).detach()
        self._loss = loss if self._loss is None else self._loss + loss
        self._batches += 1

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        train_loss = float(self._loss) / self._batches if self._batches else None
        self._loss, self._batches = None, 0
        if not trainer.is_global_zero:
            return
        row = {"epoch": float(trainer.current_epoch), "step": float(trainer.global_step)}
        if train_loss is not None:
            row["train_loss"] = train_loss
        row.update(
            {
                k: float(v)
                for k, v in trainer.callback_metrics.items()
                if k.startswith("val_") and v.numel() == 1
            }
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.run is not None:
            self._to_mlflow(row)
        self._log_line(row, pl_module.warm_up_steps())

    def _to_mlflow(self, row: dict[str, float]) -> None:
        history_to_mlflow(self.run, [row], self.per_epoch)

    def _log_line(self, row: dict[str, float], from_step: float) -> None:
        best = best_row(self.rows(), self.monitor, from_step)
        values = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k not in ("epoch", "step"))
        tail = f" (best {best[self.monitor]:.4g} at step {int(best['step'])})" if best else ""
        log.info("epoch %d, step %d/%d: %s%s", row["epoch"], row["step"], self.max_steps, values, tail)

    def rows(self) -> list[dict[str, float]]:
        """The validations so far, in step order; a validation redone after a crash counts
        once, its latest values winning."""
        if not self.path.exists():
            return []
        latest: dict[float, dict[str, float]] = {}
        for line in self.path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                r.setdefault("step", r["epoch"])  # a history written before steps were recorded
                latest[r["step"]] = {**latest.get(r["step"], {}), **r}
        return [latest[s] for s in sorted(latest)]


def history_to_mlflow(run: MlflowRun, rows: list[dict[str, float]], per_epoch: bool) -> None:
    """Validation rows as MLflow metrics of `run` (step: the epoch, or the global step)."""
    import time

    import mlflow
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [
        Metric(k, v, now, int(row["epoch"] if per_epoch else row["step"]))
        for row in rows
        for k, v in row.items()
        if k != "step" and math.isfinite(v)
    ]
    client = mlflow.MlflowClient(run.tracking_uri)
    for start in range(0, len(metrics), 1000):  # MLflow's batch limit
        client.log_batch(run.run_id, metrics=metrics[start : start + 1000])


def best_row(history: list[dict[str, float]], monitor: str, from_step: float = 0.0) -> dict[str, float]:
    """The validation from step `from_step` on (the end of the KL warm-up) whose `monitor`
    value was lowest: the one whose weights were kept."""
    scored = [
        r for r in history if r.get("step", 0.0) >= from_step and math.isfinite(r.get(monitor, math.nan))
    ]
    return min(scored, key=lambda r: r[monitor]) if scored else {}


def monitor_for(monitor: str, held: HeldOut, rows: np.ndarray) -> str:
    """`train.monitor`, or the metric the held-out cells of the validated `rows`
    (`held.sample_rows`) can give when they cannot give it (logged): val_loss when no cell
    could be held out (one modelled cell per row), the held-out NLL when no numeric cell is
    among them (val_heldout_mse is the numeric cells' error: a table without numeric columns,
    or with too few observed)."""
    if monitor != "val_loss" and not held.cells:
        log.info(
            "no cell could be held out (one modelled cell per row): monitoring val_loss, not %s", monitor
        )
        return "val_loss"
    if monitor == "val_heldout_mse" and not held.h_num[rows].any():
        log.info("no numeric cell is among the held-out cells: monitoring val_heldout_nll, not %s", monitor)
        return "val_heldout_nll"
    return monitor


@dataclass
class FitResult:
    module: VAEModule
    schema: TableSchema  # the schema given, with each log1p column's imputation estimate chosen
    history: list[dict[str, float]]  # one row per validation (ValidationHistory)
    best_checkpoint: str | None
    epochs: float  # passes over the training rows at the last validation
    budget: Budget
    monitor: str  # the metric that picked the kept weights
    best: dict[str, float]  # the history row of the kept weights


def fit(
    train_df: pd.DataFrame,
    val_df: pd.DataFrame,
    schema: TableSchema,
    settings: Settings,
    *,
    mlflow_run: MlflowRun | None = None,
    checkpoint_dir: Path | None = None,
    callbacks: list[Callback] | None = None,
) -> FitResult:
    """Fit a VAE within its step budget, with early stopping and checkpoints on held-out cells;
    returns the best weights loaded.

    A share of the observed training cells (`train.heldout_cells`) is hidden from training and
    scored at each validation given the rest of its row: imputation, the model's target, picks
    the checkpoint. If `checkpoint_dir` holds a `last.ckpt` from an interrupted fit (a retried
    task), training resumes from it: weights, optimiser, step and callback states. The held-out
    cells also pick each log1p column's imputation estimate (`inference.choose_log1p_estimates`).
    Each validation is a row of the history, a log line and, with `mlflow_run`, MLflow metrics."""
    cfg = settings.train
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    held = hold_out_cells(schema.encode(train_df), cfg.heldout_cells, seed=cfg.seed)
    val = schema.encode(val_df)
    budget = plan_budget(
        len(train_df),
        batch_size=None if cfg.batch_size == "auto" else cfg.batch_size,
        max_steps=None if cfg.max_steps == "auto" else cfg.max_steps,
        min_steps=cfg.min_steps,
        max_epochs=cfg.max_epochs,
    )
    validated = held.sample_rows(cfg.heldout_rows, cfg.seed)  # the held-out rows each validation scores
    monitor = monitor_for(cfg.monitor, held, validated)
    k = training_samples(budget, settings.model.n_importance, settings.model.architecture)
    config = settings.model.model_copy(update={"num_logvar_min": schema.logvar_floors(), "n_importance": k})
    module = VAEModule(len(schema.numeric), schema.cat_sizes, config.model_dump(), heldout_k=cfg.heldout_k)
    ckpt_dir = checkpoint_dir or settings.path(cfg.checkpoint_dir)
    history = ValidationHistory(
        Path(ckpt_dir) / "history.jsonl",
        monitor,
        budget.max_steps,
        per_epoch=budget.val_every >= budget.steps_per_epoch,
        run=mlflow_run,
    )
    # all three act when a validation ends (it may fall mid-epoch: a fit resumed from a checkpoint
    # written there re-enters that epoch's end before any new validation has run); the kept
    # checkpoint and early stopping pass over the validations of the KL warm-up (_AfterWarmUp),
    # while last.ckpt, which a retried fit resumes from, is written at every validation
    # (no version counter: a last.ckpt the callbacks' restored state does not name, e.g. one an
    # older release wrote, is overwritten rather than left beside a last-v1.ckpt)
    keep = {"dirpath": ckpt_dir, "save_on_train_epoch_end": False, "enable_version_counter": False}
    checkpoint = SelectAfterWarmUp(filename="best", monitor=monitor, **keep)
    latest = ModelCheckpoint(filename="last", **keep)
    log.info(
        "training on %d rows: batch %d, up to %d steps (%d per epoch), %d sample(s) per row, validating every %d",
        len(train_df),
        budget.batch_size,
        budget.max_steps,
        budget.steps_per_epoch,
        k,
        budget.val_every,
    )
    trainer = L.Trainer(
        max_steps=budget.max_steps,
        max_epochs=cfg.max_epochs or -1,  # in each process's epochs, should DDP split the rows
        max_time={"minutes": cfg.max_minutes} if cfg.max_minutes else None,
        **budget.trainer_args(),
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        strategy=cfg.strategy,
        num_nodes=cfg.num_nodes,
        logger=False,  # metrics go to MLflow through ValidationHistory, at the epoch
        callbacks=[
            StopAfterWarmUp(monitor=monitor, patience=cfg.patience, check_on_train_epoch_end=False),
            checkpoint,
            latest,
            history,
            *(callbacks or []),
        ],
        gradient_clip_val=cfg.gradient_clip_val,
        deterministic=cfg.deterministic,
        enable_progress_bar=cfg.progress_bar and sys.stdout.isatty(),  # else: one log line per validation
        enable_model_summary=False,
        log_every_n_steps=max(1, min(50, budget.steps_per_epoch)),
        num_sanity_val_steps=0,
    )
    if "spawn" in str(cfg.strategy):
        # tensors reach spawned workers through named shared-memory files, not passed fds,
        # which fail in containers ("unable to resize file ... Invalid argument")
        torch.multiprocessing.set_sharing_strategy("file_system")
    last = Path(ckpt_dir) / "last.ckpt"
    if last.exists():
        log.info("resuming training from %s", last)
    else:
        history.path.unlink(missing_ok=True)  # a fresh fit starts a fresh history
    val_loaders = [table_loader(val, 4096, shuffle=False)]
    if monitor != "val_loss":
        val_loaders.append(held.loader(validated, 4096))
    trainer.fit(
        module,
        train_dataloaders=table_loader(held.visible, budget.batch_size, shuffle=True, seed=cfg.seed),
        val_dataloaders=val_loaders,
        ckpt_path=str(last) if last.exists() else None,
    )
    best = checkpoint.best_model_path or None
    kept_step = None
    if best:
        kept_ckpt = torch.load(best, map_location="cpu", weights_only=True)
        module.load_state_dict(kept_ckpt["state_dict"])
        kept_step = float(kept_ckpt["global_step"])  # read here: spawned DDP fits leave no trainer
    module.cpu().eval()
    if held.cells:
        schema = inference.choose_log1p_estimates(
            module.vae, held, schema, k=cfg.heldout_k, max_rows=cfg.heldout_rows, seed=cfg.seed
        )
    rows = history.rows()
    if not rows:
        epochs = 0.0
    elif history.per_epoch:  # validations at epoch ends
        epochs = rows[-1]["epoch"] + 1.0
    else:  # within an epoch (big tables): a fraction of a pass
        epochs = rows[-1]["step"] / budget.steps_per_epoch
    # the kept weights' validation; a fit that ended within the warm-up keeps its last weights,
    # reported with its last validation
    kept = next((r for r in rows if r["step"] == kept_step), {}) if best else (rows[-1] if rows else {})
    return FitResult(module, schema, rows, best, epochs, budget, monitor, kept)


@dataclass
class Evaluation:
    metrics: dict[str, float]
    column_errors: pd.DataFrame  # column, kind, metric, value
    anomaly_threshold: float
    extra: dict[str, Any] = field(default_factory=dict)
    # per eval row, scaled so each array's mean is its metric (the promotion gate's paired SE)
    per_row: dict[str, np.ndarray] = field(default_factory=dict)


def evaluate(
    bundle: ModelBundle, eval_df: pd.DataFrame, val_df: pd.DataFrame, settings: Settings
) -> Evaluation:
    """Held-out metrics on the frozen eval split; the anomaly threshold is calibrated on val."""
    torch.manual_seed(settings.train.seed)
    vae, schema = bundle.vae, bundle.schema
    table = schema.encode(eval_df)
    k = settings.evaluation.importance_samples
    log_px = inference.log_marginal(vae, table, k=k)
    n_obs = float(table.m_num.sum() + table.m_cat.sum())
    with torch.no_grad():
        elbo = vae.loss(TableBatch(*table.tensors()), k=1).bound.mean().item()
    num_hat, cat_hat = inference.reconstruct(vae, table)
    rows = []
    for j, spec in enumerate(schema.numeric):
        m = table.m_num[:, j].astype(bool)
        rmse = float(np.sqrt(np.mean((num_hat[m, j] - table.x_num[m, j]) ** 2))) if m.any() else float("nan")
        rows.append({"column": spec.name, "kind": spec.kind, "metric": "rmse_std", "value": rmse})
    for j, spec in enumerate(schema.categorical):
        m = table.m_cat[:, j].astype(bool)
        acc = float(np.mean(cat_hat[m, j] == table.x_cat[m, j])) if m.any() else float("nan")
        rows.append({"column": spec.name, "kind": spec.kind, "metric": "error_rate", "value": 1.0 - acc})
    errors = pd.DataFrame(rows, columns=["column", "kind", "metric", "value"])
    val_scores = inference.anomaly_scores(
        vae, schema.encode(val_df), k=settings.score.importance_samples
    ).score
    threshold = float(np.quantile(val_scores, 1.0 - settings.evaluation.false_alarm_rate))
    eval_scores = inference.anomaly_scores(vae, table, k=settings.score.importance_samples).score
    rmse = errors.loc[errors.metric == "rmse_std", "value"]
    err = errors.loc[errors.metric == "error_rate", "value"]
    nll_per_cell = -log_px * (len(log_px) / max(n_obs, 1.0))  # mean = NLL per observed cell
    metrics = {
        **heldout_cell_metrics(vae, table, settings),
        "eval_nll_per_cell": float(-log_px.sum() / max(n_obs, 1.0)),
        "eval_nll_per_cell_se": float(np.std(nll_per_cell, ddof=1) / np.sqrt(len(log_px)))
        if len(log_px) > 1
        else float("nan"),
        "eval_nll_per_row": float(-log_px.mean()),
        "eval_elbo_per_row": float(elbo),
        "eval_numeric_rmse_std": float(rmse.mean()) if len(rmse) else float("nan"),
        "eval_categorical_error": float(err.mean()) if len(err) else float("nan"),
        "eval_anomaly_rate": float(np.mean(eval_scores > threshold)),
        "eval_rows": float(len(eval_df)),
    }
    per_row = {"eval_nll_per_cell": nll_per_cell, "eval_nll_per_row": -log_px}
    return Evaluation(metrics, errors, threshold, extra={"anomaly_scores": eval_scores}, per_row=per_row)


def heldout_cell_metrics(vae: TabularVAE, table: EncodedTable, settings: Settings) -> dict[str, float]:
    """Imputation of eval cells hidden at random (`train.heldout_cells`, at least 10%) from the
    rest of their row, with the scoring jobs' importance samples: NLL per cell, RMSE against the
    column-mean baseline (standardised units), categorical error, and the mean effective
    sample size of the importance weights (near 1: `score.importance_samples` is too few)."""
    held = hold_out_cells(table, max(settings.train.heldout_cells, 0.1), seed=settings.train.seed)
    if not held.cells:
        return {}
    k = settings.score.importance_samples
    total = torch.zeros(7, dtype=torch.float64)
    rows = base = 0.0
    with torch.no_grad():
        for batch in held.loader(held.sample_rows(settings.train.heldout_rows, settings.train.seed), 4096):
            sums = inference.heldout_metrics(vae, TableBatch(*batch[:4]), batch[4], batch[5], k)
            total += torch.stack([t.double() for t in sums])
            rows += batch[0].shape[0]
            base += float(((batch[0] ** 2) * batch[4]).sum())  # the mean is 0 in standardised units
    nll, cells, sq, n_num, wrong, n_cat, ess = total.tolist()
    out = {"eval_heldout_nll_per_cell": nll / cells, "eval_impute_ess_mean": ess / rows}
    if n_num:
        out["eval_heldout_rmse_std"] = math.sqrt(sq / n_num)
        out["eval_heldout_rmse_mean_baseline"] = math.sqrt(base / n_num)
    if n_cat:
        out["eval_heldout_error"] = wrong / n_cat
    return out


def write_dvc_outputs(metrics: dict[str, float], out_dir: Path) -> Path:
    """metrics.json beside the plot CSVs, where dvc.yaml declares them (written atomically)."""
    from pipelines import atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    return atomic.write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")


def snapshot_frames(snapshot: Snapshot) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    return snapshot.read("train"), snapshot.read("val"), snapshot.read("eval")
