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
leaves the previous output intact. PostgreSQL data moves as Arrow by binary COPY both ways
(ADBC's driver, or a numpy-built payload through psycopg for fixed-width chunks;
`pipelines.warehouse_postgres` shapes it); control statements go through psycopg.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipelines import atomic
from pipelines import warehouse_postgres as pg_arrow
from pipelines.credentials import redact
from pipelines.errors import DataError, SourceError, TransientError, disk_full

log = logging.getLogger(__name__)

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")  # PostgreSQL keeps 63 bytes of a name
RESERVED_PREFIX = "_vaeflow_"  # staging tables: _vaeflow_stg_<target hash>_<random>
DEFAULT_SCHEMA = {"duckdb": "main", "postgres": "public"}
# a streaming read and an atomic write need about one row group each; the rest of a bigger pool
# only caches blocks a one-pass job never reads again (256MB: ~150 MB more peak RSS, no faster)
DUCKDB_MEMORY_LIMIT = os.environ.get("VAEFLOW_DUCKDB_MEMORY_LIMIT", "128MB")
_DUCKDB_ROW_GROUP = 122_880  # rows in one DuckDB row group (its unit of writing and checkpointing)
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]?I?B)?\s*$", re.IGNORECASE)
# connections to one DuckDB file share its settings: per file, [open connections, the memory
# limit one of them raised (bytes)], so a connection opening later does not lower it again
_RAISED: dict[str, list[int]] = {}
_RAISED_LOCK = threading.Lock()
FILE_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}


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
        if self.is_file:
            return ("file", os.path.realpath(self.location))
        schema, table = self.parts
        if self.kind == "duckdb":
            return ("duckdb", os.path.realpath(self.location), schema.casefold(), table.casefold())
        return ("postgres", *_pg_server(self.location), schema, table)

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


