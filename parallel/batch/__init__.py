"""The batch job: work planning, records and the resumable output file, the leader's reporter and rank 0's writer."""
