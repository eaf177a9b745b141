"""The registry on a PostgreSQL backend store: two promotions racing leave it consistent."""

from __future__ import annotations

import json
import multiprocessing as mp
import time
import uuid

import psycopg
import pytest

from pipelines import registry
from pipelines.config import load_settings
from tests.test_warehouse import PG_URL

pytestmark = pytest.mark.postgres
ADMIN_URL = PG_URL.rsplit("/", 1)[0] + "/postgres"


@pytest.fixture
def pg_store(tmp_path):
    db = f"vaeflow_mlflow_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    uri = PG_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{db}"
    settings = load_settings(
        "params.yaml", [f"mlflow.tracking_uri={uri}", f"mlflow.artifact_location={tmp_path}/a"]
    )
    yield settings
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def _slow_score(uri: str, name: str, version: str) -> float:
    """The logged metric, after a pause that widens the read-compare-move window."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri, uri)
    run_id = client.get_model_version(name, version).run_id
    time.sleep(0.5)
    return client.get_run(run_id).data.metrics["eval_nll_per_cell"]


def _promote(uri: str, version: str, barrier) -> bool:
    from functools import partial

    settings = load_settings("params.yaml", [f"mlflow.tracking_uri={uri}"])
    client = registry.get_client(settings)
    client.search_registered_models()  # connect before the start line
    barrier.wait(timeout=120)  # both processes promote at the same moment
    return registry.promote(client, "m", version, settings, score=partial(_slow_score, uri, "m")).promoted


def test_two_promotions_at_once_leave_one_consistent_champion(pg_store):
    settings = pg_store
    uri = settings.tracking_uri
    client = registry.get_client(settings)
    client.create_registered_model("m")
    exp = client.create_experiment(
        "e", artifact_location=settings.path(settings.mlflow.artifact_location).as_uri()
    )
    versions = []
    for nll in (1.0, 0.8, 0.5):  # v3 is the best, v2 also beats v1
        run = client.create_run(exp)
        client.log_metric(run.info.run_id, "eval_nll_per_cell", nll)
        mv = client.create_model_version("m", f"runs:/{run.info.run_id}/model", run.info.run_id)
        client.set_model_version_tag("m", mv.version, "validation", "passed")
        versions.append(str(mv.version))
    assert registry.promote(client, "m", versions[0], settings).promoted

    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager, ctx.Pool(2) as pool:
        barrier = manager.Barrier(2)
        promoted = pool.starmap(_promote, [(uri, versions[1], barrier), (uri, versions[2], barrier)])

    champion = client.get_model_version_by_alias("m", "champion")
    assert champion.version == 3  # never the worse of the two racers
    events = json.loads(client.get_registered_model("m").tags[registry.HISTORY_TAG])
    history = [e["version"] for e in events]
    assert history[0] == "1" and history[-1] == "3"
    assert len(history) == 1 + sum(promoted)  # no promotion lost from the history
    for v, ok in zip(versions[1:], promoted, strict=True):
        tags = client.get_model_version("m", v).tags
        assert tags["promotion.promoted"] == str(ok)
        assert float(tags["promotion.challenger_value"]) in (0.8, 0.5)
    rolled_from, rolled_to = registry.rollback(client, "m", settings)
    assert rolled_from == "3" and rolled_to == history[-2]
