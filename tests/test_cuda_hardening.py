"""The CUDA backend's share of the hardening: norms of rows whose squares overflow
float32, hidden keys whose values hold NaN or inf, and the float32 output that the
backward's delta is taken from. Each test compares with the same computation on inputs
that need none of it (an exact power-of-two rescaling, finite values in hidden places)."""

import pytest
import torch

import fcsa
from helpers import dtype_id

pytestmark = pytest.mark.cuda

TOLERANCE = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def close(got, want, dtype, name):
    scale = max(1.0, want.abs().max().item())
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=tol * scale, rtol=tol, msg=name)


def run(q, k, v, dout, **kwargs):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fcsa.flash_cosine_sim_attention(q, k, v, **kwargs)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


# nq = 2048 takes the forward's key-norm pass, nq = 64 the per-tile norms (16-bit: on the
# tensor cores); groups = 2 the general l2norm; bf16 with one group the backward's
# shared-scores kernel with q's norm folded (its prepass computes 1 / ||q||).
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("nq", [64, 2048])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("exponent", [64, 100])
def test_norms_of_huge_rows(exponent, dtype, nq, groups):
    """q and k times 2^64 (~1.8e19) or 2^100 (~1.3e30), exact in both dtypes: the same
    attention, and gradients with respect to the raw q, k scaled by 2^-exponent."""
    torch.manual_seed(exponent + nq + groups)
    b, h, nk, d = 1, 2, 192, 64
    q = torch.randn(b, h, nq, d, device="cuda").to(dtype)
    k = torch.randn(b, h, nk, d, device="cuda").to(dtype)
    v = torch.randn(b, h, nk, d, device="cuda").to(dtype)
    dout = torch.randn(b, h, nq, d, device="cuda").to(dtype)
    c = 2.0 ** exponent
    ref = run(q, k, v, dout, groups=groups)
    big = run(q * c, k * c, v, dout, groups=groups)
    assert all(torch.isfinite(t).all() for t in big)
    close(big[0], ref[0], dtype, "out")
    close(big[1].float() * c, ref[1], dtype, "dq")
    close(big[2].float() * c, ref[2], dtype, "dk")
    close(big[3], ref[3], dtype, "dv")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_masked_values_contribute_nothing(dtype, poison):
    """A NaN or inf in the values of masked keys: the output and the gradients are those
    of the same call with zeros there (dv of a masked key is exactly 0)."""
    torch.manual_seed(1)
    b, h, n, d = 2, 2, 300, 64
    q, k, v = (torch.randn(b, h, n, d, device="cuda").to(dtype) for _ in range(3))
    dout = torch.randn(b, h, n, d, device="cuda").to(dtype)
    mask = torch.rand(b, n, device="cuda") < 0.7
    mask[:, 0] = True
    clean = v.masked_fill(~mask[:, None, :, None], 0.0)
    poisoned = v.masked_fill(~mask[:, None, :, None], poison)
    ref = run(q, k, clean, dout, mask=mask)
    got = run(q, k, poisoned, dout, mask=mask)
    for name, g, r in zip(["out", "dq", "dk", "dv"], got, ref):
        assert torch.isfinite(g).all(), name
        close(g, r, dtype, name)
    assert (got[3].masked_select(~mask[:, None, :, None]) == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_values_past_a_query_tiles_reach(dtype):
    """Causal: a NaN in the values of the last keys reaches only the rows that see them;
    the rows of earlier query tiles (their causal reach ends before those keys) stay
    equal to the call with finite values there."""
    torch.manual_seed(2)
    b, h, n, d = 1, 2, 512, 64
    q, k, v = (torch.randn(b, h, n, d, device="cuda").to(dtype) for _ in range(3))
    poisoned = v.clone()
    poisoned[:, :, 400:] = float("nan")
    ref = fcsa.flash_cosine_sim_attention(q, k, v, causal=True)
    got = fcsa.flash_cosine_sim_attention(q, k, poisoned, causal=True)
    # Rows below 384 share no query tile (of up to 128 rows) with a row that sees key 400.
    assert torch.isfinite(got[:, :, :384]).all()
    close(got[:, :, :384], ref[:, :, :384], dtype, "out")
    assert torch.isnan(got[:, :, 400:]).all()
