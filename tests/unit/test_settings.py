"""Settings: defaults of DESIGN.md, environment and iotgw.toml, one line per bad field."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from gateway.errors import ConfigError
from gateway.settings import Settings, load_settings, parse_mqtt_url

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("clean_environment")]


def test_defaults_point_at_local_stack() -> None:
    """With nothing configured, addresses are the local stack's and defaults match DESIGN.md."""
    settings = load_settings()
    assert settings.mqtt == parse_mqtt_url("mqtt://127.0.0.1:1883")
    assert settings.kafka_bootstrap == "127.0.0.1:9092"
    assert str(settings.influx_url) == "http://127.0.0.1:8086/"
    assert settings.influx_db == "iot"
    assert settings.topic_prefix == "iot"
    assert settings.require_registration is True
    assert settings.rules_file == Path("rules.yaml")
    assert settings.mqtt_client_id == f"iotgw-bridge-{socket.gethostname()}"
    assert [settings.metrics_port_for(s) for s in ("bridge", "writer", "rules")] == [
        9108,
        9109,
        9110,
    ]


def test_environment_overrides_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """IOTGW_ variables set the fields they name."""
    monkeypatch.setenv("IOTGW_KAFKA_BOOTSTRAP", "k1:9092, k2:9092")
    monkeypatch.setenv("IOTGW_TOPIC_PREFIX", "home")
    monkeypatch.setenv("IOTGW_REQUIRE_REGISTRATION", "false")
    monkeypatch.setenv("IOTGW_METRICS_PORT", "9200")
    settings = load_settings()
    assert settings.kafka_bootstrap == "k1:9092,k2:9092"
    assert settings.topic_prefix == "home"
    assert settings.require_registration is False
    assert settings.metrics_port_for("writer") == 9200


def test_toml_file_is_read_and_environment_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    """iotgw.toml in the working folder sets fields; the environment overrides it."""
    Path("iotgw.toml").write_text('influx_db = "house"\ntopic_prefix = "fromfile"\n')
    monkeypatch.setenv("IOTGW_TOPIC_PREFIX", "fromenv")
    settings = load_settings()
    assert settings.influx_db == "house"
    assert settings.topic_prefix == "fromenv"


