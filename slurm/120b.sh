#!/bin/bash
# gpt-oss-120b: 8 GPUs a node; pass parallel.tp=4 (two replicas a node) or parallel.tp=8.
#   sbatch slurm/120b.sh                        # one node
#   sbatch --nodes=2 slurm/120b.sh              # many nodes: one torchrun each, rendezvous on the first
#   sbatch --array=0-7 slurm/120b.sh            # the input split over 8 tasks; then launch/merge.py
# Settings below, or from the environment: CONFIG=... INPUT=... OUTPUT=... sbatch slurm/120b.sh parallel.tp=2
#SBATCH --job-name=gpt-oss-120b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --mem=512G
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --signal=B:TERM@120
#SBATCH --requeue

CONFIG=${CONFIG:-configs/gpt-oss-120b.yaml}
INPUT=${INPUT:-prompts.jsonl}
OUTPUT=${OUTPUT:-out/gpt-oss-120b.jsonl}
NPROC_PER_NODE=${NPROC_PER_NODE:-8}
source "${GPT_OSS_HOME:-${SLURM_SUBMIT_DIR:?submit this script with sbatch from the repository, or set GPT_OSS_HOME}}/slurm/launch.sh"
