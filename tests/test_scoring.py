"""Batch scoring without a server: concurrent chunks, seeds, output types and row tags."""

from __future__ import annotations

import contextlib

import numpy as np
import pandas as pd
import pytest
import torch

from pipelines.config import load_settings
from pipelines.errors import ConfigError, VaeflowError
from pipelines.scoring import ordered_map, run_job, samples_for, scoring_device
from pipelines.warehouse import duckdb as warehouse_duckdb
from pipelines.warehouse import parse_ref, read_frame, write_table
from tests.conftest import REPO, small_params
from tests.helpers import linear_table, train_small
from vae_models.bundle import ModelBundle


@pytest.fixture(scope="module")
def bundle() -> ModelBundle:
    module, schema = train_small(linear_table(800), epochs=3)
    return ModelBundle(vae=module.vae, schema=schema, extra={"anomaly_threshold": 2.0})


@pytest.fixture
def warehouse(tmp_path):
    """A 2,300-row table with nulls, scored in chunks of 500 (five chunks, the last short)."""
    df = linear_table(2300, seed=3)
    df.loc[df.index % 7 == 0, "x2"] = np.nan
    df.loc[df.index % 11 == 0, "sign"] = None
    settings = load_settings(small_params(tmp_path, score={"chunk_size": 500}))
    write_table(parse_ref("t", settings.warehouse_url), [df])
    return settings


def _score(bundle, settings, job: str, dest: str, concurrent: int) -> pd.DataFrame:
    settings.score.concurrent_chunks = concurrent
    run_job(bundle, job, "t", dest, settings, model_version="7", run_id="abc")
    return read_frame(parse_ref(dest, settings.warehouse_url))


@pytest.mark.parametrize("job", ["anomaly", "impute"])
def test_concurrent_chunks_give_the_sequential_result_row_for_row(bundle, warehouse, job):
    """Sampling jobs draw from a generator seeded per chunk, so threads change nothing."""
    one = _score(bundle, warehouse, job, f"{job}_1", concurrent=1)
    three = _score(bundle, warehouse, job, f"{job}_3", concurrent=3)
    assert len(one) == 2300
    pd.testing.assert_frame_equal(three, one)
    other_seed = warehouse.model_copy(update={"score": warehouse.score.model_copy(update={"seed": 1})})
    reseeded = _score(bundle, other_seed, job, f"{job}_seed1", concurrent=3)
    column = "anomaly_score" if job == "anomaly" else "x2"
    assert not reseeded[column].equals(one[column])  # the seed is what fixes the draws


@pytest.mark.parametrize("dest", ["embed_out", "embed_out.parquet"])
def test_embed_writes_float32_codes_and_the_model_tags(bundle, warehouse, tmp_path, dest):
    target = str(tmp_path / dest) if dest.endswith(".parquet") else dest
    out = _score(bundle, warehouse, "embed", target, concurrent=2)
    assert list(out.columns) == ["z_0", "z_1", "model_version", "run_id"]
    assert out["z_0"].dtype == np.float32 and out["z_0"].notna().all()
    assert (out["model_version"] == "7").all() and (out["run_id"] == "abc").all()


def test_ordered_map_keeps_order_and_reraises():
    assert list(ordered_map(lambda x: x * x, range(20), 3)) == [x * x for x in range(20)]

    def boom(x):
        if x == 5:
            raise ValueError("chunk 5")
        return x

    with pytest.raises(ValueError, match="chunk 5"):
        list(ordered_map(boom, range(20), 2))