def _pg_server(url: str) -> tuple[str, str, str]:
    """(host, port, database) of a PostgreSQL URL, with libpq's defaults and the loopback
    spellings (localhost, 127.0.0.1, ::1, a socket folder) folded into one."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        info = conninfo_to_dict(url)
    except Exception as exc:  # psycopg.ProgrammingError: a malformed URL
        raise SourceError(f"malformed PostgreSQL URL {redact(url)!r}: {redact(exc)}") from exc
    host = str(info.get("host") or os.environ.get("PGHOST") or "localhost").lower()
    if host in ("localhost", "127.0.0.1", "::1", "[::1]") or host.startswith("/"):
        host = "localhost"
    port = str(info.get("port") or os.environ.get("PGPORT") or "5432")
    user = str(info.get("user") or os.environ.get("PGUSER") or _os_user())
    database = str(info.get("dbname") or os.environ.get("PGDATABASE") or user)
    return host, port, database


def _os_user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except Exception:  # no user name for this uid
        return ""


def same_table(a: TableRef, b: TableRef) -> bool:
    """Whether two references name one table. Beyond equal identities, two PostgreSQL tables
    reached through different URLs are compared on the servers (postmaster start, port,
    database and the table's oid), so `localhost` and a host name of the same server match."""
    if a.identity == b.identity:
        return True
    if a.is_file and b.is_file:
        with contextlib.suppress(OSError):
            return os.path.samefile(a.location, b.location)  # hard links
        return False
    if a.kind == b.kind == "postgres" and a.parts == b.parts:
        fa, fb = _pg_fingerprint(a), _pg_fingerprint(b)
        return fa is not None and fa == fb
    return False


def _pg_fingerprint(ref: TableRef) -> tuple | None:
    sql = (
        "SELECT pg_postmaster_start_time()::text, current_setting('port'), current_database(), c.oid "
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s"
    )
    with _postgres(ref.location) as con:
        row = con.execute(sql, ref.parts).fetchone()
    return tuple(row) if row else None


def _quote(name: str) -> str:
    """A SQL identifier, double-quoted (embedded quotes doubled)."""
    return '"' + name.replace('"', '""') + '"'


def _literal(value: str) -> str:
    """A SQL string literal (embedded single quotes doubled), for DDL, which takes no parameters."""
    return "'" + str(value).replace("'", "''") + "'"


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


# ---------------------------------------------------------------- connections


@contextlib.contextmanager
def _duckdb(path: str, read_only: bool = False, threads: int | None = None):
    """A DuckDB connection with a bounded buffer pool; `threads` caps DuckDB's worker threads
    (None: DuckDB's default, one per core). A file another process holds, or one that is not a
    DuckDB database, is a clear error naming it."""
    import duckdb

    if read_only and not Path(path).exists():
        raise SourceError(f"DuckDB warehouse file {path} does not exist")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        con = duckdb.connect(path, read_only=read_only)
    except duckdb.Error as exc:
        first = str(exc).splitlines()[0]
        if "Could not set lock" in first or "Conflicting lock" in first:
            raise TransientError(
                f"DuckDB warehouse file {path} is in use by another process ({first}); DuckDB allows "
                f"one writing process at a time: wait for it, or use PostgreSQL for concurrent jobs"
            ) from exc
        raise SourceError(f"cannot open DuckDB warehouse file {path}: {first}") from exc
    key = str(Path(path).resolve())
    # DuckDB keeps written data in its buffer pool until a checkpoint; a bounded pool keeps a
    # job's memory flat however large the table it writes
    with _RAISED_LOCK:
        entry = _RAISED.setdefault(key, [0, 0])
        entry[0] += 1
    try:
        with _RAISED_LOCK:
            raised = entry[1] > (_size_bytes(DUCKDB_MEMORY_LIMIT) or 0)
            con.execute(f"SET memory_limit = '{f'{entry[1]}B' if raised else DUCKDB_MEMORY_LIMIT}'")
        if threads is not None:
            con.execute(f"SET threads = {int(threads)}")
        yield con
    finally:
        con.close()
        with _RAISED_LOCK:
            entry[0] -= 1
            if entry[0] == 0:
                _RAISED.pop(key, None)


# what a PostgreSQL error says when retrying cannot help (credentials, a missing database)
_PG_PERMANENT = ("authentication failed", "does not exist", "no password supplied", "permission denied")


@contextlib.contextmanager
def _postgres(url: str):
    """An autocommit connection (10 s to connect). A server that does not answer, or drops the
    connection, is a `TransientError`; refused credentials or a missing database are not."""
    import psycopg

    try:
        con = psycopg.connect(url, connect_timeout=10, autocommit=True)
    except psycopg.OperationalError as exc:
        said = redact(str(exc).strip())
        kind = SourceError if any(p in said for p in _PG_PERMANENT) else TransientError
        raise kind(f"cannot connect to PostgreSQL at {redact(url)}: {said}") from exc
    try:
        yield con
    except psycopg.OperationalError as exc:
        if con.closed or con.broken:
            raise TransientError(
                f"the connection to PostgreSQL at {redact(url)} was lost: {redact(str(exc).strip())}"
            ) from exc
        raise
    finally:
        con.close()


@contextlib.contextmanager
def _adbc(url: str):
    """An autocommit ADBC connection for bulk data (binary COPY in and out; 10 s to connect),
    its errors like `_postgres`'s: a server that does not answer, or a connection lost while
    reading or writing, is a `TransientError`; refused credentials or a missing database are not."""
    import adbc_driver_manager
    from adbc_driver_postgresql import dbapi
    from psycopg.conninfo import make_conninfo

    try:
        con = dbapi.connect(make_conninfo(url, connect_timeout=10), autocommit=True)
    except adbc_driver_manager.Error as exc:
        said = redact(str(exc).removeprefix("IO: ").strip())
        kind = SourceError if any(p in said for p in _PG_PERMANENT) else TransientError
        raise kind(f"cannot connect to PostgreSQL at {redact(url)}: {said}") from exc
    try:
        yield con
    except adbc_driver_manager.OperationalError as exc:
        raise TransientError(
            f"the connection to PostgreSQL at {redact(url)} failed: {redact(str(exc).strip())}"
        ) from exc
    finally:
        with contextlib.suppress(Exception):
            con.close()


def table_exists(ref: TableRef, read_only: bool = False) -> bool:
    """Whether the file or table exists (`read_only`: open DuckDB read-only, as concurrent
    partition readers in other processes must). DuckDB names match case-insensitively."""
    if ref.is_file:
        return Path(ref.location).is_file()
    schema, table = ref.parts
    if ref.kind == "duckdb":
        if not Path(ref.location).exists():
            return False
        sql = (
            "SELECT count(*) FROM information_schema.tables "
            "WHERE lower(table_schema) = lower(?) AND lower(table_name) = lower(?)"
        )
        with _duckdb(ref.location, read_only=read_only) as con:
            return con.execute(sql, [schema, table]).fetchone()[0] > 0
    sql = "SELECT count(*) FROM information_schema.tables WHERE table_schema = %s AND table_name = %s"
    with _postgres(ref.location) as con:
        return con.execute(sql, (schema, table)).fetchone()[0] > 0


def _require(ref: TableRef, read_only: bool = False) -> None:
    if not table_exists(ref, read_only):
        what = "file" if ref.is_file else "table"
        raise SourceError(f"{what} {ref} does not exist; check the name (and the warehouse URL)")


# ---------------------------------------------------------------- reading


def _fix_decimals(df: pd.DataFrame) -> pd.DataFrame:
    for col in df.columns:
        if df[col].dtype == object:
            first = df[col].dropna()
            if len(first) and isinstance(first.iloc[0], Decimal):
                df[col] = df[col].astype("float64")
    return df


def iter_frames(
    ref: TableRef,
    chunk_size: int = 50_000,
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
    ranged = bool(offset) or limit is not None
    _require(ref, read_only=ranged)
    if ref.kind == "parquet":
        pf = _parquet_file(ref.location)
        with _parquet_errors(ref.location):
            if ranged:
                yield from _rechunk(_parquet_range(pf, offset, limit), chunk_size)
            else:
                for batch in pf.iter_batches(batch_size=chunk_size):
                    yield batch.to_pandas(split_blocks=True)
    elif ref.kind == "csv":
        yield from _iter_csv(ref.location, chunk_size, offset, limit)
    elif ref.kind == "duckdb":
        import duckdb

        window = f" LIMIT {'ALL' if limit is None else int(limit)} OFFSET {int(offset)}" if ranged else ""
        with _duckdb(ref.location, read_only=ranged, threads=threads) as con:
            # room for a chunk and the row group it is cut from, at ~16 bytes a cell
            columns = len(con.execute(f"DESCRIBE SELECT * FROM {ref.quoted()}").fetchall())
            _fit_memory_limit(con, ref.location, 16.0 * columns, columns, max(chunk_size, _DUCKDB_ROW_GROUP))
            relation = con.sql(f"SELECT * FROM {ref.quoted()}{window}")
            to_reader = getattr(relation, "to_arrow_reader", None) or relation.record_batch  # duckdb 2 / 1
            try:
                for batch in to_reader(chunk_size):
                    yield batch.to_pandas(split_blocks=True)
            except (OSError, duckdb.OutOfMemoryException) as exc:  # pyarrow's reader wraps DuckDB's
                if "Out of Memory" not in str(exc):
                    raise
                raise _out_of_memory(con, f"reading {ref}", exc) from exc
    else:
        yield from _iter_postgres(ref, chunk_size, offset, limit, ranged)


def _iter_postgres(
    ref: TableRef, chunk_size: int, offset: int, limit: int | None, ranged: bool
) -> Iterator[pd.DataFrame]:
    """A PostgreSQL table as DataFrames of `chunk_size` rows: ADBC's record batches (binary
    COPY, ~16 MB each) re-cut to `chunk_size` and converted at the end, or, for a table with a
    column ADBC has no plain Arrow type for (uuid, json, interval, arrays...), rows fetched with
    psycopg, as they always were."""
    window = f" ORDER BY ctid LIMIT {'ALL' if limit is None else int(limit)} OFFSET {int(offset)}"
    sql = f"SELECT * FROM {ref.quoted()}{window if ranged else ''}"
    with _adbc(ref.location) as con, con.cursor() as cur:
        schema = cur.adbc_execute_schema(sql)
        if pg_arrow.readable(schema):
            timezone = None
            if pg_arrow.has_timestamptz(schema):  # psycopg gave the session's zone
                cur.execute("SELECT current_setting('TimeZone')")
                timezone = cur.fetchone()[0]
            cur.execute(sql)
            for table in pg_arrow.rechunk(cur.fetch_record_batch(), chunk_size):
                yield pg_arrow.to_pandas(table, timezone)
            return
    with _postgres(ref.location) as con, con.transaction(), con.cursor(name="vaeflow_read") as cur:
        cur.itersize = chunk_size
        cur.execute(sql)
        while rows := cur.fetchmany(chunk_size):
            names = [d.name for d in cur.description]
            yield _fix_decimals(pd.DataFrame.from_records(rows, columns=names))


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


def _parquet_range(pf: pq.ParquetFile, offset: int, limit: int | None) -> Iterator[pd.DataFrame]:
    """Rows [offset, offset + limit) of a Parquet file, reading only the overlapping row groups."""
    stop = None if limit is None else offset + limit
    start = 0
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        lo, hi = max(offset - start, 0), n if stop is None else min(stop - start, n)
        if lo < hi:
            yield pf.read_row_group(g).slice(lo, hi - lo).to_pandas()
        start += n
        if stop is not None and start >= stop:
            return


def _parquet_file(path: str) -> pq.ParquetFile:
    """Open a Parquet file; a truncated or corrupt one, or one with a column name twice, is a
    clear error naming it."""
    with _parquet_errors(path):
        pf = pq.ParquetFile(path)
    _refuse_duplicates(path, pf.schema_arrow.names)
    return pf


@contextlib.contextmanager
def _parquet_errors(path: str) -> Iterator[None]:
    try:
        yield
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise  # the file system's own error (permissions, a vanished file), not the file's content
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SourceError(
            f"file {path} is not a readable Parquet file ({first}); it may be truncated or corrupt: "
            f"write it again, or point --source at an intact copy"
        ) from exc


def _check_csv_header(path: str) -> dict:
    """Refuse a CSV whose header names a column twice (pandas would silently rename `a` to `a.1`);
    returns pandas' reading options for it: in a one-column file an empty line is a null cell,
    not a blank line to skip."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8", errors="replace") as fh:
            header = next(csv.reader(fh), [])
    except csv.Error as exc:
        raise SourceError(f"file {path} is not a readable CSV: {exc}") from exc
    _refuse_duplicates(path, header)
    return {"skip_blank_lines": len(header) > 1}


def _refuse_duplicates(where: str, names: list[str]) -> None:
    seen: set[str] = set()
    twice = [n for n in names if n in seen or seen.add(n)]
    if twice:
        shown = ", ".join(repr(n) for n in dict.fromkeys(twice))
        raise DataError(
            f"{where} has the column name(s) {shown} more than once; give every column its own name"
        )


def columns(ref: TableRef) -> list[str]:
    """A table's column names, without reading its rows (a file's header or schema)."""
    _require(ref, read_only=True)
    if ref.kind == "parquet":
        return list(_parquet_file(ref.location).schema_arrow.names)
    if ref.kind == "csv":
        return list(_empty_csv(ref.location).columns)
    if ref.kind == "duckdb":
        with _duckdb(ref.location, read_only=True) as con:
            return [row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {ref.quoted()}").fetchall()]
    return list(_empty_frame(ref).columns)


def _empty_csv(path: str) -> pd.DataFrame:
    with _csv_reading(path) as options:
        return pd.read_csv(path, nrows=0, **options)


@contextlib.contextmanager
def _csv_reading(path: str) -> Iterator[dict]:
    """Yield pandas' options for reading `path` (its header checked, see `_check_csv_header`);
    a file pandas cannot parse is a clear error naming it."""
    options = _check_csv_header(path)
    try:
        yield options
    except pd.errors.EmptyDataError as exc:
        raise SourceError(f"file {path} is empty (no header, no rows)") from exc
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise SourceError(f"file {path} is not a readable CSV: {exc}") from exc


def count_rows(ref: TableRef) -> int:
    """Number of rows of a table (Parquet: from metadata; CSV: one pass over the file)."""
    _require(ref, read_only=True)
    if ref.kind == "parquet":
        return _parquet_file(ref.location).metadata.num_rows
    if ref.kind == "csv":
        return sum(len(f) for f in _iter_csv(ref.location, 500_000))
    if ref.kind == "duckdb":
        with _duckdb(ref.location, read_only=True) as con:
            return int(con.execute(f"SELECT count(*) FROM {ref.quoted()}").fetchone()[0])
    with _postgres(ref.location) as con:
        return int(con.execute(f"SELECT count(*) FROM {ref.quoted()}").fetchone()[0])


def _iter_csv(
    path: str, chunk_size: int, offset: int = 0, limit: int | None = None
) -> Iterator[pd.DataFrame]:
    with _csv_reading(path) as options:
        yield from pd.read_csv(
            path,
            skiprows=range(1, offset + 1),
            nrows=limit,
            chunksize=chunk_size,
            low_memory=False,
            **options,
        )


def read_frame(ref: TableRef, max_rows: int | None = None) -> pd.DataFrame:
    """Read a whole table (or its first `max_rows` rows) into memory."""
    if ref.kind == "csv":
        _require(ref)
        with _csv_reading(ref.location) as options:
            return pd.read_csv(ref.location, nrows=max_rows, low_memory=False, **options)
    frames, total = [], 0
    try:
        for frame in iter_frames(ref):
            frames.append(frame)
            total += len(frame)
            if max_rows is not None and total >= max_rows:
                break
    except (pa.ArrowInvalid, OSError) as exc:
        raise SourceError(f"cannot read {ref}: {redact(exc)}") from exc
    if not frames:
        return _empty_frame(ref)
    df = pd.concat(frames, ignore_index=True)
    return df.iloc[:max_rows] if max_rows is not None else df


def _empty_frame(ref: TableRef) -> pd.DataFrame:
    if ref.kind == "parquet":
        return _parquet_file(ref.location).schema_arrow.empty_table().to_pandas()
    if ref.kind == "duckdb":
        with _duckdb(ref.location) as con:
            return con.execute(f"SELECT * FROM {ref.quoted()} LIMIT 0").df()
    with _postgres(ref.location) as con, con.cursor() as cur:
        cur.execute(f"SELECT * FROM {ref.quoted()} LIMIT 0")
        return pd.DataFrame(columns=[d.name for d in cur.description])


# ---------------------------------------------------------------- writing

Frame = pd.DataFrame | pa.Table  # what the writers take: a pandas frame or an Arrow table


def _names(frame: Frame) -> list[str]:
    return list(frame.column_names if isinstance(frame, pa.Table) else frame.columns)


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
    if ref.kind in ("parquet", "csv"):
        return _write_file(ref, frames, constants)
    with atomic.named_lock(f"table:{ref.digest}", str(ref)):
        if ref.kind == "duckdb":
            return _write_duckdb(ref, frames, constants, threads, compress_floats)
        return _write_postgres(ref, frames, constants, key)


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
    if ref.is_file:
        return
    engine = "DuckDB" if ref.kind == "duckdb" else "PostgreSQL"
    for name in names:
        if "\x00" in name:
            raise DataError(
                f"column name {name!r} has a NUL character, which {engine} cannot store; rename it"
            )
        if ref.kind == "postgres" and len(name.encode()) > 63:
            raise DataError(
                f"column name {name!r} is {len(name.encode())} bytes; PostgreSQL keeps 63 and would "
                f"silently cut it: rename it (or write a .parquet file)"
            )
    if ref.kind == "duckdb":
        folded: dict[str, str] = {}
        for name in names:
            if (other := folded.setdefault(name.casefold(), name)) != name:
                raise DataError(
                    f"columns {other!r} and {name!r} differ only in case, which DuckDB treats as one name; "
                    f"rename one of them"
                )


def _nothing_written(ref: TableRef) -> DataError:
    return DataError(f"nothing to write to {ref}: the job produced no rows; {ref} is unchanged")


def _write_file(ref: TableRef, frames: Iterable[Frame], constants: dict[str, str]) -> int:
    target = Path(ref.location)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic.target_lock(target):
        atomic.remove_stale(target)
        fd, tmp = tempfile.mkstemp(prefix=atomic.temp_prefix(target), suffix=".tmp", dir=target.parent)
        os.close(fd)
        rows, writer, schema = 0, None, None
        try:
            for frame in frames:
                table = (
                    frame
                    if isinstance(frame, pa.Table)
                    else pa.Table.from_pandas(frame, preserve_index=False)
                )
                for name, value in constants.items():
                    table = table.append_column(name, pa.repeat(pa.scalar(value, pa.string()), len(table)))
                if writer is None:
                    schema = table.schema
                    opener = pq.ParquetWriter if ref.kind == "parquet" else pacsv.CSVWriter
                    writer = opener(tmp, schema)
                try:
                    table = table.cast(schema)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                    raise DataError(
                        f"cannot write {target}: a column's type changed after row {rows} ({exc}); the "
                        f"source's types vary between chunks: raise score.chunk_size, or give the column "
                        f"one type in the source"
                    ) from exc
                writer.write_table(table)
                rows += len(frame)
            if rows == 0:
                raise _nothing_written(ref)
            writer.close()
            writer = None
            atomic.publish_mode(Path(tmp), target)
            os.replace(tmp, target)
        except OSError as exc:
            if disk_full(exc):
                raise atomic.no_space(target) from exc
            raise
        finally:
            if writer is not None:
                with contextlib.suppress(Exception):
                    writer.close()
            if os.path.exists(tmp):
                os.unlink(tmp)
    return rows


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
    sql = (
        "SELECT table_name FROM information_schema.tables "
        f"WHERE lower(table_schema) = lower({placeholder}) AND left(table_name, {len(_staging_prefix(ref))}) "
        f"= {placeholder}"
    )
    params = [ref.parts[0], _staging_prefix(ref)]
    return [row[0] for row in con.execute(sql, params).fetchall()]


_DUCKDB_COMMIT_ROWS = 500_000  # rows per transaction while filling the staging table


def _write_duckdb(
    ref: TableRef,
    frames: Iterable[Frame],
    constants: dict[str, str],
    threads: int | None,
    compress_floats: bool = True,
) -> int:
    """Fill a staging table chunk by chunk, then swap it in for the target in one transaction.

    The staging table is filled in transactions of ~500k rows: DuckDB writes a large
    transaction's row groups straight to the file (no WAL copy), and memory stays bounded. A
    killed job leaves at most a staging table, which the next writer of the target drops.
    `constants` become virtual generated columns (`GENERATED ALWAYS AS ('value')`): every row
    reads its value, but nothing is stored or compressed per row (as per-row VARCHAR values
    they cost a third of the embed job's insert time; added at the end with ADD COLUMN ...
    DEFAULT, +200 MB peak memory).
    """
    import duckdb

    staging = _staging(ref)
    rows = uncommitted = 0
    with _duckdb(ref.location, threads=threads) as con, _float_compression(con, compress_floats):
        if len(ref.table) == 2:
            con.execute(f"CREATE SCHEMA IF NOT EXISTS {_quote(ref.table[0])}")
        for stale in _stale_staging(con, ref, "?"):
            con.execute(f"DROP TABLE IF EXISTS {_quote(ref.parts[0])}.{_quote(stale)}")
        con.execute("BEGIN TRANSACTION")
        try:
            for i, frame in enumerate(frames):
                con.register("_vaeflow_chunk", frame)
                if i == 0:
                    _fit_memory_limit(con, ref.location, _frame_row_bytes(frame), len(_names(frame)))
                    con.execute(f"CREATE TABLE {staging.quoted()} ({_duck_columns(con, constants)})")
                con.execute(f"INSERT INTO {staging.quoted()} SELECT * FROM _vaeflow_chunk")
                con.unregister("_vaeflow_chunk")
                rows, uncommitted = rows + len(frame), uncommitted + len(frame)
                if uncommitted >= _DUCKDB_COMMIT_ROWS:
                    con.execute("COMMIT")
                    con.execute("BEGIN TRANSACTION")
                    uncommitted = 0
            if rows == 0:
                raise _nothing_written(ref)
            con.execute(f"DROP TABLE IF EXISTS {ref.quoted()}")
            con.execute(f"ALTER TABLE {staging.quoted()} RENAME TO {_quote(ref.parts[1])}")
            con.execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(Exception):  # best effort: the original error is what counts
                con.execute("ROLLBACK")
                con.execute(f"DROP TABLE IF EXISTS {staging.quoted()}")  # what earlier commits filled
            if isinstance(exc, duckdb.OutOfMemoryException):
                raise _out_of_memory(con, f"writing {ref} (the previous output is unchanged)", exc) from exc
            if isinstance(exc, duckdb.Error):
                if disk_full(exc):
                    raise atomic.no_space(ref) from exc
                raise SourceError(
                    f"cannot write {ref} (it is unchanged): {str(exc).splitlines()[0]}"
                ) from exc
            raise
    return rows


_FLOAT_CODECS = "alp,alprd"  # DuckDB's compression methods for FLOAT and DOUBLE columns


@contextlib.contextmanager
def _float_compression(con, enabled: bool) -> Iterator[None]:
    """Without `enabled`, disable DuckDB's float codecs while writing (the documented global
    setting `disabled_compression_methods`), then restore the setting.

    For 50k rows of 8 random float32 columns, ALP-RD analysis and compression cost 6 of 16
    core-ms per insert and saved 3% of the file (measured, DuckDB 2.0.1): network outputs such
    as embeddings have no decimal structure for ALP to find. Integers and text keep their codecs.
    """
    if enabled:
        yield
        return
    before = con.execute("SELECT current_setting('disabled_compression_methods')").fetchone()[0]
    codecs = ",".join(sorted({c.lower() for c in f"{before or ''},{_FLOAT_CODECS}".split(",") if c}))
    con.execute(f"SET disabled_compression_methods = {_literal(codecs)}")
    try:
        yield
    finally:
        con.execute(f"SET disabled_compression_methods = {_literal(str(before or ''))}")


def _fit_memory_limit(con, path: str, row_bytes: float, columns: int, rows: int = _DUCKDB_ROW_GROUP) -> None:
    """Raise DuckDB's memory limit to 1.5x `rows` rows of `row_bytes` when that is more (and
    the configured limit is a size, not e.g. a percentage).

    DuckDB writes, checkpoints and scans a table a row group (122,880 rows) at a time: with 600
    double columns (590 MB a row group) a 488 MB limit failed a checkpoint with a fatal error
    and 640 MB passed (measured), so a fixed 256 MB failed beyond ~150 such columns.
    """
    need, configured = int(1.5 * rows * row_bytes), _size_bytes(DUCKDB_MEMORY_LIMIT)
    with _RAISED_LOCK:
        entry = _RAISED[str(Path(path).resolve())]
        if configured is None or need <= max(configured, entry[1]):
            return
        log.info("raising DuckDB's memory limit to %d MB for %d columns", need >> 20, columns)
        con.execute(f"SET memory_limit = '{need}B'")
        entry[1] = need


def _frame_row_bytes(frame: Frame) -> float:
    if isinstance(frame, pa.Table):
        return float(frame.nbytes) / max(frame.num_rows, 1)
    return float(frame.memory_usage(index=False, deep=True).sum()) / max(len(frame), 1)


def _out_of_memory(con, doing: str, exc: Exception) -> SourceError:
    limit = DUCKDB_MEMORY_LIMIT
    with contextlib.suppress(Exception):
        limit = con.execute("SELECT current_setting('memory_limit')").fetchall()[0][0]
    return SourceError(
        f"DuckDB ran out of memory {doing} within its memory_limit of {limit}: set "
        f"VAEFLOW_DUCKDB_MEMORY_LIMIT higher (e.g. 2GB) or lower score.chunk_size. DuckDB said: "
        f"{str(exc).splitlines()[0]}"
    )


def _size_bytes(text: str) -> int | None:
    """A DuckDB size setting ("256MB", "1GiB", "300000000B") in bytes; None when it is not one."""
    match = _SIZE.match(text)
    if not match:
        return None
    unit = (match.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    return int(float(match.group(1)) * base ** "BKMGT".index(unit[0]))


def _duck_columns(con, constants: dict[str, str]) -> str:
    """Column definitions of the registered chunk (DuckDB's own types for it), then one
    virtual generated VARCHAR column per constant, its value an escaped string literal."""
    described = con.execute("DESCRIBE SELECT * FROM _vaeflow_chunk").fetchall()
    columns = [f"{_quote(name)} {dtype}" for name, dtype, *_ in described]
    columns += [
        f"{_quote(name)} VARCHAR GENERATED ALWAYS AS ({_literal(value)}) VIRTUAL"
        for name, value in constants.items()
    ]
    return ", ".join(columns)


def _advisory_key(ref: TableRef) -> int:
    """A signed 64-bit key for PostgreSQL's advisory locks, from the table's identity."""
    return int.from_bytes(bytes.fromhex(ref.digest[:16]), "big", signed=True)


@contextlib.contextmanager
def advisory_lock(con, key: int, what: str, timeout: float | None = None) -> Iterator[None]:
    """A PostgreSQL session advisory lock on `key`, across hosts, waited for at most `timeout`
    seconds (default VAEFLOW_LOCK_TIMEOUT), then a `TransientError`. The server releases it when
    a killed job's connection drops."""
    wait = atomic.LOCK_TIMEOUT_S if timeout is None else timeout
    deadline = time.monotonic() + wait
    while not con.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]:
        if time.monotonic() > deadline:
            raise TransientError(
                f"another job has held the lock on {what} for over {wait:.0f}s; wait for it to "
                f"finish, or raise the lock timeout"
            )
        time.sleep(0.5)
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            con.execute("SELECT pg_advisory_unlock(%s)", (key,))


