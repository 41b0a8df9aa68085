"""Device fleet simulators and the benchmark harness."""
