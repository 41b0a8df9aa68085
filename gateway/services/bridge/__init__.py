"""The ingestion bridge: one ordered MQTT session, worker processes, Kafka lanes."""
