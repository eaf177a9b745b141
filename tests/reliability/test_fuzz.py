"""Property-based tests (Hypothesis): table names, column names and cell values fuzzed through
every reader and writer and through the CLI. Each example ends in one of two ways: a correct
output, or one clear error (exit 2, one `error:` line); and every table and file that existed
before is byte-identical afterwards (the destination itself only changes on success).
"""

from __future__ import annotations

import uuid

import numpy as np
import pandas as pd
import psycopg
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pipelines.errors import VaeflowError
from pipelines.warehouse import parse_ref, read_frame, write_table
from tests.reliability.conftest import assert_one_error, cli, files_state, tables_state
from tests.test_warehouse import PG_URL

FUZZ = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,  # the same examples in CI as here: a failure is reproducible
)
TEXT = st.characters(blacklist_categories=("Cs",))  # any Unicode that UTF-8 can hold
names = st.text(TEXT, min_size=1, max_size=70)
# half of the table names are valid identifiers (and so reach the writers), half anything
identifiers = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,70}", fullmatch=True)
table_names = st.one_of(
    identifiers, names, identifiers.map(lambda s: f"main.{s}"), identifiers.map(str.upper)
)
cells = st.one_of(
    st.none(),
    st.floats(allow_nan=True, allow_infinity=False),
    st.sampled_from([1e308, -1e308, np.finfo(np.float64).max, 5e-324, -0.0, 0.0]),
)


def _table(columns: list[str], rows: list[list]) -> pd.DataFrame:
    data = {
        c: pd.array([r[i] for r in rows], dtype="Float64").astype("float64") for i, c in enumerate(columns)
    }
    return pd.DataFrame(data, columns=pd.Index(columns, dtype=object))


# column names: anything, and the spellings engines change behind your back
tricky = st.sampled_from(["A", "a", "x\x00y", "é" * 40, "a" * 70, " ", "1", "model_version", "a.1", '"', "'"])
column_names = st.one_of(names, tricky)
tables = st.integers(1, 4).flatmap(
    lambda n: st.tuples(
        st.lists(column_names, min_size=n, max_size=n),
        st.lists(st.lists(cells, min_size=n, max_size=n), min_size=1, max_size=6),
    )
)


def _same(back: pd.DataFrame, df: pd.DataFrame, kind: str) -> None:
    assert list(back.columns) == list(df.columns)
    assert len(back) == len(df)
    for i, col in enumerate(df.columns):
        want = df.iloc[:, i].to_numpy(dtype="float64")
        got = pd.to_numeric(back.iloc[:, i], errors="coerce").to_numpy(dtype="float64")
        both_nan = np.isnan(want) & np.isnan(got)
        close = np.isclose(got, want, rtol=1e-15 if kind == "csv" else 0, atol=0) | (got == want)
        assert (both_nan | close).all(), (col, want, got)


@pytest.mark.parametrize(
    "kind", ["parquet", "csv", "duckdb", pytest.param("postgres", marks=pytest.mark.postgres)]
)
@settings(FUZZ, max_examples=80)
@given(table=tables, table_name=table_names)
def test_fuzzed_tables_round_trip_or_fail_clearly(tmp_path_factory, kind, table, table_name):
    """Any column names and cells, any table name: written and read back equal, or refused
    with a `VaeflowError` that leaves the previous content of the destination as it was."""
    columns, rows = table
    df = _table(columns, rows)
    folder = tmp_path_factory.mktemp("fuzz")
    warehouse = f"duckdb:///{folder}/w.duckdb"
    if kind in ("parquet", "csv"):
        target = f"{folder}/{table_name.replace('/', '_').replace(chr(0), '_')}.{kind}"
    elif kind == "duckdb":
        target = table_name
    else:
        target = f"{PG_URL}#{table_name}"
    try:
        ref = parse_ref(target, warehouse)
    except VaeflowError as exc:
        assert str(exc)
        return
    if kind == "postgres":  # a table of this test's own, not whatever the fuzzer named
        ref = parse_ref(f"{PG_URL}#fz_{uuid.uuid4().hex[:10]}", warehouse)
    previous = pd.DataFrame({"keep": [1.0, 2.0]})
    write_table(ref, [previous])
    try:
        try:
            assert write_table(ref, [df]) == len(df)
        except VaeflowError as exc:
            assert str(exc) and "\n" not in str(exc).strip()
            pd.testing.assert_frame_equal(read_frame(ref), previous, check_dtype=False)
            return
        _same(read_frame(ref), df, kind)
    finally:
        if kind == "postgres":
            with psycopg.connect(PG_URL, autocommit=True) as con:
                con.execute(f"DROP TABLE IF EXISTS {ref.quoted()}")


@FUZZ
@given(
    dest=st.one_of(
        table_names,
        names.map(lambda s: s + ".parquet"),
        names.map(lambda s: s + ".csv"),
        st.sampled_from(["base", "BASE", "main.Base"]),
    ),
    values=st.lists(cells, min_size=6, max_size=6),
    job=st.sampled_from(["anomaly", "embed", "impute"]),
)
def test_fuzzed_destinations_and_cells_through_the_cli(
    trained, base_rows, tmp_path_factory, dest, values, job
):
    """`vaeflow score` with any destination name and any numeric cells: exit 0 with one output
    row per input row, in order, finite scores; or exit 2 with one error line. Every other
    table and file is byte-identical."""
    folder = tmp_path_factory.mktemp("cli")
    src = base_rows.head(40).copy()
    for row, value in enumerate(values):
        src.loc[row * 5, ["dep_delay", "arr_delay", "air_time"][row % 3]] = value
    source = folder / "src.parquet"
    src.to_parquet(source)
    # table destinations go to a warehouse of this example's own, which already holds tables
    db = folder / "fuzz.duckdb"
    warehouse = f"duckdb:///{db}"
    write_table(parse_ref("keep", warehouse), [base_rows.head(5)])
    write_table(parse_ref("base", warehouse), [base_rows.head(7)])
    assume("\x00" not in dest)  # argv cannot carry a NUL byte
    target = dest if not dest.endswith((".parquet", ".csv")) else str(folder / dest.replace("/", "_"))
    before_files, before_tables = files_state(folder), tables_state(db)
    code, _, err = cli("score", job, "--model", "models:/base_vae@champion", "--source", str(source), "--dest", target,
                       "--params", trained["params"], "--set", f"warehouse.url={warehouse}")  # fmt: skip
    if code != 0:
        assert_one_error(code, err)
        assert files_state(folder) == before_files
        assert tables_state(db) == before_tables
        return
    written = parse_ref(target, warehouse)
    out = read_frame(written)
    assert out["rownames"].tolist() == src["rownames"].tolist()
    if job == "anomaly":
        assert np.isfinite(out["anomaly_score"]).all()
    if job == "embed":
        assert np.isfinite(out.filter(like="z_").to_numpy()).all()
    if job == "impute":
        observed = src["dep_delay"].notna()
        assert np.array_equal(
            out.loc[observed, "dep_delay"].to_numpy(), src.loc[observed, "dep_delay"].to_numpy()
        )
        assert out["dep_delay"].notna().all()
    mine = ".".join(written.parts).lower() if not written.is_file else None

    def others(state: dict[str, str]) -> dict[str, str]:
        return {k: v for k, v in state.items() if k.lower() != mine and k != str(db)}

    assert others(tables_state(db)) == others(before_tables)
    changed = {k for k, v in files_state(folder).items() if before_files.get(k) != v}
    assert changed <= {target, str(db)}
