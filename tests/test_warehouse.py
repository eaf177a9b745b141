import os
import uuid

import numpy as np
import pandas as pd
import pytest

from pipelines.errors import SourceError
from pipelines.warehouse import duckdb as warehouse_duckdb
from pipelines.warehouse import iter_frames, parse_ref, read_frame, table_exists, write_table

PG_URL = os.environ.get("VAEFLOW_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def _frame(n=10, offset=0):
    return pd.DataFrame(
        {
            "id": range(offset, offset + n),
            "x": [float(i) / 3 for i in range(n)],
            "c": ["ab"[i % 2] for i in range(n)],
        }
    )


def test_parse_ref_kinds(tmp_path):
    wh = f"duckdb:///{tmp_path}/w.duckdb"
    assert parse_ref("t.parquet", wh).kind == "parquet"
    assert parse_ref("dir/t.CSV", wh).kind == "csv"
    assert parse_ref("flights", wh).table == ("flights",)
    assert parse_ref("main.flights", wh).table == ("main", "flights")
    ref = parse_ref("postgresql://u:secret@h/db#s.t", wh)
    assert ref.kind == "postgres" and ref.table == ("s", "t")
    assert "secret" not in str(ref)


@pytest.mark.parametrize("bad", ['flights"; DROP TABLE x; --', "a.b.c", "1abc", "t-1", "x y"])
def test_injection_and_bad_names_are_rejected(tmp_path, bad):
    with pytest.raises(SourceError, match="invalid table name"):
        parse_ref(bad, f"duckdb:///{tmp_path}/w.duckdb")


def test_unsupported_file_is_rejected(tmp_path):
    with pytest.raises(SourceError):
        parse_ref("data/x.xlsx", f"duckdb:///{tmp_path}/w.duckdb")


@pytest.mark.parametrize("dest", ["out.parquet", "out.csv", "scored"])
def test_round_trip_streams_in_chunks(tmp_path, dest):
    wh = f"duckdb:///{tmp_path}/w.duckdb"
    ref = parse_ref(str(tmp_path / dest) if "." in dest else dest, wh)
    n = write_table(ref, [_frame(10), _frame(10, 10), _frame(6, 20)])
    assert n == 26
    chunks = list(iter_frames(ref, chunk_size=8))
    assert max(len(c) for c in chunks) <= 8 and sum(len(c) for c in chunks) == 26
    back = read_frame(ref)
    assert back["id"].tolist() == list(range(26))


@pytest.mark.parametrize("dest", ["out.parquet", "out.csv", "scored"])
def test_constant_columns_are_added_to_every_row(tmp_path, dest):
    wh = f"duckdb:///{tmp_path}/w.duckdb"
    ref = parse_ref(str(tmp_path / dest) if "." in dest else dest, wh)
    tags = {"model_version": "3", "run_id": "it's-a-run"}  # a quote must survive as data
    assert write_table(ref, [_frame(5), _frame(4, 5)], tags) == 9
    back = read_frame(ref)
    assert list(back.columns) == ["id", "x", "c", "model_version", "run_id"]
    assert (back["model_version"].astype(str) == "3").all() and (back["run_id"] == "it's-a-run").all()
    if ref.kind == "duckdb":  # data columns keep their types; tags are generated text columns
        import duckdb

        with duckdb.connect(ref.location) as con:
            columns = con.execute(
                "SELECT column_name, data_type, is_generated FROM information_schema.columns "
                "WHERE table_name = 'scored' ORDER BY ordinal_position"
            ).fetchall()
        assert columns == [
            ("id", "BIGINT", "NEVER"),
            ("x", "DOUBLE", "NEVER"),
            ("c", "VARCHAR", "NEVER"),
            ("model_version", "VARCHAR", "ALWAYS"),
            ("run_id", "VARCHAR", "ALWAYS"),
        ]
    with pytest.raises(SourceError, match="model_version twice"):
        write_table(ref, [_frame(3).assign(model_version="x")], tags)
    assert len(read_frame(ref)) == 9  # the failed write left the output as it was


@pytest.mark.parametrize("dest", ["out.parquet", "scored"])
def test_failed_write_leaves_previous_output_intact(tmp_path, dest):
    wh = f"duckdb:///{tmp_path}/w.duckdb"
    ref = parse_ref(str(tmp_path / dest) if "." in dest else dest, wh)
    write_table(ref, [_frame(4)])

    def broken():
        yield _frame(4, 100)
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        write_table(ref, broken())
    assert read_frame(ref)["id"].tolist() == [0, 1, 2, 3]
    assert sorted(os.listdir(tmp_path)) in (["out.parquet"], ["w.duckdb"])  # no temp files left


def test_rewrite_is_idempotent(tmp_path):
    ref = parse_ref("t", f"duckdb:///{tmp_path}/w.duckdb")
    write_table(ref, [_frame(6)])
    write_table(ref, [_frame(6)])
    assert len(read_frame(ref)) == 6


def test_missing_file_and_table_are_named(tmp_path):
    wh = f"duckdb:///{tmp_path}/w.duckdb"
    with pytest.raises(SourceError, match="nope.csv does not exist"):
        read_frame(parse_ref(str(tmp_path / "nope.csv"), wh))
    write_table(parse_ref("t", wh), [_frame(2)])
    with pytest.raises(SourceError, match="table .*nope.* does not exist"):
        read_frame(parse_ref("nope", wh))
    assert not table_exists(parse_ref("nope", wh))


@pytest.mark.postgres
def test_postgres_round_trip_and_atomic_replace():
    psycopg = pytest.importorskip("psycopg")
    try:
        psycopg.connect(PG_URL, connect_timeout=3).close()
    except psycopg.OperationalError:
        pytest.fail(f"PostgreSQL is not reachable at {PG_URL}")
    table = f"vaeflow_test_{uuid.uuid4().hex[:8]}"
    ref = parse_ref(f"{PG_URL}#public.{table}", "duckdb:///unused.duckdb")
    try:
        odd = 'say "hi"'  # a source column name with quotes is quoted, not pasted, into the DDL
        assert write_table(ref, [_frame(10).assign(**{odd: 1.5}), _frame(10, 10).assign(**{odd: 2.5})]) == 20
        back = read_frame(ref)
        assert back["id"].tolist() == list(range(20)) and back["x"].dtype == "float64"
        assert back[odd].tolist() == [1.5] * 10 + [2.5] * 10
        assert sum(len(c) for c in iter_frames(ref, chunk_size=7)) == 20

        def broken():
            yield _frame(3, 50)
            raise RuntimeError("killed")

        with pytest.raises(RuntimeError):
            write_table(ref, broken())
        assert len(read_frame(ref)) == 20
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as con:
            con.execute(f'DROP TABLE IF EXISTS "{table}"')
            con.execute(f'DROP TABLE IF EXISTS "{table}__vaeflow_staging"')


KILLED_WRITER = """
import sys, time
import pandas as pd
from pipelines.warehouse import parse_ref, write_table

def frames():
    for i in range(10_000):
        yield pd.DataFrame({"id": range(i * 1000, (i + 1) * 1000), "x": 0.5, "c": "z"})
        if i == 3:
            print("writing", flush=True)
        time.sleep(0.02)

write_table(parse_ref(sys.argv[1], sys.argv[2]), frames())
"""


@pytest.mark.parametrize("dest", ["out", "out.parquet", pytest.param("pg", marks=pytest.mark.postgres)])
def test_job_killed_mid_write_leaves_the_old_output_readable(tmp_path, dest):
    """SIGKILL in the middle of a write: the previous output is intact; a re-run replaces it."""
    import signal
    import subprocess
    import sys

    wh = PG_URL if dest == "pg" else f"duckdb:///{tmp_path}/w.duckdb"
    name = f"killed_{uuid.uuid4().hex[:8]}" if dest == "pg" else dest
    ref = parse_ref(str(tmp_path / name) if name.endswith(".parquet") else name, wh)
    write_table(ref, [_frame(4)])
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(tmp_path / name) if ref.is_file else name, wh],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert read_frame(ref)["id"].tolist() == [0, 1, 2, 3]
    write_table(ref, [_frame(6, 10)])  # the next run replaces it cleanly (leftover staging dropped)
    assert read_frame(ref)["id"].tolist() == list(range(10, 16))
    if dest == "pg":
        import psycopg

        with psycopg.connect(PG_URL, autocommit=True) as con:
            con.execute(f'DROP TABLE IF EXISTS "{name}"')
            con.execute(f'DROP TABLE IF EXISTS "{name}__vaeflow_staging"')


