"""The portable backward's kernels, timed for A/B runs of two builds: backward time (the
gradient of a kept graph, triton's do_bench) of shapes that take each of its kernels
(shared-scores, main with and without the general paths, dq), for the fcsa on sys.path.
Run it with FCSA_DISABLE_SM90=1 on Hopper so that the portable path runs there too.

    FCSA_DISABLE_SM90=1 python benchmarks/portable_backward_ab.py TAG OUT.json
"""
import json, os, sys, torch
from triton.testing import do_bench
import fcsa

tag, path = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
cases = [
    ("bf16 d64 n4096 (shared-scores 128)", torch.bfloat16, 64, 4096, {}),
    ("f16 d128 n4096 (shared-scores 64)", torch.float16, 128, 4096, {}),
    ("f16 d64 n4096 (shared-scores 128)", torch.float16, 64, 4096, {}),
    ("bf16 d128 n4096 causal", torch.bfloat16, 128, 4096, {"causal": True}),
    ("bf16 d64 n4096 key mask", torch.bfloat16, 64, 4096, {"mask": True}),
    ("bf16 d64 n4096 no l2norm", torch.bfloat16, 64, 4096, {"l2norm_qk": False, "scale": 0.125}),
    ("bf16 d128 n4096 bias", torch.bfloat16, 128, 4096, {"bias": True}),
    ("bf16 d128 n4096 deterministic", torch.bfloat16, 128, 4096, {"deterministic": True}),
    ("f32 d64 n2048", torch.float32, 64, 2048, {}),
    ("bf16 d256 n2048", torch.bfloat16, 256, 2048, {}),
]
rows = []
for name, dtype, d, n, kw in cases:
    b, h = max(1, 16384 // n), 1024 // d
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    kw = dict(kw)
    if kw.pop("mask", False): kw["mask"] = torch.rand(b, n, device="cuda") < 0.8
    if kw.pop("bias", False): kw["attn_bias"] = torch.randn(h, n, n, device="cuda", dtype=dtype)
    out = fcsa.flash_cosine_sim_attention(q, k, v, **kw)
    dout = torch.randn_like(out)
    ms = do_bench(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True), warmup=10, rep=60)
    rows.append(dict(tag=tag, case=name, ms=ms, backend=fcsa.last_backend()))
    print(f"{tag:5s} {name:38s} {ms:8.3f} ms", flush=True)
json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), open(path, "w"), indent=1)
