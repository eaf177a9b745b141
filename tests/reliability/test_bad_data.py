"""Broken files, a full disk and values at the edge of float64: one clear error or a correct
result, never a traceback, a retry of what cannot pass, or a NaN that reads as "normal".

Before (issue 12): truncated or corrupt Parquet gave `ArrowInvalid` tracebacks and was retried
as transient, as was a full disk (`OSError`); `1e308` made `score` write NaN anomaly scores
with `is_anomaly=False` and `train` die with `LinAlgError`.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipelines.config import load_settings
from pipelines.scoring import samples_for
from tests.reliability.conftest import MODEL, assert_one_error, cli, files_state, score_args


def _score(trained, job, source, dest):
    return cli(*score_args(trained["params"], job, source, dest))


def _parquet(tmp_path, base_rows):
    path = tmp_path / "src.parquet"
    base_rows.to_parquet(path, row_group_size=100)
    return path


@pytest.mark.parametrize("damage", ["truncated", "garbage", "flipped footer", "empty file"])
def test_a_broken_parquet_file_is_one_error_and_not_retried(trained, tmp_path, base_rows, damage):
    path = _parquet(tmp_path, base_rows)
    data = path.read_bytes()
    broken = {
        "truncated": data[: len(data) // 2],
        "garbage": os.urandom(len(data)),
        "flipped footer": data[:-12] + bytes(b ^ 0xFF for b in data[-12:-4]) + data[-4:],
        "empty file": b"",
    }[damage]
    path.write_bytes(broken)
    dest = tmp_path / "out.parquet"
    for args in (
        ("score", "anomaly", "--model", MODEL, "--source", str(path), "--dest", str(dest)),
        ("train", "--source", str(path)),
    ):
        code, _, err = cli(*args, "--params", trained["params"])
        assert_one_error(code, err, "src.parquet")
        assert "retry" not in err
    assert not dest.exists()


def test_a_parquet_file_corrupt_in_its_last_row_group_keeps_the_previous_output(trained, tmp_path, base_rows):
    path = _parquet(tmp_path, base_rows)
    dest = tmp_path / "out.parquet"
    assert _score(trained, "embed", path, dest)[0] == 0
    meta = pq.ParquetFile(path).metadata.row_group(5).column(3)
    data = bytearray(path.read_bytes())
    start = meta.data_page_offset
    data[start : start + 64] = os.urandom(64)  # one page of the last row group
    path.write_bytes(bytes(data))
    before = files_state(dest)
    code, _, err = _score(trained, "embed", path, dest)
    if code != 0:  # some damage decodes to other numbers: then the output is simply rewritten
        assert_one_error(code, err, "src.parquet")
        assert files_state(dest) == before


def test_a_full_disk_is_one_error_not_a_retry_and_the_output_is_kept(
    trained, tmp_path, base_rows, monkeypatch
):
    dest = tmp_path / "out.parquet"
    assert _score(trained, "impute", "base", dest)[0] == 0
    before = files_state(tmp_path)

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", full)
    code, _, err = _score(trained, "impute", "base", dest)
    assert_one_error(code, err, "no space left", "out.parquet")
    assert "retry" not in err
    assert files_state(tmp_path) == before  # no temp file left either


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MB file system (tmpfs), when this machine lets us mount one (root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if not shutil.which("mount") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True
    ).returncode:
        pytest.skip("this machine cannot mount a tmpfs")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_really_full_disk(trained, small_disk):
    dest = small_disk / "out.csv"
    assert _score(trained, "impute", "base", dest)[0] == 0
    before = files_state(small_disk)
    filler = small_disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:  # fill the disk, then free a few kB: less than the output needs
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    os.truncate(filler, max(0, filler.stat().st_size - 16_384))
    code, _, err = _score(trained, "impute", "base", dest)
    assert_one_error(code, err, "no space left")
    assert files_state(dest) == {str(dest): before[str(dest)]}
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "out.csv"]


def test_values_at_the_edge_of_float64_train_and_score_to_finite_flagged_scores(trained, tmp_path, base_rows):
    odd = base_rows.astype({"distance": "float64"})
    odd.loc[[5, 50], "dep_delay"] = 1e308
    odd.loc[[7], "arr_delay"] = -1.7e308
    odd.loc[[9], "distance"] = np.finfo(np.float64).max
    src = tmp_path / "odd.csv"
    odd.to_csv(src, index=False)
    code, out, err = cli(
        "train", "--source", str(src), "--key", "rownames", "--name", "odd_vae", "--params", trained["params"]
    )
    assert code == 0, err[-3000:]
    for model, flagged in (("models:/odd_vae@champion", [5, 7, 9, 50]), (MODEL, [5, 7, 9, 50])):
        dest = tmp_path / "scores.parquet"
        code, _, err = cli(
            "score",
            "anomaly",
            "--model",
            model,
            "--source",
            str(src),
            "--dest",
            str(dest),
            "--params",
            trained["params"],
        )
        assert code == 0, err[-3000:]
        scores = pd.read_parquet(dest)
        assert np.isfinite(scores["anomaly_score"]).all()
        assert scores.loc[flagged, "is_anomaly"].all(), scores.loc[flagged]
        assert scores["anomaly_score"].rank(ascending=False).loc[flagged].max() <= 10
    for model in (MODEL, "models:/odd_vae@champion"):  # odd_vae's ranges reach beyond float32
        dest = tmp_path / "imp.csv"
        code, out, err = cli(
            "score", "impute", "--model", model, "--source", str(src), "--dest", str(dest), "--params", trained["params"]
        )  # fmt: skip
        assert code == 0, err[-3000:]
        k = samples_for(load_settings(trained["params"]).score, "impute", len(odd))
        assert k > 16 and out.strip().splitlines()[-1].endswith(f"K={k} importance samples per row)"), out
        imputed = pd.read_csv(dest)
        assert imputed.loc[[5, 50], "dep_delay"].tolist() == [1e308, 1e308]  # observed cells are kept
        assert (
            np.isfinite(imputed.select_dtypes("number").drop(columns=["dep_delay", "arr_delay", "distance"]))
            .all()
            .all()
        )
