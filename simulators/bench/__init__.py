"""Benchmarks, the soak run and the naive baseline: apart from the device simulators."""

# The subjects of `iotgw bench`; iotgw_N is `iotgw run bridge --workers N`.
RUNS = ("telegraf", "raw_pipe", "naive_bridge", "iotgw_1", "iotgw_2", "iotgw_3")
DEFAULT_RUNS = ("telegraf", "iotgw_1", "iotgw_2")
