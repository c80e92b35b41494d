"""Rank 0 hands out batches on demand; replica leaders claim them and publish their records.

All coordination goes through the job's c10d store, not through collectives, so a slow replica holds no one
back and a thread may talk to it on its own connection:
  batch/{k}   the k-th batch, published by rank 0 before any model loads;  `batches` = how many
  next        a counter each replica leader bumps to claim the next batch
  result/{k}  the records of batch k, then done/{j} = k for the j-th batch finished (`ndone` counts them)
"""

from __future__ import annotations

import json
from collections.abc import Callable

import torch.distributed as dist

from parallel.distributed.mesh import Placement


def publish(store: dist.Store, batches: list[list[dict]]) -> None:
    for k, batch in enumerate(batches):
        store.set(f"batch/{k}", json.dumps(batch))
    store.set("batches", str(len(batches)))


def serve_replica(place: Placement, store: dist.Store, run_batch: Callable[[list[dict], int], list[dict]]) -> None:
    """Claim batches until none are left. The leader claims and broadcasts; every rank of the replica runs the
    batch; the leader publishes the records `run_batch` returns."""
    n = int(store.get("batches"))
    while True:
        work = [None]
        if place.is_leader:
            k = store.add("next", 1) - 1
            work = [(k, json.loads(store.get(f"batch/{k}")))] if k < n else [None]
        if place.replica_group is not None:
            dist.broadcast_object_list(work, src=place.leader, group=place.replica_group)
        if work[0] is None:
            return
        k, batch = work[0]
        records = run_batch(batch, k)
        if place.is_leader:
            store.set(f"result/{k}", json.dumps(records))
            j = store.add("ndone", 1) - 1
            store.set(f"done/{j}", str(k))
