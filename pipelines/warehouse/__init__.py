"""Read and write tables: DuckDB (default), PostgreSQL, Parquet and CSV.

A reference is a `.parquet`/`.csv` path, a bare table name (`flights`, `main.flights`) in the
configured warehouse, or `URL#table` (`duckdb:///path.duckdb#t`, `postgresql://host/db#s.t`).
Table names are validated and quoted as identifiers, never pasted into SQL; a bare name lives
in the engine's default schema (`main` in DuckDB, `public` in PostgreSQL).

Table identity (`TableRef.identity`, `same_table`) is what counts as "the same table": a
file's resolved real path; a DuckDB file's real path with case-insensitive names; a
PostgreSQL server, database, schema and (quoted, case-sensitive) name.

Reads stream in Arrow record batches. Writes take a per-destination lock, remove what a killed
writer of that destination left, fill a uniquely named staging table or temp file, refuse an
empty result, and only then replace the target in one transaction or rename: a failed job
leaves the previous output intact.

Each engine is a `Backend` (`duckdb`, `postgres`, `files`); the functions here check what all
engines share and hand the rest to the reference's backend (`backend_for`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import pandas as pd

from pipelines.credentials import redact
from pipelines.errors import SourceError
from pipelines.warehouse._common import (
    CHUNK_SIZE,
    DEFAULT_SCHEMA,
    RESERVED_PREFIX,
    Backend,
    Frame,
    TableRef,
    _names,
    _refuse_duplicates,
    backend_for,
    parse_identifier,
    register,
)
from pipelines.warehouse._common import _fix_decimals as _fix_decimals
from pipelines.warehouse._common import _rechunk as _rechunk
from pipelines.warehouse._common import _staging as _staging
from pipelines.warehouse.duckdb import DUCKDB_MEMORY_LIMIT, DuckDBBackend
from pipelines.warehouse.files import CsvBackend, ParquetBackend
from pipelines.warehouse.postgres import PostgresBackend, advisory_lock

__all__ = [
    "DEFAULT_SCHEMA",
    "DUCKDB_MEMORY_LIMIT",
    "FILE_SUFFIXES",
    "RESERVED_PREFIX",
    "Backend",
    "Frame",
    "TableRef",
    "advisory_lock",
    "backend_for",
    "columns",
    "count_rows",
    "iter_frames",
    "parse_identifier",
    "parse_ref",
    "read_frame",
    "same_table",
    "table_exists",
    "write_table",
]

FILE_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}

register(DuckDBBackend(), PostgresBackend(), ParquetBackend(), CsvBackend())


def parse_ref(text: str, warehouse_url: str) -> TableRef:
    """Turn a CLI/config source or destination into a `TableRef`."""
    text = text.strip()
    if not text:
        raise SourceError("empty source/destination: give a .parquet/.csv path or a table name")
    suffix = Path(text).suffix.lower()
    if "#" in text:
        url, table = text.split("#", 1)
    elif suffix in FILE_SUFFIXES:
        path = Path(text).expanduser()
        if path.name.startswith(".") and not path.stem.strip("."):
            raise SourceError(f"{text!r} is not a file name: give the table file a name, e.g. table{suffix}")
        return TableRef(FILE_SUFFIXES[suffix], str(path))
    elif "/" in text or "\\" in text:
        raise SourceError(
            f"{text!r}: unsupported file type {suffix or '(no suffix)'}; use a .parquet or .csv file, "
            f"or a table name"
        )
    else:
        url, table = warehouse_url, text
    parts = parse_identifier(table)
    if url.startswith("duckdb:///"):
        return TableRef("duckdb", url.removeprefix("duckdb:///"), parts)
    if url.startswith(("postgresql://", "postgres://", "postgresql+psycopg://")):
        return TableRef("postgres", url.replace("postgresql+psycopg://", "postgresql://"), parts)
    raise SourceError(f"unsupported warehouse URL {redact(url)!r}: use duckdb:///FILE or postgresql://...")


def same_table(a: TableRef, b: TableRef) -> bool:
    """Whether two references name one table. Beyond equal identities, hard links to one file
    match, and two PostgreSQL tables reached through different URLs are compared on the servers
    (postmaster start, port, database and the table's oid), so `localhost` and a host name of
    the same server match."""
    return a.identity == b.identity or backend_for(a).same_table(a, b)


def table_exists(ref: TableRef, read_only: bool = False) -> bool:
    """Whether the file or table exists (`read_only`: open DuckDB read-only, as concurrent
    partition readers in other processes must). DuckDB names match case-insensitively."""
    return backend_for(ref).exists(ref, read_only)


# ---------------------------------------------------------------- reading


def iter_frames(
    ref: TableRef,
    chunk_size: int = CHUNK_SIZE,
    *,
    offset: int = 0,
    limit: int | None = None,
    threads: int | None = None,
) -> Iterator[pd.DataFrame]:
    """Stream a table as DataFrames of at most `chunk_size` rows, in table order.

    `offset`/`limit` read one row range (a partition for distributed scoring): DuckDB opens
    read-only (partition readers run in parallel processes), PostgreSQL orders by physical row
    id, Parquet reads only the row groups that overlap the range, CSV skips the rows before it.
    `threads` caps DuckDB's worker threads for this read.
    """
    backend = backend_for(ref)
    backend.require(ref, read_only=bool(offset) or limit is not None)
    yield from backend.iter_frames(ref, chunk_size, offset=offset, limit=limit, threads=threads)


def columns(ref: TableRef) -> list[str]:
    """A table's column names, without reading its rows (a file's header or schema)."""
    backend = backend_for(ref)
    backend.require(ref, read_only=True)
    return backend.columns(ref)


def count_rows(ref: TableRef) -> int:
    """Number of rows of a table (Parquet: from metadata; CSV: one pass over the file)."""
    backend = backend_for(ref)
    backend.require(ref, read_only=True)
    return backend.count(ref)


def read_frame(ref: TableRef, max_rows: int | None = None) -> pd.DataFrame:
    """Read a whole table (or its first `max_rows` rows) into memory."""
    return backend_for(ref).read_frame(ref, max_rows)


# ---------------------------------------------------------------- writing


def write_table(
    ref: TableRef,
    frames: Iterable[Frame],
    constants: dict[str, str] | None = None,
    *,
    threads: int | None = None,
    compress_floats: bool = True,
    key: str | None = None,
) -> int:
    """Write all frames (DataFrames or Arrow tables) to `ref` atomically, replacing what was
    there; returns the row count.

    Under a per-destination lock, what a killed writer of `ref` left (staging tables, temp
    files) is removed, the frames fill a uniquely named staging table or temp file, and only a
    complete, non-empty result replaces the target. Any error (including an empty result)
    leaves the target as it was.

    `constants` are text columns with one value for every row (e.g. the model version), added
    by the writer rather than carried through each chunk. `threads` caps DuckDB's worker threads.
    `compress_floats=False` stores a DuckDB output's floating-point columns uncompressed: for
    values no float codec can shrink (embeddings), it skips DuckDB's ALP/ALP-RD analysis.
    `key` names the output's key column: a PostgreSQL output gets it as its primary key (a key
    with duplicates or nulls is a `DataError` and the target stays as it was); DuckDB and
    files ignore it.
    """
    constants = constants or {}
    frames = _checked(ref, frames, constants)
    return backend_for(ref).write(
        ref, frames, constants, threads=threads, compress_floats=compress_floats, key=key
    )


def _checked(ref: TableRef, frames: Iterable[Frame], constants: dict[str, str]) -> Iterator[Frame]:
    """The frames, the first one checked for column names the output cannot hold."""
    for i, frame in enumerate(frames):
        if i == 0:
            names = _names(frame)
            _refuse_duplicates(f"the output for {ref}", [str(n) for n in names])
            _refuse_unstorable(ref, [str(n) for n in names])
            if clash := [name for name in constants if name in names]:
                raise SourceError(
                    f"the output for {ref} would have column(s) {', '.join(clash)} twice: the writer "
                    f"adds them (one value for every row); rename that column in the source table"
                )
        yield frame


def _refuse_unstorable(ref: TableRef, names: list[str]) -> None:
    """Column names the engine would silently change: a NUL byte (cut there), a PostgreSQL name
    over 63 bytes (truncated), DuckDB names that differ only in case (renamed `a_1`)."""
    backend_for(ref).refuse_unstorable(names)
