"""retrain and batch_score through Prefect on a small real sample, checked in MLflow and DuckDB."""

from __future__ import annotations

import mlflow
import pandas as pd
import pytest

from pipelines import registry
from pipelines.config import load_settings
from pipelines.warehouse import parse_ref, read_frame, write_table
from tests.conftest import small_params

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, flights, prefect_harness):
    from pipelines.flows import batch_score, retrain

    root = tmp_path_factory.mktemp("e2e")
    params = small_params(root)
    settings = load_settings(params)
    write_table(parse_ref("flights_small", settings.warehouse_url), [flights])
    out = retrain(params=str(params))
    results = batch_score(params=str(params))
    return settings, out, results


def test_registered_version_is_champion_with_lineage(pipeline_run):
    settings, out, _ = pipeline_run
    client = registry.get_client(settings)
    assert out["version"] == "1" and out["promotion"]["promoted"]
    mv = client.get_model_version_by_alias("flights_small_vae", "champion")
    assert mv.version == 1 and mv.run_id == out["run_id"]
    assert mv.tags["vaeflow.flow_run_id"]
    assert mv.tags["vaeflow.snapshot"] == "flights_small"
    assert float(mv.tags["metric.eval_nll_per_cell"]) == pytest.approx(
        out["metrics"]["eval_nll_per_cell"], rel=1e-5
    )


def test_mlflow_run_has_params_epoch_metrics_and_artifacts(pipeline_run):
    settings, out, _ = pipeline_run
    client = registry.get_client(settings)
    run = client.get_run(out["run_id"])
    assert run.data.params["model.latent_dim"] == "4"
    for metric in (
        "eval_nll_per_cell",
        "eval_elbo_per_row",
        "eval_numeric_rmse_std",
        "eval_categorical_error",
    ):
        assert metric in run.data.metrics
    assert len(client.get_metric_history(out["run_id"], "val_loss")) == 2  # one per epoch
    assert run.data.metrics["eval_nll_per_cell"] > 0
    artifacts = {a.path for a in client.list_artifacts(out["run_id"], "plots")}
    assert artifacts == {"plots/loss_curves.png", "plots/latent_map.png", "plots/column_error.png"}
    gx = mlflow.artifacts.load_dict(f"runs:/{out['run_id']}/validation/gx_result.json")
    assert gx["success"] and gx["failed"] == 0


def test_scored_tables_have_contract_columns_and_row_order(pipeline_run, flights):
    settings, out, results = pipeline_run
    assert {r["job"] for r in results} == {"impute", "anomaly", "embed", "sample"}
    table = lambda name: read_frame(parse_ref(name, settings.warehouse_url))  # noqa: E731
    anomaly = table("flights_small_anomaly")
    assert list(anomaly.columns) == ["rownames", "anomaly_score", "is_anomaly", "model_version", "run_id"]
    assert anomaly["rownames"].tolist() == flights["rownames"].tolist()
    assert anomaly["anomaly_score"].notna().all() and (anomaly["model_version"] == "1").all()
    assert 0 < anomaly["is_anomaly"].mean() < 0.1
    embed = table("flights_small_embed")
    assert [c for c in embed.columns if c.startswith("z_")] == ["z_0", "z_1", "z_2", "z_3"]
    assert len(embed) == 3000
    imputed = table("flights_small_impute")
    assert list(imputed.columns) == list(flights.columns) + ["model_version", "run_id"]
    assert imputed["dep_delay"].notna().all() and imputed["arr_delay"].notna().all()
    observed = flights["arr_delay"].notna()
    pd.testing.assert_series_equal(
        imputed.loc[observed, "arr_delay"], flights.loc[observed, "arr_delay"], check_names=False
    )
    assert imputed["tailnum"].isna().sum() == flights["tailnum"].isna().sum()  # not modelled: left as is
    sample = table("flights_small_sample")
    assert len(sample) == 50 and {"carrier", "dep_delay", "origin"} <= set(sample.columns)
    assert set(sample["origin"]) <= {"EWR", "JFK", "LGA"}


def test_logged_pyfunc_model_predicts_every_job(pipeline_run, flights):
    settings, _, _ = pipeline_run
    mlflow.set_tracking_uri(settings.tracking_uri)
    model = mlflow.pyfunc.load_model("models:/flights_small_vae@champion")
    rows = flights.head(20)
    emb = model.predict(rows, params={"job": "embed"})
    assert list(emb.columns) == ["rownames", "z_0", "z_1", "z_2", "z_3"]
    an = model.predict(rows, params={"job": "anomaly"})
    assert list(an.columns) == ["rownames", "anomaly_score", "is_anomaly"]
    imp = model.predict(rows, params={"job": "impute"})
    assert imp["dep_delay"].notna().all()


