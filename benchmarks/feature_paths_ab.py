"""Feature paths with a gradient, for A/B runs of two builds: forward + backward time of
a learnable per-head scale and of a bias broadcast over the keys, over the plain call's,
default and deterministic; and dscale's error against float64 (bf16). bf16, b 4, h 16,
d 128, n 1024 and 4096, for the fcsa on sys.path.

    python benchmarks/feature_paths_ab.py TAG OUT.json
"""
import json, sys, torch
from triton.testing import do_bench
import fcsa

tag = sys.argv[1]
rows = []
torch.manual_seed(0)
for d in (128,):
    for n in (1024, 4096):
        b, h = 4, 16
        mk = lambda: torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        q, k, v = mk(), mk(), mk()
        cases = {
            "plain": dict(),
            "scale_grad": dict(scale=torch.full((h,), 10.0, device="cuda", requires_grad=True)),
            "key_bcast_bias_grad": dict(attn_bias=torch.randn(1, h, n, 1, device="cuda", dtype=torch.bfloat16, requires_grad=True)),
        }
        base_ms = {}
        for det in (False, True):
            for name, kw in cases.items():
                def step():
                    out = fcsa.flash_cosine_sim_attention(q, k, v, deterministic=det, **kw)
                    leaves = [q, k, v] + [t for t in kw.values() if torch.is_tensor(t) and t.requires_grad]
                    return torch.autograd.grad(out, leaves, torch.ones_like(out))
                ms = do_bench(step, warmup=10, rep=50)
                if name == "plain" and not det: base_ms = ms
                rows.append(dict(tag=tag, d=d, n=n, deterministic=det, case=name, ms=ms, over_plain=ms / base_ms))
                print(f"{tag:5s} d={d:3d} n={n:5d} det={det!s:5s} {name:22s} {ms:8.3f} ms  {ms/base_ms:5.2f}x", flush=True)
# dscale accuracy: related tokens (a common direction), bf16, against float64
errs = []
for det in (False, True):
    worst = 0.0
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        b, h, n, d = 2, 4, 512, 64
        common = torch.randn(1, 1, 1, d, generator=g) * 2
        q = torch.randn(b, h, n, d, generator=g) + common
        k = torch.randn(b, h, n, d, generator=g) + common
        v = torch.randn(b, h, n, d, generator=g)
        dout = torch.randn(b, h, n, d, generator=g)
        s = (6 + 4 * torch.rand(h, generator=g))
        sc = s.cuda().requires_grad_()
        out = fcsa.flash_cosine_sim_attention(*(t.cuda().bfloat16() for t in (q, k, v)), scale=sc, deterministic=det)
        (got,) = torch.autograd.grad(out, (sc,), dout.cuda().bfloat16())
        qd, kd, vd = (t.double().bfloat16().double() for t in (q, k, v))
        sd = s.double().requires_grad_()
        ref_out = fcsa.plain_cosine_sim_attention(qd, kd, vd, scale=sd)
        (ref,) = torch.autograd.grad(ref_out, (sd,), dout.bfloat16().double())
        worst = max(worst, ((got.cpu().double() - ref).abs() / ref.abs().max()).max().item())
    errs.append(dict(tag=tag, deterministic=det, dscale_rel_error=worst))
    print(f"{tag} dscale relative error (bf16, 5 seeds, det={det}): {worst:.3e}", flush=True)
json.dump(dict(device=torch.cuda.get_device_name(), rows=rows, dscale=errs), open(sys.argv[2], "w"), indent=1)
