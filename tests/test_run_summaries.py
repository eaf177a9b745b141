"""What a Prefect user reads in a flow run's Artifacts tab, rendered from the stages' results."""

from __future__ import annotations

import pytest

from pipelines import run_summaries as summaries
from pipelines.config import JOBS


def test_artifact_keys_are_what_prefect_accepts():
    assert summaries.artifact_key("validation", "flights_small") == "validation-flights-small"
    assert (
        summaries.artifact_key("scored", "s3://Bucket/Raw Data.parquet")
        == "scored-s3-bucket-raw-data-parquet"
    )
    assert summaries.artifact_key("promotion", "___") == "promotion"


def test_validation_markdown_lists_blocking_failures_and_warnings():
    report = {
        "suite": "gx/expectations/sales.json",
        "data": "sales",
        "success": False,
        "evaluated": 10,
        "failed": 1,
        "warned": 1,
        "failures": [
            {
                "expectation": "expect_column_values_to_be_between",
                "column": "sales",
                "unexpected_percent": 10.01,
            }
        ],
        "warnings": [
            {"expectation": "expect_column_median_to_be_between", "column": "price", "observed": 13.2}
        ],
    }
    text = summaries.validation_markdown(report)
    assert text.splitlines()[0] == "# Validation of `sales`: FAILED (training blocked)"
    assert "8 of 10 expectations met (1 blocking, 1 warnings)" in text
    blocking, warnings = text.split("## Blocking failures")[1].split("## Warnings")
    assert "| expect_column_values_to_be_between | sales | 10.01 |" in blocking and "price" not in blocking
    assert "| expect_column_median_to_be_between | price | - | 13.2 |" in warnings


def test_promotion_markdown_shows_both_scores_and_the_gate():
    decision = {
        "name": "m",
        "version": "3",
        "promoted": False,
        "reason": "does not improve by more than the margin",
        "metric": "eval_nll_per_cell",
        "challenger_value": 1.2345678,
        "champion_value": 1.2301,
        "champion_version": "2",
        "improvement": -0.0044678,
        "se": 0.002,
        "margin": 0.004,
    }
    text = summaries.promotion_markdown(decision)
    assert text.startswith("# m v3: not promoted")
    assert "| v3 (challenger) | 1.2346 |" in text and "| v2 (champion) | 1.2301 |" in text
    assert "| standard error | 0.002 |" in text and "| margin | 0.004 |" in text


def test_scored_table_has_one_row_per_job_with_its_rate():
    results = [
        {"job": j, "destination": f"t_{j}", "rows": 1000, "seconds": 2.0, "model_version": "1", "run_id": "r"}
        for j in JOBS
    ]
    table = summaries.scored_table(results)
    assert [r["job"] for r in table] == list(JOBS)
    assert all(r["rows_per_second"] == 500 and r["destination"] == f"t_{r['job']}" for r in table)


def test_the_pipeline_and_the_logged_model_know_the_same_jobs():
    from vae_models import jobs

    assert jobs.JOBS == JOBS
    with pytest.raises(jobs.UnknownJob, match="unknown job 'scores'"):
        jobs.score_frame(None, None, "scores")
