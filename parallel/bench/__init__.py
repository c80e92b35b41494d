"""Benchmarks: timed runs of the engine, the launcher and the server (measure), the workloads they run
(workloads), and scaling studies across layouts and GPU counts (scaling)."""