def test_score_device_auto_picks_cuda_only_when_there_is_one(tmp_path):
    assert scoring_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert scoring_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="score.device"):
        load_settings(small_params(tmp_path), ["score.device=gpu"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_asking_for_cuda_without_a_gpu_is_a_clear_error(bundle, warehouse):
    with pytest.raises(VaeflowError, match="score.device is 'cuda:0' but torch sees 0 CUDA device"):
        scoring_device("cuda:0")
    warehouse.score.device = "cuda"
    with pytest.raises(VaeflowError, match="set score.device to auto or cpu"):
        run_job(bundle, "embed", "t", "never_written", warehouse, model_version="7", run_id="abc")
    assert next(bundle.vae.parameters()).device.type == "cpu"


def test_cpu_jobs_read_and_write_with_one_duckdb_thread(bundle, warehouse, monkeypatch):
    """On the CPU, torch's threads do the scoring: the job's DuckDB reads and writes run with
    one DuckDB worker thread (checked on the live connections)."""
    opened: list[tuple[int | None, int]] = []
    real = warehouse_duckdb._duckdb

    @contextlib.contextmanager
    def spy(path, read_only=False, threads=None):
        with real(path, read_only, threads) as con:
            opened.append((threads, con.execute("SELECT current_setting('threads')").fetchall()[0][0]))
            yield con

    monkeypatch.setattr(warehouse_duckdb, "_duckdb", spy)
    warehouse.score.device = "cpu"
    run_job(bundle, "embed", "t", "codes", warehouse, model_version="7", run_id="abc")
    capped = [setting for asked, setting in opened if asked is not None]
    assert capped == [1, 1]  # the chunked read and the write
    assert len(read_frame(parse_ref("codes", warehouse.warehouse_url))) == 2300


def test_only_embed_writes_its_floats_uncompressed(bundle, warehouse, monkeypatch):
    """Embeddings skip DuckDB's float codecs (they cannot shrink them); other outputs keep them."""
    asked: list[bool] = []
    real = warehouse_duckdb._float_compression

    def spy(con, enabled):
        asked.append(enabled)
        return real(con, enabled)

    monkeypatch.setattr(warehouse_duckdb, "_float_compression", spy)
    run_job(bundle, "embed", "t", "codes", warehouse, model_version="7", run_id="abc")
    run_job(bundle, "anomaly", "t", "scores", warehouse, model_version="7", run_id="abc")
    assert asked == [False, True]


def test_auto_impute_samples_follow_the_table_size(tmp_path):
    """auto: ~2^20 draws over the table within [importance_samples, 256]; anomaly keeps the K its
    threshold was calibrated at; a number the user sets is used as it is."""
    cfg = load_settings(REPO / "params.yaml").score
    assert (cfg.impute_samples, cfg.importance_samples) == ("auto", 16)
    assert [samples_for(cfg, "impute", n) for n in (1, 569, 4096, 20_000, 65_536, 10_000_000)] == [
        256, 256, 256, 52, 16, 16
    ]  # fmt: skip
    assert samples_for(cfg, "impute", None) == 16  # size unknown: the floor
    assert samples_for(cfg, "anomaly", 569) == 16
    assert samples_for(cfg, "embed", 569) == samples_for(cfg, "sample", None) == 0  # no draws
    assert samples_for(cfg.model_copy(update={"importance_samples": 400}), "impute", 569) == 400
    assert samples_for(cfg.model_copy(update={"impute_samples": 7}), "impute", 569) == 7


def test_a_table_imputes_alike_from_duckdb_parquet_and_csv_with_the_k_its_size_sets(
    bundle, warehouse, tmp_path
):
    """The K follows the table's rows whatever stores them (a CSV is counted first), reaches the
    scorer (a fixed K gives other draws) and comes back with the result."""
    settings = warehouse
    df = read_frame(parse_ref("t", settings.warehouse_url))
    df.to_parquet(tmp_path / "t.parquet")
    df.to_csv(tmp_path / "t.csv", index=False)
    outs = {}
    for source in ("t", str(tmp_path / "t.parquet"), str(tmp_path / "t.csv")):
        result = run_job(bundle, "impute", source, "imp", settings, model_version="7", run_id="abc")
        assert result.importance_samples == 256  # 2,300 rows: 2^20 / 2,300 > 256
        outs[source] = read_frame(parse_ref("imp", settings.warehouse_url))["x2"].to_numpy()
    assert df["x2"].isna().sum() > 300
    first = outs["t"]
    assert all(np.allclose(o, first, rtol=0, atol=1e-6) for o in outs.values()), outs
    fixed = settings.model_copy(update={"score": settings.score.model_copy(update={"impute_samples": 4})})
    result = run_job(bundle, "impute", "t", "imp4", fixed, model_version="7", run_id="abc")
    assert result.importance_samples == 4
    assert not np.allclose(read_frame(parse_ref("imp4", settings.warehouse_url))["x2"], first, atol=1e-6)
    embedded = run_job(bundle, "embed", "t", "emb", settings, model_version="7", run_id="abc")
    assert embedded.importance_samples == 0


@pytest.mark.parametrize("damage", ["zero bytes", "header only", "ragged row", "word in numeric"])
def test_a_damaged_csv_counted_for_imputation_fails_as_it_does_uncounted_and_keeps_the_output(
    bundle, warehouse, tmp_path, damage
):
    """`impute` counts a CSV before scoring (its K follows the rows), `anomaly` does not: the
    same damaged file gets the same one error from both, and the existing output stays byte-identical."""
    good = linear_table(50).to_csv(index=False).encode()
    data = {
        "zero bytes": b"",
        "header only": good.splitlines(keepends=True)[0],
        "ragged row": good + b"1,2,3,4,5,6,7,8,9\n",
        "word in numeric": good.replace(b"\n1", b"\nabc", 1),
    }[damage]
    src, dest = tmp_path / "src.csv", tmp_path / "out.parquet"
    src.write_bytes(data)
    linear_table(20).to_parquet(dest)
    before = dest.read_bytes()
    errors = []
    for job in ("impute", "anomaly"):
        with pytest.raises(VaeflowError) as info:
            run_job(bundle, job, str(src), str(dest), warehouse, model_version="7", run_id="abc")
        errors.append(str(info.value))
    assert errors[0] == errors[1], errors
    expected = {
        "zero bytes": "src.csv is empty",
        "header only": "src.csv has no rows to score",
        "ragged row": "src.csv is not a readable CSV",
        "word in numeric": "column 'x1' is numeric but holds the non-numeric value 'abc",
    }[damage]
    assert expected in errors[0], errors[0]
    assert dest.read_bytes() == before
    assert sorted(x.name for x in tmp_path.iterdir() if x.name.startswith("out")) == ["out.parquet"]
