"""Parallel degrees, checked against the world size and the model before any process group or weight exists.

A job runs `dp` replicas of the model; each replica spans `pp` pipeline stages of `mp` ranks. Inside a
stage, `tp` shards attention heads and `ep` splits the experts. Transformers lays dense and expert weights
over the same ranks (pp x fsdp x tp == pp x efsdp x ep, here fsdp = 1), so experts are either replicated in
the stage (ep = 1) or split across all of it (ep = mp); `tp` is then 1 (experts alone are sharded) or mp.
"""

from __future__ import annotations

from dataclasses import dataclass


class LayoutError(ValueError):
    pass


@dataclass(frozen=True)
class Layout:
    dp: int
    pp: int
    tp: int
    ep: int

    @property
    def mp(self) -> int:
        """Ranks in one pipeline stage of a replica (transformers' `tp_size`)."""
        return max(self.tp, self.ep)

    @property
    def replica_size(self) -> int:
        return self.pp * self.mp

    @property
    def world_size(self) -> int:
        return self.dp * self.replica_size

    def __str__(self) -> str:
        return f"dp={self.dp} pp={self.pp} tp={self.tp} ep={self.ep}"


def plan_layout(
    world_size: int, *, tp: int, ep: int, pp: int, dp: int, heads: int, kv_heads: int, experts: int, layers: int
) -> Layout:
    """Resolve `dp=-1` and reject every impossible layout with a message naming the numbers that clash."""
    problems = [
        f"parallel.{name}={value} must be >= 1" for name, value in (("tp", tp), ("ep", ep), ("pp", pp)) if value < 1
    ]
    if dp < 1 and dp != -1:
        problems.append(f"parallel.dp={dp} must be >= 1, or -1 to fill the world")
    if problems:
        raise LayoutError("; ".join(problems))

    if tp > 1 and ep > 1 and tp != ep:
        problems.append(
            f"parallel.ep={ep} must equal parallel.tp={tp} when both are > 1: transformers splits the experts "
            "across the same ranks that shard the attention"
        )
    if pp > 1 and ep > 1:
        problems.append(
            "parallel.pp > 1 with parallel.ep > 1: transformers' expert dispatch does not support pipelines"
        )
    mp = max(tp, ep)
    replica = pp * mp
    if dp == -1:
        if world_size % replica:
            problems.append(f"world size {world_size} is not divisible by pp x max(tp, ep) = {pp} x {mp} = {replica}")
        dp = max(world_size // replica, 1)
    elif dp * replica != world_size:
        problems.append(f"world size {world_size} != dp x pp x max(tp, ep) = {dp} x {pp} x {mp} = {dp * replica}")
    # The likely slip: `python launch/...` where the layout needs torchrun's processes.
    wanted = replica if dp == -1 else dp * replica
    if world_size == 1 and wanted > 1:
        problems.append(f"one process runs here: start {wanted} with torchrun --nproc_per_node={wanted}")
    for what, count in (("attention heads", heads), ("key/value heads", kv_heads)):
        if count % tp:
            problems.append(f"parallel.tp={tp} does not divide the model's {count} {what}")
    if experts % ep:
        problems.append(f"parallel.ep={ep} does not divide the model's {experts} experts")
    if pp > layers:
        problems.append(f"parallel.pp={pp} is more pipeline stages than the model's {layers} layers")
    if problems:
        raise LayoutError("impossible parallel layout: " + "; ".join(problems))
    return Layout(dp=dp, pp=pp, tp=tp, ep=ep)
