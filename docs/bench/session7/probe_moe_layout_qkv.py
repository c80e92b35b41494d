"""The probe behind session 7's two engine changes (docs/performance.md), on one GPU, each piece replayed from a
CUDA graph:
1. q, k and v projections (gpt-oss's shapes, bf16) as three GEMMs against one over their stacked weights, and
   o_proj, by tokens;
2. one MoE layer through matmul_ogs (MXFP4, 20b and 120b shapes) with the scales' Hopper layout for 8 warps (the
   engine's before) and for 4, by tokens, and the relative difference of their outputs.

    python docs/bench/session7/probe_moe_layout_qkv.py     (from the repository root, triton_kernels installed)"""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "0")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import triton_kernels.tensor_details.layout as tk_layout  # noqa: E402
from parallel.engine.mxfp4 import Mxfp4Experts  # noqa: E402
from tests.gpu.mxfp4_check import HIDDEN, INNER, MATH, in_graph, replay_us, relative, layer_inputs  # noqa: E402

original = tk_layout.make_default_matmul_mxfp4_w_scale_layout


def with_warps(w):
    def make(mx_axis, num_warps=8):
        return original(mx_axis=mx_axis, num_warps=w)
    return make


@torch.no_grad()
def moe():
    print(torch.cuda.get_device_name(), flush=True)
    print(f"{'layer':<6} {'tokens':>6} " + " ".join(f"{'w' + str(w) + ' us':>9}" for w in (8, 4)) + "  err(w4 vs w8)", flush=True)
    for name, total in (("20b", 32), ("120b", 128)):
        torch.manual_seed(0)
        ref = Mxfp4Experts.random_packed(total, HIDDEN, INNER, device="cuda", dtype=torch.float32, **MATH)
        state = {k: v.clone() for k, v in ref.state_dict().items()}
        del ref
        mods = {}
        for w in (8, 4):
            tk_layout.make_default_matmul_mxfp4_w_scale_layout = with_warps(w)
            with torch.device("cuda"):
                m = Mxfp4Experts(total, HIDDEN, INNER, **MATH)
            m.load_state_dict(state)
            m.prepare(torch.bfloat16)
            mods[w] = m
        tk_layout.make_default_matmul_mxfp4_w_scale_layout = original
        gen = torch.Generator("cuda").manual_seed(0)
        for tokens in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512):
            h, rw, rb = layer_inputs(total, tokens, gen)
            times, outs = [], []
            for w, m in mods.items():
                g, out = in_graph(m, h, rw, rb)
                times.append(min(replay_us(g, 100) for _ in range(3)))
                outs.append(out.clone())
                del g
            print(f"{name:<6} {tokens:>6} " + " ".join(f"{t:>9.1f}" for t in times) + f"  {relative(outs[1], outs[0]):.1e}", flush=True)
        del mods
        torch.cuda.empty_cache()


@torch.no_grad()
def qkv():
    print(f"\n{'tokens':>6} {'3 GEMMs us':>10} {'fused us':>9} {'o_proj us':>9}", flush=True)
    d = torch.bfloat16
    wq, wk, wv = (torch.randn(n, HIDDEN, device="cuda", dtype=d) * 0.02 for n in (4096, 512, 512))
    bq, bk, bv = (torch.randn(n, device="cuda", dtype=d) for n in (4096, 512, 512))
    wo, bo = torch.randn(HIDDEN, 4096, device="cuda", dtype=d) * 0.02, torch.randn(HIDDEN, device="cuda", dtype=d)
    w, b = torch.cat((wq, wk, wv)), torch.cat((bq, bk, bv))
    for tokens in (1, 4, 16, 64, 128, 256):
        x = torch.randn(tokens, HIDDEN, device="cuda", dtype=d)
        a = in_graph(lambda x: [F.linear(x, wq, bq), F.linear(x, wk, bk), F.linear(x, wv, bv)], x)[0]
        f = in_graph(lambda x: F.linear(x, w, b).split((4096, 512, 512), -1), x)[0]
        o = in_graph(lambda x: F.linear(x, wo, bo), torch.randn(tokens, 4096, device="cuda", dtype=d))[0]
        print(f"{tokens:>6} {min(replay_us(a, 200) for _ in range(3)):>10.1f} {min(replay_us(f, 200) for _ in range(3)):>9.1f} "
              f"{min(replay_us(o, 200) for _ in range(3)):>9.1f}", flush=True)


if __name__ == "__main__":
    qkv()
    moe()