def test_bad_values_give_one_line_per_field(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each invalid field is named on its own line, with its variable; nothing else is printed."""
    monkeypatch.setenv("IOTGW_KAFKA_BOOTSTRAP", "no-port-here")
    monkeypatch.setenv("IOTGW_READINGS_PARTITIONS", "many")
    monkeypatch.setenv("IOTGW_MQTT_URL", "http://u:hunter2@broker")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    lines = str(caught.value).splitlines()
    assert len(lines) == 3
    assert any(line.startswith("invalid setting IOTGW_KAFKA_BOOTSTRAP") for line in lines)
    assert any(line.startswith("invalid setting IOTGW_READINGS_PARTITIONS") for line in lines)
    assert any("IOTGW_MQTT_URL" in line and "mqtt://" in line for line in lines)
    assert caught.value.exit_code == 2


def test_password_never_appears_in_errors_or_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    """A password in IOTGW_MQTT_URL stays out of error messages and the settings' repr."""
    monkeypatch.setenv("IOTGW_MQTT_URL", "mqtt://gw:hunter2@broker:99999")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "hunter2" not in str(caught.value)
    monkeypatch.setenv("IOTGW_MQTT_URL", "mqtts://gw:hunter2@broker")
    settings = load_settings()
    assert "hunter2" not in repr(settings)
    assert settings.mqtt.password is not None
    assert settings.mqtt.password.get_secret_value() == "hunter2"
    assert (settings.mqtt.tls, settings.mqtt.port, settings.mqtt.username) == (True, 8883, "gw")


def test_unknown_toml_key_is_reported() -> None:
    """A misspelt key in iotgw.toml is an error, not silently ignored."""
    Path("iotgw.toml").write_text('kafka_bootstrapp = "x:1"\n')
    with pytest.raises(ConfigError, match="unknown setting IOTGW_KAFKA_BOOTSTRAPP"):
        load_settings()


def test_broken_toml_is_one_line() -> None:
    """A TOML syntax error names the file instead of raising a traceback."""
    Path("iotgw.toml").write_text("influx_db = \n")
    with pytest.raises(ConfigError, match=r"iotgw\.toml is not valid TOML"):
        load_settings()


@pytest.mark.parametrize(
    ("url", "host", "port", "tls"),
    [
        ("mqtt://broker", "broker", 1883, False),
        ("mqtts://broker", "broker", 8883, True),
        ("mqtt://127.0.0.1:11883", "127.0.0.1", 11883, False),
        ("mqtt://user:p%40ss@h:1", "h", 1, False),
    ],
)
def test_mqtt_url_is_parsed(url: str, host: str, port: int, tls: bool) -> None:
    """Host, port (default by scheme) and TLS come from the URL."""
    endpoint = parse_mqtt_url(url)
    assert (endpoint.host, endpoint.port, endpoint.tls) == (host, port, tls)


@pytest.mark.parametrize("url", ["tcp://h:1883", "mqtt://", "mqtt://h:1883/path", "mqtt://h:x"])
def test_mqtt_url_rejects_bad_forms(url: str) -> None:
    """Another scheme, no host, a path or a bad port are refused."""
    with pytest.raises(ValueError, match=r"."):
        parse_mqtt_url(url)


def test_settings_are_frozen() -> None:
    """One settings object, read once: nothing changes it behind a service's back."""
    settings = Settings()
    with pytest.raises(ValueError, match="frozen"):
        settings.influx_db = "other"  # type: ignore[misc]


def test_writer_and_rules_need_their_own_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    """One consumer group for both would split the readings between them."""
    monkeypatch.setenv("IOTGW_WRITER_GROUP", "same")
    monkeypatch.setenv("IOTGW_RULES_GROUP", "same")
    with pytest.raises(
        ConfigError, match=r"^invalid settings: IOTGW_WRITER_GROUP and IOTGW_RULES_GROUP"
    ):
        load_settings()


def test_environment_configures_another_process_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """`Settings.environment()` is what a service needs to load the very same settings."""
    original = Settings(
        mqtt_url="mqtts://iotgw:s3cret@broker:8883",
        require_registration=False,
        metrics_port=0,
        rules_file=Path("/etc/iotgw/rules.yaml"),
        influx_username="writer",
        influx_password="hunter2",
        writer_flush_interval_s=0.2,
        influx_rollup_retention="inf",
        influx_rollup_every="90s",
    )
    for name, value in original.environment().items():
        monkeypatch.setenv(name, value)
    assert load_settings() == original


def test_influxdb_2_needs_org_bucket_and_token_together(monkeypatch: pytest.MonkeyPatch) -> None:
    """A token without an organisation or bucket is one line naming all three."""
    monkeypatch.setenv("IOTGW_INFLUX_TOKEN", "t0ken-never-shown")
    monkeypatch.setenv("IOTGW_INFLUX_ORG", "home")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert str(caught.value) == (
        "invalid settings: InfluxDB 2.x needs IOTGW_INFLUX_ORG, IOTGW_INFLUX_BUCKET and "
        "IOTGW_INFLUX_TOKEN"
    )
    monkeypatch.setenv("IOTGW_INFLUX_BUCKET", "house")
    settings = load_settings()
    assert (settings.influx_v2, settings.influx_database) == (True, "house")
    assert "t0ken-never-shown" not in repr(settings)


def test_retention_settings_read_durations_and_refuse_less_than_an_hour(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """30d, 2y and inf are seconds (0 = forever); 30m is refused as InfluxDB would."""
    assert Settings().influx_retention == 30 * 86400
    assert Settings().influx_rollup_retention == 2 * 365 * 86400
    monkeypatch.setenv("IOTGW_INFLUX_RETENTION", "90d")
    monkeypatch.setenv("IOTGW_INFLUX_ROLLUP_RETENTION", "inf")
    monkeypatch.setenv("IOTGW_INFLUX_ROLLUP_EVERY", "5m")
    settings = load_settings()
    assert settings.influx_retention == 90 * 86400
    assert settings.influx_rollup_retention == 0
    assert settings.influx_rollup_every == 300
    monkeypatch.setenv("IOTGW_INFLUX_RETENTION", "30m")
    monkeypatch.setenv("IOTGW_INFLUX_ROLLUP_EVERY", "2h")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert str(caught.value).splitlines() == [
        "invalid setting IOTGW_INFLUX_RETENTION (influx_retention in iotgw.toml): "
        "a retention is at least 1h (InfluxDB's shortest), or inf",
        "invalid setting IOTGW_INFLUX_ROLLUP_EVERY (influx_rollup_every in iotgw.toml): "
        "the rollups are recomputed every 1s to 1h",
    ]
