"""PostgreSQL tables as Arrow: the column types vaeflow writes, and the conversions between
the writers' chunks, ADBC's record batches and the readers' DataFrames.

`pipelines.warehouse` moves the data by binary COPY both ways (ADBC's PostgreSQL driver, or
`binary_copy`'s payload through psycopg); this module only shapes it. A written chunk becomes
an Arrow table of five types (`PG_TYPES`), whatever it was: float32 stays float32 (`real`),
every integer is `bigint`, and any other column is text, each value as `str` writes it
(timestamps, decimals, categories), as the earlier row-by-row writer stored them. NaN is
written as NULL.
"""

from __future__ import annotations

import zoneinfo
from collections.abc import Iterable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.errors import DataError

PG_TYPES = {
    pa.int64(): "bigint",
    pa.float32(): "real",
    pa.float64(): "double precision",
    pa.bool_(): "boolean",
    pa.string(): "text",
}
# PostgreSQL types whose ADBC Arrow form reads into the DataFrame the row reader gave; a table
# with any other column (uuid, json, interval, arrays, money, enums...) is read row by row
READABLE = {
    "int2", "int4", "int8", "oid", "float4", "float8", "numeric", "bool",
    "text", "varchar", "bpchar", "name", "date", "timestamp", "timestamptz", "time", "bytea",
}  # fmt: skip
_TYPE_KEY = b"POSTGRESQL:type"  # ADBC's field metadata: the column's PostgreSQL type


def arrow_table(frame: pd.DataFrame | pa.Table, where: object) -> pa.Table:
    """A writer's chunk as an Arrow table of `PG_TYPES` (`where` names the output in errors)."""
    if isinstance(frame, pa.Table):
        names = frame.column_names
        columns = [_from_arrow(c, where, n) for n, c in zip(names, frame.columns, strict=True)]
    else:
        names = [str(c) for c in frame.columns]
        columns = [_from_pandas(frame.iloc[:, i], where, names[i]) for i in range(frame.shape[1])]
    return pa.Table.from_arrays(columns, names=names)


def conform(table: pa.Table, schema: pa.Schema, where: object, rows: int) -> pa.Table:
    """`table` in the column order and types of the first chunk (`schema`): an integer chunk
    after a float one is cast, a chunk whose columns or types no longer fit is a `DataError`."""
    if table.schema.equals(schema):
        return table
    if sorted(table.column_names) != sorted(schema.names):
        raise DataError(
            f"cannot write {where}: the columns changed after row {rows} (from {', '.join(schema.names)} "
            f"to {', '.join(table.column_names)}); every chunk must have the same columns"
        )
    try:
        return table.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise DataError(
            f"cannot write {where}: a column's type changed after row {rows} ({exc}); the source's types "
            f"vary between chunks: raise score.chunk_size, or give the column one type in the source"
        ) from exc


def _from_arrow(column: pa.ChunkedArray, where: object, name: str) -> pa.ChunkedArray:
    kind = column.type
    if pa.types.is_integer(kind):
        return _cast(column, pa.int64(), where, name)
    if pa.types.is_floating(kind):
        column = column.cast(pa.float32()) if pa.types.is_float16(kind) else column
        if len(column) and pc.any(pc.is_nan(column)).as_py():  # NaN is stored as NULL
            column = pc.if_else(pc.is_nan(column), pa.scalar(None, column.type), column)
        return column
    if pa.types.is_boolean(kind):
        return column
    if (
        pa.types.is_null(kind)
        or pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_string_view(kind)
        or (pa.types.is_dictionary(kind) and pa.types.is_string(kind.value_type))
    ):
        return column.cast(pa.string())
    return pa.chunked_array([_from_pandas(column.to_pandas(), where, name)])


def _from_pandas(series: pd.Series, where: object, name: str) -> pa.Array:
    dtype = series.dtype
    kind = getattr(dtype, "kind", "O")
    if isinstance(dtype, pd.BooleanDtype) or kind == "b":
        return pa.array(series, type=pa.bool_(), from_pandas=True)
    if kind in ("i", "u"):
        return _cast(series, pa.int64(), where, name)
    if kind == "f":
        return pa.array(series, type=pa.float32() if dtype.itemsize <= 4 else pa.float64(), from_pandas=True)
    if isinstance(dtype, pd.StringDtype):  # pandas' own strings (the default for text in pandas 3)
        return pa.array(series, from_pandas=True).cast(pa.string())
    values = series.astype(object)
    try:
        return pa.array(values, type=pa.string(), from_pandas=True)
    except (pa.ArrowTypeError, pa.ArrowInvalid):  # not all strings: each value as str() writes it
        missing = series.isna().to_numpy()
        return pa.array([None if m else str(v) for v, m in zip(values, missing, strict=True)], pa.string())


