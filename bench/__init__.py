"""Benchmarks: throughput/latency of the worker and the classical baseline the models must beat."""
