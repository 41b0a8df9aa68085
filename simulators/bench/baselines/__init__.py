"""Baselines the benchmark measures iotgw against."""
