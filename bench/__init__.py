"""Benchmarks (`make bench`): every figure is reported beside the crypto ceiling of the same run."""
