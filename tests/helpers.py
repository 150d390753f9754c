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


def qkv(b, h, nq, nk, d, hk=None):
    """Random float32 CPU q, k, v (check_attention's `tensors`); hk kv heads."""
    hk = h if hk is None else hk
    return {"q": torch.randn(b, h, nq, d), "k": torch.randn(b, hk, nk, d),
            "v": torch.randn(b, hk, nk, d)}


def with_kwargs(**kwargs):
    """A `run` for check_attention that passes these keyword arguments."""
    def run(attention, **tensors):
        return attention(**tensors, **kwargs)
    return run


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


def assert_bounded(name, got, ref, lowprec, atol, allowance=0.0):
    """got within 2x of PyTorch's own error at the same precision, plus atol relative to
    max|ref|, plus `allowance` (see rounding_allowance)."""
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
    tol = 2 * base + atol * max(1.0, ref.abs().max().item()) + allowance
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

    # The output has q's shape but for the head dim, v's.
    out_shape = (*tensors["q"].shape[:-1], tensors["v"].shape[-1])
    dout = torch.randn(out_shape).to(device=device, dtype=dtype) if grad else None
    got = attention_results(flash, run, low, dout)
    ref = attention_results(fcsa.plain_cosine_sim_attention, run, ref_in,
                            None if dout is None else dout.double().cpu())
    plain = attention_results(fcsa.plain_cosine_sim_attention, run, plain_in, dout)

    assert set(got) == set(ref), f"results {sorted(got)} != {sorted(ref)}"
    assert got["out"].dtype == dtype and got["out"].device.type == device
    allowance = rounding_allowance(run, ref_in, dout, got["out"], dtype)
    for name in got:
        if name.startswith("d"):
            assert got[name].dtype == low[name[1:]].dtype, f"{name}: dtype"
        assert_bounded(name, got[name], ref[name], plain[name], atol,
                       allowance.get(name, 0.0))
    return got


def rounding_allowance(run, ref_in, dout, out, dtype):
    """Extra tolerance for results where fused kernels round differently from plain
    PyTorch, computed on the float64 reference. Scores are rounded to float32 at the
    size of the logits, |s_ij| up to about |lse_i|, and subtracting a running maximum or
    lse keeps that absolute error. Kernels round lse, the recomputed score and its base-2
    form (s log2 e) at that size, and exp2's approximation adds its own: each P_ij is
    off by a factor up to about 1 + e_i, e_i = 8 u32 |lse_i| (u: unit roundoff):

    - out_i = sum_j P_ij v_j / sum_j P_ij: off by up to e_i max_j |v_j - out_i|.
    - The backward recomputes P_ij = exp(s_ij - lse_i): every gradient is off by the
      gradient taken with dO_i scaled by e_i.
    - The backward uses delta_i = <dO_i, O_i> with O as stored, rounded to `dtype`: off
      by up to u |dO_i| |O_i|. That moves every score gradient of row i by P_ij times
      as much, which is the gradient of sum_i err_i * lse_i.

    With l2norm'd inputs (|lse| < 20) the first two are negligible; they matter for
    logits in the thousands. Where an exact gradient vanishes (one visible key: dq = 0;
    a bias constant along the keys: dbias = 0) the last is all that is left, and plain
    PyTorch, which keeps P itself, can be exact there.
    """
    def with_lse(*args, **kwargs):
        return fcsa.plain_cosine_sim_attention(*args, **{**kwargs, "return_lse": True})

    ref_out, lse = run(with_lse, **ref_in)
    visible = torch.isfinite(lse)
    zero = torch.zeros((), dtype=torch.float64)
    u32 = torch.finfo(torch.float32).eps / 2
    score_err = 8 * u32 * torch.where(visible, lse, zero).abs().detach()
    total = {"out": (score_err.max() * 2 * ref_in["v"].abs().max()).item()}
    leaves = [n for n in GRAD_NAMES if n in ref_in and ref_in[n].requires_grad]
    if dout is None or not leaves:
        return total

    dout = dout.detach().double().cpu()
    out = out.detach().double().cpu()
    delta_err = torch.finfo(dtype).eps / 2 * dout.norm(dim=-1) * out.norm(dim=-1)
    losses = ((ref_out * dout * score_err[..., None]).sum(),
              (delta_err * torch.where(visible, lse, zero)).sum())
    for loss in losses:
        grads = torch.autograd.grad(loss, [ref_in[n] for n in leaves], retain_graph=True,
                                    allow_unused=True)
        for n, g in zip(leaves, grads):
            if g is not None:
                total["d" + n] = total.get("d" + n, 0.0) + g.abs().max().item()
    return total


def random_mask(b, n, p=0.7):
    """A bool (b, n) mask with about p of the keys visible, at least one per row."""
    mask = torch.rand(b, n) < p
    mask[:, torch.randint(n, (1,))] = True
    return mask
