"""The one settings object: environment (`IOTGW_*`), then `iotgw.toml`, then defaults."""

from __future__ import annotations

import itertools
import socket
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import unquote, urlsplit

from pydantic import (
    AfterValidator,
    Field,
    HttpUrl,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from gateway.domain.rollups import (
    RAW_RETENTION_S,
    ROLLUP_EVERY_S,
    ROLLUP_RETENTION_S,
    Retention,
    RollupEvery,
)
from gateway.domain.sources import Sources, SourcesFileError, load_sources
from gateway.errors import ConfigError
from schemas.device import TimeZone
from schemas.types import TypeCatalogue, TypesFileError, load_catalogue

__all__ = [
    "LogFormat",
    "MqttEndpoint",
    "ServiceName",
    "Settings",
    "load_settings",
    "parse_mqtt_url",
]

ENV_PREFIX = "IOTGW_"
CONFIG_FILE = "iotgw.toml"

ServiceName = Literal["bridge", "writer", "rules", "state"]

# Each service serves Prometheus metrics and health on its own port, so they can run
# side by side on one host (DESIGN.md, "Configuration").
DEFAULT_METRICS_PORTS: dict[ServiceName, int] = {
    "bridge": 9108,
    "writer": 9109,
    "rules": 9110,
    "state": 9111,
}


@dataclass(frozen=True)
class MqttEndpoint:
    """Where the broker is and how to log in, parsed from `IOTGW_MQTT_URL`."""

    host: str
    port: int
    tls: bool
    username: str | None
    password: SecretStr | None

    @property
    def address(self) -> str:
        """`mqtt://host:port` or `mqtts://host:port`: where, for messages (no login)."""
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_mqtt_url(url: str) -> MqttEndpoint:
    """Parse `mqtt://user:pass@host:1883` (or `mqtts://`); raise ValueError without echoing it."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ValueError("scheme must be mqtt:// or mqtts://")
    if not parts.hostname:
        raise ValueError("host is missing")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("port must be a number from 1 to 65535") from None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("must be scheme://[user[:password]@]host[:port] with no path")
    tls = parts.scheme == "mqtts"
    return MqttEndpoint(
        host=parts.hostname,
        port=port or (8883 if tls else 1883),
        tls=tls,
        username=unquote(parts.username) if parts.username else None,
        password=SecretStr(unquote(parts.password)) if parts.password else None,
    )


def _check_mqtt_url(url: SecretStr) -> SecretStr:
    parse_mqtt_url(url.get_secret_value())
    return url


def _check_bootstrap(value: str) -> str:
    for server in value.split(","):
        host, sep, port = server.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("must be host:port[,host:port...]")
    return value


def _check_no_credentials(url: HttpUrl) -> HttpUrl:
    # A URL is logged and shown; credentials belong in their own secret settings.
    if url.username or url.password:
        raise ValueError(
            "must not carry credentials: set IOTGW_INFLUX_USERNAME and IOTGW_INFLUX_PASSWORD"
        )
    return url


LogFormat = Literal["logfmt", "json"]
UnknownDevices = Literal["hold", "reject"]
KafkaSecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
KafkaSaslMechanism = Literal["SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN"]


def _default_client_id() -> str:
    return f"iotgw-bridge-{socket.gethostname()}"


class Settings(BaseSettings):
    """Everything iotgw reads from its environment; see the README's configuration table."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        toml_file=CONFIG_FILE,
        extra="forbid",
        frozen=True,
    )

    # The URL may carry a password, so the whole URL is a secret.
    mqtt_url: Annotated[SecretStr, AfterValidator(_check_mqtt_url)] = SecretStr(
        "mqtt://127.0.0.1:1883"
    )
    # Unset: the bridge's plain, persistent subscription (DESIGN.md, "Scaling"). Set: a
    # shared one ($share/<group>/...), only for brokers whose shared subscriptions are
    # sticky per publisher (EMQX hash_clientid); Mosquitto's are not, and lose order.
    mqtt_share_group: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    mqtt_client_id: str = Field(
        default_factory=_default_client_id, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
    )
    # The CA that signed the broker's certificate (mqtts://); the system's CAs when unset.
    # Checked when a connection is made: a deployment may create it after loading settings.
    mqtt_ca_file: Path | None = None
    # Mosquitto's password file, which `iotgw devices ... --credentials` edits; the local
    # stack's (.stack/mosquitto/passwd) when unset.
    mqtt_password_file: Path | None = None
    kafka_bootstrap: Annotated[str, AfterValidator(_check_bootstrap)] = "127.0.0.1:9092"
    # Kafka client security: TLS (SSL, SASL_SSL) verifies the brokers against
    # kafka_ca_file (the system's CAs when unset); SASL logs in with user name and password.
    kafka_security_protocol: KafkaSecurityProtocol = "PLAINTEXT"
    kafka_sasl_mechanism: KafkaSaslMechanism = "SCRAM-SHA-512"
    kafka_username: str | None = None
    kafka_password: SecretStr | None = None
    kafka_ca_file: Path | None = None
    influx_url: Annotated[HttpUrl, AfterValidator(_check_no_credentials)] = HttpUrl(
        "http://127.0.0.1:8086"
    )
    influx_username: str | None = None
    influx_password: SecretStr | None = None
    influx_db: str = Field(default="iot", pattern=r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,63}$")
    # InfluxDB 2.x: all three set, the writer writes through influxdb-client to the
    # bucket, whose name is also the database InfluxQL reads (a DBRP mapping).
    influx_org: str | None = Field(default=None, min_length=1)
    influx_bucket: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,63}$")
    influx_token: SecretStr | None = None
    # How long raw readings and their hourly rollups are kept, and how often InfluxDB
    # recomputes the rollups of the last two hours (`iotgw influx setup`).
    influx_retention: Retention = RAW_RETENTION_S
    influx_rollup_retention: Retention = ROLLUP_RETENTION_S
    influx_rollup_every: RollupEvery = ROLLUP_EVERY_S
    topic_prefix: str = Field(default="iot", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
    readings_partitions: int = Field(default=6, ge=1, le=10_000)
    # Replication of the topics `iotgw topics create` makes; unset: 3, or fewer when the
    # cluster has fewer brokers. Set, creation waits (up to IOTGW_TIMEOUT_S) for that many.
    topic_replication: int | None = Field(default=None, ge=1, le=10)
    require_registration: bool = True
    # What the bridge does with a reading of a device the registry does not know: a dead
    # letter (`reject`), or kept in the pending topic until approved (`hold`). A device
    # source may say otherwise in the sources file.
    unknown_devices: UnknownDevices = "reject"
    # Held readings older than this become dead letters; at most this many devices are held.
    pending_max_age_s: float = Field(default=7 * 24 * 3600, gt=0)
    pending_max_devices: int = Field(default=10_000, ge=1)
    rules_file: Path = Path("rules.yaml")
    # The device sources the bridge reads besides our envelope (absent: the envelope only),
    # and the user's own device types (absent: the built-in ones).
    sources_file: Path = Path("sources.yaml")
    types_file: Path = Path("types.yaml")
    # The time zone of device clocks that send local time without an offset (Tasmota's
    # `Time`), unless the device's registry record names its own.
    default_tz: TimeZone = "UTC"
    # 0 takes any free port (tests run several services in one process).
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    # Bridge: how many MQTT messages may await Kafka at once. The bridge stops reading
    # its socket at this many (and tells the broker, as its MQTT 5 receive maximum).
    max_in_flight: int = Field(default=1000, ge=1, le=65535)
    # Bridge: worker processes behind its one MQTT session; each owns a share of the devices.
    bridge_workers: int = Field(default=1, ge=1, le=64)
    rate_limit_per_s: float = Field(default=100.0, gt=0)
    rate_limit_burst: int = Field(default=2000, ge=1)
    rules_group: str = Field(default="iotgw-rules", pattern=r"^[A-Za-z0-9._-]{1,100}$")
    # Readings of a device may arrive this far out of event-time order and still count.
    rules_grace_s: float = Field(default=5.0, ge=0, le=3600)
    # The rules engine's Kafka transactional id: unique per running instance.
    rules_instance_id: str = Field(
        default_factory=lambda: f"iotgw-rules-{socket.gethostname()}",
        pattern=r"^[A-Za-z0-9._-]{1,200}$",
    )
    writer_group: str = Field(default="iotgw-writer", pattern=r"^[A-Za-z0-9._-]{1,100}$")
    # The last-known state service's consumer group (iot.readings and iot.availability).
    state_group: str = Field(default="iotgw-state", pattern=r"^[A-Za-z0-9._-]{1,100}$")
    # Writer: a batch is written when it holds this many points or is this old.
    writer_batch_size: int = Field(default=5000, ge=1, le=100_000)
    writer_flush_interval_s: float = Field(default=1.0, gt=0, le=60)
    max_reading_age_s: float = Field(default=7 * 24 * 3600, gt=0)
    # How long the broker keeps the bridge's session (and queues readings) while it is away.
    mqtt_session_expiry_s: int = Field(default=7 * 24 * 3600, ge=0, le=0xFFFFFFFF)
    # How long a command waits for a service before it gives up with one line.
    timeout_s: float = Field(default=10.0, gt=0, le=600)
    # Services log one line an event, as logfmt or JSON.
    log_format: LogFormat = "logfmt"

    @field_validator("kafka_bootstrap")
    @classmethod
    def _strip_spaces(cls, value: str) -> str:
        return ",".join(server.strip() for server in value.split(","))

    @model_validator(mode="after")
    def _distinct_groups(self) -> Settings:
        # In one group two services would split the readings between them.
        groups = {
            "IOTGW_WRITER_GROUP": self.writer_group,
            "IOTGW_RULES_GROUP": self.rules_group,
            "IOTGW_STATE_GROUP": self.state_group,
        }
        for (name, group), (other, other_group) in itertools.combinations(groups.items(), 2):
            if group == other_group:
                raise ValueError(f"{name} and {other} must differ")
        return self

    @model_validator(mode="after")
    def _complete_logins(self) -> Settings:
        sasl = self.kafka_security_protocol.startswith("SASL_")
        if sasl and not (self.kafka_username and self.kafka_password):
            raise ValueError(
                f"IOTGW_KAFKA_SECURITY_PROTOCOL={self.kafka_security_protocol} needs "
                "IOTGW_KAFKA_USERNAME and IOTGW_KAFKA_PASSWORD"
            )
        if not sasl and (self.kafka_username or self.kafka_password):
            raise ValueError(
                "IOTGW_KAFKA_USERNAME and IOTGW_KAFKA_PASSWORD need "
                "IOTGW_KAFKA_SECURITY_PROTOCOL=SASL_SSL or SASL_PLAINTEXT"
            )
        if bool(self.influx_username) != bool(self.influx_password):
            raise ValueError("IOTGW_INFLUX_USERNAME and IOTGW_INFLUX_PASSWORD go together")
        v2 = (self.influx_org, self.influx_bucket, self.influx_token)
        if any(v2) and not all(v2):
            raise ValueError(
                "InfluxDB 2.x needs IOTGW_INFLUX_ORG, IOTGW_INFLUX_BUCKET and IOTGW_INFLUX_TOKEN"
            )
        if all(v2) and self.influx_username:
            raise ValueError(
                "IOTGW_INFLUX_TOKEN (2.x) and IOTGW_INFLUX_USERNAME (1.x) exclude each other"
            )
        return self

    @property
    def mqtt(self) -> MqttEndpoint:
        return parse_mqtt_url(self.mqtt_url.get_secret_value())

    @property
    def influx_v2(self) -> bool:
        """True when iotgw speaks InfluxDB 2.x (an organisation, a bucket and a token)."""
        return self.influx_token is not None

    @property
    def influx_database(self) -> str:
        """Where readings go and what InfluxQL reads: the bucket on 2.x, else the database."""
        return self.influx_bucket if self.influx_bucket is not None else self.influx_db

    @property
    def influx_auth(self) -> tuple[str, str] | None:
        """HTTP basic credentials for InfluxDB's v1 API, when configured."""
        if self.influx_username and self.influx_password:
            return (self.influx_username, self.influx_password.get_secret_value())
        return None

    def environment(self) -> dict[str, str]:
        """These settings as `IOTGW_*` variables: how to configure another iotgw process
        (a service, a benchmark subject) exactly like this one. Holds the secrets."""
        variables = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            elif isinstance(value, bool):
                value = "true" if value else "false"
            variables[f"{ENV_PREFIX}{name.upper()}"] = str(value)
        return variables

    def catalogue(self) -> TypeCatalogue:
        """The device types: the built-in ones and the types file's; ConfigError if that
        file cannot be used."""
        try:
            return load_catalogue(self.types_file)
        except TypesFileError as exc:
            raise ConfigError(f"IOTGW_TYPES_FILE: {exc}") from None

    def sources(self) -> Sources:
        """The device sources of the sources file (none: our envelope only); ConfigError
        if that file cannot be used."""
        try:
            return load_sources(self.sources_file)
        except SourcesFileError as exc:
            raise ConfigError(f"IOTGW_SOURCES_FILE: {exc}") from None

    def metrics_port_for(self, service: ServiceName) -> int:
        if self.metrics_port is None:
            return DEFAULT_METRICS_PORTS[service]
        return self.metrics_port

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))


def _field_name(loc: tuple[int | str, ...]) -> str:
    field = str(loc[0]) if loc else "?"
    return f"{ENV_PREFIX}{field.upper()} ({field} in {CONFIG_FILE})"


def load_settings() -> Settings:
    """Load the settings or raise ConfigError: one line per missing or invalid field."""
    try:
        return Settings()
    except ValidationError as exc:
        lines = []
        for error in exc.errors(include_input=False, include_url=False):
            kind = "unknown" if error["type"] == "extra_forbidden" else "invalid"
            message = error["msg"].removeprefix("Value error, ")
            if error["loc"]:
                lines.append(f"{kind} setting {_field_name(error['loc'])}: {message}")
            else:
                lines.append(f"invalid settings: {message}")
        raise ConfigError("\n".join(lines)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{CONFIG_FILE} is not valid TOML: {exc}") from None
