#!/usr/bin/env bash
# The launcher's layouts on GPUs through NCCL (CI has no GPU, so this is run by hand on a GPU machine), greedy, in two
# series, each layout's records compared with its series' one-GPU run's:
#   float: the tiny checkpoint in float32.
#   mxfp4: the taught tiny model (tests/gpu/taught_mxfp4.py) with its experts in MXFP4, in bf16, the experts run
#          natively (model.mxfp4=require: the engine's Mxfp4Experts through triton_kernels' matmul_ogs). Its one-GPU
#          run must give the answers taught, and every rank's log must say that its experts ran through
#          triton_kernels. No pp: only the engine runs packed experts, and it runs no pipeline stages.
# A layout that fails is reported (with its log's tail) and the others still run; the script then exits 1, naming
# the failed ones. A series named on the command line runs alone (a series of tiny runs takes minutes: each run
# starts an engine, capturing and compiling its CUDA graphs).
#
#   bash tests/gpu/layouts.sh OUTDIR [float] [mxfp4]   # from the repository root; layouts that need more GPUs are skipped
set -euo pipefail
out=${1:?usage: tests/gpu/layouts.sh OUTDIR [float] [mxfp4]}
shift
mkdir -p "$out"
gpus=$(nvidia-smi -L | wc -l)
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
failed=()
LIMIT=${LIMIT:-180}  # seconds a run may take: an engine starts in about 50 s on an H100

# A series: its name ($series), its overrides ($overrides), the records its runs are compared with ($reference) and
# the line that each rank logs where it runs its experts natively ($native; empty: none looked for).
run() { # NAME NPROC OVERRIDES...
    local name=$series-$1 nproc=$2
    shift 2
    if (( nproc > gpus )); then echo "$name: skipped, needs $nproc GPUs"; return; fi
    rm -f "$out/$name".*  # the launcher resumes: records left by an earlier run would make it do nothing
    # A job that writes its records and then does not exit fails too (tp=2 with CUDA graphs once did).
    timeout "$LIMIT" torchrun --nproc_per_node="$nproc" launch/generate.py --config configs/tiny.yaml "${overrides[@]}" \
        data.output="$out/$name.jsonl" output.raw=true output.echo=false runtime.progress=false \
        generation.batch_size=1 "$@" > "$out/$name.log" 2>&1 || {
        code=$?
        echo "$name: FAILED ($( ((code == 124)) && echo "did not end within $LIMIT s" || echo "exit $code"))"
        tail -30 "$out/$name.log"; failed+=("$name"); return
    }
    python3 - "$name" "$nproc" "$reference" "$out/$name.jsonl" "$out/$name.log" "$native" <<'PY' || failed+=("$name")
import json, os, sys
name, nproc, reference, records, log, native = sys.argv[1:]
if not os.path.exists(reference):
    sys.exit(f"{name}: FAILED, no {reference} to compare with")
ref, got = ({r["id"]: r["raw"] for r in map(json.loads, open(p))} for p in (reference, records))
ranks = open(log).read().count(native) if native else int(nproc)  # no line to look for: none missing
verdict = ("is the reference" if reference == records  # float's one-GPU run: nothing to compare it with
           else f"{'same tokens as' if ref == got else 'DIFFERENT from'} {os.path.basename(reference)}")
print(f"{name}: {verdict} ({len(got)} records)"
      + (f", native on {ranks} of {nproc} ranks" if native else ""))
sys.exit(ref != got or ranks != int(nproc))
PY
}

layouts() { # the multi-GPU layouts that both series run
    run tp2 2 parallel.tp=2
    run ep2 2 parallel.ep=2
    run dp2 2 parallel.dp=2
    run tp2-ep2 2 parallel.tp=2 parallel.ep=2
    run dp2-tp2 4 parallel.dp=2 parallel.tp=2
}

float() {
    series=float overrides=(data.input=examples/prompts.jsonl) reference=$out/float-single.jsonl native=
    run single 1
    layouts
    run pp2 2 parallel.pp=2
}

mxfp4() {
    python3 -m tests.gpu.taught_mxfp4 "$out/mxfp4"
    # The longest answer taught is 28 tokens.
    series=mxfp4 overrides=(data.input="$out/mxfp4/prompts.jsonl" model.path="$out/mxfp4/checkpoint" model.dtype=bfloat16
                            model.mxfp4=require generation.max_new_tokens=32)
    reference=$out/mxfp4/answers.jsonl native="MXFP4 experts kept packed, run by the engine through triton_kernels matmul_ogs"
    run single 1
    reference=$out/mxfp4-single.jsonl
    layouts
}

(( $# )) || set -- float mxfp4
for chosen in "$@"; do
    case $chosen in float|mxfp4) "$chosen" ;; *) echo "no series $chosen: float or mxfp4"; exit 2 ;; esac
done
if (( ${#failed[@]} )); then echo "FAILED: ${failed[*]}"; exit 1; fi
