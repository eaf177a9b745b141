"""Column types and the fitted, invertible transform between a table and tensors.

A `TableSchema` is inferred from a reference table (or forced per column), fitted once on the
training split, stored as JSON beside the weights and applied unchanged at scoring time.
Nulls are missing cells (mask 0), never errors; a value that cannot belong to a column's type
(a word in a numeric column, an infinity) raises `SchemaError` naming the column and value.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

KINDS = ("numeric", "categorical", "binary")
# standardised numerics are clipped to +-CLIP before they reach the network: a value at the edge
# of float64 (1e308, a sentinel) stays finite in float32 and scores as far out, not as NaN
CLIP = 1e6
# a column whose standard deviation is this many times its robust spread (or overflows) is
# scaled by median and interquartile range instead: a few extreme values do not flatten the rest
ROBUST_RATIO = 1e4
OVERRIDE_KINDS = (*KINDS, "ignore")


class SchemaError(ValueError):
    """A table does not fit the schema: names the column and the offending value."""


@dataclass
class ColumnSpec:
    """One modelled column: its kind, source dtype and fitted transform."""

    name: str
    kind: str
    dtype: str
    transform: str = "identity"  # numeric only: identity | log1p
    center: float = 0.0
    scale: float = 1.0
    step: float = 0.0  # numeric only: the grid the values lie on (1 for integers); 0 = continuous
    low: float | None = None  # numeric only: the smallest and largest value seen in training
    high: float | None = None
    lognormal_mean: bool = False  # log1p only: impute the log-normal mean (else expm1 of the mean log)
    categories: list[Any] = field(default_factory=list)  # categorical / binary levels

    def standardised_range(self) -> tuple[float, float] | None:
        """[low, high] in the model's standardised units, when known."""
        if self.low is None or self.high is None:
            return None
        bounds = np.array([self.low, self.high], dtype="float64")
        if self.transform == "log1p":
            bounds = np.sign(bounds) * np.log1p(np.abs(bounds))
        lo, hi = (bounds - self.center) / self.scale
        return float(lo), float(hi)

    @property
    def n_classes(self) -> int:
        """Known levels plus one reserved slot for levels never seen in training."""
        return len(self.categories) + 1


