"""retrain and batch_score through Prefect on a small real sample, checked in MLflow and DuckDB."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

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
    # a user who turns the configuration search on (params.yaml's comment shows this grid)
    params = small_params(root, train={"search": {"space": {"model.beta": [1.0, 0.25]}}})
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
    mlflow.set_tracking_uri(settings.tracking_uri)  # for mlflow.artifacts.load_dict
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
    history = client.get_metric_history(out["run_id"], "val_heldout_nll")
    assert sorted(m.step for m in history) == [0, 1]  # one per epoch, at the epoch (not the step)
    assert run.data.tags["vaeflow.metric_step"] == "epoch"
    best = min(history, key=lambda m: m.value)
    assert run.data.metrics["best_val_heldout_nll"] == pytest.approx(best.value)
    assert run.data.metrics["best_epoch"] == best.step  # the kept weights' epoch, not the last one
    assert run.data.metrics["eval_nll_per_cell"] > 0
    # params: what shapes the model; paths, servers and progress bars go to config/settings.json
    params = run.data.params
    assert len(params) < 50 and "train.batch_size_used" in params
    assert (params["model.n_importance"], params["model.n_importance_used"]) == ("1", "1")  # the ELBO
    for noise in ("train.checkpoint_dir", "train.progress_bar", "mlflow.tracking_uri", "score.chunk_size"):
        assert noise not in params
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}  # mlflow.data.context
    assert set(inputs) == {"training", "validation", "evaluation"}
    train_file = settings.path("data/snapshots") / "flights_small" / "train.parquet"
    assert json.loads(inputs["training"].source)["uri"] == str(train_file)
    assert inputs["training"].digest == hashlib.md5(train_file.read_bytes()).hexdigest()[:16]
    assert json.loads(inputs["evaluation"].profile)["num_rows"] == run.data.metrics["eval_rows"]
    # the configuration search: one nested run per trial, the
    # kept trial's model.* values are the training run's params
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{out['run_id']}'")
    assert sorted(float(r.data.params["model.beta"]) for r in children) == [0.25, 1.0]
    trials = mlflow.artifacts.load_dict(f"runs:/{out['run_id']}/search/trials.json")["trials"]
    kept = min(trials, key=lambda t: t["score"])
    assert float(params["model.beta"]) == kept["model.beta"] and params["search.trials"] == "2"
    assert run.data.metrics["best_val_heldout_mse"] == pytest.approx(kept["score"])
    assert {r.data.tags["vaeflow.pid"] for r in children} == {
        run.data.tags["vaeflow.pid"]
    }  # reaped if killed
    config = mlflow.artifacts.load_dict(f"runs:/{out['run_id']}/config/settings.json")
    assert config["train.checkpoint_dir"] == "data/checkpoints" and config["model.latent_dim"] == 4
    artifacts = {a.path.removeprefix("plots/") for a in client.list_artifacts(out["run_id"], "plots")}
    assert artifacts == {
        "loss_curves.png",
        "latent_map.png",
        "column_error.png",
        "imputation_quality.png",
        "anomaly_scores.png",
        "latent_kl.png",
        "reconstruction.png",
    }
    for name in artifacts:  # also in reports/, where DVC and a reviewer find them
        assert (settings.path("reports") / "flights_small" / name).stat().st_size > 1000
    quality = pd.read_csv(settings.path("reports") / "flights_small" / "imputation_quality.csv")
    assert set(quality["metric"]) == {"rmse_std", "error_rate"} and (quality["cells"] > 0).all()
    description = client.get_model_version("flights_small_vae", out["version"]).description
    assert "snapshot `flights_small`" in description and "eval_nll_per_cell" in description
    assert f"{run.data.metrics['eval_nll_per_cell']:.4g}" in description
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
    # typed inputs: nullable (double) where the data has nulls, integer where it has none
    inputs = {c.name: c.to_dict()["type"] for c in model.metadata.get_input_schema().inputs}
    assert inputs["dep_delay"] == "double" and inputs["carrier"] == "string" and inputs["month"] == "any"
    # an integer column may hold a null when it is scored: it is imputed, not refused
    holes = rows.astype({"month": "float64"})
    holes.loc[holes.index[:3], "month"] = None
    filled = model.predict(holes, params={"job": "impute"})
    assert filled["month"].notna().all() and (filled["month"].iloc[3:] == rows["month"].iloc[3:]).all()
    assert set(model.metadata.metadata["job_outputs"]) == {"impute", "anomaly", "embed", "sample"}
    with pytest.raises(mlflow.exceptions.MlflowException, match=r"unknown job 'score'") as info:
        model.predict(rows, params={"job": "score"})
    assert info.value.error_code == "INVALID_PARAMETER_VALUE"


FRESH = """
import importlib.abc, json, sys
class NoPipeline(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("pipelines", "tests", "benchmarks"):
            raise ImportError(f"{name} is not part of the logged model")
sys.meta_path.insert(0, NoPipeline())
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
rows = pd.read_parquet(sys.argv[2])
out = model.predict(rows, params={"job": "anomaly"})
print(json.dumps({"code": sys.modules["vae_models.jobs"].__file__, "rows": len(out)}))
"""


def test_logged_model_is_self_contained(pipeline_run, flights, tmp_path):
    """A scoring host loads and runs the model with MLflow alone: no vaeflow pipeline, the ML
    core shipped in the model (`code/vae_models`), installable requirements."""
    import subprocess
    import sys

    settings, _, _ = pipeline_run
    mlflow.set_tracking_uri(settings.tracking_uri)
    local = Path(
        mlflow.artifacts.download_artifacts("models:/flights_small_vae@champion", dst_path=str(tmp_path))
    )
    requirements = (local / "requirements.txt").read_text()
    assert "torch==" in requirements and "+" not in requirements and "vaeflow" not in requirements
    assert (local / "code" / "vae_models" / "jobs.py").is_file()
    flights.head(7).to_parquet(tmp_path / "rows.parquet")
    proc = subprocess.run(
        [sys.executable, "-c", FRESH, str(local), str(tmp_path / "rows.parquet")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["rows"] == 7 and Path(out["code"]).is_relative_to(local / "code")


def test_second_training_is_challenger_and_gate_is_recorded(pipeline_run):
    from pipelines.flows import retrain

    settings, _, _ = pipeline_run
    # another seed: a real challenger (promotion.* is not what the train stage reads, so with
    # only the gate changed this would be a rerun of the champion, refused as such)
    out = retrain(
        params=str(settings.root / "params.yaml"),
        overrides=["promotion.min_improvement=1000", "train.seed=1"],
    )
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


def test_flow_runs_publish_artifacts_and_name_their_task_runs(pipeline_run):
    """What a Prefect user opens: each flow run's Artifacts tab and task runs named for what they do."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
    )

    settings, out, results = pipeline_run
    flow_run_id = (
        registry.get_client(settings).get_model_version("flights_small_vae", "1").tags["vaeflow.flow_run_id"]
    )
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
        by_key = {a.key: a for a in artifacts}
        assert {
            "validation-flights-small",
            "training-flights-small-vae",
            "promotion-flights-small-vae",
        } <= set(by_key)
        assert "passed" in by_key["validation-flights-small"].data
        promotion = by_key["promotion-flights-small-vae"].data
        assert "v1: PROMOTED to champion" in promotion and "first version of the model" in promotion
        assert f"{out['metrics']['eval_nll_per_cell']:.5g}" in by_key["training-flights-small-vae"].data
        names = {
            t.name
            for t in client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
        }
        assert {"train-flights_small_vae", "promote-flights_small_vae-v1", "validate", "ingest"} <= names
        # one version per batch_score run under one key (later tests score again): the fixture's is the first
        scored = min(
            client.read_artifacts(artifact_filter=ArtifactFilter(key={"any_": ["scored-flights-small"]})),
            key=lambda a: a.created,
        )
        rows = {r["job"]: r for r in json.loads(scored.data)}
        assert rows.keys() == {r["job"] for r in results}
        for r in results:
            assert rows[r["job"]]["rows"] == r["rows"] and rows[r["job"]]["destination"] == r["destination"]
        scoring_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[scored.flow_run_id]))
        )  # the batch_score flow run that published the table
        assert {t.name for t in scoring_runs} == {
            "score-impute",
            "score-anomaly",
            "score-embed",
            "score-sample",
        }
