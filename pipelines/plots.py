"""The training run's diagnostic plots (PNG, with the CSVs DVC plots read), written to
`reports/<snapshot>/` and logged to the MLflow run under `plots/`.

- `loss_curves.png`: training and validation loss at each validation;
- `latent_map.png`: posterior means on their first two principal axes;
- `column_error.png`: per-column reconstruction error of the eval rows;
- `imputation_quality.png`: eval cells hidden at random and imputed, against the column mean
  (numeric) or the most frequent level (categorical);
- `anomaly_scores.png`: the eval rows' anomaly scores and the calibrated threshold;
- `latent_kl.png`: KL(q(z|x) || p(z)) per latent dimension (a dimension near 0 has collapsed);
- `reconstruction.png`: reconstructed against actual values for a few numeric columns.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from vae_models import inference
from vae_models.bundle import ModelBundle
from vae_models.data import hold_out_cells
from vae_models.schema import EncodedTable

COLLAPSED_KL = 0.01  # nats: a latent dimension below this carries (almost) no information


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")  # long labels widen the image, not clip
    _pyplot().close(fig)
    return path


def imputation_quality(
    bundle: ModelBundle, table: EncodedTable, k: int, fraction: float = 0.2, seed: int = 0
) -> pd.DataFrame:
    """Hide `fraction` of the observed cells, impute them from the rest of their row, and score
    each column: RMSE in standardised units against the column mean (0 in those units) for
    numeric columns, error rate against the most frequent level for categorical ones."""
    held = hold_out_cells(table, fraction, seed=seed)
    generator = torch_generator(seed)
    imputed = inference.impute(bundle.vae, held.visible, k=k, generator=generator, schema=bundle.schema)
    rows = []
    for j, spec in enumerate(bundle.schema.numeric):
        m = held.h_num[:, j].astype(bool)
        if m.any():
            truth = table.x_num[m, j]
            rmse = float(np.sqrt(np.mean((imputed.x_num[m, j] - truth) ** 2)))
            rows.append((spec.name, "rmse_std", rmse, float(np.sqrt(np.mean(truth**2))), int(m.sum())))
    for j, spec in enumerate(bundle.schema.categorical):
        m = held.h_cat[:, j].astype(bool)
        if m.any():
            truth = table.x_cat[m, j]
            seen = table.x_cat[held.visible.m_cat[:, j].astype(bool), j]
            mode = np.bincount(seen).argmax() if len(seen) else 0
            error = float(np.mean(imputed.x_cat[m, j] != truth))
            rows.append((spec.name, "error_rate", error, float(np.mean(truth != mode)), int(m.sum())))
    return pd.DataFrame(rows, columns=["column", "metric", "vae", "baseline", "cells"])


def torch_generator(seed: int):
    import torch

    return torch.Generator().manual_seed(seed)


def latent_kl(bundle: ModelBundle, table: EncodedTable) -> np.ndarray:
    """Mean KL(q(z_j|x) || N(0, 1)) over the rows, per latent dimension (nats)."""
    mu, logvar = inference.embed(bundle.vae, table)
    return (0.5 * (mu**2 + np.exp(logvar) - 1.0 - logvar)).mean(0)


def make_plots(
    history: list[dict[str, float]],
    bundle: ModelBundle,
    eval_df: pd.DataFrame,
    errors: pd.DataFrame,
    out_dir: Path,
    *,
    anomaly_scores: np.ndarray | None = None,
    threshold: float | None = None,
    max_rows: int = 5000,
    k: int = 16,
    seed: int = 0,
) -> list[Path]:
    """Every plot of the module docstring (PNG), and loss.csv / column_error.csv for DVC."""
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    schema = bundle.schema
    sample = eval_df.head(max_rows)
    table = schema.encode(sample)

    hist = pd.DataFrame(history)
    hist.to_csv(out_dir / "loss.csv", index=False)
    fig, ax = plt.subplots(figsize=(6, 4))
    for col in ("train_loss", "val_loss"):
        if col in hist:
            ax.plot(hist["step"], hist[col], marker="o", label=col)
    ax.set_xlabel("optimisation step (one point per validation)")
    ax.set_ylabel("negative ELBO per row")
    ax.legend()
    ax.set_title("loss curves")
    paths.append(_save(fig, out_dir / "loss_curves.png"))

    mu, _ = inference.embed(bundle.vae, table)
    centred = mu - mu.mean(0)
    if mu.shape[1] > 2:
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        xy = centred @ vt[:2].T
    else:
        xy = np.pad(centred, ((0, 0), (0, 2 - mu.shape[1])))
    fig, ax = plt.subplots(figsize=(6, 5))
    cats = schema.categorical
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
    ax.set_xlabel(
        "reconstruction error on the eval rows\n(numeric: RMSE in std units; categorical: error rate)"
    )
    ax.set_title("per-column reconstruction error")
    paths.append(_save(fig, out_dir / "column_error.png"))

    quality = imputation_quality(bundle, table, k=k, seed=seed)
    quality.to_csv(out_dir / "imputation_quality.csv", index=False)
    fig, ax = plt.subplots(figsize=(7, max(3, 0.4 * len(quality))))
    pos = np.arange(len(quality))
    ax.barh(pos + 0.2, quality["vae"], height=0.4, label="VAE imputation")
    ax.barh(pos - 0.2, quality["baseline"], height=0.4, label="mean / most frequent level")
    ax.set_yticks(pos, quality["column"] + " (" + quality["metric"] + ")")
    ax.set_xlabel(
        "error on eval cells hidden at random (20%)\n(numeric: RMSE in std units; categorical: error rate)"
    )
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("imputation of hidden cells against a baseline")
    paths.append(_save(fig, out_dir / "imputation_quality.png"))

    if anomaly_scores is not None and len(anomaly_scores):
        fig, ax = plt.subplots(figsize=(6, 4))
        finite = anomaly_scores[np.isfinite(anomaly_scores)]
        ax.hist(finite, bins=60, color="tab:blue", alpha=0.8)
        if threshold is not None:
            rate = float(np.mean(finite > threshold))
            ax.axvline(
                threshold,
                color="tab:red",
                linestyle="--",
                label=f"threshold {threshold:.3g} ({rate:.1%} above)",
            )
            ax.legend()
        ax.set_xlabel("anomaly score (-log p(x) per observed cell)")
        ax.set_ylabel("eval rows")
        ax.set_title("anomaly scores of the eval rows")
        paths.append(_save(fig, out_dir / "anomaly_scores.png"))

    kl = latent_kl(bundle, table)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    colours = ["tab:grey" if v < COLLAPSED_KL else "tab:blue" for v in kl]
    ax.bar(np.arange(len(kl)), kl, color=colours)
    ax.set_xticks(np.arange(len(kl)))
    ax.set_xlabel(f"latent dimension (grey: KL < {COLLAPSED_KL}, collapsed)")
    ax.set_ylabel("mean KL (nats)")
    ax.set_title(f"KL per latent dimension: {int(np.sum(kl >= COLLAPSED_KL))} of {len(kl)} in use")
    paths.append(_save(fig, out_dir / "latent_kl.png"))

    shown = [j for j in range(len(schema.numeric)) if table.m_num[:, j].any()][:4]
    if shown:
        x_hat, _ = inference.reconstruct(bundle.vae, table)
        fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.2), squeeze=False)
        for ax, j in zip(axes[0], shown, strict=True):
            m = table.m_num[:, j].astype(bool)
            ax.scatter(table.x_num[m, j], x_hat[m, j], s=3, alpha=0.4)
            lo, hi = np.percentile(table.x_num[m, j], [0.5, 99.5])
            ax.plot([lo, hi], [lo, hi], color="tab:red", linewidth=1)
            ax.set_title(schema.numeric[j].name)
            ax.set_xlabel("actual (std units)")
            ax.set_ylabel("reconstructed")
        fig.suptitle("reconstruction of the posterior mean")
        paths.append(_save(fig, out_dir / "reconstruction.png"))
    return paths
