"""Secrets never stored or printed: one redaction rule, credentials from the environment or
a Prefect Secret block.

Before (issue 12): a password in a query string (`?password=X`) was stored in plain text as the
MLflow param `warehouse.url`; tokens in `https://tok@host` and `:secret@` URLs were not
redacted; `vaeflow run` printed the warehouse and tracking URLs unredacted; three redaction
functions disagreed.
"""

from __future__ import annotations

import uuid

import mlflow
import psycopg
import pytest

from pipelines.config import load_settings
from pipelines.credentials import redact
from pipelines.warehouse import parse_ref, write_table
from tests.conftest import small_params
from tests.reliability.conftest import cli, run
from tests.test_warehouse import PG_URL

SECRET = "s3cr3t-Pw-42"


@pytest.mark.parametrize(
    "text",
    [
        f"postgresql://user:{SECRET}@db:5432/wh",
        f"postgresql://user@db/wh?password={SECRET}",
        f"postgresql://user@db/wh?sslmode=require&password={SECRET}&application_name=x",
        f"postgresql://db/wh?user=u;password={SECRET}",
        f"https://{SECRET}@mlflow.example.com",
        f"https://:{SECRET}@mlflow.example.com/api",
        f"http://mlflow:5000/?token={SECRET}",
        f"s3://bucket/x?X-Amz-Signature={SECRET}&X-Amz-Credential={SECRET}",
        f"host=db dbname=wh password={SECRET}",
        f"host=db password='{SECRET}' user=u",
        f"cannot connect to postgresql://u:{SECRET}@h/db: refused (also postgres://a:{SECRET}@b)",
    ],
)
def test_redact_removes_every_credential(text):
    out = redact(text)
    assert SECRET not in out and "***" in out
    assert redact(out) == out  # idempotent


def test_redact_leaves_plain_text_alone():
    for text in (
        "duckdb:///data/warehouse.duckdb#flights",
        "sqlite:///mlflow.db",
        "http://mlflow:5000",
        "a=b?c",
    ):
        assert redact(text) == text


@pytest.fixture
def pg_base(base_rows):
    table = f"sec_{uuid.uuid4().hex[:8]}"
    write_table(parse_ref(f"{PG_URL}#{table}", "duckdb:///unused"), [base_rows])
    yield table
    with psycopg.connect(PG_URL, autocommit=True) as con:
        con.execute(f'DROP TABLE IF EXISTS public."{table}"')


def _everything_mlflow_stored(settings, model: str) -> str:
    client = mlflow.MlflowClient(settings.tracking_uri)
    exp = client.get_experiment_by_name(settings.mlflow.experiment)
    blob = ""
    for r in client.search_runs([exp.experiment_id]):
        blob += repr(r.data.params) + repr(r.data.tags)
    for mv in client.search_model_versions(f"name='{model}'"):
        blob += repr(mv.tags) + repr(mv.description)
    return blob


@pytest.mark.slow
@pytest.mark.postgres
def test_no_password_reaches_mlflow_logs_or_the_terminal(tmp_path, pg_base, monkeypatch):
    """The test server trusts local connections, so any password works."""
    url = PG_URL.replace("postgresql://postgres@", f"postgresql://postgres:{SECRET}@") + f"?password={SECRET}"
    params = small_params(
        tmp_path, data={"source": pg_base}, warehouse={"url": url}, mlflow={"model_name": "sec_vae"}
    )
    code, out, err = cli("train", "--source", pg_base, "--key", "rownames", "--params", str(params))
    assert code == 0, err[-3000:]
    assert SECRET not in out + err
    settings = load_settings(params)
    stored = _everything_mlflow_stored(settings, "sec_vae")
    assert "***" in stored and SECRET not in stored


@pytest.mark.postgres
def test_a_credential_can_come_from_an_environment_variable(trained, pg_base, tmp_path):
    dest = tmp_path / "emb.parquet"
    env = {"WAREHOUSE_URL_WITH_PASSWORD": PG_URL.replace("postgres@", f"postgres:{SECRET}@")}
    code, out, err = cli(
        "score", "embed", "--model", "models:/base_vae@champion", "--source", pg_base, "--dest", str(dest),
        "--params", trained["params"], "--set", "warehouse.url=${WAREHOUSE_URL_WITH_PASSWORD}", env=env,
    )  # fmt: skip
    assert code == 0, err[-3000:]
    assert dest.exists() and SECRET not in out + err
    code, _, err = cli("score", "embed", "--model", "models:/base_vae@champion", "--source", pg_base,
                       "--dest", str(dest), "--params", trained["params"], "--set", "warehouse.url=${NOT_SET_ANYWHERE}")  # fmt: skip
    assert code == 2 and "NOT_SET_ANYWHERE" in err and "not set" in err


@pytest.mark.slow
@pytest.mark.postgres
def test_a_credential_can_come_from_a_prefect_secret_block(trained, pg_base, tmp_path, prefect_api):
    from prefect.blocks.system import Secret

    block = f"wh-{uuid.uuid4().hex[:8]}"
    Secret(value=PG_URL.replace("postgres@", f"postgres:{SECRET}@")).save(block)
    dest = tmp_path / "emb.parquet"
    code, out, err = run(
        "score", "embed", "--model", "models:/base_vae@champion", "--source", pg_base, "--dest", str(dest),
        "--params", trained["params"], "--set", f"warehouse.url='{{{{ prefect.blocks.secret.{block} }}}}'",
        env={"PREFECT_API_URL": prefect_api},
    )  # fmt: skip
    assert code == 0, err[-3000:]
    assert dest.exists() and SECRET not in out + err


@pytest.mark.slow
@pytest.mark.postgres
def test_vaeflow_run_prints_no_secret_and_leaves_no_server(tmp_path, pg_base):
    url = PG_URL.replace("postgresql://postgres@", f"postgresql://postgres:{SECRET}@") + f"?password={SECRET}"
    params = small_params(
        tmp_path, data={"source": pg_base}, warehouse={"url": url}, mlflow={"model_name": "run_vae"},
        score={"jobs": ["embed"], "dest_template": str(tmp_path / "{source}_{job}.parquet")},
    )  # fmt: skip
    code, out, err = run("run", "--params", str(params), timeout=900)
    assert code == 0, err[-3000:]
    assert SECRET not in out + err
    assert "vaeflow run finished" in out and "postgresql://***@" in out
    assert (tmp_path / f"{pg_base}_embed.parquet").exists()
