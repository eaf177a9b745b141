"""Promotion gate and rollback against a real MLflow SQLite store (no training needed)."""

import mlflow
import pytest

from pipelines import registry
from pipelines.config import load_settings
from pipelines.errors import RegistryError


@pytest.fixture
def store(tmp_path):
    settings = load_settings(
        "params.yaml",
        [f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db", f"mlflow.artifact_location={tmp_path}/a"],
    )
    mlflow.set_tracking_uri(settings.tracking_uri)
    client = registry.get_client(settings)
    client.create_registered_model("m")
    exp = client.create_experiment("e", artifact_location=(tmp_path / "a").as_uri())

    def add_version(nll: float, validation: str | None = "passed") -> str:
        run = client.create_run(exp)
        client.log_metric(run.info.run_id, "eval_nll_per_cell", nll)
        mv = client.create_model_version("m", f"runs:/{run.info.run_id}/model", run.info.run_id)
        if validation is not None:
            client.set_model_version_tag("m", mv.version, "validation", validation)
        return str(mv.version)

    return settings, client, add_version


def test_first_version_is_champion_then_gate_decides(store):
    settings, client, add = store
    v1 = add(1.0)
    assert registry.promote(client, "m", v1, settings).promoted
    v2 = add(1.2)  # worse
    d2 = registry.promote(client, "m", v2, settings)
    assert not d2.promoted and d2.champion_value == 1.0 and d2.challenger_value == 1.2
    assert client.get_model_version_by_alias("m", "champion").version == int(v1)
    assert client.get_model_version_by_alias("m", "challenger").version == int(v2)
    v3 = add(0.8)  # better
    assert registry.promote(client, "m", v3, settings).promoted
    assert client.get_model_version_by_alias("m", "champion").version == int(v3)
    assert client.get_model_version("m", v2).tags["promotion.promoted"] == "False"


def test_margin_is_required(store):
    settings, client, add = store
    registry.promote(client, "m", add(1.0), settings)
    strict = settings.model_copy(
        update={"promotion": settings.promotion.model_copy(update={"min_improvement": 0.5})}
    )
    assert not registry.promote(client, "m", add(0.9), strict).promoted


def test_rollback_moves_champion_back_and_stops_at_the_first(store):
    settings, client, add = store
    v1 = add(1.0)
    registry.promote(client, "m", v1, settings)
    v2 = add(0.5)
    registry.promote(client, "m", v2, settings)
    assert registry.rollback(client, "m") == (v2, v1)
    assert client.get_model_version_by_alias("m", "champion").version == int(v1)
    with pytest.raises(RegistryError, match="no earlier champion"):
        registry.rollback(client, "m")


def test_unknown_model_and_alias_are_clear_errors(store):
    settings, client, add = store
    with pytest.raises(RegistryError, match="'nope' does not exist"):
        registry.resolve(client, "models:/nope@champion")
    add(1.0)
    with pytest.raises(RegistryError, match="no alias @champion"):
        registry.resolve(client, "models:/m@champion")
    with pytest.raises(RegistryError, match="malformed"):
        registry.resolve(client, "m@champion")


def test_version_without_recorded_checksums_is_refused(store):
    settings, client, add = store
    v = add(1.0)  # registered, but not by vaeflow: no artifact checksums, no model logged
    with pytest.raises(RegistryError, match=f"model m version {v} has no recorded artifact checksums"):
        registry.load_bundle(settings, f"models:/m/{v}")


def test_version_with_missing_artifacts_is_a_clear_error(store):
    settings, client, add = store
    v = add(1.0)
    client.set_model_version_tag("m", v, registry.ARTIFACTS_TAG, '{"MLmodel": "00"}')
    with pytest.raises(RegistryError, match=f"cannot download models:/m/{v}|artifact MLmodel is missing"):
        registry.load_bundle(settings, f"models:/m/{v}")


def test_a_version_without_a_validation_result_is_never_promoted(store):
    settings, client, add = store
    registry.promote(client, "m", add(1.0), settings)
    v2 = add(0.1, validation=None)  # far better, but nothing says it passed validation
    decision = registry.promote(client, "m", v2, settings)
    assert not decision.promoted and "validation not recorded" in decision.reason
    assert client.get_model_version_by_alias("m", "champion").version == 1


def test_unreachable_tracking_server_fails_fast_with_the_address():
    from pipelines.errors import TransientError

    settings = load_settings("params.yaml", ["mlflow.tracking_uri=http://user:secret@127.0.0.1:9"])
    with pytest.raises(TransientError, match="unreachable") as err:  # retried by the tasks
        registry.get_client(settings)
    assert "secret" not in str(err.value) and "127.0.0.1:9" in str(err.value)
