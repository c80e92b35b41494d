#!/bin/bash
# The embedded tiny gpt-oss on CPU (2 ranks a node): the cluster path anywhere, no GPU needed.
#   sbatch slurm/tiny.sh                        # one node
#   sbatch --nodes=2 slurm/tiny.sh              # many nodes: one torchrun each, rendezvous on the first
#   sbatch --array=0-7 slurm/tiny.sh            # the input split over 8 tasks; then launch/merge.py
# Settings below, or from the environment: CONFIG=... INPUT=... OUTPUT=... sbatch slurm/tiny.sh parallel.tp=2
#SBATCH --job-name=gpt-oss-tiny
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --mem=4G
#SBATCH --time=00:15:00
#SBATCH --output=logs/%x-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --signal=B:TERM@120
#SBATCH --requeue

CONFIG=${CONFIG:-configs/tiny.yaml}
INPUT=${INPUT:-examples/prompts.jsonl}
OUTPUT=${OUTPUT:-out/tiny.jsonl}
NPROC_PER_NODE=${NPROC_PER_NODE:-2}
source "${GPT_OSS_HOME:-${SLURM_SUBMIT_DIR:?submit this script with sbatch from the repository, or set GPT_OSS_HOME}}/slurm/launch.sh"
