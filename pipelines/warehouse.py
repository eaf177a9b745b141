"""Read and write tables: DuckDB (default), PostgreSQL, Parquet and CSV.

A reference is a `.parquet`/`.csv` path, a bare table name (`flights`, `main.flights`) in the
configured warehouse, or `URL#table` (`duckdb:///path.duckdb#t`, `postgresql://host/db#s.t`).
Table names are validated and quoted as identifiers, never pasted into SQL. Reads stream in
Arrow record batches; writes go to a staging table or temp file and replace the target in one
transaction or rename, so a failed job leaves the previous output intact.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipelines.errors import SourceError

log = logging.getLogger(__name__)

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
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
        """A short name for suites, snapshots and output tables."""
        if self.table:
            return self.table[-1]
        return Path(self.location).stem

    @property
    def is_file(self) -> bool:
        return self.kind in ("parquet", "csv")

    def __str__(self) -> str:
        if self.is_file:
            return self.location
        return f"{redact_url(self.location)}#{'.'.join(self.table)}"

    def quoted(self) -> str:
        return ".".join(_quote(p) for p in self.table)

    def with_table(self, name: str) -> TableRef:
        """The same database, another table (in the same schema)."""
        parts = parse_identifier(name)
        if len(parts) == 1 and len(self.table) == 2:
            parts = (self.table[0], *parts)
        return TableRef(self.kind, self.location, parts)


def _quote(name: str) -> str:
    """A SQL identifier, double-quoted (embedded quotes doubled)."""
    return '"' + name.replace('"', '""') + '"'


def _literal(value: str) -> str:
    """A SQL string literal (embedded single quotes doubled), for DDL, which takes no parameters."""
    return "'" + str(value).replace("'", "''") + "'"


def redact_url(url: str) -> str:
    """A database URL with its password replaced by *** (for messages, logs and MLflow)."""
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def parse_identifier(name: str) -> tuple[str, ...]:
    """`table` or `schema.table` -> parts; anything else is rejected with a clear error."""
    parts = tuple(name.split("."))
    if not 1 <= len(parts) <= 2 or not all(_IDENT.match(p) for p in parts):
        raise SourceError(
            f"invalid table name {name!r}: use letters, digits and underscores, optionally "
            f"schema.table (at most 63 characters a part)"
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
        return TableRef(FILE_SUFFIXES[suffix], str(Path(text).expanduser()))
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
    raise SourceError(
        f"unsupported warehouse URL {redact_url(url)!r}: use duckdb:///FILE or postgresql://..."
    )


# ---------------------------------------------------------------- connections


@contextlib.contextmanager
def _duckdb(path: str, read_only: bool = False, threads: int | None = None):
    """A DuckDB connection with a bounded buffer pool; `threads` caps DuckDB's worker threads
    (None: DuckDB's default, one per core)."""
    import duckdb

    if read_only and not Path(path).exists():
        raise SourceError(f"DuckDB warehouse file {path} does not exist")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(path, read_only=read_only)
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


@contextlib.contextmanager
def _postgres(url: str):
    import psycopg

    try:
        con = psycopg.connect(url, connect_timeout=10, autocommit=True)
    except psycopg.OperationalError as exc:
        raise SourceError(f"cannot connect to PostgreSQL at {redact_url(url)}: {exc}".strip()) from exc
    try:
        yield con
    finally:
        con.close()


def _sql_parts(ref: TableRef) -> tuple[str, str]:
    """(schema, table) with the engine's default schema filled in."""
    if len(ref.table) == 2:
        return ref.table[0], ref.table[1]
    return ("main" if ref.kind == "duckdb" else "public"), ref.table[0]


def table_exists(ref: TableRef, read_only: bool = False) -> bool:
    """Whether the file or table exists (`read_only`: open DuckDB read-only, as concurrent
    partition readers in other processes must)."""
    if ref.is_file:
        return Path(ref.location).is_file()
    schema, table = _sql_parts(ref)
    sql = "SELECT count(*) FROM information_schema.tables WHERE table_schema = %s AND table_name = %s"
    if ref.kind == "duckdb":
        if not Path(ref.location).exists():
            return False
        with _duckdb(ref.location, read_only=read_only) as con:
            return con.execute(sql.replace("%s", "?"), [schema, table]).fetchone()[0] > 0
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
        if ranged:
            yield from _rechunk(_parquet_range(ref.location, offset, limit), chunk_size)
        else:
            for batch in pq.ParquetFile(ref.location).iter_batches(batch_size=chunk_size):
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
        window = " ORDER BY ctid LIMIT %s OFFSET %s" if ranged else ""
        with _postgres(ref.location) as con, con.transaction(), con.cursor(name="vaeflow_read") as cur:
            cur.itersize = chunk_size
            cur.execute(f"SELECT * FROM {ref.quoted()}{window}", (limit, offset) if ranged else None)
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


def _parquet_range(path: str, offset: int, limit: int | None) -> Iterator[pd.DataFrame]:
    """Rows [offset, offset + limit) of a Parquet file, reading only the overlapping row groups."""
    pf = pq.ParquetFile(path)
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


def count_rows(ref: TableRef) -> int:
    """Number of rows of a table (Parquet: from metadata; CSV: one pass over the file)."""
    _require(ref, read_only=True)
    if ref.kind == "parquet":
        return pq.ParquetFile(ref.location).metadata.num_rows
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
    # pandas infers one dtype per column over the whole file, which keeps chunks consistent
    try:
        yield from pd.read_csv(
            path, skiprows=range(1, offset + 1), nrows=limit, chunksize=chunk_size, low_memory=False
        )
    except pd.errors.EmptyDataError as exc:
        raise SourceError(f"file {path} is empty (no header, no rows)") from exc
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise SourceError(f"file {path} is not a readable CSV: {exc}") from exc


def read_frame(ref: TableRef, max_rows: int | None = None) -> pd.DataFrame:
    """Read a whole table (or its first `max_rows` rows) into memory."""
    if ref.kind == "csv":
        _require(ref)
        try:
            return pd.read_csv(ref.location, nrows=max_rows, low_memory=False)
        except pd.errors.EmptyDataError as exc:
            raise SourceError(f"file {ref.location} is empty (no header, no rows)") from exc
        except (pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise SourceError(f"file {ref.location} is not a readable CSV: {exc}") from exc
    frames, total = [], 0
    try:
        for frame in iter_frames(ref):
            frames.append(frame)
            total += len(frame)
            if max_rows is not None and total >= max_rows:
                break
    except (pa.ArrowInvalid, OSError) as exc:
        raise SourceError(f"cannot read {ref}: {exc}") from exc
    if not frames:
        return _empty_frame(ref)
    df = pd.concat(frames, ignore_index=True)
    return df.iloc[:max_rows] if max_rows is not None else df


def _empty_frame(ref: TableRef) -> pd.DataFrame:
    if ref.kind == "parquet":
        return pq.read_table(ref.location).to_pandas()
    if ref.kind == "duckdb":
        with _duckdb(ref.location) as con:
            return con.execute(f"SELECT * FROM {ref.quoted()} LIMIT 0").df()
    with _postgres(ref.location) as con, con.cursor() as cur:
        cur.execute(f"SELECT * FROM {ref.quoted()} LIMIT 0")
        return pd.DataFrame(columns=[d.name for d in cur.description])


# ---------------------------------------------------------------- writing

_PG_TYPES = {"b": "boolean", "i": "bigint", "u": "bigint", "f": "double precision"}


def _pg_type(dtype) -> str:
    kind = getattr(dtype, "kind", "O")
    if isinstance(dtype, pd.BooleanDtype):
        return "boolean"
    return _PG_TYPES.get(kind, "text")


Frame = pd.DataFrame | pa.Table  # what the writers take: a pandas frame or an Arrow table


def _pandas(frame: Frame) -> pd.DataFrame:
    return frame.to_pandas() if isinstance(frame, pa.Table) else frame


def _names(frame: Frame) -> list[str]:
    return list(frame.column_names if isinstance(frame, pa.Table) else frame.columns)


def write_table(
    ref: TableRef,
    frames: Iterable[Frame],
    constants: dict[str, str] | None = None,
    *,
    threads: int | None = None,
    compress_floats: bool = True,
) -> int:
    """Write all frames (DataFrames or Arrow tables) to `ref` atomically, replacing what was
    there; returns the row count.

    `constants` are text columns with one value for every row (e.g. the model version), added
    by the writer rather than carried through each chunk. `threads` caps DuckDB's worker threads.
    `compress_floats=False` stores a DuckDB output's floating-point columns uncompressed: for
    values no float codec can shrink (embeddings), it skips DuckDB's ALP/ALP-RD analysis.
    """
    constants = constants or {}
    if constants:
        frames = _without_clash(ref, frames, constants)
    if ref.kind in ("parquet", "csv"):
        return _write_file(ref, frames, constants)
    if ref.kind == "duckdb":
        return _write_duckdb(ref, frames, constants, threads, compress_floats)
    return _write_postgres(ref, (_pandas(frame).assign(**constants) for frame in frames))


def _without_clash(ref: TableRef, frames: Iterable[Frame], constants: dict[str, str]):
    for i, frame in enumerate(frames):
        if i == 0 and (clash := [name for name in constants if name in _names(frame)]):
            raise SourceError(
                f"the output for {ref} would have column(s) {', '.join(clash)} twice: the writer adds "
                f"them (one value for every row); rename that column in the source table"
            )
        yield frame


def _write_file(ref: TableRef, frames: Iterable[Frame], constants: dict[str, str]) -> int:
    target = Path(ref.location)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    rows, writer, schema = 0, None, None
    try:
        for frame in frames:
            table = (
                frame if isinstance(frame, pa.Table) else pa.Table.from_pandas(frame, preserve_index=False)
            )
            for name, value in constants.items():
                table = table.append_column(name, pa.repeat(pa.scalar(value, pa.string()), len(table)))
            if writer is None:
                schema = table.schema
                opener = pq.ParquetWriter if ref.kind == "parquet" else pacsv.CSVWriter
                writer = opener(tmp, schema)
            writer.write_table(table.cast(schema))
            rows += len(frame)
        if writer is None:
            raise SourceError(f"nothing to write to {target}: the job produced no data")
        writer.close()
        writer = None
        os.replace(tmp, target)
    finally:
        if writer is not None:
            writer.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
    return rows


def _staging(ref: TableRef) -> TableRef:
    return TableRef(ref.kind, ref.location, (*ref.table[:-1], f"{ref.table[-1]}__vaeflow_staging"))


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
    killed job leaves at most a staging table, which the next run drops. `constants` become
    virtual generated columns (`GENERATED ALWAYS AS ('value')`): every row reads its value, but
    nothing is stored or compressed per row (as per-row VARCHAR values they cost a third of the
    embed job's insert time; added at the end with ADD COLUMN ... DEFAULT, +200 MB peak memory).
    """
    import duckdb

    staging = _staging(ref)
    rows = uncommitted = 0
    with _duckdb(ref.location, threads=threads) as con, _float_compression(con, compress_floats):
        if len(ref.table) == 2:
            con.execute(f"CREATE SCHEMA IF NOT EXISTS {_quote(ref.table[0])}")
        con.execute(f"DROP TABLE IF EXISTS {staging.quoted()}")
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
            if rows == 0 and not _exists_duck(con, staging):
                raise SourceError(f"nothing to write to {ref}: the job produced no data")
            con.execute(f"DROP TABLE IF EXISTS {ref.quoted()}")
            con.execute(f"ALTER TABLE {staging.quoted()} RENAME TO {_quote(ref.table[-1])}")
            con.execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(Exception):  # best effort: the original error is what counts
                con.execute("ROLLBACK")
                con.execute(f"DROP TABLE IF EXISTS {staging.quoted()}")  # what earlier commits filled
            if isinstance(exc, duckdb.OutOfMemoryException):
                raise _out_of_memory(con, f"writing {ref} (the previous output is unchanged)", exc) from exc
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


def _exists_duck(con, ref: TableRef) -> bool:
    schema, table = _sql_parts(ref)
    sql = "SELECT count(*) FROM information_schema.tables WHERE table_schema = ? AND table_name = ?"
    return con.execute(sql, [schema, table]).fetchone()[0] > 0


def _write_postgres(ref: TableRef, frames: Iterable[pd.DataFrame]) -> int:
    staging = _staging(ref)
    rows = 0
    with _postgres(ref.location) as con:
        with con.transaction():
            if len(ref.table) == 2:
                con.execute(f"CREATE SCHEMA IF NOT EXISTS {_quote(ref.table[0])}")
            con.execute(f"DROP TABLE IF EXISTS {staging.quoted()}")
        created = False
        for frame in frames:
            with con.transaction():
                if not created:
                    cols = ", ".join(f"{_quote(str(c))} {_pg_type(t)}" for c, t in frame.dtypes.items())
                    con.execute(f"CREATE TABLE {staging.quoted()} ({cols})")
                    created = True
                names = ", ".join(_quote(str(c)) for c in frame.columns)
                with con.cursor() as cur, cur.copy(f"COPY {staging.quoted()} ({names}) FROM STDIN") as cp:
                    for record in frame.astype(object).where(frame.notna(), None).itertuples(index=False):
                        cp.write_row(record)
            rows += len(frame)
        if not created:
            raise SourceError(f"nothing to write to {ref}: the job produced no data")
        with con.transaction():
            con.execute(f"DROP TABLE IF EXISTS {ref.quoted()}")
            con.execute(f"ALTER TABLE {staging.quoted()} RENAME TO {_quote(ref.table[-1])}")
    return rows
