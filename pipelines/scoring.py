"""Batch jobs: impute, anomaly, embed, sample; chunked over a table and written back atomically.

`score_frame` is the pure per-chunk function (`vae_models.jobs`, also behind the MLflow pyfunc);
`run_job` streams a source through it and writes the destination in one atomic replace, each
row tagged with the model version and run id.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from pipelines.config import ScoreConfig, Settings
from pipelines.errors import ConfigError, DataError, VaeflowError
from pipelines.warehouse import columns, count_rows, iter_frames, parse_ref, same_table, write_table
from vae_models import jobs
from vae_models.bundle import ModelBundle
from vae_models.jobs import DEFAULT_PARAMS  # noqa: F401  (re-exported: the pyfunc's params)

log = logging.getLogger(__name__)


def score_frame(
    bundle: ModelBundle, df: pd.DataFrame, job: str, *, k: int = 16, seed: int = 0, rows: int = 1000
) -> pd.DataFrame:
    """`vae_models.jobs.score_frame`, its input errors as the pipeline's `DataError`/`ConfigError`."""
    try:
        return jobs.score_frame(bundle, df, job, k=k, seed=seed, rows=rows)
    except jobs.UnknownJob as exc:
        raise ConfigError(str(exc)) from exc
    except jobs.InputError as exc:
        raise DataError(str(exc)) from exc


AUTO_IMPUTE_DRAWS = 2**20  # importance draws an auto-sized imputation spends over a whole table
AUTO_IMPUTE_MAX_K = 256