def _pg_swap(con, staging: TableRef, ref: TableRef, tries: int = 3, pkey: str | None = None) -> None:
    """Replace `ref` by `staging` in one transaction. Renaming a table also renames its array
    type, `_` + the name cut to 63 bytes: two targets sharing their first 62 bytes, swapped at
    the same moment, collide there (a unique violation, the transaction rolled back), so the
    swap is tried again. `pkey`, the staging table's primary-key index, becomes `<target>_pkey`
    (the name cut to 63 bytes) when no other relation has that name."""
    import psycopg

    for attempt in range(tries):
        try:
            with con.transaction():
                con.execute(f"DROP TABLE IF EXISTS {ref.quoted()}")
                con.execute(f"ALTER TABLE {staging.quoted()} RENAME TO {_quote(ref.parts[1])}")
                if pkey is not None:
                    name = _pkey_name(ref.parts[1])
                    taken = "SELECT to_regclass(%s) IS NOT NULL"
                    if not con.execute(taken, (f"{_quote(ref.parts[0])}.{_quote(name)}",)).fetchone()[0]:
                        con.execute(
                            f"ALTER INDEX {_quote(ref.parts[0])}.{_quote(pkey)} RENAME TO {_quote(name)}"
                        )
            return
        except psycopg.errors.UniqueViolation:
            if attempt == tries - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


