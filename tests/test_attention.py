"""The fused attention against the float64 reference: shapes, features, gradients."""

import pytest
import torch

import fcsa
from helpers import (ATOL, DEVICES, DTYPES, GRAD_NAMES, assert_bounded, check_attention,
                     dtype_id, qkv, random_mask, with_kwargs)


# ---------------------------------------------------------------- shapes

LENGTHS = [(1, 1), (7, 7), (63, 63), (127, 127), (300, 300), (1, 300), (300, 7), (63, 127),
           (127, 1)]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nq,nk", LENGTHS, ids=[f"{a}x{b}" for a, b in LENGTHS])
def test_lengths(nq, nk, device, dtype, causal):
    check_attention(qkv(2, 2, nq, nk, 40), dtype, device, with_kwargs(causal=causal))


GPU_HEAD_DIMS = [8, 16, 24, 40, 64, 72, 80, 96, 128, 256]
CPU_ONLY_HEAD_DIMS = [1, 3, 33]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d", GPU_HEAD_DIMS)
def test_head_dims(d, device, dtype):
    check_attention(qkv(1, 2, 37, 70, d), dtype, device, with_kwargs(causal=True))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("d", CPU_ONLY_HEAD_DIMS)
def test_head_dims_any_on_cpu(d, dtype):
    check_attention(qkv(1, 2, 19, 23, d), dtype, "cpu")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hk", [1, 2, 4, 8])
def test_grouped_query_kv(hk, device, dtype):
    check_attention(qkv(2, 8, 33, 50, 32, hk=hk), dtype, device, with_kwargs(causal=True))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device", DEVICES)
def test_merged_batch_heads_with_mask_and_bias(device, dtype):
    tensors = {"q": torch.randn(6, 20, 24), "k": torch.randn(6, 30, 24),
               "v": torch.randn(6, 30, 24), "mask": random_mask(6, 30),
               "attn_bias": torch.randn(6, 20, 30)}
    got = check_attention(tensors, dtype, device, with_kwargs(attn_bias_batch_dim=True))
    assert got["out"].shape == (6, 20, 24)


# ---------------------------------------------------------------- bias

B, H, NQ, NK = 2, 3, 17, 29
BIAS_SHAPES = {
    "heads": ((H, NQ, NK), False),
    "batch": ((B, NQ, NK), True),
    "full": ((B, H, NQ, NK), False),
    "1hqk": ((1, H, NQ, NK), False),
    "b1qk": ((B, 1, NQ, NK), False),
    "11qk": ((1, 1, NQ, NK), False),
    "b11k": ((B, 1, 1, NK), False),
    "111k": ((1, 1, 1, NK), False),
    "1h11": ((1, H, 1, 1), False),
    "11q1": ((1, 1, NQ, 1), False),
    "1111": ((1, 1, 1, 1), False),
}


