"""Grouped settings: every place a key can come from (TOML flat or as a table, secret files, the
environment, keyword overrides) lands in the same group, in the documented order, and a child process
started with `environment(settings)` reads back exactly the settings it was given. Pure logic."""

from __future__ import annotations

import os

import pytest

from shared.config import (
    CanarySettings,
    ConfigError,
    InferenceSettings,
    MqttSettings,
    SyncSettings,
    TelemetrySettings,
    environment,
    keys,
    load,
)
from shared.errors import EdgefleetError


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("EDGEFLEET_"):
            monkeypatch.delenv(key)


def test_a_group_is_filled_from_a_toml_table_or_flat_keys_and_the_environment_wins(tmp_path, monkeypatch):
    table, flat = tmp_path / "table.toml", tmp_path / "flat.toml"
    table.write_text("[canary]\nwindow = 30\nwarmup = 2\n")
    flat.write_text("canary_window = 30\ncanary_warmup = 2\n")
    for path in (table, flat):
        assert (load(SyncSettings, path).canary.window, load(SyncSettings, path).canary.warmup) == (30, 2)
    monkeypatch.setenv("EDGEFLEET_CANARY_WINDOW", "40")
    settings = load(SyncSettings, table)
    assert (settings.canary.window, settings.canary.warmup) == (40, 2)  # one key from each layer
    assert load(SyncSettings, table, canary_window=25).canary.window == 25


def test_a_secret_file_fills_a_grouped_key_and_the_environment_wins(tmp_path, monkeypatch):
    (tmp_path / "EDGEFLEET_S3_SECRET_ACCESS_KEY").write_text("from-a-file\n")
    (tmp_path / "edgefleet_cloud_mqtt_password").write_text("cloud-secret")
    monkeypatch.setenv("EDGEFLEET_SECRETS_DIR", str(tmp_path))
    assert load(SyncSettings).s3.secret_access_key.get_secret_value() == "from-a-file"
    assert load(TelemetrySettings).cloud_mqtt.password.get_secret_value() == "cloud-secret"
    monkeypatch.setenv("EDGEFLEET_S3_SECRET_ACCESS_KEY", "from-the-environment")
    assert load(SyncSettings).s3.secret_access_key.get_secret_value() == "from-the-environment"


@pytest.mark.parametrize(("variable", "value", "named"), [
    ("EDGEFLEET_CANARY_WINDWO", "30", "unknown config key 'canary_windwo' (EDGEFLEET_CANARY_WINDWO)"),
    ("EDGEFLEET_CANARY_WINDOW", "3", "bad config key 'canary_window' (EDGEFLEET_CANARY_WINDOW)"),
    ("EDGEFLEET_CLOUD_MQTT_URL", "http://cloud", "bad config key 'cloud_mqtt_url' (EDGEFLEET_CLOUD_MQTT_URL)"),
])
def test_a_bad_grouped_key_is_named_by_its_variable(monkeypatch, variable, value, named):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=named.replace("(", r"\(").replace(")", r"\)")):
        load(TelemetrySettings if "CLOUD" in variable else SyncSettings)


def test_a_config_error_is_an_edgefleet_error_not_an_exit():
    with pytest.raises(ConfigError) as caught:
        load(SyncSettings, canary_min_samples=60)  # more than the window of 50
    assert isinstance(caught.value, EdgefleetError) and not isinstance(caught.value, SystemExit)
    assert "canary_min_samples (60) exceeds canary_window (50)" in str(caught.value)


def test_a_child_given_environment_of_settings_reads_the_same_settings(monkeypatch):
    given = load(TelemetrySettings, device_id="edge-7", mqtt_password="pw", cloud_mqtt_url="mqtts://cloud:8883",
                 drift_psi_raise=0.4, outbox_path="/var/x/outbox.db", hard_example_confidence=0.2)
    child = environment(given)
    assert child["EDGEFLEET_DRIFT_PSI_RAISE"] == "0.4" and child["EDGEFLEET_MQTT_PASSWORD"] == "pw"
    assert "EDGEFLEET_DRIFT_WINDOW" not in child  # a default stays the child's own
    for name, value in child.items():
        monkeypatch.setenv(name, value)
    assert load(TelemetrySettings) == given


def test_keyword_overrides_beat_the_environment_when_settings_are_built_directly(monkeypatch):
    monkeypatch.setenv("EDGEFLEET_CANARY_WINDOW", "40")
    assert SyncSettings().canary.window == 40
    assert SyncSettings(canary_window=30).canary == CanarySettings(window=30)


def test_every_flat_key_is_listed_once_with_its_group_opened():
    names = keys(TelemetrySettings)
    assert {"mqtt_url", "cloud_mqtt_url", "drift_psi_raise", "outbox_path", "ttl_alert_s", "docker_url"} <= names.keys()
    assert "drift" not in names and "mqtt" not in names


def test_a_key_of_another_service_is_ignored_and_a_list_item_is_named_by_its_key(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGEFLEET_CACHE_ENABLED", "true")  # inference's group: sync has none of that name
    assert load(SyncSettings).canary.window == 50
    bad = tmp_path / "bad.toml"
    bad.write_text("providers = [1]\n")
    with pytest.raises(ConfigError, match=r"bad config key 'providers' \(EDGEFLEET_PROVIDERS"):
        load(InferenceSettings, bad)


def test_a_group_given_whole_merges_with_its_keys_given_flat():
    settings = load(InferenceSettings, None, mqtt=MqttSettings(url="mqtt://10.0.0.9:1884"), mqtt_username="u")
    assert (settings.mqtt.url, settings.mqtt.username) == ("mqtt://10.0.0.9:1884", "u")


def test_the_cache_refuses_a_top_k_that_hides_the_runner_up():
    with pytest.raises(ConfigError, match="cache_enabled needs top_k of at least 2"):
        load(InferenceSettings, None, cache_enabled=True, top_k=1)
    assert load(InferenceSettings, None, cache_enabled=False, top_k=1).top_k == 1
