"""Retries cover what may pass on a second try, and nothing else.

Before (issue 12): an unreachable tracking server raised `RegistryError` (a `VaeflowError`),
which the retry condition skipped, while the training task retried every error, bad input
included.
"""

from __future__ import annotations

import time

import pytest

from pipelines import flows, stages
from pipelines.errors import DataError, TransientError
from tests.reliability.conftest import assert_one_error, cli


def _flaky(fails_with: BaseException, failures: int):
    calls = {"n": 0}

    @stages.stage("flaky", stages.Retry(2, (0, 0)))
    def fn() -> str:
        calls["n"] += 1
        if calls["n"] <= failures:
            raise fails_with
        return "ok"

    return fn, calls


@pytest.mark.parametrize(
    ("error", "calls"),
    [
        (TransientError("server away"), 3),
        (ConnectionError("reset"), 3),
        (DataError("bad cell"), 1),
        (KeyError("bug"), 1),
    ],
)
def test_only_transient_errors_are_retried_in_process(error, calls):
    fn, seen = _flaky(error, failures=2)
    if calls == 3:
        assert stages.direct(fn) == "ok"
    else:
        with pytest.raises(type(error)):
            stages.direct(fn)
    assert seen["n"] == calls


@pytest.mark.slow
@pytest.mark.parametrize(
    ("error", "calls"), [(TransientError("server away"), 3), (DataError("bad cell"), 1), (KeyError("bug"), 1)]
)
def test_only_transient_errors_are_retried_as_prefect_tasks(prefect_harness, error, calls):
    from prefect import flow

    fn, seen = _flaky(error, failures=2)
    task = flows.as_task(fn)

    @flow
    def run() -> bool:
        return task(return_state=True).is_completed()

    completed = run()
    assert seen["n"] == calls
    assert completed == (calls == 3)


def test_training_retries_only_transient_errors():
    assert stages.train.retry.retries == 1
    task = flows.TASKS[stages.train]
    assert task.retries == 1 and task.retry_condition_fn is flows._transient
    assert all(flows.TASKS[fn].retry_condition_fn is flows._transient for fn in stages.STAGES)


def test_an_unreachable_tracking_server_is_retried_then_one_error(trained, tmp_path, caplog):
    start = time.monotonic()
    code, _, err = cli(
        "score", "embed", "--model", "models:/base_vae@champion", "--source", "base", "--dest", str(tmp_path / "o.parquet"),
        "--params", trained["params"], env={"MLFLOW_TRACKING_URI": "http://user:pw@127.0.0.1:9"},
    )  # fmt: skip
    took = time.monotonic() - start
    assert_one_error(code, err, "127.0.0.1:9", "unreachable")
    assert "pw" not in err
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == 2 and "retry 1/2 in 2" in retries[0] and "retry 2/2 in 10" in retries[1], retries
    assert 12 <= took < 60
