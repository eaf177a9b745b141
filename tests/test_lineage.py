"""Snapshot lineage in DVC: committed by hash, pushed when there is a remote, restored byte for byte."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from pipelines import lineage, registry
from pipelines.config import load_settings
from pipelines.errors import SourceError
from tests.conftest import small_params
from tests.test_cli import vaeflow


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` by relative path, with its bytes."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _snapshot(root: Path, name: str = "tiny") -> Path:
    """A snapshot-shaped folder: three tiny Parquet splits, schema.json, manifest.json."""
    folder = root / "data" / "snapshots" / name
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in ("train", "val", "eval"):
        pd.DataFrame({"x": rng.normal(size=5), "c": list("abcab")}).to_parquet(folder / f"{split}.parquet")
    (folder / "schema.json").write_text(json.dumps({"columns": ["x", "c"]}))
    (folder / "manifest.json").write_text(json.dumps({"source": "tiny.csv", "name": name}))
    return folder


def _spoil(folder: Path) -> None:
    """Change, add and remove files, as a re-ingest or a careless hand would."""
    (folder / "manifest.json").write_text("{}")
    (folder / "eval.parquet").unlink()
    (folder / "extra.txt").write_text("not trained on")


def _set_remote(root: Path, url: Path) -> None:
    from dvc.repo import Repo

    with Repo(str(root)) as repo, repo.config.edit() as conf:
        conf["remote"]["store"] = {"url": str(url)}
        conf["core"]["remote"] = "store"


@pytest.fixture
def settings(tmp_path):
    return load_settings(small_params(tmp_path))


def test_commit_then_restore_by_hash_is_byte_identical(tmp_path, settings):
    folder = _snapshot(tmp_path)
    original = _files(folder)
    tags = lineage.snapshot_tags(folder, settings)
    dvc_hash = tags[lineage.DVC_TAG]
    assert dvc_hash.endswith(".dir") and len(dvc_hash) == 36
    assert tags[lineage.REMOTE_TAG] == "not pushed: no default DVC remote"
    assert (tmp_path / ".dvc" / "config").is_file()  # no .dvc: one initialised at the project root
    assert lineage.commit_snapshot(folder, settings) == dvc_hash  # content-addressed: idempotent
    _spoil(folder)
    assert lineage.commit_snapshot(folder, settings) != dvc_hash
    dest = lineage.restore_snapshot(dvc_hash, tmp_path / "back", settings)
    assert _files(dest) == original


def test_restore_pulls_from_the_remote_and_dvc_reads_the_same_hash(tmp_path, settings):
    folder = _snapshot(tmp_path)
    original = _files(folder)
    lineage.commit_snapshot(folder, settings)
    _set_remote(tmp_path, tmp_path / "remote")
    tags = lineage.snapshot_tags(folder, settings)
    assert tags[lineage.REMOTE_TAG] == "pushed to store"
    shutil.rmtree(tmp_path / ".dvc" / "cache")
    _spoil(folder)
    assert _files(lineage.restore_snapshot(tags[lineage.DVC_TAG], tmp_path / "back", settings)) == original
    # the documented raw equivalent: a .dvc file holding the hash, then `dvc pull`
    shutil.rmtree(tmp_path / ".dvc" / "cache")
    (tmp_path / "raw.dvc").write_text(f"outs:\n- md5: {tags[lineage.DVC_TAG]}\n  hash: md5\n  path: raw\n")
    dvc = str(Path(sys.executable).with_name("dvc"))
    proc = subprocess.run([dvc, "pull", "raw.dvc"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert _files(tmp_path / "raw") == original


def test_push_failure_and_dvc_failures_never_fail_training(tmp_path, settings, monkeypatch):
    folder = _snapshot(tmp_path)
    (tmp_path / "not_a_folder").write_text("x")
    lineage.commit_snapshot(folder, settings)
    _set_remote(tmp_path, tmp_path / "not_a_folder")
    tags = lineage.snapshot_tags(folder, settings)
    assert tags[lineage.DVC_TAG].endswith(".dir")  # committed locally all the same
    assert tags[lineage.REMOTE_TAG].startswith("not pushed: push to store failed: ")
    missing = tmp_path / "data" / "snapshots" / "gone"
    assert lineage.snapshot_tags(missing, settings)[lineage.SKIPPED_TAG].startswith("commit failed: ")
    off = settings.model_copy(update={"snapshot": settings.snapshot.model_copy(update={"dvc": "off"})})
    assert lineage.snapshot_tags(folder, off) == {lineage.SKIPPED_TAG: "snapshot.dvc=off"}
    required = settings.model_copy(
        update={"snapshot": settings.snapshot.model_copy(update={"dvc": "required"})}
    )
    with pytest.raises(SourceError, match="does not exist"):
        lineage.snapshot_tags(missing, required)


def test_restore_never_overwrites_a_non_empty_folder(tmp_path, settings):
    folder = _snapshot(tmp_path)
    dvc_hash = lineage.commit_snapshot(folder, settings)
    dest = tmp_path / "busy"
    (dest / "sub").mkdir(parents=True)
    (dest / "sub" / "keep.txt").write_text("mine")
    before = _files(dest)
    with pytest.raises(SourceError, match="not an empty folder"):
        lineage.restore_snapshot(dvc_hash, dest, settings)
    assert _files(dest) == before and sorted(p.name for p in tmp_path.iterdir() if "busy" in p.name) == [
        "busy"
    ]
    (tmp_path / "empty").mkdir()  # an empty folder is fine
    assert _files(lineage.restore_snapshot(dvc_hash, tmp_path / "empty", settings)) == _files(folder)


def test_cli_restores_a_registered_version_and_refuses_one_without_the_tag(tmp_path, settings):
    folder = _snapshot(tmp_path)
    original = _files(folder)
    tags = lineage.snapshot_tags(folder, settings)
    client = registry.get_client(settings)
    mlflow.set_tracking_uri(settings.tracking_uri)
    client.create_registered_model("m")
    run = client.create_run(client.create_experiment("e", artifact_location=(tmp_path / "a").as_uri()))
    for version_tags in ({**tags, "vaeflow.snapshot": "tiny"}, {"vaeflow.snapshot": "tiny"}):
        mv = client.create_model_version("m", f"runs:/{run.info.run_id}/model", run.info.run_id)
        for key, value in version_tags.items():
            client.set_model_version_tag("m", mv.version, key, value)
    _spoil(folder)
    params = str(tmp_path / "params.yaml")
    code, out, err = vaeflow(None, "snapshot", "restore", "models:/m/1", "--params", params)
    assert code == 0, err
    assert tags[lineage.DVC_TAG] in out
    assert _files(tmp_path / "restored" / "m" / "v1" / "tiny") == original
    code, _, err = vaeflow(None, "snapshot", "restore", "models:/m/2", "--params", params)
    assert code == 2 and err.startswith("error: m version 2 has no vaeflow.dvc_md5 tag"), err
    client.set_registered_model_alias("m", "champion", "1")
    before = _files(folder)
    with pytest.raises(SourceError, match="not an empty folder"):
        lineage.restore_version(settings, "models:/m@champion", folder)
    assert _files(folder) == before
    restored = lineage.restore_version(settings, "models:/m@champion", tmp_path / "by_alias")
    assert restored.version == "1" and _files(restored.path) == original


@pytest.mark.slow
def test_a_cli_trained_version_restores_its_snapshot_byte_for_byte(tmp_path, flights):
    params = str(small_params(tmp_path))
    source = tmp_path / "small.csv"
    flights.head(600).to_csv(source, index=False)
    code, out, err = vaeflow(None, "train", "--source", str(source), "--key", "rownames", "--params", params)
    assert code == 0, err
    settings = load_settings(params)
    mv = registry.get_client(settings).get_model_version("small_vae", "1")
    snapshot = settings.path(settings.snapshot.dir) / mv.tags["vaeflow.snapshot"]
    trained_on = _files(snapshot)
    assert mv.tags[lineage.DVC_TAG].endswith(".dir") and mv.tags[lineage.REMOTE_TAG].startswith("not pushed")
    _spoil(snapshot)
    dest = tmp_path / "back"
    code, out, err = vaeflow(
        None, "snapshot", "restore", "models:/small_vae/1", "--to", str(dest), "--params", params
    )
    assert code == 0, err
    assert _files(dest) == trained_on
