"""Numerical robustness against the float64 reference: rows of any norm."""

import pytest
import torch

import fcsa
from helpers import DEVICES, dtype_id


def leaves(device, dtype, *tensors):
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in tensors]


def attention_and_grads(inputs, dout, **kwargs):
    """out and the gradients of (out * dout).sum() for the float tensors among
    inputs (a dict of keyword arguments), computed by fcsa, or by the plain reference
    in float64 (reference=True) from the same values."""
    reference = kwargs.pop("reference", False)
    if reference:
        inputs = {n: t.detach().cpu().double().requires_grad_() if t.is_floating_point() else t.cpu()
                  for n, t in inputs.items()}
        dout = dout.detach().cpu().double()
        attention = fcsa.plain_cosine_sim_attention
    else:
        attention = fcsa.flash_cosine_sim_attention
    out = attention(**inputs, **kwargs)
    wrt = [n for n, t in inputs.items() if t.is_floating_point() and t.requires_grad]
    grads = torch.autograd.grad(out, [inputs[n] for n in wrt], dout)
    return {"out": out.detach(), **{"d" + n: g for n, g in zip(wrt, grads)}}


def relative_error(got, ref):
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    return ((got - ref).abs().max() / ref.abs().max()).item()


# ---------------------------------------------------------------- norms

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("factor", [2.0**64, 2.0**100, 1e19, 1e30, 1e-30],
                         ids=["2^64", "2^100", "1e19", "1e30", "1e-30"])
def test_l2norm_of_rows_of_any_norm(factor, groups, dtype, device):
    # From |x| of about 1.8e19 on, the float32 sum of squares overflows; the norm must not.
    b, h, nq, nk, d = 1, 2, 20, 24, 32
    q, k, v = torch.randn(b, h, nq, d), torch.randn(b, h, nk, d), torch.randn(b, h, nk, d)
    dout = torch.randn(b, h, nq, d, device=device, dtype=dtype)

    def run(scaled, **kwargs):
        qs, ks = q * scaled, k * scaled
        inputs = dict(zip("qkv", leaves(device, dtype, qs, ks, v)))
        return attention_and_grads(inputs, dout, groups=groups, **kwargs)

    got = run(factor)
    ref = run(factor, reference=True)
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    assert relative_error(got["out"], ref["out"]) <= tol
    for name in ("dq", "dk", "dv"):
        assert relative_error(got[name], ref[name]) <= 10 * tol, name
    if factor >= 1:
        # Cosine similarity is scale-invariant; the gradient wrt the raw q scales as 1/c.
        # A power of two scales exactly, so the result is the unscaled one, bit for bit.
        base = run(1.0)
        exact = factor in (2.0**64, 2.0**100)
        for name, power in (("out", 0), ("dq", 1), ("dk", 1), ("dv", 0)):
            rescaled = got[name] * factor**power if power else got[name]
            if exact:
                assert torch.equal(rescaled, base[name]), name
            else:
                assert relative_error(rescaled.float(), base[name]) <= 10 * tol, name
    else:
        # Far below the 1e-12 clamp, x / max(|x|, 1e-12) is about 0: every logit is ~0.
        ref_uniform = v.double().mean(dim=2, keepdim=True).expand(b, h, nq, d)
        assert relative_error(got["out"], ref_uniform) <= tol
