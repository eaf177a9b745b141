"""A batch job never overwrites its source, never half-writes, and checks before it writes.

Each case was a data loss or a silent wrong output before (issue 12): a destination naming the
source under another spelling was replaced with scores (exit 0); a header-only CSV source
emptied the previous output; a source without the key column gave output without the key.
"""

from __future__ import annotations

import os

import pandas as pd
import pytest

from tests.reliability.conftest import assert_one_error, cli, files_state, score_args, tables_state


def _score(trained, job: str, source: str, dest: str) -> tuple[int, str, str]:
    return cli(*score_args(trained["params"], job, source, dest))


@pytest.mark.parametrize(
    "dest",
    ["BASE", "Base", "main.base", "MAIN.BASE", "{db}#BASE", "{db}#main.Base", "{rel_db}#base"],
)
def test_duckdb_source_under_another_spelling_is_refused(trained, dest):
    db = trained["db"]
    rel = os.path.relpath(db, os.getcwd())
    dest = dest.format(
        db=f"duckdb:///{db}", rel_db=f"duckdb:///{os.path.dirname(rel)}/sub/../{os.path.basename(rel)}"
    )
    before = tables_state(db)
    code, _, err = _score(trained, "anomaly", "base", dest)
    assert_one_error(code, err, "is the source table")
    assert tables_state(db) == before


@pytest.mark.parametrize(
    "spelling", ["{dir}/sub/../src.parquet", "{dir}/./src.parquet", "{dir}/link.parquet"]
)
def test_file_source_under_another_path_is_refused(trained, tmp_path, base_rows, spelling):
    src = tmp_path / "src.parquet"
    base_rows.to_parquet(src)
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.parquet").symlink_to(src)
    before = files_state(tmp_path)
    code, _, err = _score(trained, "impute", str(src), spelling.format(dir=tmp_path))
    assert_one_error(code, err, "is the source table")
    assert files_state(tmp_path) == before


@pytest.mark.postgres
@pytest.mark.parametrize("spelling", ["{url}#public.{t}", "{local}#{t}"])
def test_postgres_source_under_another_spelling_is_refused(trained, base_rows, spelling):
    import uuid

    import psycopg

    from pipelines.warehouse import parse_ref, read_frame, write_table
    from tests.test_warehouse import PG_URL

    t = f"base_{uuid.uuid4().hex[:8]}"
    src = parse_ref(f"{PG_URL}#{t}", "duckdb:///unused")
    write_table(src, [base_rows])
    try:
        before = read_frame(src)
        dest = spelling.format(url=PG_URL, local=PG_URL.replace("127.0.0.1", "localhost"), t=t)
        code, _, err = _score(trained, "anomaly", f"{PG_URL}#{t}", dest)
        assert_one_error(code, err, "is the source table")
        pd.testing.assert_frame_equal(read_frame(src), before)
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as con:
            con.execute(f'DROP TABLE IF EXISTS public."{t}"')


def test_a_header_only_csv_keeps_the_previous_output(trained, tmp_path, base_rows):
    dest = tmp_path / "scores.parquet"
    code, _, err = _score(trained, "anomaly", str(_csv(tmp_path, "full.csv", base_rows)), str(dest))
    assert code == 0, err
    before = files_state(tmp_path)
    empty = _csv(tmp_path, "empty.csv", base_rows.head(0))
    code, _, err = _score(trained, "anomaly", str(empty), str(dest))
    assert_one_error(code, err, "empty.csv has no rows")
    assert files_state(tmp_path) == {**before, **files_state(empty)}


@pytest.mark.parametrize("dest", ["scores.parquet", "scores.csv", "base_scores"])
def test_a_source_without_the_key_column_is_refused_before_writing(trained, tmp_path, base_rows, dest):
    dest = str(tmp_path / dest) if "." in dest else dest
    code, _, err = _score(trained, "embed", "base", dest)
    assert code == 0, err
    before_files, before_tables = files_state(tmp_path), tables_state(trained["db"])
    keyless = _csv(tmp_path, "keyless.csv", base_rows.drop(columns=["rownames"]))
    code, _, err = _score(trained, "embed", str(keyless), dest)
    assert_one_error(code, err, "keyless.csv", "'rownames'")
    assert files_state(tmp_path) == {**before_files, **files_state(keyless)}
    assert tables_state(trained["db"]) == before_tables


def test_a_source_without_a_modelled_column_is_refused_before_writing(trained, tmp_path, base_rows):
    dest = tmp_path / "imputed.parquet"
    partial = _csv(tmp_path, "partial.csv", base_rows.drop(columns=["dep_delay"]))
    code, _, err = _score(trained, "impute", str(partial), str(dest))
    assert_one_error(code, err, "'dep_delay'")
    assert not dest.exists()


def test_jobs_that_would_share_one_destination_are_refused(trained):
    before = tables_state(trained["db"])
    code, _, err = cli(
        "stage", "score", "--params", trained["params"], "--set", "score.dest_template=out_{source}"
    )
    assert_one_error(code, err, "several jobs one destination")
    code, _, err = cli(
        "stage", "score", "--params", trained["params"], "--set", "score.dest_template=out_{table}"
    )
    assert_one_error(code, err, "score.dest_template")
    assert tables_state(trained["db"]) == before


def test_csv_with_a_column_name_twice_is_refused(trained, tmp_path, base_rows):
    path = tmp_path / "twice.csv"
    text = base_rows.to_csv(index=False).splitlines()
    header = text[0].split(",")
    header[-1] = header[1]  # the last column now repeats the second one's name
    path.write_text("\n".join([",".join(header), *text[1:]]) + "\n")
    code, _, err = cli("train", "--source", str(path), "--key", "rownames", "--params", trained["params"])
    assert_one_error(code, err, "twice.csv", f"{header[1]!r} more than once")
    code, _, err = _score(trained, "anomaly", str(path), str(tmp_path / "out.parquet"))
    assert_one_error(code, err, f"{header[1]!r} more than once")
    assert not (tmp_path / "out.parquet").exists()


def test_training_on_duplicate_keys_is_refused(trained, tmp_path, base_rows):
    doubled = pd.concat([base_rows, base_rows.head(3)], ignore_index=True)
    path = _csv(tmp_path, "doubled.csv", doubled)
    code, _, err = cli("train", "--source", str(path), "--key", "rownames", "--params", trained["params"])
    assert_one_error(code, err, "key column 'rownames'", "3 duplicate value(s)")
    assert not list((trained["root"] / "data" / "snapshots").glob("doubled-*"))


def test_the_same_short_name_in_two_places_gets_two_snapshots(trained, tmp_path, base_rows):
    """A CSV called base.csv and the warehouse table `base` must not share a snapshot or a suite."""
    from pipelines import ingest
    from pipelines.warehouse import parse_ref

    settings = trained["settings"]
    table = ingest.snapshot_path(settings, parse_ref("base", settings.warehouse_url))
    before = files_state(table)
    csv = _csv(tmp_path, "base.csv", base_rows.head(300))
    code, _, err = cli("validate", "--source", str(csv), "--key", "rownames", "--params", trained["params"])
    assert code == 0, err
    snap = ingest.take_snapshot(settings, str(csv), "rownames")
    assert snap.path != table and snap.path.name.startswith("base-")
    assert files_state(table) == before


def _csv(folder, name: str, df: pd.DataFrame):
    path = folder / name
    df.to_csv(path, index=False)
    return path
