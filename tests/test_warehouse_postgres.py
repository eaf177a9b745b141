"""The PostgreSQL backend through Arrow (ADBC, binary COPY): column types, the primary key,
the read path's dtypes and chunks, and embed from PostgreSQL to PostgreSQL end to end."""

from __future__ import annotations

import dataclasses
import uuid

import numpy as np
import pandas as pd
import psycopg
import pyarrow as pa
import pytest

from pipelines.errors import DataError
from pipelines.warehouse import iter_frames, parse_ref, read_frame, write_table
from tests.test_warehouse import PG_URL

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg_table():
    """A function giving fresh table names (`length` characters); drops them afterwards."""
    try:
        psycopg.connect(PG_URL, connect_timeout=3).close()
    except psycopg.OperationalError:
        pytest.fail(f"PostgreSQL is not reachable at {PG_URL}")
    names: list[str] = []

    def make(length: int = 0) -> str:
        name = f"vf_pg_{uuid.uuid4().hex[:10]}"
        names.append(name.ljust(length, "x"))
        return names[-1]

    yield make
    with psycopg.connect(PG_URL, autocommit=True) as con:
        for name in names:
            con.execute(f'DROP TABLE IF EXISTS public."{name}"')


def _ref(name: str):
    return parse_ref(f"{PG_URL}#{name}", "duckdb:///unused.duckdb")


def _query(sql: str, *params) -> list[tuple]:
    with psycopg.connect(PG_URL, autocommit=True) as con:
        return con.execute(sql, params).fetchall()


def _types(name: str) -> dict[str, str]:
    sql = (
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = 'public' AND table_name = %s ORDER BY ordinal_position"
    )
    return dict(_query(sql, name))


def _primary_key(name: str) -> tuple[list[str], list[str]]:
    """(key columns, constraint names) of a table's primary key."""
    sql = (
        "SELECT k.column_name, c.constraint_name FROM information_schema.table_constraints c "
        "JOIN information_schema.key_column_usage k USING (constraint_schema, constraint_name) "
        "WHERE c.table_schema = 'public' AND c.table_name = %s AND c.constraint_type = 'PRIMARY KEY'"
    )
    rows = _query(sql, name)
    return [r[0] for r in rows], [r[1] for r in rows]


def _staging_left() -> list[str]:
    sql = "SELECT table_name FROM information_schema.tables WHERE table_name LIKE '\\_vaeflow\\_stg\\_%%'"
    return [r[0] for r in _query(sql)]


def _codes(n: int, offset: int = 0) -> pa.Table:
    """An embed chunk as `embed_arrow` makes it: int64 key, float32 codes (a NaN and a null)."""
    rng = np.random.default_rng(offset)
    z = rng.standard_normal((n, 2)).astype("float32")
    z[0, 0] = np.nan
    z1 = pa.array(z[:, 1], mask=np.arange(n) == 1)
    return pa.table({"id": np.arange(offset, offset + n), "z_0": z[:, 0], "z_1": z1})


def test_float32_lands_as_real_and_the_key_becomes_the_primary_key(pg_table):
    name = pg_table()
    tags = {"model_version": "3", "run_id": "it's-a-run"}
    assert write_table(_ref(name), [_codes(5), _codes(4, 5)], tags, key="id") == 9
    assert _types(name) == {
        "id": "bigint",
        "z_0": "real",
        "z_1": "real",
        "model_version": "text",
        "run_id": "text",
    }
    assert _primary_key(name) == (["id"], [f"{name}_pkey"])
    # the tags are plain columns without a default: a later insert does not inherit them
    defaults = _query(
        "SELECT count(*) FROM information_schema.columns WHERE table_name = %s AND column_default IS NOT NULL",
        name,
    )
    assert defaults == [(0,)]
    back = read_frame(_ref(name))
    assert back["id"].tolist() == list(range(9)) and back["id"].dtype == np.int64
    assert (
        back["z_0"].dtype == np.float32
        and back["z_0"].isna().tolist() == [True] + [False] * 4 + [True] + [False] * 3
    )
    assert back["z_1"].isna().sum() == 2  # NaN and null are both NULL
    assert (back["model_version"] == "3").all() and (back["run_id"] == "it's-a-run").all()
    # a rewrite replaces the table and its key (the old index goes with the old table)
    assert write_table(_ref(name), [_codes(3, 100)], tags, key="id") == 3
    assert _primary_key(name) == (["id"], [f"{name}_pkey"])
    assert read_frame(_ref(name))["id"].tolist() == [100, 101, 102]


