"""dvc.yaml as a user runs it: its outputs follow the configured table, and `dvc repro` runs
each `vaeflow stage` command on a table that is not the packaged default."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.config import settings_view
from tests.conftest import REPO, small_params

BIN = Path(sys.executable).parent


def _dvc_project(root: Path) -> None:
    """`root` as a DVC project running this checkout's code: dvc.yaml, and the code it depends on."""
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    for code in ("pipelines", "vae_models"):
        (root / code).symlink_to(REPO / code)
    subprocess.run([str(BIN / "dvc"), "init", "--no-scm", "-q"], cwd=root, check=True)


def test_dvc_yaml_outputs_follow_the_configured_table(tmp_path):
    from dvc.repo import Repo

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["source"], params["mlflow"]["model_name"] = "sales", "sales_vae"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    _dvc_project(tmp_path)
    with Repo(str(tmp_path)) as repo:
        outs = {s.name: sorted(str(o) for o in s.outs) for s in repo.index.stages}
    assert outs == {
        "ingest": ["data/snapshots/sales"],
        "validate": ["reports/sales/validation.json"],
        "train": [
            "data/models/sales_vae",
            "reports/sales/column_error.csv",
            "reports/sales/loss.csv",
            "reports/sales/metrics.json",
        ],
        "score": ["reports/sales/score.json"],
    }
    assert "flights" not in (REPO / "dvc.yaml").read_text().split("stages:", 1)[1]


def test_dvc_yaml_params_are_what_each_stage_reads():
    """dvc.yaml's params per stage == the sections its `vaeflow stage` command may read (reading
    another raises UndeclaredSection, see test_a_stage_reading_an_undeclared_section_fails), and
    each stage function it runs declares no section beyond them."""
    from pipelines import stages
    from pipelines.cli import DVC_PARAMS

    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    declared = {
        name: sorted(p if isinstance(p, str) else next(iter(p)) for p in s["params"])
        for name, s in dvc.items()
    }
    assert declared == {name: sorted(sections) for name, sections in DVC_PARAMS.items()}
    runs = {
        "ingest": [stages.seed, stages.snapshot],
        "validate": [stages.validate],
        "train": [stages.train, stages.promote, stages.champion_outputs],
        "score": [stages.score, stages.score_partition],
    }
    for name, fns in runs.items():
        for fn in fns:
            assert set(fn.reads) <= set(DVC_PARAMS[name]), (name, fn.stage_name, fn.reads)


PeekSettings = settings_view("PeekSettings", "model")  # a stage's annotation is looked up in its module


def test_a_stage_reading_an_undeclared_section_fails(tmp_path):
    from pipelines.config import UndeclaredSection, load_settings
    from pipelines.stages import stage

    settings = load_settings(small_params(tmp_path))

    @stage("peek")
    def peek(settings: PeekSettings):
        return settings.model.latent_dim, settings.train.max_epochs

    assert peek.reads == ("model",)
    with pytest.raises(UndeclaredSection, match=r"PeekSettings read settings.train.*add 'train'"):
        peek(settings)
    assert settings.train.max_epochs == 2  # the whole Settings still reads every section

    with pytest.raises(TypeError, match="first parameter must be `settings: <a settings_view>`"):

        @stage("untyped")
        def untyped(settings):
            return settings


def test_a_dvc_stage_refuses_a_source_it_cannot_name(tmp_path, flights):
    csv = tmp_path / "t.csv"
    flights.head(50).to_csv(csv, index=False)
    params = small_params(tmp_path, data={"source": str(csv)})
    proc = subprocess.run(
        [str(BIN / "vaeflow"), "stage", "ingest", "--params", str(params)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("error: dvc.yaml names the DVC stages' outputs after data.source") and "t.csv" in last
    )
    assert not (tmp_path / "data" / "snapshots").exists()  # nothing written


@pytest.mark.slow
def test_dvc_repro_runs_every_stage_on_another_table(project):
    root = project.parent
    _dvc_project(root)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PREFECT_LOGGING_LEVEL": "WARNING"}
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    # a new table's suite is built once and reviewed, then validate runs against it
    rebuild = [
        str(BIN / "vaeflow"),
        "validate",
        "--source",
        "flights_small",
        "--key",
        "rownames",
        "--rebuild",
    ]
    subprocess.run(rebuild, cwd=root, env=env, check=True, capture_output=True, timeout=300)
    proc = subprocess.run(
        [str(BIN / "dvc"), "repro"], cwd=root, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    for stage in ("ingest", "validate", "train", "score"):
        assert f"Running stage '{stage}'" in proc.stdout
    reports = root / "reports" / "flights_small"
    assert json.loads((reports / "validation.json").read_text())["success"]
    assert json.loads((reports / "metrics.json").read_text())["eval_nll_per_cell"] > 0
    assert {r["job"] for r in json.loads((reports / "score.json").read_text())} == {
        "impute",
        "anomaly",
        "embed",
        "sample",
    }
    assert (root / "data" / "models" / "flights_small_vae").is_dir()
    status = subprocess.run(
        [str(BIN / "dvc"), "status", "train", "score"], cwd=root, env=env, capture_output=True, text=True
    )
    assert "up to date" in status.stdout, status.stdout  # the lock records what ran
    first = json.loads((reports / "metrics.json").read_text())
    assert first["model_version"] == 1

    # a retrain whose challenger is refused: DVC's train outputs stay the champion's, as in the registry
    params = yaml.safe_load(project.read_text())
    params["promotion"]["min_improvement"] = 1000.0
    project.write_text(yaml.safe_dump(params))
    proc = subprocess.run(
        [str(BIN / "dvc"), "repro", "train"], cwd=root, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "registered flights_small_vae v2" in proc.stdout and "the champion, v1" in proc.stdout
    assert json.loads((reports / "metrics.json").read_text()) == first
    model = json.loads((root / "data" / "models" / "flights_small_vae" / "model.json").read_text())
    assert model["extra"]["run_id"] == first_run_id(root)


def first_run_id(root: Path) -> str:
    """The run behind version 1 of the test's model."""
    import mlflow

    store = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    return client.get_model_version("flights_small_vae", "1").run_id
