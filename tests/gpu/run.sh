#!/usr/bin/env bash
# The GPU checks and measurements, by name, in one device call (each step logged to $OUT/<step>.log, bounded by
# its own timeout so one failure costs only itself). Wheels for what the GPU image lacks come from .whl/
# (../shared/device/fetch-wheels, and for the server's clients `fetch-wheels openai==3.57.0 jiter==0.19.0
# httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5`) and harmony's vocabulary from .vocab/ (a copy of
# ../shared/tokenizer).
#
#   bash tests/gpu/run.sh engine-check:120 bench-20b launcher-20b:300      (a step's seconds after the colon; 600)
#   bash tests/gpu/run.sh bench-20b+generation.temperature=1                  (overrides for a bench step's model)
#
# On a machine of several GPUs, lists of steps run side by side, one list a GPU, each in its own OUT and JOBS:
#   for i in 0 1; do CUDA_VISIBLE_DEVICES=$i OUT=/tmp/out$i JOBS=/tmp/jobs$i bash tests/gpu/run.sh ... & done; wait
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
OUT=${OUT:-/tmp/gpu-out}
JOBS=${JOBS:-/tmp/jobs}  # the bench's workloads, outputs and job logs: emptied before each step
mkdir -p "$OUT"
if [ ! -d /tmp/site ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD TIKTOKEN_ENCODINGS_BASE=$PWD/.vocab PYTHONUNBUFFERED=1
BENCH=(python3 launch/bench.py --config configs/gpt-oss-20b.yaml --workdir "$JOBS")

step() {
    case "$1" in
        engine-check) python3 tests/gpu/engine_check.py ;;
        paged-check) python3 tests/gpu/paged_attention_check.py ;;
        mxfp4-check) python3 tests/gpu/mxfp4_check.py ;;
        # an engine's start (every graph's warm-ups and capture) and steps, 2 layers of 120b's shape, under
        # compute-sanitizer (Firecracker machines; gVisor refuses it), which names the kernel of any bad access. API
        # errors are not reported: NCCL's start probes kernels it has no image for (libnccl, in every run).
        # memcheck: out-of-bounds accesses with the graphs on; memcheck-eager: again with each tensor its own
        # allocation, without which an access past a tensor into the allocator's own memory goes unseen (and which
        # graphs cannot capture); initcheck: reads of memory nothing wrote (slow: 10 minutes)
        memcheck|memcheck-eager|initcheck)
            export TORCHINDUCTOR_COMPILE_THREADS=1
            check=(python3 tests/gpu/start_check.py --layers 2 engine.cache_gib=4 engine.slots=16)
            [ "$1" = memcheck-eager ] && { export PYTORCH_NO_CUDA_MEMORY_CACHING=1; check+=(engine.cuda_graphs=false); }
            compute-sanitizer --error-exitcode 3 --print-limit 20 --report-api-errors no --tool "${1%-eager}" "${check[@]}" ;;
        # gpt-oss-120b-shaped engines started one after another: a fault at start that comes and goes
        start-120b) PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python3 tests/gpu/start_check.py --layers 36 --starts 8 ;;
        # 20b random weights: MXFP4 experts (model.mxfp4=auto keeps them packed where triton_kernels runs), or bf16
        bench-20b) "${BENCH[@]}" --paths isolated --batch-sizes 1 128 --new-tokens 256 --out "$OUT/$RUN.json" "${M20[@]}" ;;
        bench-20b-bf16) "${BENCH[@]}" --paths isolated --batch-sizes 1 128 --new-tokens 256 --out "$OUT/$RUN.json" "${M20[@]}" model.mxfp4=dequantize ;;
        # the plain recipe, model.generate, with transformers' native MXFP4 experts (the hub kernel, staged as a wheel)
        # and dequantized to bf16: ../shared/device/recipe_mxfp4.py, which fetch-wheels copies into .whl/
        plain-20b) python3 .whl/recipe_mxfp4.py --batches 1 128 --new 256 ;;
        # the plain recipe through our launcher (engine.mode=never) beside the engine, on the same ShareGPT-like workload
        plain-launcher-20b) "${BENCH[@]}" --paths plain --requests 1000 --plain-requests 256 --out "$OUT/$RUN.json" "${M20[@]}" ;;
        launcher-20b) "${BENCH[@]}" --paths launcher --requests 1000 --out "$OUT/$RUN.json" "${M20[@]}" ;;
        launcher-20b-bf16) "${BENCH[@]}" --paths launcher --requests 1000 --out "$OUT/$RUN.json" "${M20[@]}" model.mxfp4=dequantize ;;
        # two GPUs, two replicas: the dispatcher keeps both engines full
        launcher-20b-dp2) "${BENCH[@]}" --paths launcher --requests 1000 --nproc 2 --out "$OUT/$RUN.json" "${M20[@]}" parallel.dp=2 ;;
        server-20b) "${BENCH[@]}" --paths server --requests 1000 --rounds 4 --concurrency 1 128 256 --out "$OUT/$RUN.json" "${M20[@]}" ;;
        long-20b) "${BENCH[@]}" --paths launcher --workload long --requests 64 --out "$OUT/$RUN.json" "${M20[@]}" ;;
        bench-120b) PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python3 launch/bench.py --config configs/gpt-oss-120b.yaml \
            --paths isolated --batch-sizes 1 64 --new-tokens 256 --workdir "$JOBS" --out "$OUT/$RUN.json" "${M120[@]}" ;;
        layouts) bash tests/gpu/layouts.sh "$OUT/layouts" ;;
        profile-20b) python3 tests/gpu/profile_decode.py --config configs/gpt-oss-20b.yaml --batch-sizes 1 128 240 "${M20[@]}" ;;
        # The 20b front, ~6 min: the engine's server with bf16 experts and with MXFP4 ones, each at 1, 32, 128 and 256
        # clients (a server a variant: ~1 min of loading and compiling, then ~1 min of points), and the plain recipe
        # (bf16 experts) in batches of 1 and 16 (a job each, ~1 min each): model.mxfp4=dequantize for every job, which
        # the mxfp4 variant overrides. Swept in /tmp, so a call that ran out of time resumes there on the same
        # machine; the report comes back in $OUT.
        scaling-20b) python3 launch/scaling.py run --config configs/gpt-oss-20b.yaml --out /tmp/scaling-20b --paths server plain \
                         --concurrency 1 32 128 256 --plain-concurrency 1 16 --rounds 2 --variant bf16 \
                         --variant mxfp4:model.mxfp4=require "${M20[@]}" model.mxfp4=dequantize
                     status=$?
                     mkdir -p "$OUT/scaling-20b" && cp /tmp/scaling-20b/{front.png,results.csv,results.json,summary.md} "$OUT/scaling-20b/"
                     return $status ;;
        *) echo "unknown step $1"; return 2 ;;
    esac
}