@pytest.mark.parametrize("bias_fp32", [False, True], ids=["bias_same", "bias_fp32"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", list(BIAS_SHAPES))
def test_bias_shapes(shape, device, dtype, bias_fp32):
    if bias_fp32 and dtype == torch.float32:
        pytest.skip("same as bias_same")
    bias_shape, batch_dim = BIAS_SHAPES[shape]
    tensors = {**qkv(B, H, NQ, NK, 16), "attn_bias": torch.randn(bias_shape) * 2}
    got = check_attention(tensors, dtype, device, with_kwargs(attn_bias_batch_dim=batch_dim),
                          bias_fp32=bias_fp32)
    assert got["dattn_bias"].shape == bias_shape


@pytest.mark.parametrize("device", DEVICES)
def test_bias_with_mask_causal_and_gqa(device):
    tensors = {**qkv(B, 4, NQ, NK, 32, hk=2), "mask": random_mask(B, NK),
               "attn_bias": torch.randn(B, 1, NQ, NK)}
    check_attention(tensors, torch.float32, device, with_kwargs(causal=True))


@pytest.mark.parametrize("device", DEVICES)
def test_bias_without_grad(device):
    tensors = qkv(B, H, NQ, NK, 16)
    bias = torch.randn(H, NQ, NK)

    def run(attention, **t):
        return attention(**t, attn_bias=bias.to(t["q"].device, t["q"].dtype))
    check_attention(tensors, torch.float32, device, run)


# ---------------------------------------------------------------- groups and scale

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("groups", [1, 2, 4, 8])
def test_groups(groups, device, dtype):
    check_attention(qkv(2, 2, 31, 45, 64), dtype, device,
                    with_kwargs(groups=groups, causal=True))


def test_l2norm_tensors_groups():
    x = torch.randn(3, 5, 12, dtype=torch.float64) * 4
    (y,) = fcsa.l2norm_tensors(x, groups=3)
    assert y.dtype == torch.float64 and y.shape == x.shape
    chunks = y.view(3, 5, 3, 4)
    torch.testing.assert_close(chunks.norm(dim=-1), torch.ones(3, 5, 3, dtype=torch.float64))
    torch.testing.assert_close(chunks * x.view(3, 5, 3, 4).norm(dim=-1, keepdim=True),
                               x.view(3, 5, 3, 4))
    # Half-precision inputs keep their dtype; the norm is taken in float32.
    h = torch.randn(4, 16, dtype=torch.float16) * 300
    a, b = fcsa.l2norm_tensors(h, h.float())
    assert a.dtype == torch.float16 and b.dtype == torch.float32
    torch.testing.assert_close(a.float(), b, atol=1e-3, rtol=1e-3)
    # Zero vectors stay zero (norm clamped at 1e-12).
    (z,) = fcsa.l2norm_tensors(torch.zeros(2, 8))
    assert torch.equal(z, torch.zeros(2, 8))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", [1.0, 10, 16.0, -3.0])
def test_scale_values(scale, device):
    check_attention(qkv(2, 2, 40, 40, 32), torch.float32, device,
                    with_kwargs(scale=scale, causal=True))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(), (4,)], ids=["scalar", "per_head"])
def test_scale_tensor_gradients(shape, device, dtype):
    tensors = {**qkv(2, 4, 21, 34, 32, hk=2), "scale": 4 + 8 * torch.rand(shape),
               "attn_bias": torch.randn(4, 21, 34), "mask": random_mask(2, 34)}
    got = check_attention(tensors, dtype, device, with_kwargs(causal=True))
    assert got["dscale"].shape == shape and got["dscale"].dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
def test_scale_tensor_without_grad(device):
    scale = torch.tensor([3.0, 9.0])

    def run(attention, **t):
        return attention(**t, scale=scale.to(t["q"].device))
    check_attention(qkv(1, 2, 20, 20, 16), torch.float32, device, run)


@pytest.mark.parametrize("device", DEVICES)
def test_scale_tensor_in_low_precision_is_used_as_float32(device):
    q, k, v = (torch.randn(1, 2, 9, 16, device=device) for _ in range(3))
    scale = torch.tensor([5.0, 7.0], dtype=torch.bfloat16, device=device, requires_grad=True)
    out = fcsa.flash_cosine_sim_attention(q, k, v, scale=scale)
    out.sum().backward()
    ref = fcsa.plain_cosine_sim_attention(q.double(), k.double(), v.double(),
                                          scale=scale.detach().double())
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    assert scale.grad is not None and scale.grad.dtype == torch.bfloat16


