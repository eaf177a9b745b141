"""Names from the user never become paths or SQL unchecked; PostgreSQL's 63-byte names and
concurrent writers of one table cannot drop what they should not.

Before (issue 12): `train --name ../../victim` deleted a folder outside data/models; a source
named `...csv` built the snapshot path `data/snapshots/..`; a 63-character PostgreSQL
destination's staging name was truncated into the target itself; two long names shared one
staging table; two jobs writing one destination dropped each other's staging table.
"""

from __future__ import annotations

import threading
import uuid

import pandas as pd
import psycopg
import pytest

from pipelines import warehouse
from pipelines.warehouse import parse_ref, read_frame, write_table
from tests.reliability.conftest import assert_one_error, cli, files_state
from tests.test_warehouse import PG_URL


def test_a_model_name_that_climbs_out_of_its_folder_is_refused(trained, tmp_path, base_rows):
    root = trained["root"]
    victim = root.parent / "victim"
    victim.mkdir(exist_ok=True)
    (victim / "precious.txt").write_text("keep me")
    before, models = files_state(victim), files_state(root / "data" / "models")
    csv = tmp_path / "t.csv"
    base_rows.to_csv(csv, index=False)
    for name in ("../../victim", "../victim", "/tmp/victim", ".hidden", "a/b", "it's"):
        code, _, err = cli("train", "--source", str(csv), "--name", name, "--params", trained["params"])
        assert_one_error(code, err, "invalid model name", repr(name))
    assert files_state(victim) == before
    assert files_state(root / "data" / "models") == models


@pytest.mark.parametrize("command", ["promote", "rollback"])
def test_a_model_name_with_a_quote_is_a_clear_error(trained, command):
    code, _, err = cli(command, "--name", "x' OR name LIKE '%", "--params", trained["params"])
    assert_one_error(code, err, "invalid model name")


@pytest.mark.parametrize("name", ["...csv", "..csv", ".csv", "sub/..parquet"])
def test_a_file_named_only_dots_is_refused(trained, tmp_path, base_rows, name):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    base_rows.to_csv(path, index=False) if name.endswith("csv") else base_rows.to_parquet(path)
    snapshots = trained["root"] / "data" / "snapshots"
    before = files_state(snapshots)
    code, _, err = cli("train", "--source", str(path), "--params", trained["params"])
    assert_one_error(code, err)
    assert files_state(snapshots) == before


@pytest.fixture
def pg_tables():
    """Unique table names in the test database, dropped afterwards (with any staging tables)."""
    made: list[str] = []

    def name(length: int = 20) -> str:
        stem = f"t{uuid.uuid4().hex}"
        made.append((stem + "x" * 63)[:length])
        return made[-1]

    yield name
    with psycopg.connect(PG_URL, autocommit=True) as con:
        for table in made:
            con.execute(f'DROP TABLE IF EXISTS public."{table}"')
        stale = con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_name LIKE '\\_vaeflow\\_stg\\_%'"
        ).fetchall()
        for (table,) in stale:
            con.execute(f'DROP TABLE IF EXISTS public."{table}"')


def _frame(n: int, start: int = 0) -> pd.DataFrame:
    return pd.DataFrame({"id": range(start, start + n), "x": [i / 7 for i in range(n)]})


def _pg_tables() -> set[str]:
    with psycopg.connect(PG_URL, autocommit=True) as con:
        return {
            r[0]
            for r in con.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
            )
        }


@pytest.mark.postgres
def test_a_63_character_destination_is_replaced_whole(pg_tables):
    name = pg_tables(63)
    ref = parse_ref(f"{PG_URL}#{name}", "duckdb:///unused")
    assert write_table(ref, [_frame(5)]) == 5
    assert write_table(ref, [_frame(7, 100)]) == 7  # replaces the old output, not itself
    assert read_frame(ref)["id"].tolist() == list(range(100, 107))
    assert not any(t.startswith("_vaeflow_stg_") for t in _pg_tables())


@pytest.mark.postgres
def test_long_names_with_a_common_prefix_get_their_own_staging(pg_tables):
    a = pg_tables(63)
    b = a[:62] + ("y" if a[62] != "y" else "z")  # same first 62 characters
    refs = [parse_ref(f"{PG_URL}#{n}", "duckdb:///unused") for n in (a, b)]
    assert warehouse._staging(refs[0]).table[1][:25] != warehouse._staging(refs[1]).table[1][:25]
    results = {}

    def write(ref, start):
        results[ref.table[0]] = write_table(ref, (_frame(200, start + i * 200) for i in range(5)))

    threads = [threading.Thread(target=write, args=(r, s)) for r, s in zip(refs, (0, 10_000), strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert results == {a: 1000, b: 1000}
        assert read_frame(refs[0])["id"].tolist() == list(range(1000))
        assert read_frame(refs[1])["id"].tolist() == list(range(10_000, 11_000))
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as con:
            con.execute(f'DROP TABLE IF EXISTS public."{b}"')


@pytest.mark.postgres
def test_two_jobs_writing_one_destination_do_not_drop_each_others_staging(pg_tables):
    """Both writers finish; the output is one of them, whole; no staging table is left."""
    ref = parse_ref(f"{PG_URL}#{pg_tables()}", "duckdb:///unused")
    errors: list[BaseException] = []

    def slow_frames(start):
        for i in range(6):
            threading.Event().wait(0.05)
            yield _frame(100, start + i * 100)

    def write(start):
        try:
            write_table(ref, slow_frames(start))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(s,)) for s in (0, 5000)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    ids = read_frame(ref)["id"].tolist()
    assert ids in (list(range(600)), list(range(5000, 5600)))
    assert not any(t.startswith("_vaeflow_stg_") for t in _pg_tables())


@pytest.mark.postgres
def test_a_killed_writers_staging_table_is_dropped_by_the_next_write(pg_tables):
    ref = parse_ref(f"{PG_URL}#{pg_tables()}", "duckdb:///unused")
    leftover = warehouse._staging(ref)  # what a SIGKILLed job leaves: a committed staging table
    with psycopg.connect(PG_URL, autocommit=True) as con:
        con.execute(f"CREATE TABLE {leftover.quoted()} (id bigint)")
    write_table(ref, [_frame(3)])
    assert leftover.table[1] not in _pg_tables()
    assert read_frame(ref)["id"].tolist() == [0, 1, 2]


@pytest.mark.postgres
@pytest.mark.parametrize("spelling", ["{url}#public.{t}", "{other}#{t}", "{other}#public.{t}"])
def test_postgres_source_under_another_spelling_is_the_same_table(pg_tables, spelling):
    from pipelines.warehouse import same_table

    t = pg_tables()
    write_table(parse_ref(f"{PG_URL}#{t}", "duckdb:///unused"), [_frame(3)])
    other = PG_URL.replace("127.0.0.1", "localhost")
    a = parse_ref(f"{PG_URL}#{t}", "duckdb:///unused")
    b = parse_ref(spelling.format(url=PG_URL, other=other, t=t), "duckdb:///unused")
    assert same_table(a, b)
    assert not same_table(a, parse_ref(f"{PG_URL}#{t.upper()}", "duckdb:///unused"))  # quoted: another table