def test_range_reads_cover_the_table_exactly_once(tmp_path):
    from pipelines.warehouse import count_rows

    frame = _frame(2500)
    for dest in ("t", "t.parquet", "t.csv"):
        ref = parse_ref(str(tmp_path / dest) if "." in dest else dest, f"duckdb:///{tmp_path}/w.duckdb")
        write_table(ref, [frame.iloc[:1000], frame.iloc[1000:]])
        assert count_rows(ref) == 2500
        parts = [pd.concat(list(iter_frames(ref, 300, offset=o, limit=1000))) for o in (0, 1000, 2000)]
        assert all(
            len(f) <= 300 for o in (0, 1000, 2000) for f in iter_frames(ref, 300, offset=o, limit=1000)
        )
        assert pd.concat(parts)["id"].tolist() == list(range(2500)), dest


def _wide(rows: int, columns: int = 150) -> pd.DataFrame:
    values = np.random.default_rng(0).standard_normal((rows, columns))
    return pd.DataFrame(values, columns=[f"c{i}" for i in range(columns)])


def test_wide_tables_raise_duckdb_memory_to_one_row_group(tmp_path, monkeypatch):
    """A row group of a wide table can outgrow DuckDB's memory limit (here 32MB against ~150MB
    for 150 double columns): the writer and the reader raise the limit to fit it."""
    monkeypatch.setattr(warehouse_duckdb, "DUCKDB_MEMORY_LIMIT", "32MB")
    ref = parse_ref("wide", f"duckdb:///{tmp_path}/w.duckdb")
    chunk = _wide(20_000)
    assert write_table(ref, [chunk, chunk, chunk], {"model_version": "1"}) == 60_000
    frames = list(iter_frames(ref, chunk_size=50_000))
    assert [len(f) for f in frames] == [50_000, 10_000]
    assert frames[0].shape[1] == 151 and np.allclose(frames[1]["c7"], chunk["c7"].iloc[10_000:])


