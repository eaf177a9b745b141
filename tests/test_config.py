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
