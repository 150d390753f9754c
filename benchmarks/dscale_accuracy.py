"""dscale against float64 as tests/test_numerics.py::test_learnable_scale_gradient_in_16_bit
measures it, over 20 fresh draws per case: the error over that test's per-draw bound
(median and largest) and over |dscale|, for the fcsa on sys.path (CUDA).

    python benchmarks/dscale_accuracy.py TAG OUT.json     (from the repository root)
"""
import sys, json, torch
import fcsa
sys.path.insert(0, "tests")
from test_numerics import related_tokens, softmax_grad_parts, attention_and_grads, leaves, GRAD_TOL, U32

tag = sys.argv[1]
out = {}
for dtype in (torch.bfloat16, torch.float16):
    for shape in ((), (4,)):
        for det in (False, True):
            ratios, rel = [], []
            for trial in range(20):
                b, h, n, d = 2, 4, 128, 64
                q, k = related_tokens(b, h, n, d)
                v = torch.randn(b, h, n, d)
                scale = (6 + 4 * torch.rand(shape)).cuda().requires_grad_()
                inputs = dict(zip("qkv", leaves("cuda", dtype, q, k, v)), scale=scale)
                dout = torch.randn(b, h, n, d, device="cuda", dtype=dtype)
                got = attention_and_grads(inputs, dout, deterministic=det)
                ref = attention_and_grads(inputs, dout, reference=True)
                ds, cos = softmax_grad_parts(inputs["q"], inputs["k"], inputs["v"], dout, scale)
                terms = (ds * cos.abs()).sum(dim=(0, 2, 3))
                terms = (terms.sum() if shape == () else terms.max()).item()
                error = (got["dscale"].cpu().double() - ref["dscale"]).abs().max().item()
                bound = GRAD_TOL[dtype] * ref["dscale"].abs().max().item() + 4 * U32 * terms
                ratios.append(error / bound)
                rel.append(error / ref["dscale"].abs().max().item())
            key = f"{str(dtype)[6:]} {'scalar' if shape == () else 'per_head'} {'det' if det else 'atomic'}"
            out[key] = dict(max_ratio=max(ratios), median_ratio=sorted(ratios)[10], max_rel=max(rel))
            print(f"{tag} {key:28s} error/bound max {max(ratios):6.3f} median {sorted(ratios)[10]:6.3f}  max rel {max(rel):.2e}", flush=True)
json.dump(out, open(sys.argv[2], "w"), indent=1)