def samples_for(cfg: ScoreConfig, job: str, rows: int | None) -> int:
    """Importance samples K per row for `job` on a table of `rows` rows: `score.importance_samples`
    (anomaly scores: the K their calibrated threshold was set at), except imputation, which takes
    `score.impute_samples`; its `auto` spends about AUTO_IMPUTE_DRAWS draws over the table (a
    few seconds on a CPU core), up to AUTO_IMPUTE_MAX_K per row on small tables and never fewer
    than `importance_samples`: measured on the benchmark tables, imputation RMSE falls 1-3% from
    K=16 to 256, while a table of millions of rows keeps the cheap K. Embed and sample draw none: 0."""
    if job in ("embed", "sample"):
        return 0
    if job != "impute":
        return cfg.importance_samples
    if cfg.impute_samples != "auto":
        return cfg.impute_samples
    if not rows:
        return cfg.importance_samples
    return max(cfg.importance_samples, min(AUTO_IMPUTE_MAX_K, AUTO_IMPUTE_DRAWS // rows))


def _require_columns(bundle: ModelBundle, df: pd.DataFrame, where: object = None) -> None:
    try:
        jobs.require_columns(bundle, df, where)
    except jobs.InputError as exc:
        raise DataError(str(exc)) from exc


def embed_arrow(bundle: ModelBundle, df: pd.DataFrame) -> pa.Table:
    """The embed job's output as an Arrow table (the key column when the table has one, then
    the codes), for the batch path: the writers take it as it is. Encoding, building and
    inserting a 50k-row chunk into DuckDB took 13.0 core-ms this way against 15.2 through a
    DataFrame (measured; the network's ~70 core-ms aside). Its caller (`run_job`) has checked
    the source's columns."""
    key = bundle.schema.key
    columns = {key: pa.Array.from_pandas(df[key])} if key and key in df.columns else {}
    try:
        codes = jobs.codes(bundle, df)
    except jobs.InputError as exc:
        raise DataError(str(exc)) from exc
    return pa.table({**columns, **{name: pa.array(z) for name, z in codes.items()}})


def scoring_device(setting: str) -> torch.device:
    """`score.device` as a torch device: `auto` is the first CUDA GPU when torch sees one."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not (
        torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()
    ):
        raise VaeflowError(
            f"score.device is {setting!r} but torch sees {torch.cuda.device_count()} CUDA device(s) "
            f"(torch {torch.__version__}); set score.device to auto or cpu, or install a CUDA build of torch"
        )
    return device


def duckdb_threads(vae: torch.nn.Module) -> int | None:
    """DuckDB worker threads for a job's reads and writes: 1 when the model scores on the CPU
    (torch's threads, the read-ahead thread and the writer already keep every core busy, and
    DuckDB's own workers would only compete with them: ~10% more rows/s measured for embed on 2
    cores), DuckDB's default when it scores on a GPU and the cores are free for reading and writing."""
    return 1 if next(vae.parameters()).device.type == "cpu" else None


@dataclass
class JobResult:
    job: str
    destination: str
    rows: int
    seconds: float
    model_version: str
    run_id: str
    importance_samples: int = 0  # K per row (impute, anomaly); 0 for embed and sample

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("nan")


def _scored(
    bundle: ModelBundle,
    job: str,
    frames: Iterable[pd.DataFrame],
    settings: Settings,
    k: int,
    first_chunk: int = 0,
    workers: int | None = None,
) -> Iterator[pd.DataFrame]:
    """Score a stream of chunks with `k` importance samples per row, `workers` (default
    `score.concurrent_chunks`) at a time, in order; chunk i of the table is seeded with
    `score.seed + i`, so a partition starting at chunk `first_chunk` (and any number of
    concurrent chunks) reproduces the single-process result."""
    cfg = settings.score

    def score(item: tuple[int, pd.DataFrame]) -> pd.DataFrame | pa.Table:
        i, frame = item
        if job == "embed":
            return embed_arrow(bundle, frame)
        return score_frame(bundle, frame, job, k=k, seed=cfg.seed + first_chunk + i)

    workers = workers or cfg.concurrent_chunks
    if workers == 1:
        yield from map(score, enumerate(frames))
        return
    on_cpu = next(bundle.vae.parameters()).device.type == "cpu"
    with torch_threads(max(1, torch.get_num_threads() // workers) if on_cpu else None):
        yield from ordered_map(score, enumerate(frames), workers)


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with `n` torch intra-op threads (None: unchanged), restoring the setting after."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def ordered_map(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """`fn` over `items` on `workers` threads, yielding results in input order. Up to
    `2 * workers` items are submitted ahead, so the threads keep working while the consumer
    (the writer) is busy; torch, DuckDB and Arrow release the GIL while they work."""
    with ThreadPoolExecutor(workers, thread_name_prefix="vaeflow-score") as pool:
        pending: deque = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) > 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def _samples(bundle: ModelBundle, settings: Settings) -> Iterator[pd.DataFrame]:
    cfg = settings.score
    left, i = cfg.sample_rows, 0
    while left > 0:
        n = min(left, cfg.chunk_size)
        yield score_frame(bundle, pd.DataFrame(), "sample", rows=n, seed=cfg.seed + i)
        left, i = left - n, i + 1


def _progress(
    frames: Iterable[pd.DataFrame], job: str, total: int | None, enabled: bool
) -> Iterator[pd.DataFrame]:
    """A progress bar of rows scored and rows/s (stderr), for long jobs. Close the generator
    when its consumer fails (`contextlib.closing`), so the bar ends its line before the error."""
    with tqdm(total=total, desc=f"score {job}", unit="rows", unit_scale=True, disable=not enabled) as bar:
        for frame in frames:
            yield frame
            bar.update(len(frame))


_DONE = object()


def prefetch(items: Iterator, depth: int = 2) -> Iterator:
    """Run an iterator in a background thread, `depth` items ahead of the consumer, so reading,
    scoring and writing overlap (DuckDB, PostgreSQL and torch release the GIL). Errors are
    re-raised in the consumer; a consumer that stops early stops the producer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_DONE)
        except BaseException as exc:  # handed to the consumer
            q.put(exc)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="vaeflow-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=30)


@dataclass(frozen=True)
class Partition:
    """Rows [offset, offset + limit) of a source, scored by one worker into `path`."""

    index: int
    offset: int
    limit: int
    first_chunk: int  # the table-wide index of its first chunk (offsets are whole chunks)
    path: str
    table_rows: int  # rows of the whole source (the job's K follows from them)


def plan_partitions(n_rows: int, settings: Settings, scratch: Path) -> list[Partition]:
    """Row ranges aligned to whole chunks (so chunk seeds match the single-process run)."""
    chunk = settings.score.chunk_size
    per = max(1, -(-settings.score.dask.partition_rows // chunk)) * chunk
    return [
        Partition(
            i,
            offset,
            min(per, n_rows - offset),
            offset // chunk,
            str(scratch / f"part-{i:05d}.parquet"),
            n_rows,
        )
        for i, offset in enumerate(range(0, n_rows, per))
    ]


def score_partition(bundle: ModelBundle, job: str, source: str, part: Partition, settings: Settings) -> int:
    """Score one partition of `source` into its own Parquet file (atomically); returns rows."""
    bundle.vae.to(scoring_device(settings.score.device))  # each worker picks its own device
    src = parse_ref(source, settings.warehouse_url)
    threads = duckdb_threads(bundle.vae)
    frames = prefetch(
        iter_frames(src, settings.score.chunk_size, offset=part.offset, limit=part.limit, threads=threads)
    )
    return write_table(
        parse_ref(part.path, settings.warehouse_url),
        _scored(
            bundle,
            job,
            frames,
            settings,
            samples_for(settings.score, job, part.table_rows),
            part.first_chunk,
            workers=1,  # a worker per core
        ),
    )


def _read_parts(parts: list[Partition]) -> Iterator[pd.DataFrame]:
    for part in parts:
        for batch in pq.ParquetFile(part.path).iter_batches():
            yield batch.to_pandas()


PartitionRunner = Callable[[list[Partition]], None]


def _not_empty(frames: Iterator[pd.DataFrame], src) -> Iterator[pd.DataFrame]:
    """The frames; a stream that ends without a row is an error (raised before any swap)."""
    rows = 0
    for frame in frames:
        if len(frame):
            rows += len(frame)
            yield frame
    if rows == 0:
        raise DataError(f"{src} has no rows to score")


def run_job(
    bundle: ModelBundle,
    job: str,
    source: str | None,
    dest: str,
    settings: Settings,
    *,
    model_version: str,
    run_id: str,
    run_partitions: PartitionRunner | None = None,
) -> JobResult:
    """Stream `source` through `job` and atomically replace `dest` with the result.

    With `run_partitions` (e.g. Dask workers via Prefect), the source is cut into row ranges
    that are scored in parallel into scratch Parquet files, then streamed into `dest` in order.
    """
    if job != "sample" and not source:
        raise VaeflowError(f"job {job!r} needs --source")
    src = parse_ref(source, settings.warehouse_url) if source and job != "sample" else None
    dst = parse_ref(dest, settings.warehouse_url)
    if src is not None and same_table(src, dst):
        raise VaeflowError(
            f"destination {dst} is the source table {src} under another name; choose another --dest"
        )
    tags = {"model_version": str(model_version), "run_id": run_id}
    cfg = settings.score
    bundle.vae.to(scoring_device(cfg.device))
    threads = duckdb_threads(bundle.vae)
    compress_floats = job != "embed"  # embeddings: no float codec shrinks them
    start = time.perf_counter()
    k = 0  # importance samples per row, reported with the result
    if job == "sample":
        with contextlib.closing(
            _progress(_samples(bundle, settings), job, cfg.sample_rows, cfg.progress_bar)
        ) as samples:
            rows = write_table(dst, samples, tags, threads=threads)
    else:
        _require_columns(bundle, pd.DataFrame(columns=columns(src)), src)  # before anything is written
        # a CSV is counted only when it must be cut into partitions or its size sets K (counting
        # is a full pass): the same rows score alike whatever they are stored in
        sized = job == "impute" and cfg.impute_samples == "auto"
        total = count_rows(src) if run_partitions is not None or src.kind != "csv" or sized else None
        if total == 0:
            raise DataError(f"{src} has no rows to score")
        k = samples_for(cfg, job, total)
        if run_partitions is None:
            # read ahead in one thread, score in `concurrent_chunks` threads, write in this one
            frames = _not_empty(prefetch(iter_frames(src, cfg.chunk_size, threads=threads)), src)
            chunks = _scored(bundle, job, frames, settings, k)
            with contextlib.closing(_progress(chunks, job, total, cfg.progress_bar)) as scored:
                rows = write_table(
                    dst, scored, tags, threads=threads, compress_floats=compress_floats, key=bundle.schema.key
                )
        else:
            scratch_root = settings.path(cfg.dask.scratch_dir)
            scratch_root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix=f"{job}-", dir=scratch_root) as scratch:
                parts = plan_partitions(total, settings, Path(scratch))
                run_partitions(parts)
                with contextlib.closing(
                    _progress(_read_parts(parts), job, total, cfg.progress_bar)
                ) as scored:
                    rows = write_table(
                        dst,
                        scored,
                        tags,
                        threads=threads,
                        compress_floats=compress_floats,
                        key=bundle.schema.key,
                    )
    seconds = time.perf_counter() - start
    result = JobResult(job, str(dst), rows, seconds, str(model_version), run_id, k)
    log.info(
        "%s: %d rows -> %s in %.1fs (%.0f rows/s%s)",
        job,
        rows,
        dst,
        seconds,
        result.rows_per_second,
        f", K={k} importance samples per row" if k else "",
    )
    return result
