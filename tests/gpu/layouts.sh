#!/usr/bin/env bash
# The launcher's layouts on GPUs through NCCL (CI has no GPU, so this is run by hand on a GPU machine):
# the tiny checkpoint, greedy, every layout's records compared with the one-GPU run's.
#
#   tests/gpu/layouts.sh OUTDIR      # from the repository root; layouts that need more GPUs are skipped
set -euo pipefail
out=${1:?usage: tests/gpu/layouts.sh OUTDIR}
mkdir -p "$out"
gpus=$(nvidia-smi -L | wc -l)
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"

run() { # NAME NPROC OVERRIDES...
    local name=$1 nproc=$2
    shift 2
    if (( nproc > gpus )); then echo "$name: skipped, needs $nproc GPUs"; return 0; fi
    if ! torchrun --nproc_per_node="$nproc" launch/generate.py --config configs/tiny.yaml \
            data.input=examples/prompts.jsonl data.output="$out/$name.jsonl" output.raw=true output.echo=false \
            runtime.progress=false generation.batch_size=1 "$@" > "$out/$name.log" 2>&1; then
        echo "$name: FAILED"; tail -30 "$out/$name.log"; return 1
    fi
    python3 - "$out/single.jsonl" "$out/$name.jsonl" "$name" <<'PY'
import json, sys
ref, got = ({r["id"]: r["raw"] for r in map(json.loads, open(p))} for p in sys.argv[1:3])
print(f"{sys.argv[3]}: {'same tokens as one GPU' if ref == got else 'DIFFERENT from one GPU'} ({len(got)} records)")
sys.exit(ref != got)
PY
}

run single 1
run tp2 2 parallel.tp=2
run ep2 2 parallel.ep=2
run dp2 2 parallel.dp=2
run pp2 2 parallel.pp=2
run tp2-ep2 2 parallel.tp=2 parallel.ep=2
run dp2-tp2 4 parallel.dp=2 parallel.tp=2
