import numpy as np
import pandas as pd
import pytest

from pipelines import ingest, validation
from pipelines.config import load_settings
from pipelines.errors import DataError, DataValidationError
from pipelines.warehouse import parse_ref


def test_split_is_deterministic_and_stable_under_appends(flights):
    a = ingest.split_labels(flights, "rownames", 0.1, 0.1, 42)
    more = pd.concat([flights, flights.assign(rownames=flights.rownames + 10**6)], ignore_index=True)
    b = ingest.split_labels(more, "rownames", 0.1, 0.1, 42)
    np.testing.assert_array_equal(a, b[: len(flights)])
    share = pd.Series(a).value_counts(normalize=True)
    assert 0.07 < share["eval"] < 0.13 and 0.07 < share["val"] < 0.13


def test_snapshot_writes_splits_schema_and_manifest(project):
    settings = load_settings(project)
    snap = ingest.take_snapshot(settings, "flights_small", "rownames")
    rows = snap.manifest["rows"]
    assert sum(rows.values()) == 3000 and min(rows.values()) > 0
    assert set(snap.read("eval").rownames).isdisjoint(snap.read("train").rownames)
    assert "dep_delay" in snap.schema.names


def test_empty_table_is_a_clear_error(project, flights):
    import duckdb

    settings = load_settings(project)
    with duckdb.connect(parse_ref("empty_t", settings.warehouse_url).location) as con:
        con.execute(
            "CREATE TABLE empty_t AS SELECT * FROM flights_small LIMIT 0"
        )  # vaeflow writes no empty table
    with pytest.raises(DataError, match="has no rows"):
        ingest.take_snapshot(settings, "empty_t", None)


def test_inf_values_are_named(project, flights, tmp_path):
    settings = load_settings(project)
    bad = flights.copy()
    bad.loc[5, "arr_delay"] = np.inf
    path = tmp_path / "bad.parquet"
    bad.to_parquet(path)
    with pytest.raises(DataError, match="arr_delay"):
        ingest.take_snapshot(settings, str(path), "rownames")
    assert not (tmp_path / "data" / "snapshots" / "bad").exists()  # nothing written


def test_suite_passes_on_reference_and_fails_readably_on_changed_type(project, flights):
    settings = load_settings(project)
    snap = ingest.take_snapshot(settings, "flights_small", "rownames")
    report = validation.validate_frame(snap.read("train"), snap.schema, settings, "flights_small")
    assert report.success and len(report.outcomes) > 20
    assert validation.suite_path(settings, "flights_small").exists()
    changed = flights.copy()
    changed["dep_delay"] = changed["dep_delay"].astype(str) + " min"  # type changed
    changed.loc[:600, "carrier"] = "XX"  # domain violation on 20% of rows
    with pytest.raises(DataValidationError) as err:
        validation.validate_frame(changed, snap.schema, settings, "flights_small")
    text = str(err.value)
    assert "expect_column_values_to_be_in_type_list(dep_delay)" in text
    assert "expect_column_values_to_be_in_set(carrier)" in text
    assert "XX" in text


def test_null_fraction_ceiling(project, flights):
    settings = load_settings(project)
    snap = ingest.take_snapshot(settings, "flights_small", "rownames")
    validation.validate_frame(snap.read("train"), snap.schema, settings, "flights_small")
    gappy = flights.copy()
    gappy.loc[: len(gappy) // 2, "air_time"] = np.nan
    with pytest.raises(DataValidationError, match=r"expect_column_values_to_not_be_null\(air_time\)"):
        validation.validate_frame(gappy, snap.schema, settings, "flights_small")
