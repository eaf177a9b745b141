"""What the warehouse backends share: `TableRef`, SQL quoting, the staging tables of atomic
writes, frame helpers, and `Backend`, the interface each engine implements."""

from __future__ import annotations

import contextlib
import hashlib
import re
import secrets
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import ClassVar

import pandas as pd
import pyarrow as pa

from pipelines import atomic
from pipelines.credentials import redact
from pipelines.errors import DataError, SourceError

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")  # PostgreSQL keeps 63 bytes of a name
RESERVED_PREFIX = "_vaeflow_"  # staging tables: _vaeflow_stg_<target hash>_<random>
DEFAULT_SCHEMA = {"duckdb": "main", "postgres": "public"}
CHUNK_SIZE = 50_000  # rows a read yields at a time unless told otherwise

Frame = pd.DataFrame | pa.Table  # what the writers take: a pandas frame or an Arrow table


@dataclass(frozen=True)
class TableRef:
    """Where a table lives: kind (duckdb | postgres | parquet | csv), location, table name."""

    kind: str
    location: str  # file path, or database URL / duckdb file path
    table: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """A short name for messages and default output names (not an identity)."""
        if self.table:
            return self.table[-1]
        return Path(self.location).stem

    @property
    def is_file(self) -> bool:
        return self.kind in ("parquet", "csv")

    @property
    def parts(self) -> tuple[str, str]:
        """(schema, table), the engine's default schema filled in."""
        if len(self.table) == 2:
            return self.table[0], self.table[1]
        return DEFAULT_SCHEMA[self.kind], self.table[0]

    @property
    def identity(self) -> tuple[str, ...]:
        """What makes two references the same table, whatever their spelling: a file's real
        path (`sub/../t.csv`, symlinks); a DuckDB file's real path and its case-insensitive
        names (`main.T` is `t`); a PostgreSQL server, database, schema (`public` by default)
        and name (quoted, so case-sensitive)."""
        return backend_for(self).identity(self)

    @property
    def digest(self) -> str:
        """A short stable hash of the identity (staging names, snapshot keys, lock names)."""
        return hashlib.sha256("\x1f".join(self.identity).encode()).hexdigest()

    def __str__(self) -> str:
        if self.is_file:
            return self.location
        return f"{redact(self.location)}#{'.'.join(self.table)}"

    def quoted(self) -> str:
        """The schema-qualified, quoted name for SQL."""
        return ".".join(_quote(p) for p in self.parts)

    def with_table(self, name: str) -> TableRef:
        """The same database, another table (in the same schema)."""
        parts = parse_identifier(name)
        if len(parts) == 1 and len(self.table) == 2:
            parts = (self.table[0], *parts)
        return TableRef(self.kind, self.location, parts)


def parse_identifier(name: str) -> tuple[str, ...]:
    """`table` or `schema.table` -> parts; anything else is rejected with a clear error."""
    parts = tuple(name.split("."))
    if not 1 <= len(parts) <= 2 or not all(_IDENT.match(p) for p in parts):
        raise SourceError(
            f"invalid table name {name!r}: use letters, digits and underscores, optionally "
            f"schema.table (at most 63 characters a part)"
        )
    if any(p.lower().startswith(RESERVED_PREFIX) for p in parts):
        raise SourceError(
            f"invalid table name {name!r}: names starting with {RESERVED_PREFIX} are vaeflow's own"
        )
    return parts


class Backend(ABC):
    """One engine's tables. The public functions of `pipelines.warehouse` pick the backend of
    a reference's kind (`backend_for`) and leave every engine-specific step to it."""

    kind: ClassVar[str]  # the `TableRef.kind` it serves
    noun: ClassVar[str] = "table"  # what a missing one is called in errors

    @abstractmethod
    def identity(self, ref: TableRef) -> tuple[str, ...]:
        """What makes two references the same table (see `TableRef.identity`)."""

    def same_table(self, ref: TableRef, other: TableRef) -> bool:
        """Whether `other`, whose identity differs from `ref`'s, still names the same table."""
        return False

    @abstractmethod
    def exists(self, ref: TableRef, read_only: bool = False) -> bool:
        """Whether the table exists (`read_only`: open the database read-only)."""

    def require(self, ref: TableRef, read_only: bool = False) -> None:
        """A `SourceError` unless the table exists."""
        if not self.exists(ref, read_only):
            raise SourceError(f"{self.noun} {ref} does not exist; check the name (and the warehouse URL)")

    @abstractmethod
    def columns(self, ref: TableRef) -> list[str]:
        """An existing table's column names, without reading its rows."""

    @abstractmethod
    def count(self, ref: TableRef) -> int:
        """An existing table's number of rows."""

    @abstractmethod
    def iter_frames(
        self, ref: TableRef, chunk_size: int, *, offset: int, limit: int | None, threads: int | None
    ) -> Iterator[pd.DataFrame]:
        """An existing table as DataFrames of at most `chunk_size` rows, in table order (rows
        [offset, offset + limit) when a range is asked for); see `pipelines.warehouse.iter_frames`."""

    @abstractmethod
    def empty_frame(self, ref: TableRef) -> pd.DataFrame:
        """An existing table's columns, without rows."""

    def read_frame(self, ref: TableRef, max_rows: int | None = None) -> pd.DataFrame:
        """The whole table (or its first `max_rows` rows) in memory."""
        frames, total = [], 0
        try:
            self.require(ref)
            for frame in self.iter_frames(ref, CHUNK_SIZE, offset=0, limit=None, threads=None):
                frames.append(frame)
                total += len(frame)
                if max_rows is not None and total >= max_rows:
                    break
        except (pa.ArrowInvalid, OSError) as exc:
            raise SourceError(f"cannot read {ref}: {redact(exc)}") from exc
        if not frames:
            return self.empty_frame(ref)
        df = pd.concat(frames, ignore_index=True)
        return df.iloc[:max_rows] if max_rows is not None else df

    @abstractmethod
    def refuse_unstorable(self, names: list[str]) -> None:
        """A `DataError` for a column name the engine would silently change."""

    @abstractmethod
    def write(
        self,
        ref: TableRef,
        frames: Iterable[Frame],
        constants: dict[str, str],
        *,
        threads: int | None = None,
        compress_floats: bool = True,
        key: str | None = None,
    ) -> int:
        """Replace `ref` by all `frames` atomically, under a per-destination lock, after
        removing what a killed writer of `ref` left; returns the row count. An empty result
        is a `DataError`; any error leaves the target as it was. See `write_table`."""


