"""DuckDB tables (`duckdb:///FILE#table`): connections with a bounded buffer pool, streaming
reads, and atomic writes through a staging table swapped in for the target."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import pandas as pd
import pyarrow as pa

from pipelines import atomic
from pipelines.errors import DataError, SourceError, TransientError, disk_full
from pipelines.warehouse._common import (
    Backend,
    Frame,
    TableRef,
    _literal,
    _names,
    _nothing_written,
    _quote,
    _refuse_nul,
    _staging,
    _stale_staging,
    _table_lock,
)

log = logging.getLogger(__name__)

# a streaming read and an atomic write need about one row group each; the rest of a bigger pool
# only caches blocks a one-pass job never reads again (256MB: ~150 MB more peak RSS, no faster)
DUCKDB_MEMORY_LIMIT = os.environ.get("VAEFLOW_DUCKDB_MEMORY_LIMIT", "128MB")
_DUCKDB_ROW_GROUP = 122_880  # rows in one DuckDB row group (its unit of writing and checkpointing)
_DUCKDB_COMMIT_ROWS = 500_000  # rows per transaction while filling the staging table
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]?I?B)?\s*$", re.IGNORECASE)
# connections to one DuckDB file share its settings: per file, [open connections, the memory
# limit one of them raised (bytes)], so a connection opening later does not lower it again
_RAISED: dict[str, list[int]] = {}
_RAISED_LOCK = threading.Lock()
_FLOAT_CODECS = "alp,alprd"  # DuckDB's compression methods for FLOAT and DOUBLE columns


class DuckDBBackend(Backend):
    """Tables in a DuckDB file; names match case-insensitively."""

    kind = "duckdb"

    def identity(self, ref: TableRef) -> tuple[str, ...]:
        schema, table = ref.parts
        return ("duckdb", os.path.realpath(ref.location), schema.casefold(), table.casefold())

    def exists(self, ref: TableRef, read_only: bool = False) -> bool:
        if not Path(ref.location).exists():
            return False
        sql = (
            "SELECT count(*) FROM information_schema.tables "
            "WHERE lower(table_schema) = lower(?) AND lower(table_name) = lower(?)"
        )
        with _duckdb(ref.location, read_only=read_only) as con:
            return con.execute(sql, list(ref.parts)).fetchone()[0] > 0

    def columns(self, ref: TableRef) -> list[str]:
        with _duckdb(ref.location, read_only=True) as con:
            return [row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {ref.quoted()}").fetchall()]

    def count(self, ref: TableRef) -> int:
        with _duckdb(ref.location, read_only=True) as con:
            return int(con.execute(f"SELECT count(*) FROM {ref.quoted()}").fetchone()[0])

    def iter_frames(
        self, ref: TableRef, chunk_size: int, *, offset: int, limit: int | None, threads: int | None
    ) -> Iterator[pd.DataFrame]:
        """A range read opens the file read-only (partition readers run in parallel processes);
        `threads` caps DuckDB's worker threads."""
        import duckdb

        ranged = bool(offset) or limit is not None
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

    def empty_frame(self, ref: TableRef) -> pd.DataFrame:
        with _duckdb(ref.location) as con:
            return con.execute(f"SELECT * FROM {ref.quoted()} LIMIT 0").df()

    def refuse_unstorable(self, names: list[str]) -> None:
        """A NUL byte (cut there), names that differ only in case (DuckDB renames one `a_1`)."""
        for name in names:
            _refuse_nul(name, "DuckDB")
        folded: dict[str, str] = {}
        for name in names:
            if (other := folded.setdefault(name.casefold(), name)) != name:
                raise DataError(
                    f"columns {other!r} and {name!r} differ only in case, which DuckDB treats as one name; "
                    f"rename one of them"
                )

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
        """`threads` caps DuckDB's worker threads; `compress_floats=False` skips the float
        codecs (`_float_compression`); `key` is ignored."""
        with _table_lock(ref):
            return _write_duckdb(ref, frames, constants, threads, compress_floats)


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
