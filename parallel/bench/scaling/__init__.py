"""Scaling studies (launch/scaling.py): the sweep and its result files, the jobs that measure its points, their
Slurm job arrays, and the report (plots, tables) drawn from whatever points exist."""