_BACKENDS: dict[str, Backend] = {}  # kind -> its backend; `pipelines.warehouse` registers them


def register(*backends: Backend) -> None:
    """Make `backends` the ones `backend_for` returns for their kinds."""
    _BACKENDS.update((backend.kind, backend) for backend in backends)


def backend_for(ref: TableRef) -> Backend:
    """The backend that reads and writes `ref`'s kind of table."""
    try:
        return _BACKENDS[ref.kind]
    except KeyError:
        raise SourceError(f"unsupported table kind {ref.kind!r} for {redact(ref.location)!r}") from None


# ---------------------------------------------------------------- SQL


def _quote(name: str) -> str:
    """A SQL identifier, double-quoted (embedded quotes doubled)."""
    return '"' + name.replace('"', '""') + '"'


def _literal(value: str) -> str:
    """A SQL string literal (embedded single quotes doubled), for DDL, which takes no parameters."""
    return "'" + str(value).replace("'", "''") + "'"


def _table_lock(ref: TableRef) -> contextlib.AbstractContextManager[None]:
    """The lock a writer of a database table holds on this machine (keyed by its identity)."""
    return atomic.named_lock(f"table:{ref.digest}", str(ref))


def _staging_prefix(ref: TableRef) -> str:
    """Every staging table of `ref` starts with this (a hash of its identity): the next writer
    finds and drops what a killed one left."""
    return f"{RESERVED_PREFIX}stg_{ref.digest[:12]}_"


def _staging(ref: TableRef) -> TableRef:
    """A staging table for `ref` in its schema: unique per job, 34 characters (within
    PostgreSQL's 63-byte limit however long the target's name)."""
    name = f"{_staging_prefix(ref)}{secrets.token_hex(4)}"
    return TableRef(ref.kind, ref.location, (ref.parts[0], name))


def _stale_staging(con, ref: TableRef, placeholder: str) -> list[str]:
    """Staging tables of `ref` that a killed writer left (`placeholder`: the driver's `?` or `%s`)."""
    sql = (
        "SELECT table_name FROM information_schema.tables "
        f"WHERE lower(table_schema) = lower({placeholder}) AND left(table_name, {len(_staging_prefix(ref))}) "
        f"= {placeholder}"
    )
    params = [ref.parts[0], _staging_prefix(ref)]
    return [row[0] for row in con.execute(sql, params).fetchall()]


# ---------------------------------------------------------------- frames


def _names(frame: Frame) -> list[str]:
    return list(frame.column_names if isinstance(frame, pa.Table) else frame.columns)


def _nothing_written(ref: TableRef) -> DataError:
    return DataError(f"nothing to write to {ref}: the job produced no rows; {ref} is unchanged")


def _refuse_duplicates(where: str, names: list[str]) -> None:
    seen: set[str] = set()
    twice = [n for n in names if n in seen or seen.add(n)]
    if twice:
        shown = ", ".join(repr(n) for n in dict.fromkeys(twice))
        raise DataError(
            f"{where} has the column name(s) {shown} more than once; give every column its own name"
        )


def _refuse_nul(name: str, engine: str) -> None:
    """A `DataError` for a column name with a NUL byte, which `engine` would cut there."""
    if "\x00" in name:
        raise DataError(f"column name {name!r} has a NUL character, which {engine} cannot store; rename it")


def _fix_decimals(df: pd.DataFrame) -> pd.DataFrame:
    for col in df.columns:
        if df[col].dtype == object:
            first = df[col].dropna()
            if len(first) and isinstance(first.iloc[0], Decimal):
                df[col] = df[col].astype("float64")
    return df


def _rechunk(frames: Iterator[pd.DataFrame], chunk_size: int) -> Iterator[pd.DataFrame]:
    """Re-cut a stream of frames into frames of exactly `chunk_size` rows (the last may be short)."""
    buffer: list[pd.DataFrame] = []
    held = 0
    for frame in frames:
        buffer.append(frame)
        held += len(frame)
        while held >= chunk_size:
            whole = (
                pd.concat(buffer, ignore_index=True) if len(buffer) > 1 else buffer[0].reset_index(drop=True)
            )
            yield whole.iloc[:chunk_size].reset_index(drop=True)
            rest = whole.iloc[chunk_size:]
            buffer, held = ([rest] if len(rest) else []), len(rest)
    if held:
        yield pd.concat(buffer, ignore_index=True) if len(buffer) > 1 else buffer[0].reset_index(drop=True)
