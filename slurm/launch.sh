# Sourced by slurm/{tiny,20b,120b}.sh inside the allocation: launch/generate.py on every node through
# slurm/torchrun.sh (one torchrun a node under srun, a c10d rendezvous on the allocation's first node). The caller
# sets CONFIG, INPUT, OUTPUT and NPROC_PER_NODE; anything it passes as arguments reaches the launcher as key=value
# overrides.
#
# Environment it honours: REQUEUE (1: requeue after SIGTERM), and what slurm/torchrun.sh honours (RDZV_HOST,
# RDZV_PORT, RDZV_JOIN_TIMEOUT, NCCL_DEBUG, HF_HUB_OFFLINE, HF_HOME, TIKTOKEN_ENCODINGS_BASE).
set -euo pipefail
cd "${GPT_OSS_HOME:-$SLURM_SUBMIT_DIR}"

written=$OUTPUT
overrides=("data.input=$INPUT" "data.output=$written")
if [[ -n "${SLURM_ARRAY_TASK_COUNT:-}" ]]; then
    # Task i of n takes the input lines whose (line number - 1) % n == i, and writes its own shard.
    shard=$(( (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / ${SLURM_ARRAY_TASK_STEP:-1} ))
    written=${OUTPUT%.jsonl}.shard-$shard-of-$SLURM_ARRAY_TASK_COUNT.jsonl
    overrides=("data.input=$INPUT" "data.output=$written" "data.shard=$shard" "data.num_shards=$SLURM_ARRAY_TASK_COUNT")
fi
export NPROC_PER_NODE
slurm/torchrun.sh launch/generate.py --config "$CONFIG" "${overrides[@]}" "$@" &
step=$!

# Preemption and time limits (#SBATCH --signal=B:TERM@...) signal this shell: hand the signal to the step,
# whose rank 0 flushes the output, then requeue so the job resumes from that output.
stopped=0
# scancel signals the step's processes themselves; a SIGTERM to srun would make it kill the step outright.
trap 'stopped=1; echo "gpt-oss: SIGTERM, stopping the step"; scancel --signal=TERM "$SLURM_JOB_ID"' TERM
set +e
wait "$step"; status=$?
while kill -0 "$step" 2>/dev/null; do wait "$step"; status=$?; done
if (( stopped )) && [[ "${REQUEUE:-1}" == 1 ]]; then
    echo "gpt-oss: requeueing job ${SLURM_JOB_ID}; it resumes from ${written}"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
