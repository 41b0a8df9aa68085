"""Kills and outages of real servers and of iotgw's own processes."""
