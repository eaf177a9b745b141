"""Unattended on a busy machine: commands start without a server, survive load, leave no
orphan process, and never leave a run RUNNING.

Before (issue 12): on a busy machine (load 9-14 on 2 cores) commands died with `Timed out
while attempting to connect to ephemeral Prefect API server`; a killed command left its
`uvicorn` server running; a tracking server that died mid-training kept the command alive for
~12 minutes and left the run RUNNING forever, as did a SIGKILLed training.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pytest

from pipelines.config import load_settings
from pipelines.warehouse import parse_ref, write_table
from tests.conftest import small_params
from tests.reliability.conftest import EXE, SCRUB, assert_one_error, cli, run, score_args

pytestmark = pytest.mark.slow
TRAIN_BASE = ("train", "--source", "base", "--key", "rownames")


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every process whose parent is `pid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                found.append((int(stat.parent.name), cmd))
        except (OSError, ValueError, IndexError):
            continue
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@contextmanager
def _busy_cores(n: int = 4):
    """`n` processes spinning on the CPU (more than this machine's cores)."""
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for p in burners:
            p.kill()
            p.wait()


def _start(*args: str, env: dict | None = None) -> subprocess.Popen:
    full = {k: v for k, v in os.environ.items() if k not in SCRUB}
    full.update(env or {})
    return subprocess.Popen([EXE, *args], env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_score_command_on_a_busy_machine_needs_no_server(trained, tmp_path):
    dest = tmp_path / "emb.parquet"
    with _busy_cores():
        code, out, err = run(*score_args(trained["params"], "embed", "base", dest))
    assert code == 0, err[-3000:]
    assert "Prefect server" not in err and "ephemeral" not in err.lower()
    assert dest.exists()


def test_a_killed_run_leaves_no_prefect_server_behind(tmp_path, flights):
    params = small_params(tmp_path, train={"max_epochs": 50, "batch_size": 64})
    write_table(parse_ref("flights_small", load_settings(params).warehouse_url), [flights])
    proc = _start("run", "--params", str(params))
    deadline, server = time.monotonic() + 180, None
    while time.monotonic() < deadline and server is None:
        server = next((pid for pid, cmd in _children(proc.pid) if "uvicorn" in cmd), None)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    assert server is not None, "vaeflow run started no Prefect server"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 20
    while _alive(server) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(server), f"the temporary Prefect server {server} outlived its command"


def _runs(settings, status: str | None = None):
    client = mlflow.MlflowClient(tracking_uri=settings.tracking_uri)
    exp = client.get_experiment_by_name(settings.mlflow.experiment)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id])
    return [r for r in runs if status is None or r.info.status == status]


