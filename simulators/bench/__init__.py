"""Benchmarks, the soak run and the naive baseline: apart from the device simulators."""
