"""l2norm_tensors and the plain attention for rows of any norm: |x|^2 may overflow (or
underflow) where |x| itself is an ordinary number, and x / max(|x|, 1e-12) must not
notice. Multiplying a row by a power of two changes nothing but that power in |x|, so
those results must be the very same numbers."""

import pytest
import torch

import fcsa

# Factors whose squares overflow the dtype the norm is taken in (float32 for 16-bit
# inputs), and powers of two in the same range, which make the comparison exact.
HUGE = {torch.float32: (1e19, 1e30), torch.float64: (1e160, 1e300)}
POWER = {torch.float32: 2.0**100, torch.float64: 2.0**900, torch.bfloat16: 2.0**100}


def dtype_id(dtype):
    return str(dtype).replace("torch.", "")


@pytest.mark.parametrize("dtype", list(POWER), ids=dtype_id)
def test_l2norm_tensors_is_exactly_scale_invariant(dtype):
    x = torch.randn(6, 5, 24).to(dtype)
    x[0, 0] = 0  # a zero row stays zero
    power = POWER[dtype]
    for groups in (1, 3):
        (want,) = fcsa.l2norm_tensors(x, groups=groups)
        (big,) = fcsa.l2norm_tensors(x * power, groups=groups)
        assert torch.equal(big, want)
        # Normalized groups have norm 1 (zero ones excepted).
        norms = want.double().unflatten(-1, (groups, -1)).norm(dim=-1)
        assert ((norms - 1).abs() < 1e-2).sum() == norms.numel() - groups


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_l2norm_tensors_keeps_the_clamp_for_tiny_rows(dtype):
    # x / max(|x|, 1e-12) with the true norm: rows below 1e-12 are divided by 1e-12,
    # rows above by their norm, on both sides of the clamp and far from it.
    x = torch.randn(8, 16, dtype=torch.float64)
    x = x / x.norm(dim=-1, keepdim=True)
    sizes = torch.tensor([1e-30, 1e-20, 3e-13, 9e-13, 1.1e-12, 4e-12, 1e-6, 1.0],
                         dtype=torch.float64)
    rows = (x * sizes[:, None]).to(dtype)
    exact = rows.double() / rows.double().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    (got,) = fcsa.l2norm_tensors(rows)
    torch.testing.assert_close(got.double(), exact, rtol=4 * torch.finfo(dtype).eps, atol=0)
    assert (got.double().norm(dim=-1)[:4] < 0.95).all()  # clamped
    assert ((got.double().norm(dim=-1)[4:] - 1).abs() < 1e-6).all()  # normalized


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_plain_attention_with_huge_norms(dtype):
    q, k, v = (torch.randn(2, 3, 11, 16, dtype=dtype) for _ in range(3))
    mask = torch.rand(2, 11) < 0.8
    mask[:, 0] = True
    want = fcsa.plain_cosine_sim_attention(q, k, v, mask=mask, causal=True)
    for factor in HUGE[dtype]:
        got = fcsa.plain_cosine_sim_attention(q * factor, k * factor, v, mask=mask, causal=True)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    # With a power of two the inputs scale exactly, and so do the gradients:
    # d out / d(c q) = (d out / d q) / c.
    power = POWER[dtype]
    leaves = [t.clone().requires_grad_() for t in (q, k)]
    big = [(t * power).detach().requires_grad_() for t in (q, k)]
    dout = torch.randn_like(want)
    outs = [fcsa.plain_cosine_sim_attention(a, b, v, mask=mask, causal=True)
            for a, b in (leaves, big)]
    assert torch.equal(outs[1], outs[0])
    grads = [torch.autograd.grad(out, inputs, dout) for out, inputs in zip(outs, (leaves, big))]
    for small_grad, big_grad in zip(*grads):
        assert torch.isfinite(big_grad).all()
        assert torch.equal(big_grad * power, small_grad)
