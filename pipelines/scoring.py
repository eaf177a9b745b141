"""Batch jobs: impute, anomaly, embed, sample; chunked over a table and written back atomically.

`score_frame` is the pure per-chunk function (also behind the MLflow pyfunc's `predict`);
`run_job` streams a source through it and writes the destination in one atomic replace, each
row tagged with the model version and run id.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pandas as pd
import torch

from pipelines.config import JOBS, Settings
from pipelines.errors import DataError, VaeflowError
from pipelines.warehouse import TableRef, iter_frames, parse_ref, write_table
from vae_models import inference
from vae_models.bundle import ModelBundle
from vae_models.schema import SchemaError

log = logging.getLogger(__name__)

DEFAULT_PARAMS = {"job": "anomaly", "k": 16, "seed": 0, "rows": 1000}


def _keyed(bundle: ModelBundle, df: pd.DataFrame) -> pd.DataFrame:
    key = bundle.schema.key
    if key and key in df.columns:
        return df[[key]].reset_index(drop=True)
    return pd.DataFrame(index=pd.RangeIndex(len(df)))


def _fill(original: pd.Series, filled: pd.Series) -> pd.Series:
    filled = filled.set_axis(original.index)
    if pd.api.types.is_numeric_dtype(original) and not pd.api.types.is_bool_dtype(original):
        filled = filled.astype("float64")
        if pd.api.types.is_integer_dtype(original):
            return original  # an integer column without a nullable dtype has no nulls to fill
    return original.where(original.notna(), filled)


def score_frame(
    bundle: ModelBundle, df: pd.DataFrame, job: str, *, k: int = 16, seed: int = 0, rows: int = 1000
) -> pd.DataFrame:
    """Run one batch job on a DataFrame and return its output columns in input row order."""
    if job not in JOBS:
        raise VaeflowError(f"unknown job {job!r}: use one of {', '.join(JOBS)}")
    schema, vae = bundle.schema, bundle.vae
    torch.manual_seed(seed)
    if job == "sample":
        num, cat = inference.sample(vae, rows, seed=seed)
        return schema.decode(num, cat)
    try:
        table = schema.encode(df)
    except SchemaError as exc:
        raise DataError(str(exc)) from exc
    if job == "anomaly":
        scores = inference.anomaly_scores(vae, table, k=k).score
        out = _keyed(bundle, df)
        out["anomaly_score"] = scores.astype("float64")
        threshold = bundle.extra.get("anomaly_threshold")
        out["is_anomaly"] = scores > threshold if threshold is not None else False
        return out
    if job == "embed":
        mu, _ = inference.embed(vae, table)
        out = _keyed(bundle, df)
        for j in range(mu.shape[1]):
            out[f"z_{j}"] = mu[:, j].astype("float64")
        return out
    imp = inference.impute(vae, table, k=k)
    decoded = schema.decode(imp.x_num, imp.x_cat)
    out = df.reset_index(drop=True).copy()
    for name in schema.names:
        out[name] = _fill(out[name], decoded[name])
    return out


@dataclass
class JobResult:
    job: str
    destination: str
    rows: int
    seconds: float
    model_version: str
    run_id: str

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("nan")


def _chunks(
    bundle: ModelBundle, job: str, src: TableRef | None, settings: Settings, tags: dict[str, str]
) -> Iterator[pd.DataFrame]:
    cfg = settings.score
    if job == "sample":
        left, i = cfg.sample_rows, 0
        while left > 0:
            n = min(left, cfg.chunk_size)
            frame = score_frame(bundle, pd.DataFrame(), job, rows=n, seed=cfg.seed + i)
            left, i = left - n, i + 1
            yield frame.assign(**tags)
        return
    assert src is not None
    seen = 0
    for i, frame in enumerate(iter_frames(src, cfg.chunk_size)):
        out = score_frame(bundle, frame, job, k=cfg.importance_samples, seed=cfg.seed + i)
        seen += len(out)
        yield out.assign(**tags)
    if seen == 0:
        raise DataError(f"{src} has no rows to score")


def run_job(
    bundle: ModelBundle,
    job: str,
    source: str | None,
    dest: str,
    settings: Settings,
    *,
    model_version: str,
    run_id: str,
) -> JobResult:
    """Stream `source` through `job` and atomically replace `dest` with the result."""
    if job != "sample" and not source:
        raise VaeflowError(f"job {job!r} needs --source")
    src = parse_ref(source, settings.warehouse_url) if source else None
    dst = parse_ref(dest, settings.warehouse_url)
    if src is not None and src == dst:
        raise VaeflowError(f"destination {dst} is the source table; choose another --dest")
    tags = {"model_version": str(model_version), "run_id": run_id}
    start = time.perf_counter()
    rows = write_table(dst, _chunks(bundle, job, src, settings, tags))
    seconds = time.perf_counter() - start
    result = JobResult(job, str(dst), rows, seconds, str(model_version), run_id)
    log.info("%s: %d rows -> %s in %.1fs (%.0f rows/s)", job, rows, dst, seconds, result.rows_per_second)
    return result
