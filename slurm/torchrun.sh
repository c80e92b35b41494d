#!/bin/bash
# SCRIPT ARGS... on every node of this Slurm allocation: one torchrun a node under srun, NPROC_PER_NODE ranks each,
# a c10d rendezvous on the allocation's first node. Run inside the allocation, by slurm/launch.sh (the batch job)
# and by a scaling sweep's tasks (slurm/scaling.sh, for each job they start).
#
# Environment it honours: NPROC_PER_NODE (required), RDZV_HOST (default: the first node), RDZV_PORT, RDZV_JOIN_TIMEOUT (s),
# NCCL_DEBUG, and for offline nodes HF_HUB_OFFLINE, HF_HOME, TIKTOKEN_ENCODINGS_BASE (see README, "Offline clusters").
set -euo pipefail

head_node=${RDZV_HOST:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)}
rdzv_port=${RDZV_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
# A failed NCCL collective ends the process instead of leaving it waiting.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
echo "gpt-oss: job ${SLURM_JOB_ID} on ${SLURM_NNODES} node(s) (${SLURM_JOB_NODELIST}), rendezvous ${head_node}:${rdzv_port}," \
     "HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-} HF_HOME=${HF_HOME:-} TIKTOKEN_ENCODINGS_BASE=${TIKTOKEN_ENCODINGS_BASE:-}"

# exec: the caller's $! is srun itself, which its signal handling relies on (slurm/launch.sh).
exec srun --ntasks-per-node=1 --kill-on-bad-exit=1 \
    python -m torch.distributed.run --nnodes="$SLURM_NNODES" --nproc_per_node="$NPROC_PER_NODE" \
        --rdzv_backend=c10d --rdzv_id="$SLURM_JOB_ID" --rdzv_endpoint="$head_node:$rdzv_port" \
        --rdzv_conf="join_timeout=${RDZV_JOIN_TIMEOUT:-600}" \
        "$@"
