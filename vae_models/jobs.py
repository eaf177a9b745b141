"""The batch jobs on one DataFrame: impute, anomaly, embed, sample.

The pure per-chunk function behind both the pipeline's batch jobs (`pipelines/scoring.py`
streams tables through it) and the logged MLflow model's `predict`, which ships this package
as its code: it needs torch, numpy and pandas only.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from vae_models import inference
from vae_models.bundle import ModelBundle
from vae_models.schema import EncodedTable, SchemaError

JOBS = ("impute", "anomaly", "embed", "sample")


class InputError(ValueError):
    """The input cannot be scored by this model (missing columns, unreadable values)."""


class UnknownJob(InputError):
    """A job name that is not one of `JOBS`."""


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
        raise UnknownJob(f"unknown job {job!r}: use one of {', '.join(JOBS)}")
    schema, vae = bundle.schema, bundle.vae
    if job == "sample":
        num, cat = inference.sample(vae, rows, seed=seed)
        return schema.decode(num, cat)
    require_columns(bundle, df)
    if job == "embed":
        return pd.concat([_keyed(bundle, df), pd.DataFrame(codes(bundle, df))], axis=1)
    table = _encoded(bundle, df)
    # a generator of its own per call: chunks scored in parallel threads stay reproducible
    gen = torch.Generator(device=next(vae.parameters()).device).manual_seed(seed)
    if job == "anomaly":
        scores = inference.anomaly_scores(vae, table, k=k, generator=gen).score
        _finite(bundle, df, scores)
        out = _keyed(bundle, df)
        out["anomaly_score"] = scores.astype("float64")
        threshold = bundle.extra.get("anomaly_threshold")
        out["is_anomaly"] = scores > threshold if threshold is not None else False
        return out
    imp = inference.impute(vae, table, k=k, generator=gen, schema=schema)
    decoded = imp.to_frame(schema)
    out = df.reset_index(drop=True).copy()
    for name in schema.names:
        out[name] = _fill(out[name], decoded[name])
    return out


def require_columns(bundle: ModelBundle, df: pd.DataFrame, where: object = None) -> None:
    """The key column (when the model has one) and every modelled column must be in the input
    (`where`, when given, names it): an output without its key cannot be joined back to the rows
    it scores."""
    try:
        bundle.schema.check_columns(df, need_key=True)
    except SchemaError as exc:
        raise InputError(f"{where}: {exc}" if where is not None else str(exc)) from exc


def _finite(bundle: ModelBundle, df: pd.DataFrame, scores: np.ndarray) -> None:
    """Refuse to write a score that is not a number (it would read as `is_anomaly=False`)."""
    bad = ~np.isfinite(scores)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        key = bundle.schema.key
        row = f"{key}={df[key].iloc[i]!r}" if key else f"row {i}"
        raise InputError(
            f"{int(bad.sum())} row(s) got a non-finite anomaly score (first: {row}); their values are "
            f"beyond what the model can represent: check those rows for sentinel or overflowed values"
        )


def _encoded(bundle: ModelBundle, df: pd.DataFrame) -> EncodedTable:
    try:
        return bundle.schema.encode(df)
    except SchemaError as exc:
        raise InputError(str(exc)) from exc


def codes(bundle: ModelBundle, df: pd.DataFrame) -> dict[str, np.ndarray]:
    """The embedding columns z_0..z_{L-1}: posterior means in float32, the network's own precision."""
    mu, _ = inference.embed(bundle.vae, _encoded(bundle, df))
    return {f"z_{j}": column for j, column in enumerate(np.ascontiguousarray(mu.T))}
