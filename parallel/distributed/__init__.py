"""A rank's place in the job: parallel degrees (layout), process groups and the device mesh (mesh), and the job's
runtime: heartbeats, signals, leaving (runtime)."""
