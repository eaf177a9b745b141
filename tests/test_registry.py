"""Promotion gate and rollback against a real MLflow SQLite store (no training needed)."""

import getpass
import json

import mlflow
import numpy as np
import pytest

from pipelines import registry
from pipelines.config import load_settings
from pipelines.errors import RegistryError
from pipelines.registry import Measurement

# one version's data, params and code
LINEAGE = {
    "vaeflow.snapshot_md5": "d1",
    "vaeflow.params_hash": "p1",
    "vaeflow.git_commit": "c1",
    "vaeflow.code_version": "0.1",
}


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

    def add_version(
        nll: float, validation: str | None = "passed", se: float | None = None, tags: dict | None = None
    ) -> str:
        run = client.create_run(exp)
        client.log_metric(run.info.run_id, "eval_nll_per_cell", nll)
        if se is not None:
            client.log_metric(run.info.run_id, "eval_nll_per_cell_se", se)
        mv = client.create_model_version("m", f"runs:/{run.info.run_id}/model", run.info.run_id)
        if validation is not None:
            client.set_model_version_tag("m", mv.version, "validation", validation)
        for key, value in (tags or {}).items():
            client.set_model_version_tag("m", mv.version, key, value)
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


# ---------------------------------------------------------------- the noise-aware gate


def _rows(n: int = 400, seed: int = 0) -> np.ndarray:
    """A champion's per-row NLL per cell on an evaluation split (skewed, as real rows are)."""
    return 1.7 + np.random.default_rng(seed).gamma(2.0, 0.15, n)


def _retrain(champion: np.ndarray, improvement: float, spread: float = 0.1, seed: int = 1) -> np.ndarray:
    """Another model on the same rows: each row moves by noise, the mean by `improvement`."""
    noise = np.random.default_rng(seed).normal(0.0, spread, champion.size)
    return champion + noise - noise.mean() - improvement


def _measure(rows: np.ndarray) -> Measurement:
    return Measurement(float(rows.mean()), rows=rows)


def test_gate_refuses_an_improvement_within_the_noise_and_passes_a_clear_one():
    champion = _rows()
    retrain = _retrain(champion, 0.004)  # SE of the paired differences ~ 0.1 / sqrt(400) = 0.005
    noisy = registry.gate(_measure(retrain), _measure(champion), 0.0, 2.0)
    d = champion - retrain
    assert noisy.improvement == pytest.approx(0.004) and noisy.method == "paired over 400 eval rows"
    assert noisy.se == pytest.approx(d.std(ddof=1) / np.sqrt(d.size))
    assert noisy.margin == pytest.approx(2 * noisy.se) and not noisy.passed
    assert registry.gate(_measure(retrain), _measure(champion), 0.0, 0.0).passed  # what min_improvement 0 did
    better = _retrain(champion, 0.05)
    assert registry.gate(_measure(better), _measure(champion), 0.0, 2.0).passed
    # min_improvement is a fixed margin on top of the noise allowance
    assert not registry.gate(_measure(better), _measure(champion), 0.05, 2.0).passed


def test_gate_without_rows_combines_logged_ses_and_without_any_uses_the_fixed_margin():
    g = registry.gate(Measurement(0.992, se=0.003), Measurement(1.0, se=0.004), 0.0, 2.0)
    assert g.se == pytest.approx(0.005) and g.margin == pytest.approx(0.01) and not g.passed
    bare = registry.gate(Measurement(0.99), Measurement(1.0, se=float("nan")), 0.001, 2.0)
    assert bare.se is None and bare.margin == 0.001 and bare.passed
    # rows of different evaluation splits are not paired: each one's own SE counts
    a, b = _rows(300), _rows(400, seed=2)
    unpaired = registry.gate(_measure(a), _measure(b), 0.0, 2.0)
    assert unpaired.se == pytest.approx(np.hypot(_measure(a).se, _measure(b).se))
    # a champion that cannot score the snapshot any more loses to any challenger that can
    assert registry.gate(_measure(a), Measurement(float("inf")), 0.0, 2.0).passed
    assert not registry.gate(Measurement(float("inf")), _measure(a), 0.0, 2.0).passed


