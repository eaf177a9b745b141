"""tests/pg_server.py, the wrapper `make test` runs the suite under: a throwaway PostgreSQL server
when none answers, passed-through exit codes, nothing left behind, and a clear stop when there is
neither a server nor PostgreSQL's binaries."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests import pg_server

WRAPPER = Path(pg_server.__file__)


def _silent_port() -> int:
    """A port of 127.0.0.1 where nothing listens (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def _wrapped(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("VAEFLOW_TEST_PG", "VAEFLOW_TEST_PG_DIR")}
    return subprocess.run(
        [sys.executable, str(WRAPPER), *cmd], env={**base, **env}, capture_output=True, text=True, timeout=180
    )


# Inside the wrapper: the throwaway server answers on both databases the tests use; a wrapper run
# inside it (probing that server) uses it rather than starting another; then exit with argv[1].
COMMAND = textwrap.dedent(
    """
    import os, subprocess, sys
    import psycopg

    url = os.environ["VAEFLOW_TEST_PG"]
    with psycopg.connect(url, connect_timeout=5) as con:
        assert con.execute("SELECT 1").fetchone() == (1,)
    with psycopg.connect(url.rsplit("/", 1)[0] + "/postgres", connect_timeout=5) as con:
        con.execute("SELECT 1")
    port = url.rsplit(":", 1)[1].split("/")[0]
    env = {k: v for k, v in os.environ.items() if k != "VAEFLOW_TEST_PG"}
    env["VAEFLOW_TEST_PG_PROBE"] = "127.0.0.1:" + port
    inner = subprocess.run(
        [sys.executable, sys.argv[2], sys.executable, "-c", "import os; print(os.environ['VAEFLOW_TEST_PG'])"],
        env=env, capture_output=True, text=True,
    )
    print("url", url)
    print("dir", os.environ["VAEFLOW_TEST_PG_DIR"])
    print("inner", inner.stdout.strip(), inner.returncode)
    sys.exit(int(sys.argv[1]))
    """
)


@pytest.mark.skipif(pg_server.find_bindir() is None, reason="PostgreSQL's initdb/pg_ctl are not installed")
@pytest.mark.parametrize("code", [0, 7])
def test_a_throwaway_server_serves_the_command_and_is_gone_after_it(code):
    probe = _silent_port()
    done = _wrapped(
        [sys.executable, "-c", COMMAND, str(code), str(WRAPPER)], VAEFLOW_TEST_PG_PROBE=f"127.0.0.1:{probe}"
    )
    assert done.returncode == code, done.stdout + done.stderr
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    url, folder = lines["url"], Path(lines["dir"])
    assert url.startswith("postgresql://postgres@127.0.0.1:") and url.endswith("/test")
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    assert port != probe
    assert lines["inner"] == f"{url} 0"  # the answering server was used, no second one started
    assert not folder.exists()
    assert not _listening(port)


def test_a_set_url_or_deselected_postgres_tests_run_the_command_as_is():
    silent = f"127.0.0.1:{_silent_port()}"
    show = [sys.executable, "-c", "import os, sys; print(os.environ.get('VAEFLOW_TEST_PG')); sys.exit(3)"]
    done = _wrapped(show, VAEFLOW_TEST_PG="postgresql://u@h:1/db", VAEFLOW_TEST_PG_PROBE=silent)
    assert (done.returncode, done.stdout.strip(), done.stderr) == (3, "postgresql://u@h:1/db", "")
    done = _wrapped([*show, "-m", "not postgres"], VAEFLOW_TEST_PG_PROBE=silent)
    assert (done.returncode, done.stdout.strip(), done.stderr) == (3, "None", "")


def test_no_server_and_no_binaries_stops_before_the_command_and_says_what_to_do(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("PATH", str(tmp_path))  # no initdb, pg_ctl or pg_isready
    monkeypatch.setattr(pg_server, "BIN_GLOBS", [])
    monkeypatch.delenv("VAEFLOW_TEST_PG", raising=False)
    monkeypatch.setenv("VAEFLOW_TEST_PG_PROBE", f"127.0.0.1:{_silent_port()}")
    marker = tmp_path / "ran"
    assert pg_server.main([sys.executable, "-c", f"open({str(marker)!r}, 'w')"]) == 2
    assert not marker.exists()
    err = capsys.readouterr().err
    assert "need a PostgreSQL server" in err
    assert "apt install postgresql" in err
    assert "VAEFLOW_TEST_PG=postgresql://" in err
    assert '-m "not postgres"' in err