def _cast(values, to: pa.DataType, where: object, name: str):
    try:
        if isinstance(values, pd.Series):
            return pa.array(values, type=to, from_pandas=True)
        return values.cast(to)
    except (pa.ArrowInvalid, OverflowError) as exc:
        raise DataError(
            f"column {name!r} of the output for {where} has integers beyond PostgreSQL's bigint "
            f"({exc}); store it as a float or text column in the source"
        ) from exc


_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)  # binary COPY's signature, flags, extension length
_COPY_TRAILER = b"\xff\xff"
_FIXED = {pa.int64(): ">i8", pa.float32(): ">f4", pa.float64(): ">f8", pa.bool_(): "?"}


def binary_copy(table: pa.Table) -> bytes | None:
    """`table` in PostgreSQL's binary COPY format when every column has a fixed width and no
    nulls (the scoring jobs' keys, codes and scores), None otherwise. Every row then has one
    layout, so the rows are one packed numpy record array (field count, then each column's
    length and big-endian value): for 1M rows of a key and 8 float32 codes, 0.1 core-s against
    ADBC's 0.56 for the same COPY, which encodes row by row, and 0.6 s of wall time against 1.3
    (measured, PostgreSQL 15 on this machine)."""
    if not all(f.type in _FIXED for f in table.schema) or any(c.null_count for c in table.columns):
        return None
    layout = [("n", ">i2")]
    for i, field in enumerate(table.schema):
        layout += [(f"l{i}", ">i4"), (f"v{i}", _FIXED[field.type])]
    rows = np.empty(table.num_rows, np.dtype(layout))
    rows["n"] = table.num_columns
    for i, (field, column) in enumerate(zip(table.schema, table.columns, strict=True)):
        rows[f"l{i}"] = np.dtype(_FIXED[field.type]).itemsize
        rows[f"v{i}"] = column.to_numpy()
    return b"".join([_COPY_HEADER, rows.tobytes(), _COPY_TRAILER])


def readable(schema: pa.Schema) -> bool:
    """Whether every column of ADBC's result `schema` converts like the row reader's values."""
    return all(_pg_type(field) in READABLE for field in schema)


def _pg_type(field: pa.Field) -> str:
    return (field.metadata or {}).get(_TYPE_KEY, b"").decode()


def has_timestamptz(schema: pa.Schema) -> bool:
    return any(_pg_type(f) == "timestamptz" for f in schema)


def rechunk(batches: Iterable[pa.RecordBatch], size: int) -> Iterator[pa.Table]:
    """Record batches re-cut into tables of exactly `size` rows (the last may be short): chunk i
    of a table is always the same rows, whatever batch sizes the driver chose."""
    held: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        while batch.num_rows:
            take = min(size - count, batch.num_rows)
            held.append(batch.slice(0, take))
            count += take
            batch = batch.slice(take)
            if count == size:
                yield pa.Table.from_batches(held)
                held, count = [], 0
    if count:
        yield pa.Table.from_batches(held)


def _known_zone(name: str | None) -> bool:
    if not name:
        return False
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):  # e.g. a POSIX zone string: left as UTC
        return False
    return True


def to_pandas(table: pa.Table, timezone: str | None = None) -> pd.DataFrame:
    """A read chunk as the row reader's DataFrame: every integer int64 (float64 with nulls),
    numeric as float64, timestamptz in the session's `timezone` (when Arrow knows it); `real`
    stays float32, as DuckDB reads its FLOAT."""
    columns = []
    for field, column in zip(table.schema, table.columns, strict=True):
        kind, pg_type = field.type, _pg_type(field)
        if pg_type == "numeric":
            if isinstance(kind, pa.BaseExtensionType):  # ADBC's opaque type: the digits as text
                column = pa.chunked_array([c.storage for c in column.chunks], type=kind.storage_type)
            column = column.cast(pa.float64())
        elif pa.types.is_integer(kind) and kind != pa.int64():
            column = column.cast(pa.int64())
        elif pg_type == "timestamptz" and _known_zone(timezone):
            column = column.cast(pa.timestamp(kind.unit, tz=timezone))
        columns.append(column)
    return pa.Table.from_arrays(columns, names=table.column_names).to_pandas(split_blocks=True)