# ---------------------------------------------------------------- masking

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device", DEVICES)
def test_fully_masked_rows(device, dtype):
    # Batch 1 has no visible key at all; with causal and nq > nk, the first
    # nq - nk query rows of every batch see no key either.
    b, h, nq, nk = 2, 2, 24, 16
    mask = random_mask(b, nk)
    mask[0, 0] = True  # every causal row of batch 0 past the first nq - nk sees key 0
    mask[1] = False
    tensors = {**qkv(b, h, nq, nk, 32), "mask": mask, "attn_bias": torch.randn(h, nq, nk)}
    got = check_attention(tensors, dtype, device, with_kwargs(causal=True, return_lse=True))

    hidden_rows = nq - nk
    for name in ("out", "dq"):
        assert torch.equal(got[name][1], torch.zeros_like(got[name][1])), name
        assert torch.equal(got[name][:, :, :hidden_rows],
                           torch.zeros_like(got[name][:, :, :hidden_rows])), name
    for name in ("dk", "dv"):
        assert torch.equal(got[name][1], torch.zeros_like(got[name][1])), name
        hidden_keys = ~mask[0].to(got[name].device)
        assert torch.equal(got[name][0][:, hidden_keys],
                           torch.zeros_like(got[name][0][:, hidden_keys])), name
    assert torch.isneginf(got["lse"][1]).all()
    assert torch.isneginf(got["lse"][:, :, :hidden_rows]).all()
    assert torch.isfinite(got["lse"][0, :, hidden_rows:]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_mask_and_causal_together(device):
    tensors = {**qkv(3, 2, 50, 70, 24), "mask": random_mask(3, 70, p=0.5)}
    check_attention(tensors, torch.float32, device, with_kwargs(causal=True))


# ---------------------------------------------------------------- numerics

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device", DEVICES)
def test_zero_vectors(device, dtype):
    tensors = qkv(1, 2, 20, 24, 16)
    tensors["q"][0, :, ::3] = 0
    tensors["k"][0, :, ::4] = 0
    # The l2norm backward divides by max(|x|, 1e-12): a zero row's gradient is
    # 1e12 times its incoming one, which float16 cannot hold; check it elsewhere.
    got = check_attention(tensors, dtype, device, grad=dtype != torch.float16)
    assert torch.isfinite(got["out"]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("device", DEVICES)
def test_unnormalized_large_logits(device, dtype):
    # l2norm_qk=False with norms near 17 and biases near 300: logits in the thousands,
    # far beyond exp's range (88). The result must stay finite and right (a running
    # maximum or equivalent). (lse is float32: logits of 1e4 and more would cost the
    # backward its precision through lse's rounding, as in any lse-based backward.)
    tensors = qkv(2, 2, 33, 47, 32)
    tensors["q"] = tensors["q"] * 3
    tensors["k"] = tensors["k"] * 3
    tensors["attn_bias"] = torch.randn(2, 33, 47) * 100
    got = check_attention(tensors, dtype, device,
                          with_kwargs(l2norm_qk=False, causal=True, return_lse=True))
    assert got["lse"].abs().max() > 500


@pytest.mark.parametrize("device", DEVICES)
def test_l2norm_false_on_normalized_inputs_matches_l2norm_true(device):
    q, k, v = (torch.randn(2, 2, 30, 32, device=device) * 5 for _ in range(3))
    qn, kn = fcsa.l2norm_tensors(q, k)
    a = fcsa.flash_cosine_sim_attention(q, k, v)
    b = fcsa.flash_cosine_sim_attention(qn, kn, v, l2norm_qk=False)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- lse

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device", DEVICES)
def test_lse_composition(device, dtype):
    """Two halves of the keys combine into the whole (SPEC: statistics for composition)."""
    b, h, nq, nk, d = 2, 2, 40, 90, 32
    t = {n: x.to(device, dtype) for n, x in qkv(b, h, nq, nk, d).items()}
    mask = random_mask(b, nk).to(device)
    bias = torch.randn(h, nq, nk, device=device, dtype=dtype)
    split = 37

    def part(keys):
        return fcsa.flash_cosine_sim_attention(
            t["q"], t["k"][:, :, keys], t["v"][:, :, keys], mask=mask[:, keys],
            attn_bias=bias[:, :, keys], return_lse=True)

    out, lse = part(slice(None))
    out1, lse1 = part(slice(0, split))
    out2, lse2 = part(slice(split, None))
    assert lse.dtype == torch.float32 and lse.shape == (b, h, nq)
    m = torch.maximum(lse1, lse2)
    w1, w2 = (lse1 - m).exp()[..., None], (lse2 - m).exp()[..., None]
    combined = (w1 * out1.float() + w2 * out2.float()) / (w1 + w2)
    torch.testing.assert_close(combined, out.float(), atol=ATOL[dtype], rtol=ATOL[dtype])
    torch.testing.assert_close(m + torch.log(w1 + w2)[..., 0], lse, atol=1e-5, rtol=1e-5)

    # And lse itself against the float64 reference, within PyTorch's own error.
    _, ref_lse = fcsa.plain_cosine_sim_attention(
        t["q"].double(), t["k"].double(), t["v"].double(), mask=mask,
        attn_bias=bias.double(), return_lse=True)
    _, plain_lse = fcsa.plain_cosine_sim_attention(t["q"], t["k"], t["v"], mask=mask,
                                                   attn_bias=bias, return_lse=True)
    assert_bounded("lse", lse, ref_lse, plain_lse, ATOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_lse_merged_shape_and_no_grad(device):
    q, k, v = (torch.randn(6, 11, 16, device=device, requires_grad=True) for _ in range(3))
    out, lse = fcsa.flash_cosine_sim_attention(q, k, v, return_lse=True)
    assert out.shape == (6, 11, 16) and lse.shape == (6, 11)
    assert not lse.requires_grad
    with torch.no_grad():
        out2, lse2 = fcsa.flash_cosine_sim_attention(q, k, v, return_lse=True)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)


# ---------------------------------------------------------------- determinism

@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_backward_is_bitwise_repeatable(device):
    b, h, hk, nq, nk, d = 2, 4, 2, 70, 130, 32
    q = torch.randn(b, h, nq, d, device=device, requires_grad=True)
    k = torch.randn(b, hk, nk, d, device=device, requires_grad=True)
    v = torch.randn(b, hk, nk, d, device=device, requires_grad=True)
    bias = torch.randn(1, h, 1, nk, device=device, requires_grad=True)
    scale = torch.tensor(9.0, device=device, requires_grad=True)
    dout = torch.randn(b, h, nq, d, device=device)
    inputs = (q, k, v, bias, scale)

    def grads():
        out = fcsa.flash_cosine_sim_attention(q, k, v, attn_bias=bias, scale=scale,
                                              causal=True, deterministic=True)
        return torch.autograd.grad(out, inputs, dout)

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first = grads()
        for _ in range(3):
            for a, b_ in zip(first, grads()):
                assert torch.equal(a, b_)
    finally:
        torch.set_num_threads(threads)


# Which dims of (b, h, nq, nk) a bias keeps; the others it broadcasts over. The items of
# the CPU backward that share its elements add their sums in turn, in a fixed order.
SHARED_BIAS_SHAPES = {"bhqk": (1, 1, 1, 1), "11qk": (0, 0, 1, 1), "b1q1": (1, 0, 1, 0),
                      "1h1k": (0, 1, 0, 1), "1111": (0, 0, 0, 0)}


@pytest.mark.parametrize("bias", list(SHARED_BIAS_SHAPES))
@pytest.mark.parametrize("size", ["key_splits", "key_chunks"])
def test_shared_bias_gradient_is_bitwise_the_same_for_any_thread_count(size, bias):
    # key_splits: few kv heads, so each one's keys are split over several work items;
    # key_chunks: d = 256 and 300 keys, so an item walks its keys in three chunks.
    if size == "key_splits":
        b, h, hk, nq, nk, d = 3, 4, 2, 70, 150, 16
    else:
        b, h, hk, nq, nk, d = 4, 8, 4, 40, 300, 256
    keep = SHARED_BIAS_SHAPES[bias]
    shape = tuple(n if kept else 1 for n, kept in zip((b, h, nq, nk), keep))
    q = torch.randn(b, h, nq, d, requires_grad=True)
    k = torch.randn(b, hk, nk, d, requires_grad=True)
    v = torch.randn(b, hk, nk, d, requires_grad=True)
    attn_bias = torch.randn(shape, requires_grad=True)
    scale = (6 + torch.rand(h)).requires_grad_()
    mask = random_mask(b, nk)
    dout = torch.randn(b, h, nq, d)
    inputs = (q, k, v, attn_bias, scale)

    def grads(attention, tensors):
        out = attention(*tensors[:3], mask=mask, attn_bias=tensors[3], scale=tensors[4],
                        causal=True)
        return torch.autograd.grad(out, tensors, dout.to(out.dtype))

    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append(grads(fcsa.flash_cosine_sim_attention, inputs))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for name, a, b_ in zip(GRAD_NAMES, results[0], other):
            assert torch.equal(a, b_), name
    ref_inputs = tuple(t.detach().double().requires_grad_() for t in inputs)
    ref = grads(fcsa.plain_cosine_sim_attention, ref_inputs)
    # Each dbias element sums this many dS terms, whose rounding grows as its square root
    # (the exact sum is 0 for a bias broadcast over the keys).
    terms = b * h * nq * nk / attn_bias.numel()
    for name, got, want in zip(GRAD_NAMES, results[0], ref):
        atol = 2e-5 * terms**0.5 if name == "attn_bias" else 1e-4
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=1e-4, msg=name)


# ---------------------------------------------------------------- layouts

@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs(device):
    # q from a (b, n, h, d) projection: strided heads pass through as they are; k with a
    # non-contiguous last dim gets copied; v broadcast over heads with stride 0.
    b, h, nq, nk, d = 2, 3, 21, 26, 16
    q_bnhd = torch.randn(b, nq, h, d, device=device, requires_grad=True)
    k_bhdn = torch.randn(b, h, d, nk, device=device, requires_grad=True)
    v_one = torch.randn(b, 1, nk, d, device=device, requires_grad=True)
    bias_t = torch.randn(h, nk, nq, device=device, requires_grad=True)
    inputs = (q_bnhd, k_bhdn, v_one, bias_t)

    def run(attention, dtype):
        q = q_bnhd.transpose(1, 2)
        k = k_bhdn.transpose(-1, -2)
        v = v_one.expand(b, h, nk, d)
        cast = [t.to(dtype) for t in (q, k, v, bias_t.transpose(-1, -2))]
        out = attention(*cast[:3], attn_bias=cast[3], causal=True)
        return out, torch.autograd.grad(out, inputs, dout.to(dtype))

    dout = torch.randn(b, h, nq, d, device=device)
    out, grads = run(fcsa.flash_cosine_sim_attention, torch.float32)
    ref, ref_grads = run(fcsa.plain_cosine_sim_attention, torch.float64)
    torch.testing.assert_close(out, ref.float(), atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r.float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_inference_without_grad(device):
    q, k, v = (torch.randn(2, 2, 33, 24, device=device) for _ in range(3))
    with torch.no_grad():
        out = fcsa.flash_cosine_sim_attention(q, k, v, causal=True)
    ref = fcsa.plain_cosine_sim_attention(q.double(), k.double(), v.double(), causal=True)
    assert not out.requires_grad
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_only_some_inputs_require_grad(device):
    q = torch.randn(1, 2, 10, 16, device=device)
    k = torch.randn(1, 2, 12, 16, device=device)
    v = torch.randn(1, 2, 12, 16, device=device, requires_grad=True)
    out = fcsa.flash_cosine_sim_attention(q, k, v)
    (dv,) = torch.autograd.grad(out.sum(), [v])
    vd = v.detach().double().requires_grad_()
    ref = fcsa.plain_cosine_sim_attention(q.double(), k.double(), vd)
    (ref_dv,) = torch.autograd.grad(ref.sum(), [vd])
    torch.testing.assert_close(dv.double(), ref_dv, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_keys_give_zeros(device):
    q = torch.randn(1, 2, 5, 8, device=device, requires_grad=True)
    k = torch.randn(1, 2, 0, 8, device=device, requires_grad=True)
    v = torch.randn(1, 2, 0, 8, device=device, requires_grad=True)
    out, lse = fcsa.flash_cosine_sim_attention(q, k, v, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(lse).all()
    (dq,) = torch.autograd.grad(out.sum(), [q])
    assert torch.equal(dq, torch.zeros_like(dq))
