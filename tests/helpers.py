"""Shared by the tests: devices, dtypes, and the comparison against the float64 reference.

The fused function's error is bounded by PyTorch's own at the same precision:

    max|fused - ref| <= 2 * max|plain_lowprec - ref| + atol * max(1, max|ref|)

where ref is plain_cosine_sim_attention in float64 on the same (rounded) inputs and
plain_lowprec the same plain computation in the tested dtype.
"""

import pytest
import torch

import fcsa

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
GRAD_NAMES = ("q", "k", "v", "attn_bias", "scale")


def dtype_id(dtype):
    return str(dtype).replace("torch.", "")


def default_run(attention, **tensors):
    return attention(**tensors)


def attention_results(attention, run, tensors, dout):
    """Runs run(attention, **tensors); returns {"out", "lse"?, and the gradients}."""
    result = run(attention, **tensors)
    out, lse = result if isinstance(result, tuple) else (result, None)
    results = {"out": out.detach()}
    if lse is not None:
        results["lse"] = lse.detach()
    wrt = [n for n in GRAD_NAMES if n in tensors and tensors[n].requires_grad]
    if dout is not None and wrt:
        grads = torch.autograd.grad(out, [tensors[n] for n in wrt], dout, allow_unused=True)
        for n, g in zip(wrt, grads):
            results["d" + n] = torch.zeros_like(tensors[n]) if g is None else g
    return results


def assert_bounded(name, got, ref, lowprec, atol, magnitude=1.0):
    """got within 2x of PyTorch's own error at the same precision, plus atol relative to
    the larger of max|ref| and `magnitude` (the size of the terms a reduction sums)."""
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    got, ref, lowprec = (t.detach().double().cpu() for t in (got, ref, lowprec))
    if got.numel() == 0:
        return
    # -inf marks rows without a visible key (lse): they must agree exactly.
    infinite = torch.isinf(ref)
    assert torch.equal(torch.isinf(got), infinite), f"{name}: infinities differ"
    assert torch.equal(got[infinite], ref[infinite]), f"{name}: infinities differ"
    got, ref, lowprec = got[~infinite], ref[~infinite], lowprec[~infinite]
    assert torch.isfinite(got).all(), f"{name}: not finite"
    if got.numel() == 0:
        return
    err = (got - ref).abs().max().item()
    base = (lowprec - ref).abs().max().item()
    tol = 2 * base + atol * max(1.0, magnitude, ref.abs().max().item())
    assert err <= tol, (f"{name}: max error {err:.3g} exceeds {tol:.3g} "
                        f"(plain torch at this precision: {base:.3g})")


def check_attention(tensors, dtype, device, run=default_run, *, grad=True, bias_fp32=False,
                    atol=None, deterministic=None):
    """Checks the fused function against the float64 reference.

    tensors: float32 (or bool) CPU tensors, keyword arguments of the attention function;
    floating ones are cast to `dtype` (attn_bias to float32 with bias_fp32, scale always
    float32) and moved to `device`. run(attention, **tensors) calls the function.
    Returns the fused results (dict of out, lse and gradients).
    """
    atol = ATOL[dtype] if atol is None else atol

    def cast(name, t):
        if not t.is_floating_point():
            return t.to(device)
        to = dtype
        if name == "scale" or (name == "attn_bias" and bias_fp32):
            to = torch.float32
        return t.to(device=device, dtype=to).requires_grad_(grad)

    low = {n: cast(n, t) for n, t in tensors.items()}
    ref_in = {n: (t.detach().cpu().double().requires_grad_(grad) if t.is_floating_point()
                  else t.cpu()) for n, t in low.items()}
    plain_in = {n: (t.detach().clone().requires_grad_(grad) if t.is_floating_point() else t)
                for n, t in low.items()}

    flash = fcsa.flash_cosine_sim_attention
    if deterministic is not None:
        def flash(*args, **kwargs):
            return fcsa.flash_cosine_sim_attention(*args, deterministic=deterministic,
                                                   **kwargs)

    # The output has q's shape.
    dout = torch.randn(tensors["q"].shape).to(device=device, dtype=dtype) if grad else None
    got = attention_results(flash, run, low, dout)
    ref = attention_results(fcsa.plain_cosine_sim_attention, run, ref_in,
                            None if dout is None else dout.double().cpu())
    plain = attention_results(fcsa.plain_cosine_sim_attention, run, plain_in, dout)

    assert set(got) == set(ref), f"results {sorted(got)} != {sorted(ref)}"
    assert got["out"].dtype == dtype and got["out"].device.type == device
    magnitudes = {}
    if grad and "attn_bias" in tensors and tensors["attn_bias"].dim() == 4:
        magnitudes["dattn_bias"] = bias_gradient_magnitude(run, ref_in, dout)
    for name in got:
        if name.startswith("d"):
            assert got[name].dtype == low[name[1:]].dtype, f"{name}: dtype"
        assert_bounded(name, got[name], ref[name], plain[name], atol,
                       magnitudes.get(name, 1.0))
    return got


def bias_gradient_magnitude(run, ref_in, dout):
    """The largest sum of |d score| that one entry of a broadcast 4-D bias's gradient
    adds up. Where the bias is constant along the keys, the exact gradient is 0 (each
    softmax row's score gradients sum to 0), so the error is measured against the size
    of the terms summed, not against the result."""
    bias = ref_in["attn_bias"]
    q, k = ref_in["q"], ref_in["k"]
    b, h, nq = (q.shape[0], 1, q.shape[1]) if q.dim() == 3 else tuple(q.shape[:3])
    full = bias.detach().expand(b, h, nq, k.shape[-2]).clone().requires_grad_()
    result = run(fcsa.plain_cosine_sim_attention, **dict(ref_in, attn_bias=full))
    out = result[0] if isinstance(result, tuple) else result
    (dscore,) = torch.autograd.grad(out, [full], dout.double().cpu())
    reduced = [i for i in range(4) if bias.shape[i] == 1 and full.shape[i] != 1]
    total = dscore.abs().sum(dim=reduced) if reduced else dscore.abs()
    return total.max().item()


def random_mask(b, n, p=0.7):
    """A bool (b, n) mask with about p of the keys visible, at least one per row."""
    mask = torch.rand(b, n) < p
    mask[:, torch.randint(n, (1,))] = True
    return mask