@dataclass
class EncodedTable:
    """A table as arrays: standardised numerics and category codes, each with a mask."""

    x_num: np.ndarray  # (N, n_num) float32, 0 where missing
    m_num: np.ndarray  # (N, n_num) float32, 1 = observed
    x_cat: np.ndarray  # (N, n_cat) int64, code; n_classes-1 = unknown level
    m_cat: np.ndarray  # (N, n_cat) float32

    def __len__(self) -> int:
        return self.x_num.shape[0]

    def tensors(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
        """The four arrays as tensors, in the order `TableBatch` expects."""
        return tuple(
            torch.as_tensor(a, device=device) for a in (self.x_num, self.m_num, self.x_cat, self.m_cat)
        )


def _py(value: Any) -> Any:
    """A numpy scalar as a JSON-able Python scalar."""
    return value.item() if isinstance(value, np.generic) else value


def _numeric_values(series: pd.Series, column: str) -> np.ndarray:
    """Float values of a column that must be numeric; NaN for nulls; errors name the value."""
    if pd.api.types.is_bool_dtype(series) or pd.api.types.is_numeric_dtype(series):
        values = series
    else:
        values = pd.to_numeric(series, errors="coerce")
        bad = values.isna() & series.notna()
        if bad.any():
            first = series[bad].iloc[0]
            raise SchemaError(
                f"column '{column}' is numeric but holds the non-numeric value {first!r} "
                f"({int(bad.sum())} such cells); fix or null those cells, or declare the column's "
                f"type in params.yaml (schema.overrides)"
            )
        values = values.astype("float64")
    arr = values.to_numpy(dtype="float64", na_value=np.nan)
    n_inf = int(np.isinf(arr).sum())
    if n_inf:
        raise SchemaError(
            f"column '{column}' holds {n_inf} infinite value(s); replace them with nulls "
            f"(missing cells) or finite numbers"
        )
    return arr


@dataclass
class TableSchema:
    """The modelled columns of a table, the key carried through, and what was left out."""

    columns: list[ColumnSpec]
    key: str | None = None
    ignored: dict[str, str] = field(default_factory=dict)  # column -> reason

    @property
    def numeric(self) -> list[ColumnSpec]:
        return [c for c in self.columns if c.kind == "numeric"]

    @property
    def categorical(self) -> list[ColumnSpec]:
        """Categorical and binary columns (a binary column is a two-level categorical)."""
        return [c for c in self.columns if c.kind != "numeric"]

    @property
    def cat_sizes(self) -> list[int]:
        return [c.n_classes for c in self.categorical]

    @property
    def names(self) -> list[str]:
        """Modelled columns in the model's cell order: numerics, then categoricals."""
        return [c.name for c in self.numeric] + [c.name for c in self.categorical]

    def logvar_floors(self) -> list[float | None]:
        """Per numeric column, the log-variance floor in standardised units: log(step^2 / 12),
        the variance of a uniform over one quantisation step (dequantisation); None when the
        column is continuous or log-transformed (its grid is not uniform in model space)."""
        return [
            math.log((c.step / c.scale) ** 2 / 12.0) if c.step > 0 and c.transform == "identity" else None
            for c in self.numeric
        ]

    @property
    def input_columns(self) -> list[str]:
        """The key (if any), then the modelled columns: what a scoring input carries."""
        return ([self.key] if self.key else []) + self.names

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "ignored": self.ignored, "columns": [asdict(c) for c in self.columns]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TableSchema:
        return cls(
            columns=[ColumnSpec(**c) for c in data["columns"]],
            key=data.get("key"),
            ignored=dict(data.get("ignored", {})),
        )

    def check_columns(self, df: pd.DataFrame, *, need_key: bool = False) -> None:
        """Raise `SchemaError` naming the first modelled column the table lacks."""
        wanted = self.names + ([self.key] if need_key and self.key else [])
        missing = [c for c in wanted if c not in df.columns]
        if missing:
            raise SchemaError(
                f"column(s) {', '.join(repr(c) for c in missing)} missing from the input; the "
                f"model expects {', '.join(wanted)}"
            )

    def encode(self, df: pd.DataFrame) -> EncodedTable:
        """Standardise numerics and code categoricals; nulls become masked cells."""
        self.check_columns(df)
        x_num, m_num = self._encode_numeric(df)
        n, cat = len(df), self.categorical
        x_cat = np.zeros((n, len(cat)), dtype=np.int64)
        m_cat = np.zeros((n, len(cat)), dtype=np.float32)
        for j, spec in enumerate(cat):
            series = df[spec.name]
            missing = series.isna().to_numpy()
            codes = _level_codes(spec.categories, series)
            codes = np.where(codes < 0, spec.n_classes - 1, codes)  # unseen level
            x_cat[:, j] = np.where(missing, 0, codes)
            m_cat[:, j] = ~missing
        return EncodedTable(x_num, m_num, x_cat, m_cat)

    def _encode_numeric(self, df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """(standardised values, observed mask), both float32 (N, n_num), 0 where missing."""
        num = self.numeric
        x_num = np.empty((len(df), len(num)), dtype=np.float32)
        m_num = np.empty((len(df), len(num)), dtype=np.float32)
        for j, spec in enumerate(num):
            values = _numeric_values(df[spec.name], spec.name)
            observed = ~np.isnan(values)
            if spec.transform == "log1p":
                values = np.sign(values) * np.log1p(np.abs(values))
            with np.errstate(over="ignore", invalid="ignore"):
                z = np.clip((values - spec.center) / spec.scale, -CLIP, CLIP)
            x_num[:, j] = np.where(observed, z, 0.0)
            m_num[:, j] = observed
        return x_num, m_num

    def decode(self, num_values: np.ndarray, cat_codes: np.ndarray) -> pd.DataFrame:
        """Map standardised numerics and category codes back to the source columns and dtypes."""
        out: dict[str, pd.Series] = {}
        for j, spec in enumerate(self.numeric):
            values = np.clip(num_values[:, j].astype("float64"), -CLIP, CLIP) * spec.scale + spec.center
            if spec.transform == "log1p":  # expm1 overflows past 709
                values = np.sign(values) * np.expm1(np.minimum(np.abs(values), 709.0))
            out[spec.name] = _restore_numeric(values, spec.dtype)
        for j, spec in enumerate(self.categorical):
            levels = np.array(spec.categories + [None], dtype=object)
            out[spec.name] = _restore_levels(levels[cat_codes[:, j]], spec.dtype)
        return pd.DataFrame(out)[[c.name for c in self.columns]]


def _level_codes(levels: list[Any], series: pd.Series) -> np.ndarray:
    """Each value's position among a column's levels; -1 for nulls and levels never seen."""
    if levels and all(isinstance(v, str) for v in levels) and isinstance(series.dtype, pd.StringDtype):
        if series.dtype.storage == "pyarrow":  # a hash lookup in Arrow, without Python strings
            import pyarrow as pa
            import pyarrow.compute as pc

            found = pc.index_in(pa.array(series), value_set=pa.array(levels, type=pa.string()))
            return found.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        return pd.Index(levels, dtype="str").get_indexer(series)
    return pd.Index(levels, dtype=object).get_indexer(series)


def _restore_numeric(values: np.ndarray, dtype: str) -> pd.Series:
    if dtype.lower().startswith(("int", "uint")):
        return pd.Series(np.round(values)).astype("Int64")
    return pd.Series(values, dtype="float64")


def _restore_levels(values: np.ndarray, dtype: str) -> pd.Series:
    if dtype in ("bool", "boolean"):
        return pd.Series(values, dtype="boolean")
    if dtype.lower().startswith(("int", "uint")):
        return pd.Series(values).astype("Int64")
    if dtype.startswith("float"):
        return pd.Series(values).astype("float64")
    return pd.Series(values, dtype=object)


def infer_schema(
    df: pd.DataFrame,
    *,
    key: str | None = None,
    overrides: dict[str, str] | None = None,
    max_categories: int = 150,
    default_kind: str | None = None,
) -> TableSchema:
    """Infer column kinds from a reference table and fit each column's transform.

    Constant, all-null, datetime and high-cardinality text columns are left out with a reason;
    `overrides` maps a column to numeric, categorical, binary or ignore; `default_kind` forces
    every other column to one kind (e.g. numeric for the pixel columns of images).
    """
    overrides = dict(overrides or {})
    for column, kind in overrides.items():
        if column not in df.columns:
            raise SchemaError(f"schema override names column '{column}', which the table lacks")
        if kind not in OVERRIDE_KINDS:
            raise SchemaError(
                f"schema override for column '{column}' is {kind!r}; use one of {OVERRIDE_KINDS}"
            )
    if default_kind is not None and default_kind not in KINDS:
        raise SchemaError(f"schema default kind is {default_kind!r}; use one of {KINDS}")
    if key is not None and key not in df.columns:
        raise SchemaError(f"key column '{key}' is not in the table (columns: {', '.join(df.columns)})")
    if len(df) == 0:
        raise SchemaError("the table has no rows; a schema needs at least one row")
    columns: list[ColumnSpec] = []
    ignored: dict[str, str] = {}
    for name in df.columns:
        if name == key:
            continue
        kind, reason = _infer_kind(df[name], name, overrides.get(name, default_kind), max_categories)
        if kind == "ignore":
            ignored[name] = reason
            continue
        columns.append(_fit_column(df[name], name, kind))
    if not columns:
        raise SchemaError(
            "no column can be modelled (all are constant, empty, dates or free text: "
            + "; ".join(f"{k}: {v}" for k, v in ignored.items())
            + ")"
        )
    return TableSchema(columns=columns, key=key, ignored=ignored)


def _infer_kind(series: pd.Series, name: str, forced: str | None, max_categories: int) -> tuple[str, str]:
    if forced == "ignore":
        return "ignore", "ignored by schema.overrides"
    nonnull = series.dropna()
    if forced:
        if forced == "numeric":
            _numeric_values(series, name)
        return forced, ""
    if nonnull.empty:
        return "ignore", "all values are null"
    if pd.api.types.is_datetime64_any_dtype(series):
        return "ignore", "datetime column (not modelled)"
    n_unique = nonnull.nunique()
    if n_unique == 1:
        return "ignore", "constant column"
    if pd.api.types.is_bool_dtype(series) or n_unique == 2:
        return "binary", ""
    if pd.api.types.is_numeric_dtype(series):
        _numeric_values(series, name)
        return "numeric", ""
    parsed = pd.to_numeric(nonnull, errors="coerce")
    n_bad = int(parsed.isna().sum())
    if n_bad == 0:
        _numeric_values(series, name)
        return "numeric", ""
    if n_bad <= 0.01 * len(nonnull):
        # a numeric column with a few stray words: a data error, not a text column
        _numeric_values(series, name)
    if n_unique <= max_categories:
        return "categorical", ""
    return "ignore", f"high-cardinality text ({n_unique} distinct values > {max_categories})"


def _center_scale(values: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation of a numeric column; median and interquartile range (as a
    normal's sigma) when extreme values overflow the first or dominate it (`ROBUST_RATIO`)."""
    if values.size == 0:
        return 0.0, 1.0
    with np.errstate(over="ignore", invalid="ignore"):
        center, scale = float(values.mean()), float(values.std()) if values.size > 1 else 1.0
    q1, median, q3 = (float(q) for q in np.quantile(values, [0.25, 0.5, 0.75]))
    robust = (q3 - q1) / 1.349
    if robust <= 1e-12:  # more than half the values equal: the spread of the rest
        robust = float(np.median(np.abs(values - median))) * 1.4826
    if not (math.isfinite(center) and math.isfinite(scale)) or (
        robust > 1e-12 and scale > ROBUST_RATIO * robust
    ):
        center, scale = median, robust
    if not math.isfinite(scale) or scale <= 1e-12:
        scale = 1.0
    return center, scale


def _grid_step(values: np.ndarray) -> float:
    """The step of the grid a column's values lie on (1.0 for counts, 1/16 for 16-level pixels),
    or 0.0 when they do not lie on one: the smallest gap between distinct values, accepted when
    every value is a whole number of steps from the smallest (within 1e-6 of a step)."""
    levels = np.unique(values)
    if levels.size < 2 or levels.size > 0.5 * values.size:
        return 0.0
    step = float(np.diff(levels).min())
    steps = (levels - levels[0]) / step
    return step if np.abs(steps - np.round(steps)).max() < 1e-6 else 0.0


def _fit_column(series: pd.Series, name: str, kind: str) -> ColumnSpec:
    dtype = str(series.dtype)
    if kind == "numeric":
        values = _numeric_values(series, name)
        values = values[~np.isnan(values)]
        low, high = (float(values.min()), float(values.max())) if values.size else (None, None)
        transform = "identity"
        if values.size > 2 and values.min() >= 0 and pd.Series(values).skew() > 2.0:
            transform = "log1p"
            values = np.log1p(values)
        center, scale = _center_scale(values)
        step = _grid_step(values) if transform == "identity" else 0.0
        return ColumnSpec(
            name, kind, dtype, transform=transform, center=center, scale=scale, step=step, low=low, high=high
        )
    levels = [_py(v) for v in series.dropna().unique()]
    levels.sort(key=lambda v: (str(type(v)), v))
    return ColumnSpec(name, kind, dtype, categories=levels)