def _pkey_name(table: str) -> str:
    """`<table>_pkey`, PostgreSQL's own name for a primary key, the table's name cut to fit 63 bytes."""
    cut = table
    while len(cut.encode()) > 63 - len("_pkey"):
        cut = cut[:-1]
    return f"{cut}_pkey"


def _write_postgres(
    ref: TableRef, frames: Iterable[Frame], constants: dict[str, str], key: str | None
) -> int:
    """Fill a staging table chunk by chunk, one binary COPY (and transaction) a chunk, then add
    the constants and the primary key and swap it in for the target in one transaction, under
    an advisory lock on the target. A chunk of fixed-width columns without nulls goes as one
    numpy-built COPY payload through psycopg (`warehouse_postgres.binary_copy`), any other
    through ADBC's bulk ingest.

    Column types come from the first chunk (`warehouse_postgres.PG_TYPES`: float32 is `real`);
    later chunks are cast to them. `constants` are added at the end as text columns whose value
    PostgreSQL keeps once in its catalog (`ADD COLUMN ... DEFAULT`, no table rewrite; the default
    is dropped again, so later inserts do not inherit it).
    """
    import adbc_driver_manager
    import psycopg

    staging = _staging(ref)
    schema = ref.parts[0]
    rows, types = 0, None
    with _postgres(ref.location) as con, advisory_lock(con, _advisory_key(ref), f"writing {ref}"):
        try:
            with con.transaction():
                if len(ref.table) == 2:
                    con.execute(f"CREATE SCHEMA IF NOT EXISTS {_quote(schema)}")
                for stale in _stale_staging(con, ref, "%s"):
                    con.execute(f"DROP TABLE IF EXISTS {_quote(schema)}.{_quote(stale)}")
            with contextlib.ExitStack() as stack:
                bulk = None  # an ADBC cursor, opened for the first chunk that needs it
                for frame in frames:
                    table = pg_arrow.arrow_table(frame, ref)
                    if types is None:
                        types = table.schema
                        cols = ", ".join(f"{_quote(f.name)} {pg_arrow.PG_TYPES[f.type]}" for f in types)
                        con.execute(f"CREATE TABLE {staging.quoted()} ({cols})")
                        copy = f"COPY {staging.quoted()} ({', '.join(_quote(n) for n in types.names)}) "
                    table = pg_arrow.conform(table, types, ref, rows)
                    if not table.num_rows:
                        continue
                    if (payload := pg_arrow.binary_copy(table)) is not None:
                        with con.cursor() as cur, cur.copy(copy + "FROM STDIN (FORMAT binary)") as cp:
                            cp.write(payload)
                    else:
                        if bulk is None:
                            bulk = stack.enter_context(
                                contextlib.closing(stack.enter_context(_adbc(ref.location)).cursor())
                            )
                        bulk.adbc_ingest(staging.parts[1], table, mode="append", db_schema_name=schema)
                    rows += table.num_rows
            if rows == 0:
                raise _nothing_written(ref)
            pkey = _pg_finish(con, staging, ref, constants, key if key in types.names else None)
            _pg_swap(con, staging, ref, pkey=pkey)
        except BaseException as exc:
            with contextlib.suppress(Exception):  # best effort: the original error is what counts
                con.execute(f"DROP TABLE IF EXISTS {staging.quoted()}")
            if (
                isinstance(exc, psycopg.Error) and not isinstance(exc, psycopg.OperationalError)
            ) or isinstance(exc, adbc_driver_manager.Error):
                # one line, the target's name where the server named the staging table
                said = " ".join(str(exc).removeprefix("INVALID_DATA: ").removeprefix("[libpq] ").split())
                said = said.replace(staging.parts[1], ref.parts[1])
                raise SourceError(f"cannot write {ref} (it is unchanged): {redact(said)}") from exc
            raise
    return rows


