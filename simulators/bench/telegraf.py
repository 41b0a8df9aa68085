"""Telegraf as a subject of `iotgw bench`: built once with Go, configured like a tuned user would.

Telegraf 1.37.2 with only the plugins the comparison needs, built by `go install` from the
Go module proxy into `~/.cache/iotgw/telegraf-1.37.2/` (about 2 minutes the first time).
Its configuration is the fair twin of the bridge's work: `inputs.mqtt_consumer` on a
persistent session at QoS 1 (it acknowledges MQTT only once the output accepted a
message, like the bridge), the readings parsed with `json_v2`, and `outputs.kafka` with
`required_acks = -1` (all in-sync replicas, the bridge's `acks=all`), keyed by the MQTT
topic. Telegraf validates nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from devstack.installer import cache_dir
from gateway.settings import Settings
from gateway.topics import MQTT_TELEMETRY_FILTER

__all__ = ["TELEGRAF_VERSION", "TUNING", "config", "ensure_telegraf"]

TELEGRAF_VERSION = "1.37.2"
_TAGS = "custom,inputs.mqtt_consumer,outputs.kafka,parsers.json_v2,serializers.json"
_MODULE = f"github.com/influxdata/telegraf/cmd/telegraf@v{TELEGRAF_VERSION}"

# What we tuned, against its defaults (1000, 1000, 10000, 10s): ten times the
# undelivered messages (its default window of 1,000 halves its drain rate), batches of
# 5,000 readings, a buffer that never drops, and a 100 ms flush so a slow trickle is not
# held for 10 s (which would make its latency the flush interval, not its speed).
TUNING = {
    "max_undelivered_messages": 10_000,
    "metric_batch_size": 5_000,
    "metric_buffer_limit": 100_000,
    "flush_interval": "100ms",
}


def ensure_telegraf(log: Path, say: Callable[[str], None]) -> Path | None:
    """The telegraf binary, built on first use; None (and one line said) without Go."""
    binary = cache_dir() / f"telegraf-{TELEGRAF_VERSION}" / "bin" / "telegraf"
    if binary.exists():
        return binary
    go = shutil.which("go")
    if go is None:
        say("telegraf: no Go toolchain on PATH, so the run goes on without Telegraf")
        return None
    say(f"telegraf: building {TELEGRAF_VERSION} with go install (once, ~2 min; log: {log})")
    env = {**os.environ, "GOBIN": str(binary.parent)}
    with log.open("ab") as out:
        built = subprocess.run(
            [go, "install", "-tags", _TAGS, _MODULE], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    if built.returncode or not binary.exists():
        say(f"telegraf: the build failed (see {log}), so the run goes on without it")
        return None
    return binary


def config(settings: Settings, topic: str) -> str:
    """Telegraf's TOML for one run: the stack's broker into `topic` on the stack's Kafka."""
    return f"""\
[agent]
  metric_batch_size = {TUNING["metric_batch_size"]}
  metric_buffer_limit = {TUNING["metric_buffer_limit"]}
  flush_interval = "{TUNING["flush_interval"]}"
  flush_jitter = "0s"
  omit_hostname = true
  quiet = false

[[inputs.mqtt_consumer]]
  servers = ["tcp://{settings.mqtt.host}:{settings.mqtt.port}"]
  topics = ["{MQTT_TELEMETRY_FILTER}"]
  qos = 1
  persistent_session = true
  client_id = "{settings.mqtt_client_id}"
  max_undelivered_messages = {TUNING["max_undelivered_messages"]}
  data_format = "json_v2"
  [[inputs.mqtt_consumer.json_v2]]
    measurement_name = "reading"
    timestamp_path = "ts"
    timestamp_format = "unix_ms"
    [[inputs.mqtt_consumer.json_v2.object]]
      path = "@this"
      tags = ["type"]
      disable_prepend_keys = true

[[outputs.kafka]]
  brokers = ["{settings.kafka_bootstrap}"]
  topic = "{topic}"
  required_acks = -1
  routing_tag = "topic"
  data_format = "json"
"""
