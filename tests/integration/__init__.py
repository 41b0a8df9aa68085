"""Against the real local stack: Mosquitto, Apache Kafka, InfluxDB."""
