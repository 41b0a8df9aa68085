"""Security pieces without servers: password hashes, the password file, certificates, the
local stack's Mosquitto config, and Kafka and InfluxDB client security from settings."""

from __future__ import annotations

import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509

from devstack import stack
from gateway.adapters.certs import ensure_certificates
from gateway.adapters.kafka import kafka_security
from gateway.adapters.mosquitto_auth import (
    PasswordFile,
    generate_password,
    hash_password,
    verify_password,
)
from gateway.adapters.mqtt import tls_context
from gateway.errors import ConfigError, IotgwError
from gateway.settings import Settings, load_settings, parse_mqtt_url

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("clean_environment")]


def test_password_hash_is_mosquittos_pbkdf2_format() -> None:
    """`$7$101$<salt>$<hash>` as mosquitto_passwd writes it; salted, so never the same twice."""
    password = generate_password()
    hashed = hash_password(password)
    kind, iterations, salt, digest = hashed.split("$")[1:]
    assert (kind, iterations, len(salt), len(digest)) == ("7", "101", 16, 88)
    assert verify_password(password, hashed)
    assert not verify_password(password + "x", hashed)
    assert hash_password(password) != hashed
    assert password not in hashed


def test_password_file_keeps_others_and_stores_only_hashes(tmp_path: Path) -> None:
    """Setting, replacing and removing one login leaves the others; the file is owner-only."""
    passwords = PasswordFile(tmp_path / "auth" / "passwd")
    passwords.set("iotgw", "gateway-secret")
    passwords.set("thermo-1", "first")
    passwords.set("thermo-1", "second")
    assert passwords.users() == {"iotgw", "thermo-1"}
    assert passwords.check("thermo-1", "second")
    assert not passwords.check("thermo-1", "first")
    assert passwords.remove("thermo-1")
    assert not passwords.remove("thermo-1")
    assert passwords.users() == {"iotgw"}
    text = passwords.path.read_text()
    assert "gateway-secret" not in text
    assert text.startswith("iotgw:$7$")
    assert stat.S_IMODE(passwords.path.stat().st_mode) == 0o600


def test_certificates_verify_the_server_and_the_ca_is_reused(tmp_path: Path) -> None:
    """The server certificate is signed by ca.crt for the names given; a new name renews the
    server certificate but keeps the CA that devices already trust."""
    files = ensure_certificates(tmp_path, ["127.0.0.1", "localhost"])
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(n) for n in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert stat.S_IMODE(files.ca_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(files.server_key.stat().st_mode) == 0o600
    # Python's TLS accepts them as a pair.
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
        files.server_cert, files.server_key
    )

    ca_bytes, server_bytes = files.ca_cert.read_bytes(), files.server_cert.read_bytes()
    ensure_certificates(tmp_path, ["127.0.0.1", "localhost"])
    assert files.server_cert.read_bytes() == server_bytes
    ensure_certificates(tmp_path, ["mosquitto"])
    assert files.ca_cert.read_bytes() == ca_bytes
    assert files.server_cert.read_bytes() != server_bytes


def test_a_new_ca_gets_a_new_server_certificate_and_its_key_may_live_apart(
    tmp_path: Path,
) -> None:
    """A CA made anew (same name, other key) is not trusted to have signed the old server
    certificate: that is made again. The CA's key can be kept out of the certificates'
    folder, which a broker mounts."""
    files = ensure_certificates(tmp_path / "certs", ["mosquitto"], key_folder=tmp_path / "ca")
    assert not (tmp_path / "certs" / "ca.key").exists()
    assert files.ca_key == tmp_path / "ca" / "ca.key"
    files.ca_cert.unlink()
    files.ca_key.unlink()
    renewed = ensure_certificates(tmp_path / "certs", ["mosquitto"], key_folder=tmp_path / "ca")
    ca = x509.load_pem_x509_certificate(renewed.ca_cert.read_bytes())
    x509.load_pem_x509_certificate(renewed.server_cert.read_bytes()).verify_directly_issued_by(ca)


