"""Session 8's probe (call 3): are the engine's logits finite on a gpt-oss-20b-shaped model with random weights and
MXFP4 experts? Greedy and sampled, eager and in CUDA graphs; in eager, each layer's experts' input and output.

    python docs/bench/session8/finite_probe.py 20b      (from the repository root, on a GPU, triton_kernels installed)"""
import sys
sys.path.insert(0, ".")
from launch.bench import loaded, PROMPT
from parallel.engine.engine import Engine
from parallel.engine.interface import Sampling, Work, complete
from parallel.protocol.harmony import encoding, render_prompt, stop_tokens
from parallel.protocol.requests import parse_request

shape = sys.argv[1] if len(sys.argv) > 1 else "20b"
cfg, model = loaded(f"configs/gpt-oss-{shape}.yaml", (f"model.path=builtin:gpt-oss-{shape}", "model.load_format=dummy"))
enc = encoding()
prompts = [render_prompt(enc, parse_request({"prompt": PROMPT.format(i)}, 0), "medium") for i in range(8)]
stats = []
orig = Engine._next_tokens
def spy(self, logits, due):
    l = logits.float()
    stats.append((l.isfinite().all().item(), l.isnan().any(dim=-1).sum().item(), l[l.isfinite()].abs().max().item() if l.isfinite().any() else None, l[l.isfinite()].std().item() if l.isfinite().any() else None))
    return orig(self, logits, due)
Engine._next_tokens = spy
events = []
def hook(i):
    def f(mod, args, out):
        h = args[0]
        events.append((i, h.isfinite().all().item(), out.isfinite().all().item(), h.float().abs().max().item(), out.float().abs().max().item() if out.isfinite().all() else None))
    return f
for graphs in (False, True):
    ecfg = cfg.engine; ecfg.cuda_graphs = graphs; ecfg.compile = graphs
    handles = [l.mlp.experts.register_forward_hook(hook(i)) for i, l in enumerate(model.model.layers)] if not graphs else []
    for t in (0.0, 1.0):
        stats.clear(); events.clear()
        e = Engine(model, ecfg, stop_tokens(enc))
        out = complete(e, [Work(i, p, 8, Sampling(t, 1.0, i, ignore_eos=True)) for i, p in enumerate(prompts)])
        toks = [x for v in out.values() for x in v[0]]
        print(f"graphs={graphs} temperature={t}: {len(set(toks))} distinct of {len(toks)}; first row {out[0][0]}", flush=True)
        print("  logits per step (all finite, rows with NaN, max|finite|, std):", stats[:4], "...", stats[-2:], flush=True)
        if events:
            bad = [ev for ev in events if not ev[2]]
            print("  experts calls", len(events), "first non-finite output:", bad[:3], "first events:", events[:3], flush=True)
        del e
    for h in handles: h.remove()
