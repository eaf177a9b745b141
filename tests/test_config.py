from pathlib import Path

import pytest

from pipelines.config import load_settings, parse_override
from pipelines.errors import ConfigError


def test_defaults_load_from_repo_params(tmp_path):
    settings = load_settings("params.yaml")
    assert settings.data.source == "flights"
    assert settings.model.latent_dim == 8
    assert settings.tracking_uri.startswith("sqlite:////")  # resolved against the project root


def test_overrides_change_nested_values_with_yaml_types():
    settings = load_settings(
        "params.yaml", ["model.latent_dim=3", "model.hidden_dims=[16, 8]", "data.key=null"]
    )
    assert settings.model.latent_dim == 3
    assert settings.model.hidden_dims == [16, 8]
    assert settings.data.key is None


@pytest.mark.parametrize("bad", ["train.max_epochs", "=5", "train..x=1", "train.max_epochs=[1"])
def test_malformed_override_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="override"):
        load_settings("params.yaml", [bad])


def test_unknown_key_and_bad_value_name_the_path():
    with pytest.raises(ConfigError, match="train.max_epoch"):
        load_settings("params.yaml", ["train.max_epoch=5"])
    with pytest.raises(ConfigError, match="train.max_epochs"):
        load_settings("params.yaml", ["train.max_epochs=zero"])


def test_missing_params_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_settings(tmp_path / "nope.yaml")


def test_parse_override():
    assert parse_override("a.b=1.5") == (["a", "b"], 1.5)


def test_environment_overrides_tracking_uri(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert load_settings("params.yaml").tracking_uri == "http://127.0.0.1:5999"


def test_a_preset_sets_its_values_and_every_set_still_wins():
    plain = load_settings("params.yaml")
    assert (plain.model.n_importance, plain.train.min_steps, plain.train.patience) == (1, 4000, 10)
    impute = load_settings("params.yaml", ["train.preset=impute"])
    assert (impute.model.n_importance, impute.train.min_steps, impute.train.patience) == ("auto", 12000, 20)
    assert (plain.train.monitor, impute.train.monitor) == ("val_heldout_nll", "val_heldout_mse")
    assert (plain.model.encoder_hide_rate, impute.model.encoder_hide_rate) == (0.2, 0.0)
    embed = load_settings("params.yaml", ["train.preset=embed"])
    assert embed.model.beta == 0.1 and plain.model.beta == 1.0
    same = {"model": {"beta"}, "train": {"preset"}}  # all else as params.yaml has it
    assert embed.model_dump(exclude=same) == plain.model_dump(exclude=same)
    mine = load_settings("params.yaml", ["train.preset=impute", "train.min_steps=500"])
    assert (mine.model.n_importance, mine.train.min_steps, mine.train.patience) == ("auto", 500, 20)
    # a --set given before the preset is named wins too; so does a whole section set above the key
    first = load_settings("params.yaml", ["model.n_importance=3", "train.preset=impute"])
    assert first.model.n_importance == 3 and first.train.min_steps == 12000
    section = load_settings("params.yaml", ["train.preset=impute", "model={latent_dim: 4}"])
    assert (section.model.latent_dim, section.model.n_importance, section.train.min_steps) == (4, 1, 12000)
    # ... and a key below a section the preset sets
    grid = "train.presets.wide={train.search: {space: {model.beta: [1.0, 0.5]}, max_minutes: 9}}"
    below = load_settings(
        "params.yaml", [grid, "train.preset=wide", "train.search.space={model.latent_dim: [4]}"]
    )
    assert below.train.search.space == {"model.latent_dim": [4]} and below.train.search.max_minutes == 9


def test_params_yaml_ships_the_presets_a_settings_file_without_them_gets():
    from pipelines.config import TrainConfig

    assert load_settings("params.yaml").train.presets == TrainConfig().presets
    assert sorted(TrainConfig().presets) == ["embed", "impute"]


def test_the_params_hash_sees_what_a_preset_set_not_the_preset_table():
    from pipelines.tracking import params_hash

    spelled = [
        "model.n_importance=auto",
        "train.min_steps=12000",
        "train.patience=20",
        "train.monitor=val_heldout_mse",
        "model.encoder_hide_rate=0.0",
    ]
    assert params_hash(load_settings("params.yaml", ["train.preset=impute"])) == params_hash(
        load_settings("params.yaml", spelled)
    )
    extra = "train.presets.mine={model.beta: 0.5}"
    assert params_hash(load_settings("params.yaml", [extra])) == params_hash(load_settings("params.yaml"))
    assert params_hash(load_settings("params.yaml", ["train.preset=impute"])) != params_hash(
        load_settings("params.yaml")
    )


def test_a_preset_named_in_params_yaml_applies_and_null_turns_it_off(tmp_path):
    text = Path("params.yaml").read_text().replace("  preset: null", "  preset: impute")
    assert "preset: impute" in text
    (tmp_path / "params.yaml").write_text(text)
    assert load_settings(tmp_path / "params.yaml").train.min_steps == 12000
    off = load_settings(tmp_path / "params.yaml", ["train.preset=null"])
    assert (off.model.n_importance, off.train.min_steps) == (1, 4000)


def test_the_run_logs_the_preset_and_the_values_it_set_not_the_preset_table():
    from pipelines.tracking import model_params

    params = model_params(load_settings("params.yaml", ["train.preset=impute"]))
    assert params["train.preset"] == "impute" and params["model.n_importance"] == "auto"
    assert params["train.min_steps"] == 12000
    assert not [k for k in params if k.startswith("train.presets")]


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (
            ["train.preset=imputation"],
            "train.preset 'imputation' is not one of train.presets ['embed', 'impute']",
        ),
        (["train.presets.x={score.jobs: [embed]}"], "preset 'x': 'score.jobs' is not a model.* or train.*"),
        (["train.presets.x={train.preset: x}"], "preset 'x': 'train.preset' is not a model.* or train.*"),
        (["train.presets.impute.train.min_steps=500"], "its keys are dotted paths: train.presets.impute={"),
        (
            ["train.preset=x", "train.presets.x={model.nope: 3}"],
            "train.preset 'x' set model.nope=3): model.nope: Extra inputs",
        ),
        (["train.preset=x", "train.presets.x={model.latent_dim: 0}"], "model.latent_dim"),
    ],
)
def test_a_bad_preset_is_one_config_error_that_names_it(sets, message):
    with pytest.raises(ConfigError) as err:
        load_settings("params.yaml", sets)
    assert message in str(err.value)
