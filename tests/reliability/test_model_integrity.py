"""A registered model is loaded only as it was registered; promotion trusts nothing implicit.

Before (issue 12): a line appended to the logged `mlflow_model.py` ran on every scoring host;
an `MLmodel` whose artifact path pointed outside the model folder was loaded; a version without
a `validation` tag counted as passed; a model name with a quote broke the registry filter; the
promotion lock's connect had no timeout.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import pytest

from pipelines import registry
from pipelines.errors import RegistryError, TransientError
from tests.reliability.conftest import assert_one_error, cli, score_args


def _model_dir(trained) -> Path:
    settings = trained["settings"]
    client = mlflow.MlflowClient(settings.tracking_uri)
    mv = client.get_model_version("base_vae", "1")
    model_id = mv.source.removeprefix("models:/")
    return Path(urlparse(client.get_logged_model(model_id).artifact_location).path)


@contextlib.contextmanager
def _tampered(path: Path, data: bytes | None):
    """`path` holds `data` (None: removed) for the block, then its bytes are restored."""
    original = path.read_bytes() if path.exists() else None
    try:
        if data is None:
            path.unlink()
        else:
            path.write_bytes(data)
        yield
    finally:
        if original is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(original)


def _score(trained, tmp_path):
    dest = tmp_path / "emb.parquet"
    code, _, err = cli(*score_args(trained["params"], "embed", "base", dest))
    return code, err, dest


@pytest.mark.parametrize(
    "change",
    [
        "code appended",
        "weights replaced",
        "schema edited",
        "MLmodel redirected",
        "file added",
        "file removed",
    ],
)
def test_an_altered_model_artifact_is_refused_before_anything_runs(trained, tmp_path, change):
    model = _model_dir(trained)
    marker = tmp_path / "i-ran"
    (bundle,) = [p for p in (model / "artifacts").iterdir() if p.is_dir()]
    target, data, named = {
        "code appended": (
            model / "mlflow_model.py",
            (model / "mlflow_model.py").read_bytes() + f"\nopen({str(marker)!r}, 'w')\n".encode(),
            "mlflow_model.py",
        ),
        "weights replaced": (bundle / "weights.pt", b"not the weights", "weights.pt"),
        "schema edited": (
            bundle / "schema.json",
            (bundle / "schema.json").read_bytes().replace(b"numeric", b"binary", 1),
            "schema.json",
        ),
        "MLmodel redirected": (
            model / "MLmodel",
            (model / "MLmodel").read_bytes().replace(b"path: artifacts/", b"path: ../../../"),
            "MLmodel",
        ),
        "file added": (
            model / "sitecustomize.py",
            f"open({str(marker)!r}, 'w')\n".encode(),
            "sitecustomize.py",
        ),
        "file removed": (model / "requirements.txt", None, "requirements.txt"),
    }[change]
    assert _score(trained, tmp_path)[0] == 0
    with _tampered(target, data):
        code, err, _ = _score(trained, tmp_path)
        line = assert_one_error(code, err, named, "refusing to load")
    assert not marker.exists()
    assert "after registration" in line or "missing" in line
    assert _score(trained, tmp_path)[0] == 0  # restored: loads again


def test_an_mlmodel_pointing_outside_the_model_folder_is_refused(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "MLmodel").write_text(
        "flavors:\n  python_function:\n    artifacts:\n      bundle:\n        path: ../../etc\n"
    )
    with pytest.raises(RegistryError, match="outside the model folder"):
        registry.bundle_folder(model, "model m version 1")


def test_a_symbolic_link_in_a_model_is_refused(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "weights.pt").symlink_to("/etc/passwd")
    with pytest.raises(RegistryError, match="symbolic link"):
        registry.artifact_digests(tmp_path / "m")


def test_each_version_records_the_sha256_of_every_artifact(trained):
    client = mlflow.MlflowClient(trained["settings"].tracking_uri)
    record = json.loads(client.get_model_version("base_vae", "1").tags[registry.ARTIFACTS_TAG])
    assert {"MLmodel", "mlflow_model.py", "requirements.txt"} <= set(record)
    assert any(name.endswith("/weights.pt") for name in record)
    assert all(len(digest) == 64 for digest in record.values())


@pytest.mark.postgres
def test_the_promotion_lock_gives_up_on_a_dead_server_and_on_a_held_lock(trained):
    from tests.test_warehouse import PG_URL

    settings = trained["settings"]
    dead = settings.model_copy(
        update={
            "promotion": settings.promotion.model_copy(update={"lock_url": "postgresql://u@127.0.0.1:9/db"})
        }
    )
    start = time.monotonic()
    with (
        pytest.raises(TransientError, match="cannot connect to the promotion lock"),
        registry.promotion_lock(dead, "m"),
    ):
        pass
    assert time.monotonic() - start < 15
    held = settings.model_copy(
        update={
            "promotion": settings.promotion.model_copy(update={"lock_url": PG_URL, "lock_timeout_s": 1.0})
        }
    )
    with registry.promotion_lock(held, "m"):  # another promotion holds it ...
        start = time.monotonic()
        with pytest.raises(TransientError, match="promotions of m"), registry.promotion_lock(held, "m"):
            pass
        assert time.monotonic() - start < 10  # ... this one waits lock_timeout_s, then says so


def test_a_version_without_a_validation_result_is_never_promoted(trained):
    """A version registered outside vaeflow (no `validation` tag) cannot become champion."""
    settings = trained["settings"]
    client = registry.get_client(settings)
    name = "no_validation_record"
    client.create_registered_model(name)
    exp = client.get_experiment_by_name(settings.mlflow.experiment).experiment_id
    versions = []
    for nll, tagged in ((1.0, True), (0.1, False)):
        run_ = client.create_run(exp)
        client.log_metric(run_.info.run_id, "eval_nll_per_cell", nll)
        client.set_terminated(run_.info.run_id)
        mv = client.create_model_version(name, f"runs:/{run_.info.run_id}/model", run_.info.run_id)
        if tagged:
            client.set_model_version_tag(name, mv.version, "validation", "passed")
        versions.append(str(mv.version))
    assert registry.promote(client, name, versions[0], settings).promoted
    decision = registry.promote(client, name, versions[1], settings)  # far better, but unvalidated
    assert not decision.promoted and "validation not recorded" in decision.reason
    assert str(client.get_model_version_by_alias(name, "champion").version) == versions[0]
