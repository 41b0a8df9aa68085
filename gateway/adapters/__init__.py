"""The only code that talks to Kafka, MQTT, InfluxDB and Mosquitto's files; certificates."""
