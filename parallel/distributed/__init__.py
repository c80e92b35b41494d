"""Distributed setup: parallel degrees, process groups and the device mesh, the job runtime, checkpoints, loading."""
