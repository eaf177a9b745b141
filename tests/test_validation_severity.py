"""Blocking vs warning expectations (issue 15): a real distribution shift must not stop a
retrain, broken data must, and both are shown to the user and kept as GX Data Docs."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest

from pipelines import ingest, validation
from pipelines.config import load_settings
from pipelines.errors import DataValidationError
from tests.conftest import small_params

N = 20_000


def shop(seed: int = 0) -> pd.DataFrame:
    """A nightly table: non-negative sales, prices and units, a margin, a region with unequal shares."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "sales": rng.gamma(2.0, 50.0, N),
            "price": rng.normal(10.0, 2.0, N),
            "units": rng.poisson(5, N).astype("int64"),
            "margin": rng.normal(1.0, 2.0, N),
            "region": rng.choice(["north", "south", "east", "west"], N, p=[0.4, 0.3, 0.2, 0.1]),
        }
    )


@pytest.fixture(scope="module")
def night_one(tmp_path_factory):
    """Settings of a throw-away project and the suite built from night one's table."""
    settings = load_settings(small_params(tmp_path_factory.mktemp("shop")))
    reference = shop()
    schema = ingest.table_schema(settings, reference, None)
    report = validation.validate_frame(reference, schema, settings, "shop", rebuild=True)
    assert report.success and not report.warnings
    return settings, schema


def test_suite_marks_blocking_and_warning_expectations(night_one):
    settings, _ = night_one
    suite = validation.load_suite(validation.suite_path(settings, "shop"))
    severity = {
        (e["type"], e["kwargs"].get("column"), e["kwargs"].get("max_value") is None): e["severity"]
        for e in suite["expectations"]
    }
    between = "expect_column_values_to_be_between"
    assert severity[(between, "sales", True)] == "critical"  # the non-negative bound
    assert (between, "margin", True) not in severity  # the reference has negative margins: no bound
    assert severity[(between, "sales", False)] == severity[(between, "price", False)] == "warning"
    assert severity[("expect_column_median_to_be_between", "price", False)] == "warning"
    for kind in ("be_in_type_list", "not_be_null"):
        assert severity[(f"expect_column_values_to_{kind}", "units", True)] == "critical"
    assert severity[("expect_column_values_to_be_in_set", "region", True)] == "critical"
    assert severity[("expect_table_columns_to_match_set", None, True)] == "critical"
    assert suite["meta"]["vaeflow_suite_format"] == validation.SUITE_FORMAT


def test_night_five_shift_passes_with_warnings_shown(night_one, caplog):
    settings, schema = night_one
    night5 = shop(seed=5)
    night5["price"] += 1.5 * 2.0  # mean +1.5 sd
    night5["sales"] *= 4.5
    night5["region"] = np.random.default_rng(5).choice(
        ["north", "south", "east", "west"], N, p=[0.1, 0.2, 0.3, 0.4]
    )
    with caplog.at_level(logging.WARNING, logger="pipelines.validation"):
        report = validation.validate_frame(night5, schema, settings, "shop")
    text = report.text()
    assert report.success and "0 blocking failure(s)" in text and "FAILED" not in text
    assert "WARNING expect_column_median_to_be_between(price): observed 13" in text
    assert "WARNING expect_column_values_to_be_between(sales): " in text
    assert "WARNING expect_column_median_to_be_between(sales)" in text
    assert f"{len(report.warnings)} warning(s)" in text and len(report.warnings) >= 3
    assert any("(price)" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    recorded = report.to_dict()
    assert recorded["success"] and recorded["failed"] == 0 and recorded["warned"] == len(report.warnings)
    assert validation.ValidationReport.from_dict(json.loads(json.dumps(recorded))).text() == text


def test_negative_sales_block_naming_the_column(night_one):
    settings, schema = night_one
    bad = shop(seed=1)
    bad.loc[:2000, "sales"] *= -1  # 2,001 of 20,000 rows
    with pytest.raises(DataValidationError) as err:
        validation.validate_frame(bad, schema, settings, "shop")
    text = str(err.value)
    assert "1 blocking failure(s)" in text
    assert (
        "FAILED expect_column_values_to_be_between(sales): 10.01% of values unexpected, expected >= 0" in text
    )


def test_new_category_blocks_beyond_domain_mostly(night_one):
    settings, schema = night_one
    few = shop(seed=2)
    few.loc[: N // 400, "region"] = "central"  # 0.25%: within domain_mostly (0.99)
    assert validation.validate_frame(few, schema, settings, "shop").success
    many = shop(seed=2)
    many.loc[: N // 50, "region"] = "central"  # 2%
    with pytest.raises(
        DataValidationError, match=r"FAILED expect_column_values_to_be_in_set\(region\): 2\.0\d% .*'central'"
    ):
        validation.validate_frame(many, schema, settings, "shop")


def test_missing_column_blocks(night_one):
    settings, schema = night_one
    with pytest.raises(DataValidationError) as err:
        validation.validate_frame(shop(seed=3).drop(columns="units"), schema, settings, "shop")
    text = str(err.value)
    assert "FAILED expect_table_columns_to_match_set: missing columns ['units']" in text
    assert "FAILED expect_column_values_to_be_in_type_list(units)" in text


def test_old_format_suite_loads_and_its_ranges_block(night_one, tmp_path):
    """A suite written before severities (no `severity`, no format mark) is GX's default, critical,
    throughout: its range expectation blocks, and the report says to rebuild the suite."""
    settings, schema = night_one
    suite = validation.load_suite(validation.suite_path(settings, "shop"))
    for e in suite["expectations"]:
        e.pop("severity")
    del suite["meta"]["vaeflow_suite_format"]
    night5 = shop(seed=5)
    night5["sales"] *= 4.5
    report = validation.run_suite(night5, suite, "shop", "old.json")
    text = report.text()
    assert not report.success and not report.warnings
    assert "FAILED expect_column_values_to_be_between(sales): " in text
    assert "predates blocking/warning severities" in text and "vaeflow validate --rebuild" in text


def test_data_docs_are_a_static_site_of_the_validation(night_one):
    settings, schema = night_one
    report = validation.validate_frame(shop(seed=4), schema, settings, "shop")
    docs = validation.data_docs_dir(settings, "shop")
    assert report.data_docs == str(docs) and f"data docs: {docs / 'index.html'}" in report.text()
    assert (docs / "index.html").is_file()
    (page,) = (docs / "validations").rglob("*.html")  # the last validation only
    html = page.read_text()
    assert all(c in html for c in schema.input_columns)
    assert "values must belong to this set" in html and "Evaluated Expectations" in html


def test_old_range_slack_is_ignored_with_a_warning(tmp_path):
    params = small_params(tmp_path, validation={"range_slack": 0.25})
    with pytest.warns(FutureWarning, match="range_slack is ignored"):
        settings = load_settings(params)
    assert not hasattr(settings.validation, "range_slack")
