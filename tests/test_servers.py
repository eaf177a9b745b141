"""The production topology without containers, as in infra/docker-compose.yml: PostgreSQL (MLflow
backend store and warehouse), an MLflow tracking server serving artifacts, a Prefect server and
`vaeflow serve` as the worker; all real processes on 127.0.0.1, started and stopped here.

Checks: deployments with their crons; a triggered run of retrain, batch_score and monitor each
completes; the registered model loads in a fresh process and answers REST requests through
`mlflow models serve`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
import yaml

from pipelines.config import load_settings
from pipelines.warehouse import parse_ref, read_frame, write_table
from tests.conftest import small_params
from tests.test_warehouse import PG_URL

pytestmark = [pytest.mark.slow, pytest.mark.postgres]
BIN = Path(sys.executable).parent
ADMIN_URL = PG_URL.rsplit("/", 1)[0] + "/postgres"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {timeout}s:\n{log.read_text()[-3000:]}")


@contextmanager
def _process(args: list[str], env: dict, log: Path, health: str | None = None):
    with log.open("w") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        if health:
            _wait_http(health, proc, log)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def topology(tmp_path_factory, flights):
    root = tmp_path_factory.mktemp("servers")
    db = f"vaeflow_srv_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    base = PG_URL.rsplit("/", 1)[0]
    table = f"flights_{uuid.uuid4().hex[:6]}"
    params = small_params(root, data={"source": table}, mlflow={"model_name": "srv_vae"})
    warehouse = f"{base}/{db}"
    mlflow_port, prefect_port = _free_port(), _free_port()
    env = {
        **{k: v for k, v in os.environ.items() if k != "MLFLOW_REGISTRY_URI"},
        "PREFECT_HOME": str(root / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
        "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
        "VAEFLOW_WAREHOUSE_URL": warehouse,
        "PYTHONUNBUFFERED": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # as with the venv activated
    }
    settings = load_settings(params, [f"warehouse.url={warehouse}"])
    write_table(parse_ref(table, settings.warehouse_url), [flights])
    mlflow_cmd = [
        str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
        "--backend-store-uri", f"{base.replace('postgresql://', 'postgresql+psycopg://')}/{db}",
        "--artifacts-destination", str(root / "artifacts"), "--workers", "1",
    ]  # fmt: skip
    prefect_cmd = [
        str(BIN / "prefect"),
        "server",
        "start",
        "--host",
        "127.0.0.1",
        "--port",
        str(prefect_port),
    ]
    try:
        with (
            _process(mlflow_cmd, env, root / "mlflow.log", f"{env['MLFLOW_TRACKING_URI']}/health"),
            _process(prefect_cmd, env, root / "prefect.log", f"{env['PREFECT_API_URL']}/health"),
            _process(
                [str(BIN / "vaeflow"), "serve", "--params", str(params)], env, root / "serve.log"
            ) as served,
        ):
            yield {
                "root": root,
                "env": env,
                "params": params,
                "settings": settings,
                "table": table,
                "served": served,
            }
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def _deployments(env: dict) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with (
        temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}),
        get_client(sync_client=True) as client,
    ):
        flows = {f.id: f.name for f in client.read_flows()}
        return {f"{flows[d.flow_id]}/{d.name}": d for d in client.read_deployments()}


def _run(env: dict, name: str, log: Path) -> str:
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}):
        run = run_deployment(name, timeout=300, poll_interval=2)
    assert run.state.is_completed(), f"{name}: {run.state}\n{log.read_text()[-4000:]}"
    return str(run.id)


def _triggered_run(env: dict, flow_name: str, log: Path, timeout: float = 300) -> str:
    """The id of the first completed run of `flow_name` that no one started by hand."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter
    from prefect.settings import PREFECT_API_URL, temporary_settings

    deadline = time.time() + timeout
    with (
        temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}),
        get_client(sync_client=True) as client,
    ):
        while time.time() < deadline:
            runs = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])), flow_run_filter=FlowRunFilter()
            )
            done = [r for r in runs if r.state and r.state.is_completed()]
            if done:
                return str(done[0].id)
            failed = [r for r in runs if r.state and r.state.is_final() and not r.state.is_completed()]
            assert not failed, f"{flow_name}: {failed[0].state}\n{log.read_text()[-4000:]}"
            time.sleep(2)
    raise AssertionError(
        f"no {flow_name} run followed the retrain within {timeout:.0f} s\n{log.read_text()[-4000:]}"
    )


def test_served_deployments_have_their_schedules_and_each_run_completes(topology):
    env, root = topology["env"], topology["root"]
    deadline = time.time() + 120
    deployments = {}
    while time.time() < deadline and len(deployments) < 3:
        deployments = _deployments(env)
        time.sleep(1)
    settings = topology["settings"]
    crons = {name: [s.schedule.cron for s in d.schedules] for name, d in deployments.items()}
    assert crons == {
        "retrain/nightly": [settings.schedule.retrain_cron],
        "batch_score/nightly": [],  # no cron of its own: it follows each completed retrain
        "monitor/hourly": [settings.schedule.monitor_cron],
    }
    log = root / "serve.log"
    retrain_run = _run(env, "retrain/nightly", log)
    assert _triggered_run(env, "batch_score", log) != retrain_run  # started by the retrain's completion
    _run(env, "monitor/hourly", log)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"], env["MLFLOW_TRACKING_URI"])
    mv = client.get_model_version_by_alias("srv_vae", "champion")
    assert mv.tags["vaeflow.flow_run_id"] == retrain_run  # lineage: the Prefect flow run
    for tag in (
        "vaeflow.git_commit",
        "vaeflow.snapshot_md5",
        "vaeflow.params_hash",
        "metric.eval_nll_per_cell",
    ):
        assert mv.tags.get(tag), tag
    assert mv.tags["validation"] == "passed"
    scored = read_frame(parse_ref(f"{topology['table']}_anomaly", settings.warehouse_url))
    assert {"anomaly_score", "is_anomaly", "model_version"} <= set(scored.columns)
    assert (scored["model_version"].astype(str) == str(mv.version)).all()
    monitor_runs = client.search_runs(
        [client.get_experiment_by_name(f"{settings.mlflow.experiment}-monitor").experiment_id]
    )
    assert monitor_runs and monitor_runs[0].data.tags["vaeflow.drifted"] == "False"
    topology["model"] = mv