def _pg_finish(
    con, staging: TableRef, ref: TableRef, constants: dict[str, str], key: str | None
) -> str | None:
    """Add the constant columns and the primary key on `key` to the filled staging table, in
    one transaction; returns the primary key's index name (None without a key). A key with
    duplicates or nulls is a `DataError` naming the table and column."""
    import psycopg

    pkey = f"{staging.parts[1]}_pkey"
    with con.transaction():
        if constants:
            added = ", ".join(
                f"ADD COLUMN {_quote(n)} text DEFAULT {_literal(v)}" for n, v in constants.items()
            )
            con.execute(f"ALTER TABLE {staging.quoted()} {added}")
            dropped = ", ".join(f"ALTER COLUMN {_quote(n)} DROP DEFAULT" for n in constants)
            con.execute(f"ALTER TABLE {staging.quoted()} {dropped}")
        if key is None:
            return None
        try:
            con.execute(
                f"ALTER TABLE {staging.quoted()} ADD CONSTRAINT {_quote(pkey)} PRIMARY KEY ({_quote(key)})"
            )
        except (psycopg.errors.UniqueViolation, psycopg.errors.NotNullViolation) as exc:
            what = "nulls" if isinstance(exc, psycopg.errors.NotNullViolation) else "duplicate values"
            detail = f" ({exc.diag.message_detail})" if exc.diag.message_detail else ""
            raise DataError(
                f"key column {key!r} of the output for {ref} has {what}{detail}; a PostgreSQL output gets "
                f"its key as primary key, so the key must identify every row: de-duplicate the source "
                f"(or fill its nulls) and score again; {ref} is unchanged"
            ) from exc
    return pkey
