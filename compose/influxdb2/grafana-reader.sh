#!/bin/bash
# InfluxDB 2's image runs this once, at its first start, after its own setup (org, bucket,
# admin token: docker-compose.influxdb2.yml). It makes Grafana's read-only login, as on 1.x:
# a v1 user and password (InfluxQL's /query takes them) that may read the bucket and its
# rollup bucket, made here so the login can name it (`iotgw influx setup` then sets its
# retention). Not the admin token: whoever may query a Grafana datasource reaches InfluxDB
# with the datasource's credentials.
set -euo pipefail

org="${DOCKER_INFLUXDB_INIT_ORG}"
# The rollup bucket's name: rollup_bucket() in gateway/domain/rollups.py.
rollup_id=$(influx bucket create --org "${org}" --name "${DOCKER_INFLUXDB_INIT_BUCKET}_rollup" \
    --hide-headers | cut -f 1)
influx v1 auth create --org "${org}" \
    --username "${INFLUX_READER_USER}" --password "${INFLUX_READER_PASSWORD}" \
    --read-bucket "${DOCKER_INFLUXDB_INIT_BUCKET_ID}" --read-bucket "${rollup_id}" \
    --description "Grafana: read only"
