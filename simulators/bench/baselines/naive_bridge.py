"""The tutorial way to bridge MQTT into Kafka, as a baseline for the benchmark.

A paho-mqtt callback sends each message with kafka-python and waits for Kafka's
acknowledgement before returning; paho acknowledges QoS 1 on receipt. No validation.
Configured by the same IOTGW_ variables as the bridge; topic `<prefix>.naive_bridge`.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import paho.mqtt.client as mqtt
from kafka import KafkaProducer
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.settings import load_settings
from gateway.topics import MQTT_TELEMETRY_FILTER


def main() -> None:
    settings = load_settings()
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap.split(","), acks="all")
    topic = f"{settings.topic_prefix}.naive_bridge"

    def on_message(client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        device_id = message.topic.split("/")[1]
        producer.send(topic, key=device_id.encode(), value=message.payload).get(timeout=30)

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=settings.mqtt_client_id,
        protocol=mqtt.MQTTv5,
    )
    client.on_message = on_message
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = settings.mqtt_session_expiry_s
    endpoint = settings.mqtt
    client.connect(endpoint.host, endpoint.port, clean_start=False, properties=properties)
    client.subscribe(MQTT_TELEMETRY_FILTER, qos=1)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    client.loop_start()
    print("event=naive_bridge_started", flush=True)
    stopping.wait()
    client.loop_stop()
    client.disconnect()
    producer.close()


if __name__ == "__main__":
    main()