def test_second_training_is_challenger_and_gate_is_recorded(pipeline_run):
    from pipelines.flows import retrain

    settings, _, _ = pipeline_run
    out = retrain(params=str(settings.root / "params.yaml"), overrides=["promotion.min_improvement=1000"])
    assert out["version"] == "2" and not out["promotion"]["promoted"]
    client = registry.get_client(settings)
    assert client.get_model_version_by_alias("flights_small_vae", "challenger").version == 2
    assert client.get_model_version_by_alias("flights_small_vae", "champion").version == 1
    tags = client.get_model_version("flights_small_vae", "2").tags
    assert tags["promotion.promoted"] == "False" and "does not improve" in tags["promotion.reason"]


def test_gate_rescores_the_champion_instead_of_trusting_its_logged_metric(pipeline_run):
    from pipelines.flows import retrain

    settings, out, _ = pipeline_run
    client = registry.get_client(settings)
    champion = client.get_model_version_by_alias("flights_small_vae", "champion")
    # a champion whose logged metric was tampered with looks unbeatable ...
    client.log_metric(champion.run_id, "eval_nll_per_cell", -1e9)
    # ... but the gate re-scores it on the challenger's evaluation snapshot
    new = retrain(params=str(settings.root / "params.yaml"), overrides=["train.max_epochs=3"])
    tags = client.get_model_version("flights_small_vae", new["version"]).tags
    champion_value = float(tags["promotion.champion_value"])
    assert champion_value == pytest.approx(out["metrics"]["eval_nll_per_cell"], rel=1e-4)
    assert "re-scored on the same evaluation snapshot" in tags["promotion.reason"]
    assert tags["vaeflow.snapshot_md5"] and tags["vaeflow.params_hash"]
    # 3 epochs beat 2 on the same data; rollback then restores the previous champion
    assert new["promotion"]["promoted"], tags["promotion.reason"]
    assert registry.rollback(client, "flights_small_vae", settings) == (new["version"], str(champion.version))
    assert client.get_model_version_by_alias("flights_small_vae", "champion").version == champion.version


def test_dask_partitions_equal_the_single_process_result(pipeline_run):
    """batch_score on a 2-worker LocalCluster (prefect-dask), 3 partitions: row for row equal."""
    from pipelines.flows import batch_score

    settings, _, _ = pipeline_run
    overrides = [
        "score.dask.enabled=true",
        "score.dask.n_workers=2",
        "score.dask.partition_rows=1000",
        "score.dest_template='{source}_{job}_dask'",
    ]
    results = batch_score(
        params=str(settings.root / "params.yaml"), overrides=overrides, jobs=["anomaly", "impute"]
    )
    assert [r["rows"] for r in results] == [3000, 3000]
    for job in ("anomaly", "impute"):
        single = read_frame(parse_ref(f"flights_small_{job}", settings.warehouse_url))
        dask = read_frame(parse_ref(f"flights_small_{job}_dask", settings.warehouse_url))
        pd.testing.assert_frame_equal(dask, single)
    assert not any(settings.path(settings.score.dask.scratch_dir).iterdir())  # scratch cleaned up


def test_monitor_reports_drift_to_mlflow_and_triggers_retrain(pipeline_run, flights):
    """A shifted batch of the table: drift detected, report logged, a new version trained."""
    from pipelines.flows import monitor

    settings, _, _ = pipeline_run
    params = str(settings.root / "params.yaml")
    calm = monitor(params=params)
    assert not calm["drifted"] and calm["retrain"] is None
    # a batch of late flights only: every value within the suite's ranges, the distribution not
    shifted = flights[flights["dep_delay"] > 15].reset_index(drop=True)
    write_table(parse_ref("flights_small", settings.warehouse_url), [shifted])
    client = registry.get_client(settings)
    before = len(client.search_model_versions("name='flights_small_vae'"))
    out = monitor(params=params)
    assert out["drifted"]
    assert out["report"]["columns"]["dep_delay"]["drifted"] and out["report"]["latent_statistic"] > 0.1
    run = client.get_run(out["mlflow_run_id"])
    assert run.data.tags["vaeflow.drifted"] == "True" and run.data.metrics["drift.dep_delay"] > 0.5
    assert out["retrain"] is not None
    assert len(client.search_model_versions("name='flights_small_vae'")) == before + 1


def test_network_tasks_retry_transient_errors_but_not_bad_input(prefect_harness):
    from prefect import flow, task

    from pipelines.errors import SourceError
    from pipelines.flows import NETWORK_RETRIES

    calls = {"flaky": 0, "bad": 0}

    @task(**{**NETWORK_RETRIES, "retry_delay_seconds": 0})
    def flaky():
        calls["flaky"] += 1
        if calls["flaky"] < 3:
            raise ConnectionError("server went away")
        return "ok"

    @task(**{**NETWORK_RETRIES, "retry_delay_seconds": 0})
    def bad_input():
        calls["bad"] += 1
        raise SourceError("table 'nope' does not exist")

    @flow
    def run():
        return flaky(), bad_input(return_state=True)

    value, state = run()
    assert value == "ok" and calls["flaky"] == 3  # two retries, then success
    assert state.is_failed() and calls["bad"] == 1  # a clear input error is not retried
