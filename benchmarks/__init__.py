"""Benchmarks, imported as `cotune.bench` and run as `cotune bench NAME`."""
