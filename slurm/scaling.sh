#!/bin/bash
# A scaling sweep on Slurm, submitted by `python launch/scaling.py submit ...` (docs/benchmarks.md), which
# writes the sweep's plan ($SWEEP/sweep.json), submits one array per GPU count and then this script's `report`:
#   array task i       job i of the plan (a launcher point, or a server over its concurrencies), each of its
#                      launches through slurm/torchrun.sh (one torchrun a node, as slurm/launch.sh runs a batch job);
#   report (argument)  the merge, after every task has ended: plots and tables from all the tasks' results.
# Resources (--nodes, --gpus-per-node, --array) come from the submit step; site options from its --sbatch.
#SBATCH --job-name=gpt-oss-scaling
#SBATCH --ntasks-per-node=1
#SBATCH --time=01:00:00
#SBATCH --output=logs/%x-%A_%a.out
set -euo pipefail
cd "${GPT_OSS_HOME:-$SLURM_SUBMIT_DIR}"

if [[ "${1:-}" == report ]]; then
    exec python launch/scaling.py report --out "$SWEEP"
fi
export NPROC_PER_NODE
GPT_OSS_TORCHRUN="$PWD/slurm/torchrun.sh" exec python launch/scaling.py task --out "$SWEEP" --index "$SLURM_ARRAY_TASK_ID"