def test_champion_loads_in_a_fresh_process_and_serves_rest(topology):
    env, root = topology["env"], topology["root"]
    if "model" not in topology:
        pytest.skip("needs the trained model from the previous test")
    rows = read_frame(parse_ref(topology["table"], topology["settings"].warehouse_url), max_rows=5)
    rows_json = rows.to_json(orient="split", index=False, date_format="iso")
    code = (
        "import json, sys, mlflow, pandas as pd;"
        "m = mlflow.pyfunc.load_model('models:/srv_vae@champion');"
        "df = pd.read_parquet(sys.argv[1]);"  # the warehouse's types: MLflow never casts int64 to double
        "print(json.dumps({j: list(m.predict(df, params={'job': j}).columns) for j in ('anomaly','embed','impute')}))"
    )
    rows.to_parquet(root / "rows.parquet")
    fresh = subprocess.run(
        [sys.executable, "-c", code, str(root / "rows.parquet")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    cols = json.loads(fresh.stdout.strip().splitlines()[-1])
    assert {"anomaly_score", "is_anomaly"} <= set(cols["anomaly"])
    assert [c for c in cols["embed"] if c.startswith("z_")] == ["z_0", "z_1", "z_2", "z_3"]
    assert "dep_delay" in cols["impute"]

    port = _free_port()
    serve = [str(BIN / "mlflow"), "models", "serve", "-m", "models:/srv_vae@champion", "--env-manager", "local",
             "--host", "127.0.0.1", "-p", str(port)]  # fmt: skip
    with _process(serve, env, root / "models-serve.log", f"http://127.0.0.1:{port}/ping"):
        body = {"dataframe_split": json.loads(rows_json), "params": {"job": "anomaly"}}
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            answer = json.loads(resp.read())
        bad = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps({**body, "params": {"job": "scores"}}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(bad, timeout=60)
        error = json.loads(refused.value.read())
        assert refused.value.code == 400 and error["error_code"] == "INVALID_PARAMETER_VALUE"
        assert "unknown job 'scores'" in error["message"] and "Traceback" not in json.dumps(error)
    preds = answer["predictions"]
    assert len(preds) == 5 and all("anomaly_score" in p and "is_anomaly" in p for p in preds)


def test_unreachable_tracking_server_is_one_clear_error(topology):
    env = {**topology["env"], "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{_free_port()}"}
    out = subprocess.run(
        [str(BIN / "vaeflow"), "promote", "--name", "srv_vae", "--params", str(topology["params"])],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2
    assert "unreachable" in out.stderr and env["MLFLOW_TRACKING_URI"] in out.stderr


def test_deployments_on_a_work_pool_run_on_a_process_worker(topology):
    """`vaeflow deploy` puts the same three deployments on a process work pool; a `prefect
    worker` (not `vaeflow serve`) picks up their runs. Last on this topology: the deployments
    move from the served runner to the pool."""
    env, root = topology["env"], topology["root"]
    if "model" not in topology:
        pytest.skip("needs the trained champion from the first test")
    pool = "vaeflow-test"
    out = subprocess.run(
        [str(BIN / "vaeflow"), "deploy", "--pool", pool, "--params", str(topology["params"])],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"prefect worker start --pool {pool}" in out.stdout
    deployed = _deployments(env)
    assert {name: d.work_pool_name for name, d in deployed.items()} == {
        "retrain/nightly": pool,
        "batch_score/nightly": pool,
        "monitor/hourly": pool,
    }
    assert deployed["retrain/nightly"].entrypoint == "pipelines.flows.retrain"
    log = root / "worker.log"
    with _process([str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"], env, log):
        run_id = _run(env, "monitor/hourly", log)  # completed: the worker ran vaeflow's flow
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with (
        temporary_settings({PREFECT_API_URL: env["PREFECT_API_URL"]}),
        get_client(sync_client=True) as client,
    ):
        flow_run = client.read_flow_run(run_id)
    assert flow_run.work_pool_name == pool and flow_run.state.is_completed()  # run from the pool: the worker


def test_compose_file_matches_this_topology():
    compose = yaml.safe_load((Path(__file__).parents[1] / "infra" / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "mlflow", "prefect", "worker"} <= set(services)
    worker = services["worker"]["environment"]
    assert worker["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert worker["PREFECT_API_URL"] == "http://prefect:4200/api"
    assert worker["VAEFLOW_WAREHOUSE_URL"].startswith("postgresql://")
    assert (
        "postgresql://" in services["mlflow"]["command"]
        and "--serve-artifacts" in services["mlflow"]["command"]
    )
    for svc in services.values():
        build = svc.get("build")
        if build:
            ctx = (Path(__file__).parents[1] / "infra" / build["context"]).resolve()
            assert (ctx / build.get("dockerfile", "Dockerfile")).exists()
