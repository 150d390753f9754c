"""The original package's test cases, run through a drop-in module.

fcsa replaces flash-cosine-sim-attention: code written against the original imports
`flash_cosine_sim_attention` and calls its two functions. Here that import name is a
module that re-exports fcsa, and the original's cases run against it on the CPU,
written in the original's style: flash against plain, both in float32, with the
original's tolerance. Its cases take q and k of head dim 32 and v of 64 (the original
computes softmax(scale q^ k^T) v with v of its own width), batch 2, 4 heads, sequences
of 127, self and cross attention, causal, masks and biases, outputs and gradients:
4 tests of 12 cases each, 48 in all, on the CPU and (as the original ran them) on CUDA. The original's 0.2 releases also take
`use_triton` and `sequence_parallel`, which fcsa accepts and ignores.
"""

import sys
import types

import pytest
import torch

import fcsa


def drop_in_module():
    """A module named as the original, re-exporting fcsa's functions."""
    module = types.ModuleType("flash_cosine_sim_attention")
    module.flash_cosine_sim_attention = fcsa.flash_cosine_sim_attention
    module.plain_cosine_sim_attention = fcsa.plain_cosine_sim_attention
    module.l2norm_tensors = fcsa.l2norm_tensors
    return module


@pytest.fixture(scope="module", autouse=True)
def original_import_name():
    previous = sys.modules.get("flash_cosine_sim_attention")
    sys.modules["flash_cosine_sim_attention"] = drop_in_module()
    yield
    if previous is None:
        del sys.modules["flash_cosine_sim_attention"]
    else:
        sys.modules["flash_cosine_sim_attention"] = previous


def original():
    from flash_cosine_sim_attention import flash_cosine_sim_attention, plain_cosine_sim_attention
    return flash_cosine_sim_attention, plain_cosine_sim_attention


# ---------------------------------------------------------------- the original's helpers

def not_nan_or_infs(t):
    return not (torch.any(torch.isnan(t)) or torch.any(torch.isinf(t)))


def allclose(a, b, atol=1e-4):
    diff = (a - b).abs().amax()
    return diff <= atol


BATCH, HEADS, SEQ, DIM, DIM_V = 2, 4, 127, 32, 64
CROSS_SEQ = 63  # the queries' length in the cross-attention cases

CASES = pytest.mark.parametrize("causal,mask", [(True, False), (False, True), (False, False)])
BIAS = pytest.mark.parametrize("attn_bias", [True, False])
VALUE_DIM = pytest.mark.parametrize("dim_v", [DIM, DIM_V])
DEVICE = pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])


def inputs(q_len, dim_v, mask, attn_bias, requires_grad=False, device="cpu"):
    q = torch.randn(BATCH, HEADS, q_len, DIM, device=device)
    k = torch.randn(BATCH, HEADS, SEQ, DIM, device=device)
    v = torch.randn(BATCH, HEADS, SEQ, dim_v, device=device)
    mask = torch.randint(0, 2, (BATCH, SEQ), device=device).bool() if mask else None
    attn_bias = torch.randn(HEADS, q_len, SEQ, device=device) if attn_bias else None
    tensors = [q, k, v] + ([attn_bias] if attn_bias is not None else [])
    for t in tensors:
        t.requires_grad_(requires_grad)
    return q, k, v, mask, attn_bias


def output_equal(q_len, causal, mask, attn_bias, dim_v, device):
    flash_cosine_sim_attention, plain_cosine_sim_attention = original()
    q, k, v, mask, attn_bias = inputs(q_len, dim_v, mask, attn_bias, device=device)
    plain_output = plain_cosine_sim_attention(q, k, v, causal=causal, mask=mask,
                                              attn_bias=attn_bias)
    flash_output = flash_cosine_sim_attention(q, k, v, causal=causal, mask=mask,
                                              attn_bias=attn_bias)
    assert flash_output.shape == (BATCH, HEADS, q_len, dim_v)
    assert not_nan_or_infs(flash_output)
    assert allclose(plain_output, flash_output)


def grad_equal(q_len, causal, mask, attn_bias, dim_v, device):
    flash_cosine_sim_attention, plain_cosine_sim_attention = original()
    q, k, v, mask, attn_bias = inputs(q_len, dim_v, mask, attn_bias, requires_grad=True, device=device)
    leaves = [t for t in (q, k, v, attn_bias) if t is not None]

    plain_output = plain_cosine_sim_attention(q, k, v, causal=causal, mask=mask,
                                              attn_bias=attn_bias)
    plain_output.sum().backward()
    plain_grads = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None

    flash_output = flash_cosine_sim_attention(q, k, v, causal=causal, mask=mask,
                                              attn_bias=attn_bias)
    flash_output.sum().backward()
    for plain_grad, t in zip(plain_grads, leaves):
        assert not_nan_or_infs(t.grad)
        assert allclose(plain_grad, t.grad, atol=1e-4)


def original_cases(test):
    """The original's parameters: causal or a mask or neither, a bias or none, and here
    v's head dim, q's or its own, and the device."""
    return DEVICE(VALUE_DIM(BIAS(CASES(test))))


@original_cases
def test_output_equal(causal, mask, attn_bias, dim_v, device):
    output_equal(SEQ, causal, mask, attn_bias, dim_v, device)


@original_cases
def test_grad_equal(causal, mask, attn_bias, dim_v, device):
    grad_equal(SEQ, causal, mask, attn_bias, dim_v, device)


@original_cases
def test_output_equal_cross_attn(causal, mask, attn_bias, dim_v, device):
    output_equal(CROSS_SEQ, causal, mask, attn_bias, dim_v, device)


@original_cases
def test_grad_equal_cross_attn(causal, mask, attn_bias, dim_v, device):
    grad_equal(CROSS_SEQ, causal, mask, attn_bias, dim_v, device)


# ---------------------------------------------------------------- 0.2's keyword arguments

@pytest.mark.parametrize("sequence_parallel", [False, True])
@pytest.mark.parametrize("use_triton", [False, True])
def test_use_triton_and_sequence_parallel_are_accepted_no_ops(use_triton, sequence_parallel):
    flash_cosine_sim_attention, _ = original()
    q, k, v, mask, attn_bias = inputs(SEQ, DIM_V, True, True, requires_grad=True)
    leaves = (q, k, v, attn_bias)
    kwargs = dict(causal=True, mask=mask, attn_bias=attn_bias)
    out = flash_cosine_sim_attention(q, k, v, **kwargs, use_triton=use_triton,
                                     sequence_parallel=sequence_parallel)
    grads = torch.autograd.grad(out.sum(), leaves)
    expected = flash_cosine_sim_attention(q, k, v, **kwargs)
    expected_grads = torch.autograd.grad(expected.sum(), leaves)
    assert torch.equal(out, expected)
    for got, want in zip(grads, expected_grads):
        assert torch.equal(got, want)
    # Positional, where the original's signature puts them.
    positional = flash_cosine_sim_attention(q, k, v, mask, attn_bias, 8, 1, True, True, False,
                                            use_triton, sequence_parallel)
    assert torch.equal(positional.detach(), out.detach())


def test_use_triton_and_sequence_parallel_must_be_flags():
    flash_cosine_sim_attention, _ = original()
    q, k, v, _, _ = inputs(SEQ, DIM_V, False, False)
    with pytest.raises(TypeError, match="use_triton"):
        flash_cosine_sim_attention(q, k, v, use_triton="yes")
    with pytest.raises(TypeError, match="sequence_parallel"):
        flash_cosine_sim_attention(q, k, v, sequence_parallel=None)
