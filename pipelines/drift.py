"""Drift of a new batch of a table against the training reference, per column and in latent space.

Numeric columns: the two-sample Kolmogorov-Smirnov statistic; categorical and binary columns:
the total-variation distance between level frequencies (levels unseen in training count as
one extra level); every column: the change in its null fraction. Latent space: the KS
statistic of each coordinate of the champion's posterior means. Plain functions, no I/O.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
from scipy.stats import ks_2samp

from vae_models import inference
from vae_models.bundle import ModelBundle
from vae_models.schema import TableSchema


@dataclass
class ColumnDrift:
    kind: str
    method: str
    statistic: float
    null_fraction_change: float
    drifted: bool


@dataclass
class DriftReport:
    columns: dict[str, ColumnDrift]
    latent_statistics: list[float]
    drifted_share: float  # share of modelled columns that drifted
    latent_statistic: float  # the largest per-dimension latent KS statistic
    drifted: bool
    reasons: list[str] = field(default_factory=list)
    reference_rows: int = 0
    current_rows: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        head = (
            f"drift {'DETECTED' if self.drifted else 'not detected'}: {self.drifted_share:.0%} of columns "
            f"drifted, latent KS {self.latent_statistic:.3f} ({self.current_rows} rows vs "
            f"{self.reference_rows} reference rows)"
        )
        lines = [head, *(f"  {r}" for r in self.reasons)]
        return "\n".join(lines)


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a[~np.isnan(a)], b[~np.isnan(b)]
    if a.size == 0 or b.size == 0:
        return 0.0 if a.size == b.size else 1.0
    return float(ks_2samp(a, b).statistic)


def _tvd(reference: pd.Series, current: pd.Series, levels: list) -> float:
    known = {str(v) for v in levels}

    def freq(s: pd.Series) -> pd.Series:
        s = s.dropna().astype(str)
        s = s.where(s.isin(known), "<unseen>")
        return s.value_counts(normalize=True)

    p, q = freq(reference), freq(current)
    if p.empty or q.empty:
        return 0.0 if p.empty and q.empty else 1.0
    p, q = p.align(q, fill_value=0.0)
    return float(0.5 * np.abs(p - q).sum())


def column_drift(
    schema: TableSchema,
    reference: pd.DataFrame,
    current: pd.DataFrame,
    threshold: float,
    null_threshold: float,
) -> dict[str, ColumnDrift]:
    """Per modelled column: the drift statistic and whether it passes the thresholds."""
    schema.check_columns(current)
    enc_ref, enc_cur = schema.encode(reference), schema.encode(current)
    out: dict[str, ColumnDrift] = {}
    for j, spec in enumerate(schema.numeric):
        a = np.where(enc_ref.m_num[:, j] > 0, enc_ref.x_num[:, j], np.nan)
        b = np.where(enc_cur.m_num[:, j] > 0, enc_cur.x_num[:, j], np.nan)
        stat = _ks(a, b)
        dnull = float(np.isnan(b).mean() - np.isnan(a).mean()) if len(a) and len(b) else 0.0
        out[spec.name] = ColumnDrift(
            "numeric", "ks", stat, dnull, stat > threshold or abs(dnull) > null_threshold
        )
    for spec in schema.categorical:
        stat = _tvd(reference[spec.name], current[spec.name], spec.categories)
        dnull = float(current[spec.name].isna().mean() - reference[spec.name].isna().mean())
        out[spec.name] = ColumnDrift(
            spec.kind, "tvd", stat, dnull, stat > threshold or abs(dnull) > null_threshold
        )
    return out


def latent_drift(bundle: ModelBundle, reference: pd.DataFrame, current: pd.DataFrame) -> list[float]:
    """KS statistic of each latent coordinate (posterior means) between the two tables."""
    ref_mu, _ = inference.embed(bundle.vae, bundle.schema.encode(reference))
    cur_mu, _ = inference.embed(bundle.vae, bundle.schema.encode(current))
    return [
        _ks(ref_mu[:, d].astype("float64"), cur_mu[:, d].astype("float64")) for d in range(ref_mu.shape[1])
    ]


def drift_report(
    bundle: ModelBundle,
    reference: pd.DataFrame,
    current: pd.DataFrame,
    *,
    column_threshold: float,
    null_threshold: float,
    max_drifted_share: float,
    latent_threshold: float,
) -> DriftReport:
    """Drift of `current` against `reference`; `drifted` when too many columns drifted or the
    latent distribution moved more than `latent_threshold`."""
    columns = column_drift(bundle.schema, reference, current, column_threshold, null_threshold)
    latent = latent_drift(bundle, reference, current)
    share = sum(c.drifted for c in columns.values()) / max(len(columns), 1)
    latent_max = max(latent, default=0.0)
    reasons = [
        f"{name}: {c.method} {c.statistic:.3f}, null fraction {c.null_fraction_change:+.3f}"
        for name, c in columns.items()
        if c.drifted
    ]
    if latent_max > latent_threshold:
        reasons.append(f"latent space: max KS {latent_max:.3f} > {latent_threshold}")
    drifted = share > max_drifted_share or latent_max > latent_threshold
    return DriftReport(columns, latent, share, latent_max, drifted, reasons, len(reference), len(current))


def reservoir_sample(frames, n: int, seed: int = 0) -> pd.DataFrame:
    """A uniform sample of at most `n` rows from a stream of DataFrames, in one pass and
    O(n) memory: every row gets a random priority and the n smallest are kept."""
    rng = np.random.default_rng(seed)
    kept: pd.DataFrame | None = None
    for frame in frames:
        frame = frame.reset_index(drop=True).assign(_priority=rng.random(len(frame)))
        kept = frame if kept is None else pd.concat([kept, frame], ignore_index=True)
        if len(kept) > n:
            kept = kept.nsmallest(n, "_priority")
    if kept is None:
        return pd.DataFrame()
    return kept.sort_index().drop(columns="_priority").reset_index(drop=True)
