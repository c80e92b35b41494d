"""Session 8's probe (call 5): which stage of the MXFP4 experts goes wrong. Random 20b- and 120b-shaped layers, a
random router (std 0.02, as model.load_format=dummy draws it), 79 and 640 tokens; routing, both matmul_ogs calls and
the route sum each run 3 times on the same inputs, the routing metadata checked against triton_kernels' torch
reference.

    python docs/bench/session8/stage_probe.py      (from the repository root, on a GPU, triton_kernels installed)"""
import sys, torch
sys.path.insert(0, ".")
import torch.nn.functional as F
from parallel.engine.mxfp4 import Mxfp4Experts, combine_routes
from triton_kernels.matmul_ogs import matmul_ogs
from triton_kernels.tensor_details.ragged_tensor import make_ragged_tensor_metadata_torch
H = I = 2880
def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()
torch.manual_seed(0)
for E, T in ((32, 79), (32, 640), (128, 79)):
  for seed in range(6):
    torch.manual_seed(seed)
    m = Mxfp4Experts.random_packed(E, H, I, device="cuda", dtype=torch.float32, top_k=4, limit=7.0, alpha=1.702)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.device("cuda"):
        fast = Mxfp4Experts(E, H, I, top_k=4, limit=7.0, alpha=1.702)
    fast.load_state_dict(state); fast.prepare(torch.bfloat16)
    k = fast.kernel
    rw = (torch.randn(E, H, device="cuda") * 0.02).bfloat16(); rb = (torch.randn(E, device="cuda") * 0.02).bfloat16()
    h = torch.randn(T, H, device="cuda").bfloat16()
    logits = F.linear(h, rw, rb)
    runs = []
    for _ in range(3):
        routing, gather, dispatch = k._route(logits)
        hidden = matmul_ogs(h, k.gate_up, k.gate_up_bias, routing, gather_indx=gather, precision_config=k.gate_up_precision, fused_activation=k.activation)
        rows = matmul_ogs(hidden, k.down, k.down_bias, routing, precision_config=k.down_precision, gammas=routing.gate_scal)
        out = combine_routes(rows, dispatch, 4)
        torch.cuda.synchronize()
        ed = routing.expt_data
        runs.append(dict(combine=gather.src_indx.clone(), dispatch=dispatch.clone(), counts=routing.expt_hist.clone(), gate=routing.gate_scal.clone(),
                         offs=ed.block_offs_data.clone(), sched=ed.block_schedule_data.clone(), slice_offs=ed.slice_offs.clone(),
                         hidden=hidden.clone(), rows=rows.clone(), out=out.clone()))
    ref = m.reference(h.float(), rw.float(), rb.float())
    diff = {key: [torch.equal(runs[0][key], r[key]) for r in runs[1:]] for key in runs[0]}
    torch_meta = make_ragged_tensor_metadata_torch(runs[0]["counts"], runs[0]["dispatch"].shape[0])
    meta_ok = torch.equal(torch_meta.block_offs_data.int(), runs[0]["offs"]) and torch.equal(torch_meta.block_schedule_data.int(), runs[0]["sched"])
    # routes: every route exactly once
    perm_ok = torch.equal(runs[0]["combine"].sort().values.long(), torch.arange(T * 4, device="cuda"))
    inv_ok = torch.equal(runs[0]["combine"].long()[runs[0]["dispatch"].long()], torch.arange(T * 4, device="cuda"))
    errs = ["%.1e" % rel(r["out"], ref) for r in runs]
    fin = [bool(r["out"].isfinite().all()) for r in runs]
    hfin = [bool(r["hidden"].isfinite().all()) for r in runs]
    unequal = {k2: v for k2, v in diff.items() if not all(v)}
    print(f"E={E} T={T} seed {seed}: errs {errs} finite {fin} hidden finite {hfin} meta=torch {meta_ok} perm {perm_ok} "
          f"inverse {inv_ok} repeat-unequal {unequal} counts {runs[0]['counts'].tolist()}", flush=True)
    del m, fast, k
    torch.cuda.empty_cache()
