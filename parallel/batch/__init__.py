"""The batch job: work planning, records and the resumable output file, the coordinator and the writer."""
