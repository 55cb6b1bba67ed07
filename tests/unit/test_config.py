"""Config fails fast and names the key (pure logic: `load()` in this process; the service command's
own start-up and --help are in tests/test_config_cli.py)."""

from __future__ import annotations

import os

import pytest

from shared.config import ConfigError, InferenceSettings, load


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("EDGEFLEET_"):
            monkeypatch.delenv(key)


def test_defaults_are_valid():
    settings = load(InferenceSettings)
    assert settings.mqtt.url == "mqtt://127.0.0.1:1883" and settings.providers == ["cpu"]


def test_environment_over_file_over_defaults(tmp_path, monkeypatch):
    config = tmp_path / "edgefleet.toml"
    config.write_text('max_batch = 4\ndevice_id = "from-file"\nproviders = ["cuda", "cpu"]\n')
    monkeypatch.setenv("EDGEFLEET_DEVICE_ID", "from-env")
    monkeypatch.setenv("EDGEFLEET_TOP_K", "3")
    settings = load(InferenceSettings, config)
    assert (settings.max_batch, settings.device_id, settings.top_k) == (4, "from-env", 3)
    assert settings.providers == ["cuda", "cpu"]
    monkeypatch.setenv("EDGEFLEET_PROVIDERS", "tensorrt, cuda,cpu")
    assert load(InferenceSettings, config).providers == ["tensorrt", "cuda", "cpu"]


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("MAX_BATCH", "0", "max_batch"),
        ("MQTT_URL", "http://broker", "mqtt_url"),
        ("DEVICE_ID", "a/b", "device_id"),
        ("PROVIDER_POLICY", "maybe", "provider_policy"),
        ("PREDICTION_FORMAT", "xml", "prediction_format"),
        ("QUEUE_SIZE", "lots", "queue_size"),
        ("PREDICTION_QOS", "2", "prediction_qos"),
    ],
)
def test_a_bad_value_names_its_key(monkeypatch, key, value, named):
    monkeypatch.setenv(f"EDGEFLEET_{key}", value)
    with pytest.raises(ConfigError) as caught:
        load(InferenceSettings)
    assert named in str(caught.value) and f"EDGEFLEET_{key}" in str(caught.value)


def test_an_unknown_key_in_the_file_is_named(tmp_path):
    config = tmp_path / "edgefleet.toml"
    config.write_text("max_bacth = 4\n")
    with pytest.raises(ConfigError, match="unknown config key 'max_bacth'"):
        load(InferenceSettings, config)


def test_a_missing_or_broken_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load(InferenceSettings, tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("max_batch = = 4")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(InferenceSettings, broken)


def test_secrets_come_from_files_in_the_secrets_folder_and_the_environment_wins(tmp_path, monkeypatch):
    from shared.config import CommonSettings, ConfigError, load

    (tmp_path / "edgefleet_mqtt_password").write_text("from-a-file")
    monkeypatch.setenv("EDGEFLEET_SECRETS_DIR", str(tmp_path))
    assert load(CommonSettings).mqtt.password.get_secret_value() == "from-a-file"
    monkeypatch.setenv("EDGEFLEET_MQTT_PASSWORD", "from-the-environment")
    assert load(CommonSettings).mqtt.password.get_secret_value() == "from-the-environment"
    monkeypatch.setenv("EDGEFLEET_SECRETS_DIR", str(tmp_path / "nowhere"))
    try:
        load(CommonSettings)
    except ConfigError as exc:
        assert "EDGEFLEET_SECRETS_DIR" in str(exc)
    else:
        raise AssertionError("a missing secrets folder must stop the service")