def test_out_of_memory_is_a_clear_error_and_keeps_the_old_output(tmp_path, monkeypatch):
    ref = parse_ref("wide", f"duckdb:///{tmp_path}/w.duckdb")
    write_table(ref, [_frame(4)])
    monkeypatch.setattr(warehouse_duckdb, "DUCKDB_MEMORY_LIMIT", "8MB")
    monkeypatch.setattr(warehouse_duckdb, "_fit_memory_limit", lambda *args, **kwargs: None)
    with pytest.raises(SourceError, match="DuckDB ran out of memory writing .*VAEFLOW_DUCKDB_MEMORY_LIMIT"):
        write_table(ref, [_wide(20_000), _wide(20_000)])
    monkeypatch.undo()
    assert read_frame(ref)["id"].tolist() == [0, 1, 2, 3]


def test_a_raised_memory_limit_holds_while_the_file_has_connections(tmp_path, monkeypatch):
    """Connections to one DuckDB file share its settings: a writer opened while a wide read is
    streaming must not put the limit the reader raised back down."""
    monkeypatch.setattr(warehouse_duckdb, "DUCKDB_MEMORY_LIMIT", "32MB")
    wh = f"duckdb:///{tmp_path}/w.duckdb"
    src = parse_ref("wide", wh)
    chunk = _wide(20_000)
    write_table(src, [chunk, chunk, chunk])
    frames = iter_frames(src, chunk_size=10_000)
    first = next(frames)  # the reader's connection is open and has raised the limit

    def narrow():
        yield first[["c0"]]
        for frame in frames:
            yield frame[["c0"]]

    assert write_table(parse_ref("narrow", wh), narrow()) == 60_000
    assert warehouse_duckdb._RAISED == {}  # forgotten once the file has no connections


def test_uncompressed_floats_skip_float_codecs_only_and_restore_the_setting(tmp_path):
    """An embed output's float columns are stored uncompressed (no ALP analysis), its integer
    key keeps its codec, a default write compresses the same floats, and the setting (global to
    the database file) is back as it was for the connections that share it."""
    import duckdb

    rng = np.random.default_rng(0)
    n = 130_000  # more than a row group, so rows reach the file while the writer holds the setting
    z = pd.DataFrame(rng.standard_normal((n, 2)).astype("float32"), columns=["z_0", "z_1"])
    frame = pd.concat([pd.DataFrame({"id": np.arange(n)}), z], axis=1)
    path = tmp_path / "w.duckdb"
    wh = f"duckdb:///{path}"
    with duckdb.connect(str(path)) as other:  # another connection to the file, open throughout
        write_table(parse_ref("plain", wh), [frame])
        write_table(parse_ref("embedded", wh), [frame], compress_floats=False)
        assert other.execute("SELECT current_setting('disabled_compression_methods')").fetchone()[0] == ""
        sql = "SELECT DISTINCT compression FROM pragma_storage_info(?) WHERE column_name = ? AND segment_type <> 'VALIDITY'"

        def codecs(table, column):
            return {row[0] for row in other.execute(sql, [table, column]).fetchall()}

        assert codecs("embedded", "z_0") == {"Uncompressed"}
        assert "Uncompressed" not in codecs("plain", "z_0")
        assert "Uncompressed" not in codecs("embedded", "id")
    assert read_frame(parse_ref("embedded", wh))["z_1"].to_numpy().tolist() == z["z_1"].tolist()


@pytest.mark.parametrize("dest", ["out.parquet", "out.csv", "scored"])
def test_arrow_tables_are_written_like_frames(tmp_path, dest):
    """The embed job hands the writers Arrow tables; they come back as the frames would."""
    import pyarrow as pa

    wh = f"duckdb:///{tmp_path}/w.duckdb"
    ref = parse_ref(str(tmp_path / dest) if "." in dest else dest, wh)
    parts = [_frame(5), _frame(4, 5)]
    assert write_table(ref, [pa.Table.from_pandas(p) for p in parts], {"run_id": "r1"}) == 9
    back = read_frame(ref)
    assert back["id"].tolist() == list(range(9)) and (back["run_id"] == "r1").all()
    assert back["x"].tolist() == pytest.approx(pd.concat(parts)["x"].tolist())