def test_frames_keep_their_column_types(pg_table):
    """DataFrames (the other jobs) map dtype by dtype: float32 `real`, float64 `double
    precision`, every integer `bigint`, booleans `boolean`, anything else `text`."""
    name = pg_table()
    frame = pd.DataFrame(
        {
            "id": np.arange(3, dtype="int32"),
            "f32": np.array([1.5, np.nan, 2.0], dtype="float32"),
            "f64": [0.1, np.nan, np.inf],
            "flag": [True, False, True],
            "maybe": pd.array([True, None, False], dtype="boolean"),
            "count": pd.array([1, None, 3], dtype="Int64"),
            "label": ["a", None, "c"],
            "when": pd.to_datetime(["2024-01-02 03:04:05", None, "2024-01-03"], format="ISO8601"),
        }
    )
    write_table(_ref(name), [frame], key="id")
    assert _types(name) == {
        "id": "bigint",
        "f32": "real",
        "f64": "double precision",
        "flag": "boolean",
        "maybe": "boolean",
        "count": "bigint",
        "label": "text",
        "when": "text",  # as the row writer stored timestamps
    }
    back = read_frame(_ref(name))
    assert back["id"].dtype == np.int64 and back["f32"].dtype == np.float32
    assert back["f64"].tolist()[::2] == [0.1, np.inf] and np.isnan(back["f64"][1])
    assert back["flag"].tolist() == [True, False, True] and back["maybe"].tolist() == [True, None, False]
    assert back["count"].dtype == np.float64 and back["count"].isna().tolist() == [False, True, False]
    assert back["label"].tolist()[::2] == ["a", "c"] and pd.isna(back["label"][1])
    assert back["when"].tolist()[::2] == ["2024-01-02 03:04:05", "2024-01-03 00:00:00"]


def test_fixed_width_chunks_round_trip_bit_for_bit(pg_table):
    """Chunks of fixed-width columns without nulls go as a numpy-built binary COPY payload:
    extremes of every type come back exactly, next to a chunk with a null (ADBC's ingest)."""
    name = pg_table()
    fixed = pa.table(
        {
            "id": pa.array([np.iinfo(np.int64).min, -1, 0, np.iinfo(np.int64).max], pa.int64()),
            "f32": pa.array([np.finfo(np.float32).max, -0.0, np.float32(1e-45), -np.inf], pa.float32()),
            "f64": pa.array([np.finfo(np.float64).max, 5e-324, -0.0, np.inf], pa.float64()),
            "flag": [True, False, False, True],
        }
    )
    with_null = fixed.slice(0, 2).set_column(3, "flag", pa.array([None, True], pa.bool_()))
    assert write_table(_ref(name), [fixed, with_null, fixed]) == 10
    assert _types(name) == {"id": "bigint", "f32": "real", "f64": "double precision", "flag": "boolean"}
    back = read_frame(_ref(name))
    want = pa.concat_tables([fixed, with_null, fixed]).to_pandas()
    for column in ("id", "f32", "f64"):
        assert back[column].dtype == want[column].dtype
        assert back[column].to_numpy().tobytes() == want[column].to_numpy().tobytes(), column
    assert back["flag"].tolist() == want["flag"].tolist()


@pytest.mark.parametrize("bad", ["duplicates", "nulls"])
def test_a_key_that_does_not_identify_rows_is_refused_and_the_old_table_stays(pg_table, bad):
    name = pg_table()
    write_table(_ref(name), [_codes(4)], key="id")
    chunk = _codes(4, 10)
    if bad == "duplicates":
        chunk = pa.concat_tables([chunk, _codes(1, 12)])
    else:
        chunk = chunk.set_column(0, "id", pa.array([10, None, 12, 13], pa.int64()))
    what = "duplicate values .*12" if bad == "duplicates" else "nulls"
    with pytest.raises(
        DataError, match=f"key column 'id' of the output for .*{name}.* has {what}.*unchanged"
    ):
        write_table(_ref(name), [chunk], key="id")
    assert read_frame(_ref(name))["id"].tolist() == [0, 1, 2, 3]
    assert _primary_key(name)[0] == ["id"]
    assert not _staging_left()


def test_no_key_no_primary_key_and_a_63_character_name_gets_its_key_cut_to_fit(pg_table):
    plain, long = pg_table(), pg_table(63)
    write_table(_ref(plain), [_codes(3)])
    assert _primary_key(plain) == ([], [])
    for _ in range(2):  # the second write replaces the first, key and all
        write_table(_ref(long), [_codes(3)], key="id")
    assert _primary_key(long) == (["id"], [f"{long[:58]}_pkey"])
    write_table(_ref(long), [_codes(3)], key="not_a_column")  # a key the output lacks: no primary key
    assert _primary_key(long) == ([], [])


