"""Shared fixtures of the reliability tests: a project with a trained model, the CLI run
in-process (fast, many cases) or as a subprocess (what a terminal shows), and snapshots of
every pre-existing file and table to prove they were left byte-identical."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from tests.conftest import small_params

EXE = str(Path(sys.executable).with_name("vaeflow"))
SCRUB = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "VAEFLOW_WAREHOUSE_URL", "PREFECT_API_URL")


def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """`vaeflow ARGS` in this process (no start-up cost); returns (exit code, stdout, stderr).
    The environment is restored afterwards."""
    from pipelines import cli as vaeflow_cli

    saved = dict(os.environ)
    for name in SCRUB:
        os.environ.pop(name, None)
    os.environ.update(env or {})
    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["vaeflow", *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                vaeflow_cli.main()
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = argv
        os.environ.clear()
        os.environ.update(saved)
    return code, out.getvalue(), err.getvalue()


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> tuple[int, str, str]:
    """`vaeflow ARGS` as a user runs it: a subprocess; returns (exit code, stdout, stderr)."""
    full = {k: v for k, v in os.environ.items() if k not in SCRUB}
    full.update(env or {})
    proc = subprocess.run([EXE, *args], capture_output=True, text=True, env=full, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


MODEL = "models:/base_vae@champion"


def score_args(params: str, job: str, source, dest, model: str = MODEL) -> list[str]:
    """The argv of `vaeflow score JOB` with the shared model."""
    return [
        "score",
        job,
        "--model",
        model,
        "--source",
        str(source),
        "--dest",
        str(dest),
        "--params",
        str(params),
    ]


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def assert_one_error(code: int, err: str, *needles: str, exit_code: int = 2) -> str:
    """Exit `exit_code`, exactly one `error:` line, it is the last line, no traceback; the
    line contains every needle. Returns the line."""
    lines = error_lines(err)
    assert code == exit_code, err[-3000:]
    assert len(lines) == 1, err[-3000:]
    assert err.strip().splitlines()[-1] == lines[0], err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def files_state(*roots: Path) -> dict[str, str]:
    """sha256 of every file under `roots` (byte-identity of everything that existed)."""
    state = {}
    for root in roots:
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in paths:
            state[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def tables_state(db: Path) -> dict[str, str]:
    """Every table of a DuckDB file with a hash of its full content, in order."""
    with duckdb.connect(str(db), read_only=True) as con:
        names = [
            r[0]
            for r in con.execute(
                "SELECT table_schema || '.' || table_name FROM information_schema.tables"
            ).fetchall()
        ]
        return {
            name: hashlib.sha256(
                con.execute(f"SELECT * FROM {name}").df().to_csv(index=False).encode()
            ).hexdigest()
            for name in sorted(names)
        }


@pytest.fixture(scope="session")
def base_rows(flights) -> pd.DataFrame:
    """600 real rows of nycflights13 (numeric, categorical and missing cells) keyed by rownames."""
    return flights.head(600).reset_index(drop=True)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, base_rows) -> dict:
    """A project whose DuckDB warehouse holds `base`, with `base_vae` v1 trained by the CLI."""
    from pipelines.config import load_settings
    from pipelines.warehouse import parse_ref, write_table

    root = tmp_path_factory.mktemp("reliable")
    params = small_params(root, data={"source": "base", "key": "rownames"}, mlflow={"model_name": "base_vae"})
    settings = load_settings(params)
    write_table(parse_ref("base", settings.warehouse_url), [base_rows])
    code, out, err = cli("train", "--source", "base", "--key", "rownames", "--params", str(params))
    assert code == 0, err[-3000:]
    return {
        "root": root,
        "params": str(params),
        "settings": settings,
        "db": root / "data" / "warehouse.duckdb",
    }
