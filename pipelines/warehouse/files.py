"""Parquet and CSV files as tables: streaming reads (Parquet by row group, CSV by pandas'
chunks) and atomic writes through a temp file renamed over the target."""

from __future__ import annotations

import contextlib
import os
import tempfile
from abc import abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipelines import atomic
from pipelines.errors import DataError, SourceError, disk_full
from pipelines.warehouse._common import (
    Backend,
    Frame,
    TableRef,
    _nothing_written,
    _rechunk,
    _refuse_duplicates,
)


class FileBackend(Backend):
    """A table in one file: identity is the file's real path; any column name can be stored."""

    noun = "file"

    def identity(self, ref: TableRef) -> tuple[str, ...]:
        return ("file", os.path.realpath(ref.location))

    def same_table(self, ref: TableRef, other: TableRef) -> bool:
        """Hard links to one file are one table."""
        if not other.is_file:
            return False
        with contextlib.suppress(OSError):
            return os.path.samefile(ref.location, other.location)
        return False

    def exists(self, ref: TableRef, read_only: bool = False) -> bool:
        return Path(ref.location).is_file()

    def refuse_unstorable(self, names: list[str]) -> None:
        """Parquet and CSV store any column name as it is."""

    @abstractmethod
    def _writer(self, path: str, schema: pa.Schema) -> pq.ParquetWriter | pacsv.CSVWriter:
        """An Arrow writer of this format to `path`."""

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
        """Write a temp file beside the target and rename it over the target; `constants`
        become columns, `threads`, `compress_floats` and `key` are ignored."""
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
                        table = table.append_column(
                            name, pa.repeat(pa.scalar(value, pa.string()), len(table))
                        )
                    if writer is None:
                        schema = table.schema
                        writer = self._writer(tmp, schema)
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


class ParquetBackend(FileBackend):
    """A `.parquet`/`.pq` file: counts from its metadata, ranges read only the row groups they overlap."""

    kind = "parquet"

    def columns(self, ref: TableRef) -> list[str]:
        return list(_parquet_file(ref.location).schema_arrow.names)

    def count(self, ref: TableRef) -> int:
        return _parquet_file(ref.location).metadata.num_rows

    def iter_frames(
        self, ref: TableRef, chunk_size: int, *, offset: int, limit: int | None, threads: int | None
    ) -> Iterator[pd.DataFrame]:
        pf = _parquet_file(ref.location)
        with _parquet_errors(ref.location):
            if bool(offset) or limit is not None:
                yield from _rechunk(_parquet_range(pf, offset, limit), chunk_size)
            else:
                for batch in pf.iter_batches(batch_size=chunk_size):
                    yield batch.to_pandas(split_blocks=True)

    def empty_frame(self, ref: TableRef) -> pd.DataFrame:
        return _parquet_file(ref.location).schema_arrow.empty_table().to_pandas()

    def _writer(self, path: str, schema: pa.Schema) -> pq.ParquetWriter:
        return pq.ParquetWriter(path, schema)


class CsvBackend(FileBackend):
    """A `.csv` file with a header: counting takes a pass over it, a range skips the rows before it."""

    kind = "csv"

    def columns(self, ref: TableRef) -> list[str]:
        return list(_empty_csv(ref.location).columns)

    def count(self, ref: TableRef) -> int:
        return sum(len(f) for f in _iter_csv(ref.location, 500_000))

    def iter_frames(
        self, ref: TableRef, chunk_size: int, *, offset: int, limit: int | None, threads: int | None
    ) -> Iterator[pd.DataFrame]:
        return _iter_csv(ref.location, chunk_size, offset, limit)

    def empty_frame(self, ref: TableRef) -> pd.DataFrame:
        return _empty_csv(ref.location)

    def read_frame(self, ref: TableRef, max_rows: int | None = None) -> pd.DataFrame:
        """The file in one `read_csv`, not chunk by chunk."""
        self.require(ref)
        with _csv_reading(ref.location) as options:
            return pd.read_csv(ref.location, nrows=max_rows, low_memory=False, **options)

    def _writer(self, path: str, schema: pa.Schema) -> pacsv.CSVWriter:
        return pacsv.CSVWriter(path, schema)


# ---------------------------------------------------------------- Parquet


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


# ---------------------------------------------------------------- CSV


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


def _empty_csv(path: str) -> pd.DataFrame:
    with _csv_reading(path) as options:
        return pd.read_csv(path, nrows=0, **options)


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
