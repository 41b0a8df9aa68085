#!/bin/sh
# Mosquitto reads its password file at start and again on SIGHUP. `iotgw devices ...
# --credentials`, `disable` and `remove` change the file from another container, so this
# runs the broker and makes it reload whenever the file's contents change.
set -eu
passwd=/mosquitto/auth/passwd

mosquitto -c /mosquitto/config/mosquitto.conf &
broker=$!
trap 'kill -TERM "$broker" 2>/dev/null; wait "$broker"; exit $?' TERM INT

fingerprint() { cksum "$passwd" 2>/dev/null || echo none; }
last=$(fingerprint)
while kill -0 "$broker" 2>/dev/null; do
  sleep 2 &
  wait $!
  now=$(fingerprint)
  if [ "$now" != "$last" ]; then
    last=$now
    kill -HUP "$broker"
  fi
done
wait "$broker"
