"""Rank 0 and the replicas: the work transport (channel), rank 0's dispatcher that hands requests to whichever
replica has room (dispatcher), the loop every rank of a replica runs (loop), and the streamer a replica's leader
sends tokens back through (streamer)."""