def _wait_for_running_run(settings, proc, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        running = _runs(settings, "RUNNING")
        if running:
            return running[0]
        time.sleep(0.3)
    raise AssertionError("no RUNNING run appeared")


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_killed_training_does_not_leave_its_run_running(tmp_path, base_rows, how):
    params = small_params(tmp_path, data={"source": "base"}, train={"max_epochs": 400, "batch_size": 32})
    settings = load_settings(params)
    write_table(parse_ref("base", settings.warehouse_url), [base_rows])
    logs = tmp_path / "errors"
    proc = _start(*TRAIN_BASE, "--params", str(params), env={"VAEFLOW_LOG_DIR": str(logs)})
    run_ = _wait_for_running_run(settings, proc)
    time.sleep(1.0)  # into the epochs
    proc.send_signal(how)
    _, err = proc.communicate(timeout=90)
    if how == signal.SIGTERM:
        dumps = "\n".join(p.read_text() for p in sorted(logs.glob("*.log"))) if logs.is_dir() else ""
        assert "cleanup did not finish" not in err, err[-2000:] + dumps[-6000:]
        assert_one_error(proc.returncode, err, "terminated", exit_code=143)
        assert mlflow.MlflowClient(settings.tracking_uri).get_run(run_.info.run_id).info.status == "KILLED"
    else:
        # nobody could end it; the next training on this host does, before it starts its own
        code, _, err = cli(*TRAIN_BASE, "--params", str(params), "--set", "train.max_epochs=1")
        assert code == 0, err[-3000:]
    run_ = mlflow.MlflowClient(settings.tracking_uri).get_run(run_.info.run_id)
    assert run_.info.status == "KILLED"
    assert not _runs(settings, "RUNNING")


def test_a_search_killed_mid_trial_leaves_no_run_running(tmp_path, base_rows):
    """SIGKILL while a configuration search trains a trial: the training run and its nested
    trial run are reaped (KILLED) by the next training on this host; nothing stays RUNNING."""
    params = small_params(
        tmp_path,
        data={"source": "base"},
        train={"max_epochs": 400, "batch_size": 32, "search": {"space": {"model.beta": [1.0, 0.5]}}},
    )
    settings = load_settings(params)
    write_table(parse_ref("base", settings.warehouse_url), [base_rows])
    proc = _start(*TRAIN_BASE, "--params", str(params))
    deadline, trial = time.monotonic() + 180, None
    while trial is None and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        trial = next((r for r in _runs(settings, "RUNNING") if "mlflow.parentRunId" in r.data.tags), None)
        time.sleep(0.3)
    assert trial is not None, "no trial run appeared"
    time.sleep(1.0)  # into the trial's epochs
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    parent = trial.data.tags["mlflow.parentRunId"]
    assert {r.info.run_id for r in _runs(settings, "RUNNING")} >= {parent, trial.info.run_id}

    code, _, err = cli(*TRAIN_BASE, "--params", str(params), "--set", "train.max_epochs=1")
    assert code == 0, err[-3000:]
    client = mlflow.MlflowClient(settings.tracking_uri)
    assert client.get_run(parent).info.status == "KILLED"
    assert client.get_run(trial.info.run_id).info.status == "KILLED"
    assert not _runs(settings, "RUNNING")


def test_a_cleanup_that_hangs_after_sigterm_ends_within_the_grace_period(tmp_path):
    """A terminated command whose cleanup never returns still exits 143, leaving its stacks."""
    stuck = (
        "import signal, sys, time\n"
        "from pipelines import cli\n"
        "signal.signal(signal.SIGTERM, cli._terminate)\n"
        "print('ready', flush=True)\n"
        "try:\n"
        "    time.sleep(120)\n"
        "finally:\n"
        "    time.sleep(120)  # a cleanup that never returns\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in SCRUB}
    env.update(VAEFLOW_TERM_GRACE_S="2", VAEFLOW_LOG_DIR=str(tmp_path / "errors"))
    proc = subprocess.Popen(
        [sys.executable, "-c", stuck], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "ready"
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - started < 30
    line = assert_one_error(proc.returncode, err, "cleanup did not finish", exit_code=143)
    (dump,) = (tmp_path / "errors").glob("*.log")
    assert str(dump) in line
    assert 'File "<string>", line 8 in <module>' in dump.read_text()  # where the cleanup hangs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _mlflow_server(root: Path, port: int):
    bin_ = Path(sys.executable).parent
    args = [
        str(bin_ / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root}/store.db", "--artifacts-destination", str(root / "artifacts"),
    ]  # fmt: skip
    with (root / f"mlflow-{port}.log").open("a") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        import urllib.request

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_tracking_server_that_dies_mid_training_is_reported_within_two_minutes(tmp_path, base_rows):
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    params = small_params(tmp_path, data={"source": "base"}, train={"max_epochs": 400, "batch_size": 32})
    settings = load_settings(params, [f"mlflow.tracking_uri={uri}"])
    write_table(parse_ref("base", settings.warehouse_url), [base_rows])
    with _mlflow_server(tmp_path, port) as server:
        proc = _start(*TRAIN_BASE, "--params", str(params), env={"MLFLOW_TRACKING_URI": uri})
        run_ = _wait_for_running_run(settings, proc)
        time.sleep(1.0)
        os.killpg(server.pid, signal.SIGKILL)
        killed = time.monotonic()
        _, err = proc.communicate(timeout=180)
        took = time.monotonic() - killed
    assert took < 120, f"the command noticed the dead tracking server after {took:.0f}s"
    assert_one_error(proc.returncode, err, f"127.0.0.1:{port}")
    with _mlflow_server(tmp_path, port):  # the server is back: the run is not left RUNNING
        from pipelines import tracking

        tracking.reap_orphaned_runs(settings)
        status = mlflow.MlflowClient(uri).get_run(run_.info.run_id).info.status
    assert status in ("FAILED", "KILLED")