def test_evaluation_gives_the_gate_per_row_values_and_an_se():
    from pipelines import training
    from tests.helpers import linear_table, train_small
    from vae_models.bundle import ModelBundle

    df = linear_table(600)
    module, schema = train_small(df, epochs=1)
    settings = load_settings("params.yaml", ["evaluation.importance_samples=4", "score.importance_samples=4"])
    ev = training.evaluate(ModelBundle(vae=module.vae, schema=schema), df.iloc[:300], df.iloc[300:], settings)
    rows = ev.per_row["eval_nll_per_cell"]
    assert rows.shape == (300,)
    assert rows.mean() == pytest.approx(ev.metrics["eval_nll_per_cell"], rel=1e-4)
    assert ev.metrics["eval_nll_per_cell_se"] == pytest.approx(rows.std(ddof=1) / np.sqrt(300), rel=1e-4)
    assert ev.per_row["eval_nll_per_row"].mean() == pytest.approx(ev.metrics["eval_nll_per_row"], rel=1e-4)


def test_a_retrain_within_the_logged_ses_is_refused_and_its_tags_say_why(store):
    settings, client, add = store
    registry.promote(client, "m", add(1.0, se=0.004), settings)
    v2 = add(0.994, se=0.004)  # 0.006 better, within 2 x sqrt(0.004^2 + 0.004^2) = 0.0113
    d2 = registry.promote(client, "m", v2, settings)
    assert not d2.promoted and d2.se == pytest.approx(np.hypot(0.004, 0.004))
    tags = client.get_model_version("m", v2).tags
    assert float(tags["promotion.se"]) == pytest.approx(d2.se)
    assert float(tags["promotion.margin"]) == pytest.approx(2 * d2.se)
    assert float(tags["promotion.improvement"]) == pytest.approx(0.006)
    assert tags["promotion.status"] == "refused" and tags["promotion.challenger_value"] == "0.994"
    for text in ("0.99400", "champion v1 1.00000", "margin 0.01131", "2 x SE 0.00566", "does not improve"):
        assert text in tags["promotion.reason"], tags["promotion.reason"]
    v3 = add(0.95, se=0.004)
    assert registry.promote(client, "m", v3, settings).promoted
    assert client.get_model_version("m", "1").tags["promotion.status"] == "superseded"


def test_rescored_versions_are_compared_row_by_row(store):
    settings, client, add = store
    versions = [add(5.0) for _ in range(3)]  # the logged metric is not what the gate reads here
    champion = _rows()
    scored = dict(zip(versions, [champion, _retrain(champion, 0.004), _retrain(champion, 0.05)], strict=True))

    def score(version: str) -> Measurement:
        return _measure(scored[version])

    v1, v2, v3 = versions
    registry.promote(client, "m", v1, settings, score)
    d2 = registry.promote(client, "m", v2, settings, score)
    assert not d2.promoted and d2.improvement == pytest.approx(0.004)
    assert (
        "re-scored on the same evaluation snapshot" in d2.reason and "paired over 400 eval rows" in d2.reason
    )
    assert str(client.get_registered_model("m").aliases["challenger"]) == v2
    d3 = registry.promote(client, "m", v3, settings, score)
    assert d3.promoted and d3.margin < d3.improvement
    # the new champion is not also the challenger; the refused v2 lost that alias to v3
    assert {k: str(v) for k, v in client.get_registered_model("m").aliases.items()} == {"champion": v3}


# ---------------------------------------------------------------- rollback


def _two_champions(store) -> tuple[str, str]:
    settings, client, add = store
    v1, v2 = add(1.0), add(0.5)
    registry.promote(client, "m", v1, settings)
    assert registry.promote(client, "m", v2, settings).promoted
    return v1, v2