def test_chunks_whose_types_drift_are_cast_or_refused(pg_table):
    name = pg_table()
    ints = pd.DataFrame({"id": [1, 2], "v": [1, 2]})
    floats = pd.DataFrame({"id": [3, 4], "v": [3.0, np.nan]})  # an int column with a null
    assert write_table(_ref(name), [ints, floats]) == 4
    assert _types(name)["v"] == "bigint" and read_frame(_ref(name))["v"].isna().tolist() == [False] * 3 + [
        True
    ]
    with pytest.raises(DataError, match="type changed after row 2"):
        write_table(_ref(name), [ints, pd.DataFrame({"id": [3], "v": [2.5]})])
    with pytest.raises(DataError, match="columns changed after row 2"):
        write_table(_ref(name), [ints, pd.DataFrame({"id": [3], "w": [2]})])
    assert len(read_frame(_ref(name))) == 4


def test_reads_are_cut_into_exact_chunks_and_ranges(pg_table):
    """Chunk i is the same rows however the driver batches them (chunk seeds depend on it)."""
    name = pg_table()
    write_table(_ref(name), [_codes(1000), _codes(1500, 1000)], key="id")
    assert [len(f) for f in iter_frames(_ref(name), chunk_size=700)] == [700, 700, 700, 400]
    parts = [list(iter_frames(_ref(name), 300, offset=o, limit=1000)) for o in (0, 1000, 2000)]
    assert [len(f) for f in parts[2]] == [300, 200]
    assert pd.concat([f for p in parts for f in p])["id"].tolist() == list(range(2500))


def test_column_types_without_a_plain_arrow_form_read_as_before(pg_table):
    """uuid, json and interval columns (no plain Arrow type) are read row by row, as psycopg
    gives them; numeric reads as float64 and timestamptz in the session's time zone either way."""
    name = pg_table()
    with psycopg.connect(PG_URL, autocommit=True) as con:
        con.execute(f'CREATE TABLE "{name}" (n numeric, ts timestamptz, i int, u uuid, j jsonb, iv interval)')
        con.execute(
            f"INSERT INTO \"{name}\" VALUES (1.25, '2024-01-02 03:04:05+02', 4, gen_random_uuid(), "
            "'{\"a\": 1}', '1 day'), (NULL, NULL, NULL, NULL, NULL, NULL)"
        )
        zone = con.execute("SELECT current_setting('TimeZone')").fetchone()[0]
    back = read_frame(_ref(name))
    assert isinstance(back["u"][0], uuid.UUID) and back["j"][0] == {"a": 1}
    assert back["iv"][0] == pd.Timedelta(days=1)
    assert back["n"].tolist()[0] == 1.25 and back["i"].tolist()[0] == 4
    assert back["ts"][0] == pd.Timestamp("2024-01-02 01:04:05", tz="UTC")
    with psycopg.connect(PG_URL, autocommit=True) as con:  # the same columns without the odd ones
        con.execute(f'ALTER TABLE "{name}" DROP COLUMN u, DROP COLUMN j, DROP COLUMN iv')
    fast = read_frame(_ref(name))
    assert fast["n"].dtype == np.float64 and fast["n"].tolist()[0] == 1.25
    assert fast["i"].dtype == np.float64  # an int column with a null, as the row reader gave it
    assert str(fast["ts"].dtype.tz) == str(back["ts"].dtype.tz) == zone
    assert fast["ts"][0] == back["ts"][0]


def test_embed_from_postgres_to_postgres_end_to_end(pg_table, tmp_path):
    """`run_job` passes the model's key: the codes land as `real` with `id` as primary key."""
    from pipelines.config import load_settings
    from pipelines.scoring import run_job
    from tests.conftest import small_params
    from tests.helpers import linear_table, train_small
    from vae_models.bundle import ModelBundle

    df = linear_table(1200, seed=1)
    module, schema = train_small(df, epochs=1)
    bundle = ModelBundle(vae=module.vae, schema=dataclasses.replace(schema, key="id"), extra={})
    src, dst = pg_table(), pg_table()
    write_table(_ref(src), [df.assign(id=np.arange(len(df)))[["id", *df.columns]]])
    settings = load_settings(small_params(tmp_path, score={"chunk_size": 500}))
    result = run_job(
        bundle, "embed", f"{PG_URL}#{src}", f"{PG_URL}#{dst}", settings, model_version="7", run_id="r"
    )
    assert result.rows == 1200
    assert _types(dst) == {
        "id": "bigint",
        "z_0": "real",
        "z_1": "real",
        "model_version": "text",
        "run_id": "text",
    }
    assert _primary_key(dst)[0] == ["id"]
    back = read_frame(_ref(dst))
    assert back["id"].tolist() == list(range(1200)) and (back["model_version"] == "7").all()
