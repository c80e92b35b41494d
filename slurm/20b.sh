#!/bin/bash
# gpt-oss-20b: one replica per GPU by default (dp fills the world); add parallel.tp=2 for long contexts.
#   sbatch slurm/20b.sh                        # one node
#   sbatch --nodes=2 slurm/20b.sh              # many nodes: one torchrun each, rendezvous on the first
#   sbatch --array=0-7 slurm/20b.sh            # the input split over 8 tasks; then launch/merge.py
# Settings below, or from the environment: CONFIG=... INPUT=... OUTPUT=... sbatch slurm/20b.sh parallel.tp=2
#SBATCH --job-name=gpt-oss-20b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --mem=256G
#SBATCH --time=12:00:00
#SBATCH --output=logs/%x-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --signal=B:TERM@120
#SBATCH --requeue

CONFIG=${CONFIG:-configs/gpt-oss-20b.yaml}
INPUT=${INPUT:-prompts.jsonl}
OUTPUT=${OUTPUT:-out/gpt-oss-20b.jsonl}
NPROC_PER_NODE=${NPROC_PER_NODE:-4}
source "${GPT_OSS_HOME:-${SLURM_SUBMIT_DIR:?submit this script with sbatch from the repository, or set GPT_OSS_HOME}}/slurm/launch.sh"