def test_after_a_rollback_aliases_tags_and_history_tell_one_story(store):
    settings, client, _ = store
    v1, v2 = _two_champions(store)
    client.set_registered_model_alias("m", "challenger", v2)  # as earlier versions of vaeflow left it
    assert registry.rollback(client, "m", settings, reason="imputations off by 10x", by="alice") == (v2, v1)
    assert {k: str(v) for k, v in client.get_registered_model("m").aliases.items()} == {"champion": v1}
    tags = client.get_model_version("m", v2).tags
    assert tags["promotion.status"] == "rolled_back" and tags["promotion.promoted"] == "False"
    assert tags["promotion.rolled_back"] == "True" and tags["promotion.rolled_back_to"] == v1
    assert (
        tags["promotion.rollback_reason"] == "imputations off by 10x"
        and tags["promotion.rollback_by"] == "alice"
    )
    assert client.get_model_version("m", v1).tags["promotion.status"] == "champion"
    events = registry.history(client, "m")
    assert [(e["version"], e["action"]) for e in events] == [
        (v1, "promote"),
        (v2, "promote"),
        (v2, "rollback"),
    ]
    last = events[-1]
    assert last["to"] == v1 and last["reason"] == "imputations off by 10x" and last["by"] == "alice"
    assert last["time"].endswith("+00:00")


def test_a_rolled_back_version_stays_out_until_forced_with_a_reason(store):
    settings, client, _ = store
    v1, v2 = _two_champions(store)
    registry.rollback(client, "m", settings, reason="bad scores")
    with pytest.raises(
        RegistryError, match=rf"version {v2} was rolled back .*'bad scores'.*--force --reason"
    ):
        registry.promote(client, "m", v2, settings, by="bob")
    assert client.get_model_version_by_alias("m", "champion").version == int(v1)
    assert client.get_model_version("m", v2).tags["promotion.status"] == "rolled_back"  # untouched
    with pytest.raises(RegistryError, match="needs a reason"):
        registry.promote(client, "m", v2, settings, force=True, reason=" ")
    d = registry.promote(client, "m", v2, settings, force=True, reason="scores checked by hand", by="bob")
    assert d.promoted and d.forced and "forced by bob: scores checked by hand" in d.reason
    assert client.get_model_version_by_alias("m", "champion").version == int(v2)
    tags = client.get_model_version("m", v2).tags
    assert tags["promotion.rolled_back"] == "False" and "promotion.rolled_back_to" not in tags
    assert tags["promotion.status"] == "champion" and tags["promotion.forced"] == "True"
    assert (
        tags["promotion.request_reason"] == "scores checked by hand"
        and tags["promotion.requested_by"] == "bob"
    )
    assert "promotion.champion_value" not in tags  # the numbers of the gate it passed before are gone
    event = registry.history(client, "m")[-1]
    assert (event["version"], event["action"], event["reason"], event["by"]) == (
        v2,
        "force",
        "scores checked by hand",
        "bob",
    )
    assert registry.rollback(client, "m", settings, reason="again") == (v2, v1)


def test_force_never_overrides_a_failed_validation(store):
    settings, client, add = store
    registry.promote(client, "m", add(1.0), settings)
    v2 = add(0.1, validation="failed")
    d = registry.promote(client, "m", v2, settings, force=True, reason="trust me")
    assert not d.promoted and "not even with --force" in d.reason


def test_a_nightly_rerun_of_a_rolled_back_version_is_not_promoted(store):
    settings, client, add = store
    lineage = dict(LINEAGE)
    registry.promote(client, "m", add(1.0, tags={**lineage, "vaeflow.snapshot_md5": "d0"}), settings)
    v2 = add(0.5, tags=lineage)
    assert registry.promote(client, "m", v2, settings).promoted
    registry.rollback(client, "m", settings, reason="bad")
    v3 = add(0.5, tags=lineage)  # the next nightly retrain: same data, params and code as v2
    d3 = registry.promote(client, "m", v3, settings)
    assert not d3.promoted and f"same data, params and code as v{v2}, which was rolled back" in d3.reason
    assert client.get_model_version_by_alias("m", "champion").version == 1
    v4 = add(0.5, tags={**lineage, "vaeflow.snapshot_md5": "d2"})  # new data: the gate decides again
    assert registry.promote(client, "m", v4, settings).promoted


