"""Numerical robustness against the float64 reference: rows of any norm, and non-finite
values in hidden keys."""

import pytest
import torch

import fcsa
from helpers import DEVICES, dtype_id, random_mask


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


def all_finite(results):
    return all(torch.isfinite(t).all() for t in results.values())


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


# ---------------------------------------------------------------- non-finite hidden keys

def with_values(t, index, value):
    t = t.clone()
    t[index] = value
    return t


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")],
                         ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("features", ["plain", "causal_bias_scale", "no_l2norm_gqa"])
def test_masked_keys_holding_nonfinite_values(features, poison, device):
    # SPEC: hidden keys contribute exactly nothing, whatever they hold. Every result must
    # equal the reference with those entries set to 0, and a masked key's dk, dv are 0.
    b, h, nq, nk, d = 2, 4, 70, 90, 16
    hk = 2 if features == "no_l2norm_gqa" else h
    mask = random_mask(b, nk, p=0.6)
    masked = ~mask
    q, k, v = torch.randn(b, h, nq, d), torch.randn(b, hk, nk, d), torch.randn(b, hk, nk, d)
    # The first few elements of each masked key's k and v.
    where = masked[:, None, :, None] & (torch.arange(d) < 5)
    where = where.expand(b, hk, nk, d)
    kwargs = {}
    if features == "causal_bias_scale":
        kwargs["causal"] = True
    if features == "no_l2norm_gqa":
        kwargs.update(l2norm_qk=False, scale=0.25)

    def inputs(fill):
        t = dict(zip("qkv", leaves(device, torch.float32, q, with_values(k, where, fill),
                                   with_values(v, where, fill))))
        t["mask"] = mask.to(device)
        if features == "causal_bias_scale":
            t["attn_bias"], t["scale"] = leaves(device, torch.float32, bias, scale)
        return t

    bias, scale = torch.randn(h, nq, nk), 4 + 4 * torch.rand(h)
    dout = torch.randn(b, h, nq, d, device=device)
    got = attention_and_grads(inputs(poison), dout, **kwargs)
    ref = attention_and_grads(inputs(0.0), dout, reference=True, **kwargs)
    assert all_finite(got), {n: bool(torch.isfinite(t).all()) for n, t in got.items()}
    for name in got:
        assert relative_error(got[name], ref[name]) <= 1e-4, name
    hidden = masked.to(device)[:, None, :, None].expand(b, hk, nk, d)
    for name in ("dk", "dv"):
        assert torch.equal(got[name][hidden], torch.zeros_like(got[name][hidden])), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("nq,nk,keys", [(300, 300, (170, 295)), (40, 100, (70, 95))],
                         ids=["300x300", "40x100"])
def test_causally_hidden_keys_holding_nonfinite_values(nq, nk, keys, poison, device):
    # A row that cannot see the poisoned keys must give the result it gives with them 0:
    # keys past the reach of a whole query tile, and keys that some rows of a diagonal
    # tile see and others do not. (Rows that see them propagate NaN, as they should;
    # through dS those rows reach every key's dk and dv, so only out and dq are checked.)
    b, h, d = 1, 2, 16
    q, k, v = torch.randn(b, h, nq, d), torch.randn(b, h, nk, d), torch.randn(b, h, nk, d)
    index = (slice(None), slice(None), list(keys), slice(0, 3))

    def inputs(fill):
        return dict(zip("qkv", leaves(device, torch.float32, q, with_values(k, index, fill),
                                      with_values(v, index, fill))))

    dout = torch.randn(b, h, nq, d, device=device)
    got = attention_and_grads(inputs(poison), dout, causal=True)
    ref = attention_and_grads(inputs(0.0), dout, causal=True, reference=True)
    blind = slice(0, min(keys) - (nk - nq))  # rows i with i + nk - nq < min(keys)
    for name in ("out", "dq"):
        part, ref_part = got[name][:, :, blind], ref[name][:, :, blind]
        assert torch.isfinite(part).all(), name
        assert relative_error(part, ref_part) <= 1e-4, name
