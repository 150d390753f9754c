"""Checks libfcsa's CPU backend against a float64 reference (plain formula, torch autograd).

    python cuda/tests/cpu/check_cpu_backend.py [--library PATH] [--quick] [--verbose]

Every case draws fresh random inputs, runs the library's forward and backward (outputs
poisoned with NaN beforehand) and compares out, lse, dq, dk, dv, dbias and dscale with
the reference computed in float64 from the same (rounded) inputs. A tensor passes when
max |x - ref| <= tol * (max |ref| + terms) + 4 * max |ref32 - ref|, where ref32 is the
same formula evaluated by torch in float32, tol depends on the input dtype, and terms
is the size of the parts that cancel in a sum (for dbias and dscale; 1 otherwise).
Also checks bitwise determinism across thread counts and the degenerate sizes. Exits
non-zero when anything fails. FCSA_CPU_ISA=generic or =avx2 tests the other kernels.
"""
import argparse
import itertools
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fcsa_ctypes as fc  # noqa: E402

TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def grouped_l2norm(x, groups):
    shape = x.shape
    x = x.reshape(*shape[:-1], groups, shape[-1] // groups)
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return x.reshape(shape)


def reference(q, k, v, mask, bias, scale, groups, causal, l2norm, dout, dtype=torch.float64):
    """The plain formula's forward and gradients (torch autograd) computed in `dtype`."""
    q64 = q.to(dtype).requires_grad_()
    k64 = k.to(dtype).requires_grad_()
    v64 = v.to(dtype).requires_grad_()
    bias64 = bias.to(dtype).requires_grad_() if bias is not None else None
    scale64 = scale.to(dtype).requires_grad_() if torch.is_tensor(scale) else None
    b, h, nq, d = q.shape
    hk, nk = k.shape[1], k.shape[2]
    qn = grouped_l2norm(q64, groups) if l2norm else q64
    kn = grouped_l2norm(k64, groups) if l2norm else k64
    kn = kn.repeat_interleave(h // hk, dim=1)
    ve = v64.repeat_interleave(h // hk, dim=1)
    if scale64 is None:
        s = scale * (qn @ kn.transpose(-1, -2))
    else:
        s = scale64.reshape(1, -1, 1, 1) * (qn @ kn.transpose(-1, -2))
    if bias64 is not None:
        s = s + bias64
    visible = torch.ones(b, 1, nq, nk, dtype=torch.bool)
    if mask is not None:
        visible = visible & mask[:, None, None, :]
    if causal:
        i = torch.arange(nq)[:, None]
        j = torch.arange(nk)[None, :]
        visible = visible & (j <= i + (nk - nq))
    visible = visible.expand(b, h, nq, nk)
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    dead = torch.isinf(lse)
    p = torch.where(visible, torch.exp(s - torch.where(dead, torch.zeros_like(lse), lse)), torch.zeros_like(s))
    p.retain_grad()
    out = p @ ve
    out.backward(dout.to(dtype))
    result = {"out": out.detach(), "lse": lse.squeeze(-1).detach(), "dq": q64.grad, "dk": k64.grad, "dv": v64.grad}
    # dS = P dP - P delta cancels; the size of its two parts bounds the rounding of the
    # sums of dS that make up dbias and dscale.
    delta = (dout.to(dtype) * out.detach()).sum(-1, keepdim=True)
    ds = (p * (p.grad.abs() + delta.abs())).detach()
    if bias64 is not None:
        result["dbias"] = bias64.grad
        reduced = [i for i in range(4) if bias64.shape[i] == 1 and ds.shape[i] > 1]
        result["dbias_terms"] = ds.sum(dim=reduced, keepdim=True) if reduced else ds
    if scale64 is not None:
        result["dscale"] = scale64.grad
        terms = (ds * (qn @ kn.transpose(-1, -2)).abs().detach()).sum(dim=(0, 2, 3))
        result["dscale_terms"] = terms if scale64.dim() == 1 else terms.sum()
    return result


def max_abs(x):
    return x.abs().max().item() if x.numel() else 0.0


def compare(x, ref, ref32, tolerance, terms=1.0):
    """(relative error, error / allowed error). Allowed: tolerance * (max |ref| + terms),
    plus four times the error of the same formula evaluated by torch in float32. The
    `terms` floor (the largest sum of |terms| that makes up one element) and the float32
    error account for sums that cancel, like a gradient that is zero in exact arithmetic."""
    x = x.double()
    finite = torch.isfinite(ref)
    if not torch.equal(finite, torch.isfinite(x)) or not torch.equal(x[~finite], ref[~finite]):
        return math.inf, math.inf
    x, ref, ref32 = x[finite], ref[finite], ref32.double()[finite]
    error = max_abs(x - ref)
    allowed = tolerance * (max_abs(ref) + terms) + 4 * max_abs(ref32 - ref)
    return error / max(max_abs(ref), 1e-30), error / allowed


def strided(t, layout):
    """The same values in another memory layout (the last dim stays contiguous)."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "padded":  # row stride larger than d
        wide = torch.empty(*t.shape[:-1], t.shape[-1] + 5, dtype=t.dtype)
        wide[..., : t.shape[-1]] = t
        return wide[..., : t.shape[-1]]
    if layout == "seq-major":  # (b, n, h, d) memory, as from a projection
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    raise ValueError(layout)


class Checker:
    def __init__(self, lib, verbose):
        self.lib = lib
        self.verbose = verbose
        self.failures = []
        self.count = 0
        self.worst = {}

    def case(self, name, b=2, h=4, hk=None, nq=37, nk=None, d=32, d_v=None, dtype=torch.float32, groups=1,
             causal=False,
             mask=False, bias_shape=None, bias_dtype=None, scale=8.0, scale_tensor=None, l2norm=True,
             magnitude=1.0, bias_magnitude=1.0, layout="contiguous", zero_rows=False, dead_rows=False,
             num_threads=0, tolerance=None):
        hk = hk or h
        nk = nk if nk is not None else nq
        d_v = d_v or d  # v's head dim
        q = (torch.randn(b, h, nq, d) * magnitude).to(dtype)
        k = (torch.randn(b, hk, nk, d) * magnitude).to(dtype)
        v = torch.randn(b, hk, nk, d_v).to(dtype)
        if zero_rows:  # zero vectors among the queries and keys
            if nq > 1:
                q[:, :, 1] = 0
            if nk > 2:
                k[:, :, 2] = 0
        mask_t = None
        if mask:
            mask_t = torch.rand(b, nk) > 0.3
            if dead_rows:
                mask_t[0] = False  # batch 0 sees no key at all
        bias_t = None
        if bias_shape is not None:
            bias_t = (torch.randn(*bias_shape) * bias_magnitude).to(bias_dtype or dtype)
        scale_value = scale
        if scale_tensor is not None:
            scale_value = (torch.rand(scale_tensor) * 10 + 1).float()
        q, k, v = strided(q, layout), strided(k, layout), strided(v, layout)
        dout = torch.randn(b, h, nq, d_v).to(dtype)

        out, lse = fc.forward(self.lib, q, k, v, mask_t, bias_t, scale_value, groups, causal, l2norm, num_threads)
        grads = fc.backward(self.lib, q, k, v, out, dout, lse, mask_t, bias_t, scale_value, groups, causal, l2norm,
                            num_threads, want_dbias=bias_t is not None, want_dscale=scale_tensor is not None)
        ref = reference(q, k, v, mask_t, bias_t, scale_value, groups, causal, l2norm, dout)
        ref32 = reference(q, k, v, mask_t, bias_t, scale_value, groups, causal, l2norm, dout, torch.float32)
        got = {"out": out, "lse": lse, "dq": grads[0], "dk": grads[1], "dv": grads[2]}
        if bias_t is not None:
            got["dbias"] = grads[3]
        if scale_tensor is not None:
            got["dscale"] = grads[4]
        limit = tolerance or TOLERANCE[dtype]
        terms = {"out": 1.0, "lse": 1.0, "dq": 1.0, "dk": 1.0, "dv": 1.0}
        for key in ("dbias", "dscale"):
            if key in got:  # sums of dS (times the cosine) over many logits
                terms[key] = max_abs(ref[key + "_terms"])
        results = {key: compare(got[key], ref[key], ref32[key], limit, terms[key]) for key in got}
        bad = [key for key, (_, ratio) in results.items() if not ratio <= 1.0]
        self.count += 1
        for key, (error, ratio) in results.items():
            self.worst[(dtype, key)] = max(self.worst.get((dtype, key), 0.0), ratio)
        line = f"{name:55s} " + " ".join(f"{key}={e:.1e}" for key, (e, _) in results.items())
        if bad:
            line += "  (over the bound: " + ", ".join(f"{key} x{results[key][1]:.1f}" for key in bad) + ")"
        if bad:
            self.failures.append(line)
            print("FAIL", line, flush=True)
        elif self.verbose:
            print("ok  ", line, flush=True)


def run_cases(c, quick):
    # Lengths, cross attention and head dims.
    lengths = [(1, 1), (7, 7), (63, 63), (127, 127), (300, 300), (7, 300), (300, 7), (65, 129), (1, 200)]
    if quick:
        lengths = [(7, 7), (127, 127), (7, 300), (300, 7)]
    for (nq, nk), d in itertools.product(lengths, [8, 24, 64, 80, 100]):
        c.case(f"len nq={nq} nk={nk} d={d}", nq=nq, nk=nk, d=d)
    # Groups, with and without l2norm.
    for groups, d in [(2, 64), (4, 64), (4, 24), (2, 100)]:
        c.case(f"groups={groups} d={d}", groups=groups, d=d, nq=70, nk=90)
    # Masks and causal, aligned to the end.
    for nq, nk in [(100, 100), (130, 60), (60, 130), (1, 77), (77, 1), (200, 70)]:
        c.case(f"causal nq={nq} nk={nk}", causal=True, nq=nq, nk=nk)
        c.case(f"mask nq={nq} nk={nk}", mask=True, nq=nq, nk=nk)
        c.case(f"mask+causal nq={nq} nk={nk}", mask=True, causal=True, nq=nq, nk=nk)
    c.case("fully masked batch", mask=True, dead_rows=True, nq=40, nk=70)
    c.case("fully masked batch, causal, bias", mask=True, dead_rows=True, causal=True, nq=40, nk=70,
           bias_shape=(2, 4, 40, 70))
    c.case("causal nq > nk: early rows see nothing", causal=True, nq=150, nk=20, mask=True)
    c.case("zero vectors in q and k", zero_rows=True, nq=50, nk=60)
    c.case("zero vectors, groups=2", zero_rows=True, nq=50, nk=60, groups=2)
    # Every bias shape, including broadcast dims, in q's dtype and in float32.
    b, h, nq, nk = 2, 4, 45, 70
    for dims in itertools.product([False, True], repeat=4):
        shape = tuple(1 if broadcast else full for broadcast, full in zip(dims, (b, h, nq, nk)))
        c.case(f"bias {shape}", b=b, h=h, nq=nq, nk=nk, bias_shape=shape, bias_magnitude=2.0)
    c.case("bias (1,4,45,70) GQA hk=2, causal", b=2, h=4, hk=2, nq=45, nk=70, bias_shape=(1, 4, 45, 70),
           causal=True)
    c.case("bias (2,1,1,70) hk=1, mask", b=2, h=4, hk=1, nq=45, nk=70, bias_shape=(2, 1, 1, 70), mask=True)
    c.case("bias (1,1,45,1) hk=2", b=2, h=4, hk=2, nq=45, nk=70, bias_shape=(1, 1, 45, 1))
    # Scale: a number, a tensor of shape () or (h,), negative and large.
    c.case("scale tensor ()", scale_tensor=(), nq=50, nk=60)
    c.case("scale tensor (h,)", scale_tensor=(4,), nq=50, nk=60)
    c.case("scale tensor (h,) GQA hk=2 causal", scale_tensor=(4,), hk=2, nq=50, nk=60, causal=True)
    c.case("scale tensor (h,) hk=1 with bias", scale_tensor=(4,), hk=1, nq=50, nk=60, bias_shape=(1, 4, 50, 60))
    c.case("scale -3", scale=-3.0, nq=50, nk=60)
    c.case("scale 0", scale=0.0, nq=50, nk=60)
    c.case("scale 60 (beyond the constant offset)", scale=60.0, nq=50, nk=60)
    c.case("scale 25, groups 4 (beyond the constant offset)", scale=25.0, groups=4, nq=50, nk=60)
    # Grouped-query and single-head kv.
    for hk in (1, 2, 4):
        c.case(f"GQA h=4 hk={hk}", h=4, hk=hk, nq=70, nk=130)
        c.case(f"GQA h=4 hk={hk} causal mask", h=4, hk=hk, nq=70, nk=130, causal=True, mask=True)
    c.case("GQA h=8 hk=2 b=1", b=1, h=8, hk=2, nq=300, nk=300)
    # No l2norm: large norms and large biases stay finite and correct.
    c.case("l2norm off", l2norm=False, scale=0.125, nq=60, nk=80)
    # Logits of a few hundred carry float32 rounding of ~1e-5 relative into P: looser bound.
    c.case("l2norm off |q|,|k| ~ 1e3, scale 1e-3", l2norm=False, scale=1e-3, magnitude=1e3 / 8, nq=60, nk=80,
           tolerance=1e-4)
    c.case("l2norm off, bias ~ 1e4", l2norm=False, scale=0.125, bias_shape=(2, 4, 60, 80), bias_magnitude=1e4,
           nq=60, nk=80, tolerance=1e-4)
    c.case("l2norm on, bias ~ 1e4", bias_shape=(1, 4, 60, 80), bias_magnitude=1e4, nq=60, nk=80, tolerance=1e-4)
    c.case("l2norm off, causal, mask, GQA", l2norm=False, scale=0.1, causal=True, mask=True, hk=2, nq=90, nk=70)
    # Memory layouts.
    for layout in ("padded", "seq-major"):
        c.case(f"layout {layout}", layout=layout, nq=70, nk=90, d=40)
        c.case(f"layout {layout} GQA causal", layout=layout, hk=2, causal=True, nq=70, nk=90, d=40)
    # Few kv heads: the keys are split into ranges (partial dq sums).
    c.case("b=1 hk=1 long keys (key splits)", b=1, h=2, hk=1, nq=90, nk=1500)
    c.case("b=1 hk=1 key splits, bias (1,1,1,nk), scale (h,)", b=1, h=2, hk=1, nq=90, nk=1500,
           bias_shape=(1, 1, 1, 1500), scale_tensor=(2,))
    c.case("b=1 hk=1 key splits, causal nq > nk", b=1, h=2, hk=1, nq=900, nk=700, causal=True)
    # Many kv heads and long keys: each item walks its keys in chunks (dq^ carried over).
    c.case("b*hk=16, nk=1100: key chunks", b=2, h=8, nq=100, nk=1100)
    c.case("key chunks, causal nq > nk, mask, bias (1,8,1,nk)", b=2, h=8, nq=700, nk=600, causal=True, mask=True,
           bias_shape=(1, 8, 1, 600), scale_tensor=(8,))
    c.case("key chunks, d=256, GQA hk=8 of h=16", b=1, h=16, hk=8, d=256, nq=70, nk=300, causal=True)
    # v with a head dim of its own (d_v), wider or narrower than q's and k's.
    for d, d_v in [(32, 64), (64, 32), (192, 128), (24, 40), (3, 17)]:
        c.case(f"d={d} d_v={d_v} causal mask bias (h,1,nk) scale (h,)", d=d, d_v=d_v, causal=True, mask=True,
               bias_shape=(1, 4, 1, 90), scale_tensor=(4,), nq=70, nk=90)
    c.case("d=64 d_v=32 key splits, padded layout", b=1, h=2, hk=1, d=64, d_v=32, nq=90, nk=1500, layout="padded")
    c.case("d=24 d_v=40 key chunks, bias (1,8,1,nk)", b=2, h=8, d=24, d_v=40, nq=100, nk=1100,
           bias_shape=(1, 8, 1, 1100))
    c.case("bfloat16 d=192 d_v=128 GQA", dtype=torch.bfloat16, d=192, d_v=128, hk=2, nq=100, nk=120)
    # Threads.
    for threads in (1, 3):
        c.case(f"num_threads={threads}", num_threads=threads, nq=130, nk=170, causal=True, mask=True)
    # Half precision inputs.
    for dtype in (torch.float16, torch.bfloat16):
        name = str(dtype).replace("torch.", "")
        c.case(f"{name}", dtype=dtype, nq=100, nk=120)
        c.case(f"{name} d=80 causal GQA", dtype=dtype, d=80, hk=2, causal=True, nq=100, nk=120)
        c.case(f"{name} bias in {name}", dtype=dtype, bias_shape=(2, 1, 100, 120), nq=100, nk=120)
        c.case(f"{name} bias in float32", dtype=dtype, bias_shape=(1, 4, 1, 120), bias_dtype=torch.float32,
               nq=100, nk=120)
        c.case(f"{name} scale (h,) groups 2 mask", dtype=dtype, scale_tensor=(4,), groups=2, mask=True, nq=100,
               nk=120)
        c.case(f"{name} l2norm off", dtype=dtype, l2norm=False, scale=0.125, nq=100, nk=120)


def check_determinism(lib):
    """The backward gives the same bits for any thread count and on every run."""
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 4, 300, 64), torch.randn(1, 2, 900, 64), torch.randn(1, 2, 900, 64)
    bias = torch.randn(1, 1, 300, 900)
    dout = torch.randn(1, 4, 300, 64)
    scale = torch.rand(4) + 5
    results = []
    for threads in (1, 2, 3, 1):
        out, lse = fc.forward(lib, q, k, v, bias=bias, scale=scale, causal=True, num_threads=threads)
        grads = fc.backward(lib, q, k, v, out, dout, lse, bias=bias, scale=scale, causal=True,
                            num_threads=threads, want_dbias=True, want_dscale=True)
        results.append((out, lse) + grads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            if not torch.equal(a, b):
                print("FAIL determinism: results differ between thread counts")
                return False
    print("ok   determinism: same bits for 1, 2 and 3 threads and a repeated run")
    return True


def check_degenerate(lib):
    ok = True
    # nk == 0: out = 0, lse = -inf, dq = 0, dbias over a broadcast key dim = 0, dscale = 0.
    q = torch.randn(2, 3, 5, 16)
    k = torch.randn(2, 3, 0, 16)
    v = torch.randn(2, 3, 0, 16)
    bias = torch.randn(2, 3, 5, 1)
    scale = torch.rand(3) + 1
    out, lse = fc.forward(lib, q, k, v, bias=bias, scale=scale)
    ok &= torch.equal(out, torch.zeros_like(out)) and bool(torch.all(lse == float("-inf")))
    dq, dk, dv, dbias, dscale = fc.backward(lib, q, k, v, out, torch.randn_like(q), lse, bias=bias, scale=scale,
                                            want_dbias=True, want_dscale=True)
    ok &= torch.equal(dq, torch.zeros_like(dq)) and torch.equal(dbias, torch.zeros_like(dbias))
    ok &= torch.equal(dscale, torch.zeros_like(dscale))
    # nq == 0: nothing to write in the forward; the backward's dk, dv are zero.
    q = torch.randn(2, 4, 0, 16)
    k, v = torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    out, lse = fc.forward(lib, q, k, v)
    dq, dk, dv, _, _ = fc.backward(lib, q, k, v, out, torch.randn_like(q), lse)
    ok &= torch.equal(dk, torch.zeros_like(dk)) and torch.equal(dv, torch.zeros_like(dv))
    print(("ok  " if ok else "FAIL") + " degenerate sizes: nk = 0, nq = 0")
    return ok


def check_large_offsets(lib):
    """Element offsets beyond 2^31: batch 1 of q, k, v, out and dq lies 2^31 + 64 elements
    past batch 0. The memory between is reserved, never touched, so this costs little."""
    torch.manual_seed(2)
    shape, far = (2, 2, 9, 16), 2**31 + 64

    def spread(t):
        wide = torch.empty_strided(t.shape, (far, 9 * 16, 16, 1), dtype=t.dtype)
        wide.copy_(t)
        return wide

    q, k, v, dout = (torch.randn(shape, dtype=torch.float16) for _ in range(4))
    out, lse = fc.forward(lib, q, k, v, causal=True)
    grads = fc.backward(lib, q, k, v, out, dout, lse, causal=True)
    far_out = spread(torch.zeros_like(out))
    out2, lse2 = fc.forward(lib, spread(q), spread(k), spread(v), causal=True, out=far_out)
    far_grads = (spread(torch.zeros_like(q)), spread(torch.zeros_like(k)), spread(torch.zeros_like(v)), None, None)
    grads2 = fc.backward(lib, spread(q), spread(k), spread(v), out2, spread(dout), lse2, causal=True,
                         grads=far_grads)
    ok = torch.equal(out, out2) and torch.equal(lse, lse2) and all(torch.equal(a, b) for a, b in zip(grads[:3],
                                                                                                       grads2[:3]))
    print(("ok  " if ok else "FAIL") + " offsets beyond 2^31 elements give the same bits")
    return ok


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--library", default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    lib = fc.load(args.library)
    print(lib.fcsa_build_info().decode())
    torch.manual_seed(0)
    checker = Checker(lib, args.verbose)
    run_cases(checker, args.quick)
    ok = check_determinism(lib) & check_degenerate(lib) & check_large_offsets(lib)
    print(f"{checker.count} cases, {len(checker.failures)} failed")
    for (dtype, key), e in sorted(checker.worst.items(), key=lambda x: (str(x[0][0]), x[0][1])):
        print(f"  worst error / allowed  {str(dtype):15s} {key:7s} {e:.2f}")
    if checker.failures or not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