def test_a_rerun_of_the_champion_is_not_promoted_on_training_noise(store):
    """The issue's case: a retrain on identical data, params and code scored 0.0058 better by
    chance. A rerun is refused whatever its score; new data goes through the gate again."""
    settings, client, add = store
    lineage = dict(LINEAGE)
    v1 = add(1.0, tags=lineage)
    registry.promote(client, "m", v1, settings)
    v2 = add(0.5, tags=lineage)
    d2 = registry.promote(client, "m", v2, settings)
    assert not d2.promoted and f"same data, params and code as champion v{v1}" in d2.reason
    assert client.get_model_version_by_alias("m", "champion").version == int(v1)
    assert client.get_model_version("m", v2).tags["promotion.status"] == "refused"
    v3 = add(0.5, tags={**lineage, "vaeflow.snapshot_md5": "d2"})
    assert registry.promote(client, "m", v3, settings).promoted
    untracked = add(0.2, tags={k: v for k, v in lineage.items() if k != "vaeflow.snapshot_md5"})
    assert (
        "same data" not in registry.promote(client, "m", untracked, settings).reason
    )  # unknown data: the gate


def test_a_registry_from_before_still_rolls_back_and_keeps_rolled_back_versions_out(store):
    settings, client, add = store
    v1, v2, v3 = add(1.0), add(0.8), add(0.5)
    # as the earlier code left it: versions as a list, v2 rolled back to v1, then v3 promoted
    client.set_registered_model_tag("m", registry.HISTORY_TAG, json.dumps([v1, v3]))
    client.set_model_version_tag("m", v2, "promotion.rolled_back_to", v1)
    client.set_model_version_tag("m", v2, "promotion.promoted", "True")
    for alias in ("champion", "challenger"):
        client.set_registered_model_alias("m", alias, v3)
    with pytest.raises(RegistryError, match=f"version {v2} was rolled back to v{v1}"):
        registry.promote(client, "m", v2, settings)
    assert registry.rollback(client, "m", settings, reason="r") == (v3, v1)
    assert {k: str(v) for k, v in client.get_registered_model("m").aliases.items()} == {"champion": v1}
    events = registry.history(client, "m")
    assert [(e["version"], e["action"]) for e in events] == [
        (v1, "promote"),
        (v3, "promote"),
        (v3, "rollback"),
    ]


def test_the_history_fits_mlflows_tag_limit_and_keeps_the_champion_chain(store):
    _, client, _ = store
    for i in range(40):
        event = {"version": str(i), "action": "promote", "reason": "r" * 400, "by": "u", "time": "t"}
        registry._record(client, "m", event)
    text = client.get_registered_model("m").tags[registry.HISTORY_TAG]
    events = json.loads(text)
    assert len(text) <= 5000 and registry.champion_chain(events) == [str(i) for i in range(40)]
    assert "reason" not in events[0] and events[-1]["reason"] == "r" * 300  # newest keep their details


def test_cli_refuses_a_rolled_back_version_until_forced_with_a_reason(store, tmp_path):
    from tests.conftest import small_params
    from tests.test_cli import vaeflow

    settings, client, _ = store
    v1, v2 = _two_champions(store)
    mlflow_section = {"tracking_uri": settings.mlflow.tracking_uri, "artifact_location": str(tmp_path / "a")}
    params = str(small_params(tmp_path, mlflow=mlflow_section))

    def cli(*args: str) -> tuple[int, str, str]:
        return vaeflow(None, *args, "--name", "m", "--params", params)

    code, _, err = cli("rollback")
    assert code == 2 and "rollback needs --reason" in err
    code, out, err = cli("rollback", "--reason", "drifted scores")
    assert code == 0 and f"from v{v2} back to v{v1}" in out, err
    code, out, err = cli("promote", "--version", v2)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, err
    assert f"version {v2} was rolled back" in errors[0] and "'drifted scores'" in errors[0]
    assert "--force --reason" in errors[0]
    assert client.get_model_version_by_alias("m", "champion").version == int(v1)
    code, _, err = cli("promote", "--version", v2, "--force")
    assert code == 2 and "--force needs --reason" in err
    code, out, err = cli("promote", "--version", v2, "--force", "--reason", "scores checked by hand")
    assert code == 0 and f"m v{v2}: promoted to champion (forced by" in out, err
    assert client.get_model_version_by_alias("m", "champion").version == int(v2)
    event = registry.history(client, "m")[-1]
    assert event["action"] == "force" and event["reason"] == "scores checked by hand"
    assert event["by"] == getpass.getuser()