for name in "$@"; do
    RUN=$name limit=600
    [[ $name =~ ^(.*):([0-9]+)$ ]] && RUN=${BASH_REMATCH[1]} limit=${BASH_REMATCH[2]}
    # STEP+key=value+...: the step with config overrides for its model (logged and written as the whole name)
    IFS=+ read -ra parts <<< "$RUN"
    if [ ${#parts[@]} -gt 1 ] && [[ ! ${parts[0]} =~ ^(bench|launcher|plain-launcher|server|long|profile|scaling)- ]]; then
        echo "== $RUN: step ${parts[0]} takes no overrides"
        continue
    fi
    M20=(model.path=builtin:gpt-oss-20b model.load_format=dummy "${parts[@]:1}")
    M120=(model.path=builtin:gpt-oss-120b model.load_format=dummy "${parts[@]:1}")
    start=$(date +%s)
    rm -rf "$JOBS"
    timeout "$limit" bash -c "$(declare -f step); $(declare -p M20 M120 BENCH OUT JOBS RUN); step ${parts[0]}" > "$OUT/$RUN.log" 2>&1
    code=$?
    # the jobs a bench step started: the end of their logs, with the engine's step counts
    for job in "$JOBS"/*.log; do [ -f "$job" ] && { echo "--- $job"; grep -v "Loading weights" "$job" | tail -n 12; } >> "$OUT/$RUN.log"; done
    echo "== $RUN: exit $code in $(( $(date +%s) - start )) s"
    tail -n 15 "$OUT/$RUN.log" | grep -v "Loading weights"
done
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
