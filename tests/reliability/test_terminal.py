"""What the terminal shows when a command fails: one `error:` line, last, no traceback; an
unexpected error names the file its traceback went to; `--debug` shows it.

Before (issue 12): every error printed Prefect's traceback (up to 85 lines) before the error
line, and the last line was `INFO prefect: Stopping temporary server`.
"""

from __future__ import annotations

import pytest

from tests.reliability.conftest import MODEL, assert_one_error, cli, run, score_args


@pytest.mark.slow
@pytest.mark.parametrize("on_prefect", [False, True], ids=["no server", "prefect server"])
def test_a_failing_command_ends_with_its_one_error_line(trained, tmp_path, prefect_api, on_prefect):
    env = {"PREFECT_API_URL": prefect_api} if on_prefect else {}
    cases = [
        (
            ["score", "anomaly", "--model", MODEL, "--source", str(tmp_path / "nope.csv"), "--dest", "o"],
            "nope.csv does not exist",
        ),
        (["train", "--source", "base", "--key", "no_such_column"], "key column 'no_such_column'"),
    ]
    for args, needle in cases:
        code, out, err = run(*args, "--params", trained["params"], env=env)
        assert_one_error(code, err, needle)
        assert "Stopping temporary server" not in err + out


def test_an_unexpected_error_is_one_line_naming_its_traceback_file(trained, tmp_path, monkeypatch):
    from pipelines import scoring

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug, not bad input")

    monkeypatch.setattr(scoring, "run_job", broken)
    args = score_args(trained["params"], "embed", "base", "emb_out")
    code, _, err = cli(*args, env={"VAEFLOW_LOG_DIR": str(tmp_path / "logs")})
    line = assert_one_error(code, err, "unexpected ZeroDivisionError: a bug, not bad input", exit_code=1)
    (log,) = (tmp_path / "logs").iterdir()
    assert str(log) in line and "Traceback" in log.read_text() and "ZeroDivisionError" in log.read_text()
    code, _, err = cli("--debug", *args, env={"VAEFLOW_LOG_DIR": str(tmp_path / "logs")})
    assert code == 1 and "Traceback" in err and err.strip().splitlines()[-1].startswith("error: unexpected")


def test_debug_shows_the_traceback_of_an_expected_error(trained):
    code, _, err = cli(
        "train", "--source", "nope_table", "--params", trained["params"], env={"VAEFLOW_DEBUG": "1"}
    )
    assert code == 2 and "Traceback" in err
    assert err.strip().splitlines()[-1].startswith("error: table ")
