"""Process group and device mesh: one mesh with named dimensions, built once, sub-meshes asked for by name.

Ranks are laid out dp-major: replica r is the contiguous ranks [r * replica_size, (r + 1) * replica_size),
so a replica that fits a node stays on that node.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from transformers.distributed.utils import TransformersDeviceMesh

from parallel.distributed.layout import Layout


@dataclass
class Placement:
    rank: int
    world_size: int
    device: torch.device
    replica: int  # which data-parallel replica this rank serves
    replica_ranks: list[int]
    replica_group: dist.ProcessGroup | None  # the replica's ranks (NCCL on GPUs): the model's collectives
    control_group: dist.ProcessGroup | None  # the same ranks on gloo: the leader's news to its replica, on the CPU
    model_mesh: TransformersDeviceMesh | None  # the replica's sub-mesh, in transformers' dimension names

    @property
    def leader(self) -> int:
        """The replica's rank 0: it takes work from rank 0's dispatcher and hands it to the other ranks."""
        return self.replica_ranks[0]

    @property
    def is_leader(self) -> bool:
        return self.rank == self.leader


def init_distributed(collective_timeout_s: float) -> tuple[int, torch.device]:
    """Join the job's process group (NCCL on GPUs, gloo on CPU). Without torchrun, a world of one."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    dist.init_process_group(
        backend, timeout=timedelta(seconds=collective_timeout_s), device_id=device if backend == "nccl" else None
    )
    return dist.get_world_size(), device


def build_mesh(layout: Layout, device: torch.device) -> Placement:
    rank = dist.get_rank()
    replica = rank // layout.replica_size
    replica_ranks = list(range(replica * layout.replica_size, (replica + 1) * layout.replica_size))
    group = control = model_mesh = None
    if layout.replica_size > 1:
        # new_group is collective: every rank creates every replica's groups, in the same order.
        for r in range(layout.dp):
            ranks = list(range(r * layout.replica_size, (r + 1) * layout.replica_size))
            groups = dist.new_group(ranks), dist.new_group(ranks, backend="gloo")
            if r == replica:
                group, control = groups
        dense = dist.init_device_mesh(
            device.type,
            (layout.dp, layout.pp, 1, 1, layout.mp),
            mesh_dim_names=("dp", "pp", "dp_replicate", "fsdp", "tp"),
        )
        expert = dist.init_device_mesh(
            device.type,
            (layout.dp, layout.pp, 1, layout.mp // layout.ep, layout.ep),
            mesh_dim_names=("dp", "pp", "dp_replicate", "efsdp", "ep"),
        )
        model_mesh = TransformersDeviceMesh(
            dense[("pp", "dp_replicate", "fsdp", "tp")], expert[("pp", "dp_replicate", "efsdp", "ep")]
        )
    return Placement(
        rank=rank,
        world_size=dist.get_world_size(),
        device=device,
        replica=replica,
        replica_ranks=replica_ranks,
        replica_group=group,
        control_group=control,
        model_mesh=model_mesh,
    )