@pytest.mark.parametrize(
    ("source", "listeners"),
    [
        (stack.MOSQUITTO_CONFIG, {("listener 1883 127.0.0.1", "listener 21883 127.0.0.1"),
                                  ("listener 8883", "listener 28883 127.0.0.1")}),
        (stack.COMPOSE_MOSQUITTO_CONFIG, {("listener 8883", "listener 28883 127.0.0.1")}),
    ],
)  # fmt: skip
def test_a_mosquitto_config_is_moved_to_the_stacks_ports_and_folders(
    source: Path, listeners: set[tuple[str, str]], tmp_path: Path
) -> None:
    """Listeners move to the stack's ports on loopback, /mosquitto/ paths under the stack;
    every other line stays as it is."""
    original = source.read_text().splitlines()
    folders = {
        "data": Path("/s/mosquitto/data"), "auth": Path("/s/mosquitto"),
        "certs": Path("/s/certs"), "config": Path("/repo/compose/mosquitto"),
    }  # fmt: skip
    local = stack.local_mosquitto_config(source, 21883, 28883, "alice", folders).splitlines()
    assert len(local) == len(original)
    changed = {(old, new) for old, new in zip(original, local, strict=True) if old != new}
    assert changed == listeners | {
        ("user mosquitto", "user alice"),
        ("persistence_location /mosquitto/data/", "persistence_location /s/mosquitto/data/"),
        ("certfile /mosquitto/certs/server.crt", "certfile /s/certs/server.crt"),
        ("keyfile /mosquitto/certs/server.key", "keyfile /s/certs/server.key"),
        ("password_file /mosquitto/auth/passwd", "password_file /s/mosquitto/passwd"),
        ("acl_file /mosquitto/config/acl", "acl_file /repo/compose/mosquitto/acl"),
    }
    strange = tmp_path / "mosquitto.conf"
    strange.write_text("listener 9001\n")
    with pytest.raises(IotgwError, match="no port for 'listener 9001'"):
        stack.local_mosquitto_config(strange, 1, 2, "a", folders)


def test_the_deployment_broker_keeps_backlogs_with_one_authenticated_listener() -> None:
    """Compose's Mosquitto: per_listener_settings false (true loses offline backlogs on
    2.0.12 and later, upstream #2618), so its security settings are global: logins only,
    and a single listener, with TLS."""
    lines = {
        line for line in stack.COMPOSE_MOSQUITTO_CONFIG.read_text().splitlines()
        if line and not line.startswith("#")
    }  # fmt: skip
    assert "per_listener_settings false" in lines
    assert "allow_anonymous false" in lines
    assert [line for line in lines if line.startswith("listener ")] == ["listener 8883"]
    assert {"certfile /mosquitto/certs/server.crt", "tls_version tlsv1.2"} <= lines


def test_kafka_sasl_scram_over_tls_from_settings(tmp_path: Path) -> None:
    """SASL_SSL gives aiokafka the mechanism, the login and a context verifying with the CA."""
    ca = ensure_certificates(tmp_path, ["kafka"]).ca_cert
    settings = Settings(
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-256",
        kafka_username="iotgw",
        kafka_password="s3cret",
        kafka_ca_file=ca,
    )
    options = kafka_security(settings)
    context = options.pop("ssl_context")
    assert options == {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-256",
        "sasl_plain_username": "iotgw",
        "sasl_plain_password": "s3cret",
    }
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert "s3cret" not in repr(settings)
    assert kafka_security(Settings()) == {"security_protocol": "PLAINTEXT"}


@pytest.mark.parametrize(
    ("variables", "problem"),
    [
        ({"IOTGW_KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "needs IOTGW_KAFKA_USERNAME"),
        ({"IOTGW_KAFKA_USERNAME": "u", "IOTGW_KAFKA_PASSWORD": "p"}, "need IOTGW_KAFKA_SECURITY"),
        ({"IOTGW_INFLUX_USERNAME": "writer"}, "go together"),
        ({"IOTGW_INFLUX_URL": "http://writer:hunter2@influx:8086"}, "must not carry credentials"),
    ],
)
def test_incomplete_or_leaky_security_settings_are_refused(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], problem: str
) -> None:
    """Each mistake is one line naming what to set, and never echoes a secret."""
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as error:
        load_settings()
    assert problem in str(error.value)
    assert "hunter2" not in str(error.value)


def test_influx_credentials_are_basic_auth_and_hidden() -> None:
    settings = Settings(influx_username="writer", influx_password="hunter2")
    assert settings.influx_auth == ("writer", "hunter2")
    assert "hunter2" not in repr(settings)
    assert "hunter2" not in str(settings.model_dump())
    assert Settings().influx_auth is None


def test_a_missing_ca_file_is_one_line_when_connecting() -> None:
    """The CA file is read when a TLS connection is made (Compose creates it after the
    settings load): a missing one is a clear error then, for MQTT and for Kafka."""
    endpoint = parse_mqtt_url("mqtts://iotgw:pw@broker:8883")
    with pytest.raises(IotgwError, match=r"cannot use the CA file /nowhere/ca\.crt"):
        tls_context(endpoint, Path("/nowhere/ca.crt"))
    assert tls_context(parse_mqtt_url("mqtt://broker:1883"), Path("/nowhere/ca.crt")) is False
    kafka = Settings(kafka_security_protocol="SSL", kafka_ca_file=Path("/nowhere/ca.crt"))
    with pytest.raises(IotgwError, match=r"cannot use the CA file /nowhere/ca\.crt"):
        kafka_security(kafka)
