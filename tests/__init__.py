"""iotgw tests: unit (no services), integration (real servers), faults (kills, outages)."""
