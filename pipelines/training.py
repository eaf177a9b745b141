"""Train: build the Lightning Trainer, fit on a snapshot, evaluate on its frozen eval split.

Per-epoch metrics go to MLflow through Lightning's `MLFlowLogger`; held-out metrics, plots,
the validation report and the model bundle are logged into the same run by `tracking.py`.
"""

from __future__ import annotations

import json
import logging
import math
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
from vae_models.data import hold_out_cells, plan_budget, table_loader
from vae_models.module import VAEModule
from vae_models.schema import EncodedTable, TableSchema
from vae_models.vae import TableBatch, TabularVAE

log = logging.getLogger(__name__)


class EpochHistory(Callback):
    """Each epoch's logged metrics (for the loss-curve plot), appended to a JSON-lines file on
    rank 0, so the history survives spawned DDP workers and a resumed fit."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        row = {"epoch": float(trainer.current_epoch)}
        row.update({k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")

    def rows(self) -> list[dict[str, float]]:
        if not self.path.exists():
            return []
        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        latest: dict[float, dict[str, float]] = {}
        for r in rows:  # an epoch redone after a crash counts once, its latest values winning
            latest[r["epoch"]] = {**latest.get(r["epoch"], {}), **r}
        return [latest[e] for e in sorted(latest)]


@dataclass
class FitResult:
    module: VAEModule
    schema: TableSchema  # the schema given, with each log1p column's imputation estimate chosen
    history: list[dict[str, float]]
    best_checkpoint: str | None
    epochs: int


def fit(
    train_df: pd.DataFrame,
    val_df: pd.DataFrame,
    schema: TableSchema,
    settings: Settings,
    *,
    logger: Any = False,
    checkpoint_dir: Path | None = None,
    callbacks: list[Callback] | None = None,
) -> FitResult:
    """Fit a VAE within its step budget, with early stopping and checkpoints on held-out cells;
    returns the best weights loaded.

    A share of the observed training cells (`train.heldout_cells`) is hidden from training and
    scored at each validation given the rest of its row: imputation, the model's target, picks
    the checkpoint. If `checkpoint_dir` holds a `last.ckpt` from an interrupted fit (a retried
    task), training resumes from it: weights, optimiser, step and callback states. The held-out
    cells also pick each log1p column's imputation estimate (`inference.choose_log1p_estimates`)."""
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
    monitor = cfg.monitor if held.cells or cfg.monitor == "val_loss" else "val_loss"
    if monitor != cfg.monitor:
        log.info("no cell could be held out (one modelled cell per row): monitoring val_loss")
    config = settings.model.model_copy(update={"num_logvar_min": schema.logvar_floors()})
    module = VAEModule(len(schema.numeric), schema.cat_sizes, config.model_dump(), heldout_k=cfg.heldout_k)
    ckpt_dir = checkpoint_dir or settings.path(cfg.checkpoint_dir)
    history = EpochHistory(Path(ckpt_dir) / "history.jsonl")
    # both act when a validation ends (it may fall mid-epoch): a fit resumed from a checkpoint
    # written there re-enters that epoch's end before any new validation has run
    checkpoint = ModelCheckpoint(
        dirpath=ckpt_dir, filename="best", monitor=monitor, save_last=True, save_on_train_epoch_end=False
    )
    log.info(
        "training on %d rows: batch %d, up to %d steps (%d per epoch), validating every %d",
        len(train_df),
        budget.batch_size,
        budget.max_steps,
        budget.steps_per_epoch,
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
        logger=logger,
        callbacks=[
            EarlyStopping(monitor=monitor, patience=cfg.patience, check_on_train_epoch_end=False),
            checkpoint,
            history,
            *(callbacks or []),
        ],
        gradient_clip_val=cfg.gradient_clip_val,
        deterministic=cfg.deterministic,
        enable_progress_bar=cfg.progress_bar,
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
        val_loaders.append(held.loader(cfg.heldout_rows, 4096, seed=cfg.seed))
    trainer.fit(
        module,
        train_dataloaders=table_loader(held.visible, budget.batch_size, shuffle=True, seed=cfg.seed),
        val_dataloaders=val_loaders,
        ckpt_path=str(last) if last.exists() else None,
    )
    best = checkpoint.best_model_path or None
    if best:
        state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
    module.cpu().eval()
    if held.cells:
        schema = inference.choose_log1p_estimates(
            module.vae, held, schema, k=cfg.heldout_k, max_rows=cfg.heldout_rows, seed=cfg.seed
        )
    rows = history.rows()
    return FitResult(module, schema, rows, best, len(rows))


@dataclass
class Evaluation:
    metrics: dict[str, float]
    column_errors: pd.DataFrame  # column, kind, metric, value
    anomaly_threshold: float
    extra: dict[str, Any] = field(default_factory=dict)


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
    metrics = {
        **heldout_cell_metrics(vae, table, settings),
        "eval_nll_per_cell": float(-log_px.sum() / max(n_obs, 1.0)),
        "eval_nll_per_row": float(-log_px.mean()),
        "eval_elbo_per_row": float(elbo),
        "eval_numeric_rmse_std": float(rmse.mean()) if len(rmse) else float("nan"),
        "eval_categorical_error": float(err.mean()) if len(err) else float("nan"),
        "eval_anomaly_rate": float(np.mean(eval_scores > threshold)),
        "eval_rows": float(len(eval_df)),
    }
    return Evaluation(metrics, errors, threshold)


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
        for batch in held.loader(settings.train.heldout_rows, 4096, seed=settings.train.seed):
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


def make_plots(
    history: list[dict[str, float]],
    bundle: ModelBundle,
    eval_df: pd.DataFrame,
    errors: pd.DataFrame,
    out_dir: Path,
    max_rows: int = 5000,
) -> list[Path]:
    """Loss curves, a 2-d map of the latent space and per-column reconstruction error (PNG + CSV)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    hist = pd.DataFrame(history)
    hist.to_csv(out_dir / "loss.csv", index=False)
    fig, ax = plt.subplots(figsize=(6, 4))
    for col in ("train_loss", "val_loss"):
        if col in hist:
            ax.plot(hist["epoch"], hist[col], marker="o", label=col)
    ax.set_xlabel("epoch")
    ax.set_ylabel("negative ELBO per row")
    ax.legend()
    ax.set_title("loss curves")
    paths.append(_save(fig, out_dir / "loss_curves.png"))

    sample = eval_df.head(max_rows)
    mu, _ = inference.embed(bundle.vae, bundle.schema.encode(sample))
    centred = mu - mu.mean(0)
    if mu.shape[1] > 2:
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        xy = centred @ vt[:2].T
    else:
        xy = np.pad(centred, ((0, 0), (0, 2 - mu.shape[1])))
    fig, ax = plt.subplots(figsize=(6, 5))
    cats = bundle.schema.categorical
    if cats:
        labels = sample[cats[0].name].astype(str).to_numpy()
        top = pd.Series(labels).value_counts().index[:8]
        for level in top:
            m = labels == level
            ax.scatter(xy[m, 0], xy[m, 1], s=4, alpha=0.5, label=str(level))
        ax.legend(title=cats[0].name, markerscale=3, fontsize=7)
    else:
        ax.scatter(xy[:, 0], xy[:, 1], s=4, alpha=0.5)
    ax.set_title("latent space (posterior means, first two principal axes)")
    paths.append(_save(fig, out_dir / "latent_map.png"))

    errors.to_csv(out_dir / "column_error.csv", index=False)
    fig, ax = plt.subplots(figsize=(7, max(3, 0.3 * len(errors))))
    ax.barh(errors["column"] + " (" + errors["metric"] + ")", errors["value"])
    ax.set_xlabel("held-out reconstruction error (numeric: RMSE in std units; categorical: error rate)")
    ax.set_title("per-column reconstruction error")
    paths.append(_save(fig, out_dir / "column_error.png"))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def write_dvc_outputs(metrics: dict[str, float], out_dir: Path) -> Path:
    """metrics.json beside the plot CSVs, where dvc.yaml declares them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return path


def snapshot_frames(snapshot: Snapshot) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    return snapshot.read("train"), snapshot.read("val"), snapshot.read("eval")
