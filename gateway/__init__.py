"""iotgw: MQTT readings validated into Apache Kafka, on to InfluxDB and alerting rules."""
