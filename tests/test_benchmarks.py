"""The benchmarks: the quality benchmark's data (real shipped tables, labels kept out of the
features) and report, and the throughput benchmark on a small table."""

import json

import numpy as np
import pytest

from benchmarks.datasets import MAX_ROWS, anomaly_construction, load_tables
from benchmarks.quality import design


def test_ten_real_tables_from_two_packages_without_label_leaks():
    tables = load_tables(0)
    assert len(tables) >= 10 and len({t.name for t in tables}) == len(tables)
    assert len({t.source.split()[0] for t in tables}) >= 2
    for t in tables:
        assert 100 <= len(t.features) <= MAX_ROWS
        assert len(t.label) == len(t.features)
        assert "label" not in t.features.columns
        assert not any(c.lower() in ("id", "rownames") for c in t.features.columns), t.name  # no identifiers
        assert (t.label == t.anomaly_class).any(), t.name
    kinds = {t.name: bool(t.categorical_columns) for t in tables}
    assert any(kinds.values()) and not all(kinds.values())  # mixed-type and purely numeric tables
    assert any(t.features.isna().any().any() for t in tables)  # at least one has real nulls


def test_anomaly_construction_keeps_the_rare_class_rare():
    table = next(t for t in load_tables(0) if t.name == "breast_cancer")
    df, y = anomaly_construction(table, seed=0)
    assert len(df) == len(y)
    assert 0 < y.mean() <= 0.06
    assert y.sum() < (table.label == table.anomaly_class).sum()


def test_design_standardises_with_full_table_statistics():
    table = next(t for t in load_tables(0) if t.name == "penguins")
    d = design(table)
    num = d.matrix[:, : len(d.num_cols)]
    assert np.allclose(np.nanmean(num, axis=0), 0, atol=1e-9)
    assert np.isnan(num).any()  # real nulls stay missing for the imputers
    onehot = d.matrix[:, len(d.num_cols) :]
    assert set(np.unique(onehot)) <= {0.0, 1.0}


def test_quality_results_are_logged_as_nested_mlflow_runs(tmp_path):
    import mlflow

    from benchmarks.quality import log_to_mlflow
    from pipelines.config import load_settings
    from tests.conftest import small_params

    uri = f"sqlite:///{tmp_path}/bench.db"
    settings = load_settings(small_params(tmp_path), [f"mlflow.tracking_uri={uri}"])
    results = {
        "seed": 0,
        "params": "params.yaml",
        "seconds": 12.5,
        "tables": {
            "wine": {
                "source": "scikit-learn load_wine",
                "rows": 178,
                "columns": 13,
                "impute_mcar20": {"vaeflow": 0.7, "mice": 0.72},
                "anomaly": {"iforest": {"auroc": 0.85, "auprc": float("nan")}},
            }
        },
    }
    parent = log_to_mlflow(results, settings)
    client = mlflow.MlflowClient(uri)
    children = client.search_runs(
        [client.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'"
    )
    assert [r.data.tags["mlflow.runName"] for r in children] == ["wine"]
    metrics = children[0].data.metrics
    assert metrics["impute_mcar20/vaeflow"] == 0.7 and metrics["anomaly/iforest/auroc"] == 0.85
    assert "anomaly/iforest/auprc" not in metrics  # a NaN is left in the JSON, not logged as a number
    assert client.get_run(parent).data.metrics["seconds"] == 12.5


def test_paired_knn_scores_both_codings_on_the_same_folds():
    from benchmarks.quality import paired_knn

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 100)
    informative = labels[:, None] + 0.3 * rng.standard_normal((200, 2))
    noise = rng.standard_normal((200, 2))
    same = paired_knn(informative, informative.copy(), labels)
    assert same["vaeflow_knn_acc"] == same["pca_knn_acc"] and same["knn_acc_diff_se"] == 0.0
    better = paired_knn(informative, noise, labels)
    assert better["vaeflow_knn_acc"] > 0.9 > 0.7 > better["pca_knn_acc"]
    assert 0 < better["knn_acc_diff_se"] < 0.05


def test_a_loss_within_two_standard_errors_is_reported_as_a_tie_and_nothing_else_is():
    from benchmarks.quality import _table

    rows = [
        {"table": "near", "vaeflow": 0.960, "pca": 0.965, "se": 0.004},  # -0.005 within 0.008
        {"table": "far", "vaeflow": 0.900, "pca": 0.965, "se": 0.004},
        {"table": "ahead", "vaeflow": 0.970, "pca": 0.965, "se": 0.004},
    ]
    lines = {line.split()[0]: line for line in _table("t", rows, ["vaeflow", "pca"], False).splitlines()[2:]}
    assert lines["near"].endswith("loss (tie: within 2 SE)")
    assert lines["far"].endswith(" loss") and "tie" not in lines["far"]
    assert lines["ahead"].endswith(" win")


@pytest.mark.postgres
def test_the_throughput_benchmark_runs_on_a_table_smaller_than_its_validation_split(tmp_path):
    """`--rows` for less (README): a 20k-row table used to leave the training split empty
    ("num_samples=0"), since the benchmark's model held out 20,000 rows to validate."""
    from benchmarks import throughput
    from tests.test_warehouse import PG_URL

    out = tmp_path / "throughput.json"
    throughput.main(["--rows", "20000", "--parts", "postgres", "--pg", PG_URL, "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["rows"] == 20000 and result["postgres"]["rows"] == 20000
    assert result["postgres"]["postgres_rows_per_s"] > 0 and result["postgres"]["duckdb_rows_per_s"] > 0
