"""GPU check of the batch jobs: each job end to end on CUDA against the bare network on CUDA,
with `score.concurrent_chunks` 1 and 2, and GPU results against CPU results.

    python -m benchmarks.gpu_scoring [--rows 2000000] [--k 8] [--workers 1 2]

Needs a CUDA device (exits with a message otherwise). The model is trained for one epoch with
Lightning's `accelerator="auto"` (the GPU), as `vaeflow train` does there.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.throughput import bare_timing, make_table, settings_for, train_bundle

CHECK_ROWS = 200_000  # rows compared between GPU and CPU


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--k", type=int, default=8, help="importance samples of anomaly and impute")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="concurrent_chunks to try")
    args = parser.parse_args(argv)
    import duckdb
    import torch

    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this check needs a GPU (torch.cuda.is_available() is False)")
    from pipelines.scoring import run_job
    from pipelines.warehouse import parse_ref, read_frame
    from vae_models.bundle import load_bundle

    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, {args.rows} rows, K={args.k}")
    with tempfile.TemporaryDirectory(prefix="vaeflow-gpu-") as tmp:
        workdir = Path(tmp)
        warehouse = workdir / "bench.duckdb"
        make_table(warehouse, args.rows)
        with duckdb.connect(str(warehouse)) as con:
            con.execute(f"CREATE TABLE check_rows AS SELECT * FROM bench LIMIT {CHECK_ROWS}")
        t0 = time.perf_counter()
        bundle_path, sample = train_bundle(workdir, warehouse, args.k)
        print(
            f"training, 1 epoch of {len(sample) - 20000} rows (accelerator auto): {time.perf_counter() - t0:.1f} s"
        )
        bundle = load_bundle(bundle_path)
        bundle.vae.to("cuda")  # for the bare timing; the jobs move it with score.device (auto)
        print(f"\n{'job':>8} {'workers':>8} {'e2e rows/s':>12} {'bare rows/s':>12} {'e2e/bare':>9}")
        for job in ("embed", "anomaly", "impute"):
            rows, seconds = bare_timing(bundle, sample, job, args.k)
            bare = rows / seconds
            for workers in args.workers:
                settings = settings_for(workdir, warehouse, args.k, f"score.concurrent_chunks={workers}")
                result = run_job(
                    bundle,
                    job,
                    "bench",
                    f"bench_{job}_{workers}",
                    settings,
                    model_version="gpu",
                    run_id="gpu",
                )
                print(
                    f"{job:>8} {workers:>8} {result.rows_per_second:12.0f} {bare:12.0f} {result.rows_per_second / bare:9.2f}"
                )
        # the same rows on GPU and on CPU
        print(f"\nGPU against CPU on {CHECK_ROWS} rows:")
        outs = {}
        for device in ("cuda", "cpu"):
            settings = settings_for(workdir, warehouse, args.k, f"score.device={device}")
            for job in ("embed", "anomaly"):
                run_job(
                    bundle,
                    job,
                    "check_rows",
                    f"check_{job}_{device}",
                    settings,
                    model_version="x",
                    run_id="x",
                )
                outs[job, device] = read_frame(parse_ref(f"check_{job}_{device}", settings.warehouse_url))
        z = [c for c in outs["embed", "cpu"].columns if c.startswith("z_")]
        diff = np.abs(outs["embed", "cuda"][z].to_numpy() - outs["embed", "cpu"][z].to_numpy()).max()
        print(f"  embed: max |z_gpu - z_cpu| = {diff:.2e}")
        a, b = outs["anomaly", "cuda"]["anomaly_score"], outs["anomaly", "cpu"]["anomaly_score"]
        print(
            f"  anomaly: Pearson r = {np.corrcoef(a, b)[0, 1]:.4f}, median |diff| = {np.median(np.abs(a - b)):.3f}"
        )
        lo, hi = min(args.workers), max(args.workers)
        same = {
            w: read_frame(parse_ref(f"bench_anomaly_{w}", settings.warehouse_url))["anomaly_score"]
            for w in (lo, hi)
        }
        diff = np.abs(same[lo] - same[hi]).max()
        print(f"  anomaly on GPU, {lo} against {hi} concurrent chunks: max |diff| = {diff:.2e}")


if __name__ == "__main__":
    main()
