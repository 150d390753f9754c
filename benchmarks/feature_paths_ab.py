"""Feature paths with a gradient, for A/B runs of two builds: forward + backward time of
a learnable per-head scale and of a bias broadcast over the keys, over the plain call's,
default and deterministic. bf16, b 4, h 16, d 128, n 1024 and 4096, for the fcsa on
sys.path. (dscale's accuracy: benchmarks/dscale_accuracy.py; the JSONs of 2026-12-02
also hold a 5-seed dscale error that an earlier version of this program measured.)

    python benchmarks/feature_paths_ab.py TAG OUT.json
"""
import json
import sys

import torch
from triton.testing import do_bench

import fcsa

tag = sys.argv[1]
rows = []
torch.manual_seed(0)
b, h, d = 4, 16, 128
for n in (1024, 4096):
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    cases = {
        "plain": {},
        "scale_grad": {"scale": torch.full((h,), 10.0, device="cuda", requires_grad=True)},
        "key_bcast_bias_grad": {
            "attn_bias": torch.randn(1, h, n, 1, device="cuda", dtype=torch.bfloat16, requires_grad=True)},
    }
    plain_ms = None
    for det in (False, True):
        for name, kw in cases.items():
            leaves = [q, k, v] + list(kw.values())

            def step():
                out = fcsa.flash_cosine_sim_attention(q, k, v, deterministic=det, **kw)
                return torch.autograd.grad(out, leaves, torch.ones_like(out))

            ms = do_bench(step, warmup=10, rep=50)
            plain_ms = ms if plain_ms is None else plain_ms
            rows.append(dict(tag=tag, d=d, n=n, deterministic=det, case=name, ms=ms, over_plain=ms / plain_ms))
            print(f"{tag:5s} d={d:3d} n={n:5d} det={det!s:5s} {name:22s} {ms:8.3f} ms  {ms / plain_ms:5.2f}x",
                  flush=True)
json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), open(sys.argv[2], "w"), indent=1)
