"""Session 8's probe (call 4): each layer of a gpt-oss-20b-shaped model's MXFP4 experts (random weights) against the
reference path on a copy of its packed weights taken before conversion, and against a module freshly converted from
that copy, at 1, 79 and 640 tokens; the first layers again once an engine has started.

    python docs/bench/session8/layer_probe.py 20b      (from the repository root, on a GPU, triton_kernels installed)"""
import sys, torch
sys.path.insert(0, ".")
from parallel.engine import mxfp4 as M
stash = []
orig_prepare = M.Mxfp4Experts.prepare
def prepare(self, dtype):
    stash.append({k: v.detach().to("cpu", copy=True) for k, v in self.state_dict().items()})
    return orig_prepare(self, dtype)
M.Mxfp4Experts.prepare = prepare
from launch.bench import loaded
shape = sys.argv[1] if len(sys.argv) > 1 else "20b"
cfg, model = loaded(f"configs/gpt-oss-{shape}.yaml", (f"model.path=builtin:gpt-oss-{shape}", "model.load_format=dummy"))
print("stashed", len(stash), flush=True)
gen = torch.Generator("cuda").manual_seed(0)
E, H, I = model.config.num_local_experts, model.config.hidden_size, model.config.intermediate_size
math = dict(top_k=model.config.num_experts_per_tok, limit=model.config.swiglu_limit, alpha=model.config.swiglu_alpha)
def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()
@torch.no_grad()
def probe(layers):
    for i, layer in enumerate(model.model.layers[:layers]):
        ex = layer.mlp.experts
        with torch.device("cuda"):
            ref = M.Mxfp4Experts(E, H, I, **math)
        ref.load_state_dict({k: v.cuda() for k, v in stash[i].items()})
        with torch.device("cuda"):
            fresh = M.Mxfp4Experts(E, H, I, **math)
        fresh.load_state_dict({k: v.cuda() for k, v in stash[i].items()})
        orig_prepare(fresh, torch.bfloat16)
        rw, rb = layer.mlp.router.weight, layer.mlp.router.bias
        row = []
        for T in (1, 79, 640):
            h = torch.randn(T, H, device="cuda", generator=gen).bfloat16()
            k = ex(h, rw, rb); f = fresh(h, rw, rb)
            r = ref.reference(h.float(), rw.float(), rb.float())
            row.append(f"T={T}: model {k.isfinite().all().item()} {rel(k, r):.1e} fresh {f.isfinite().all().item()} {rel(f, r):.1e} same {torch.equal(k, f)}")
        kk, fk = ex.kernel, fresh.kernel
        same_w = [torch.equal(a.storage.data, b.storage.data) for a, b in ((kk.gate_up, fk.gate_up), (kk.down, fk.down),
                  (kk.gate_up_precision.weight_scale, fk.gate_up_precision.weight_scale), (kk.down_precision.weight_scale, fk.down_precision.weight_scale))]
        same_b = [torch.equal(kk.gate_up_bias.cpu(), stash[i]["gate_up_proj_bias"]), torch.equal(kk.down_bias.cpu(), stash[i]["down_proj_bias"])]
        row.append(f"weights = fresh {same_w} biases = stash {same_b}")
        torch.cuda.synchronize()
        print(f"layer {i}: " + " | ".join(row), flush=True)
        del ref, fresh
        torch.cuda.empty_cache()


probe(len(model.model.layers))
from parallel.engine.engine import Engine
cfg.engine.cuda_graphs = cfg.engine.compile = False
engine = Engine(model, cfg.engine, [200002])
print("after an engine (eager) started:", flush=True)
probe(4)
