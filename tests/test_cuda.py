"""CUDA-only checks: the GPU backend against the CPU backend, the backend reported, the
stream and device used, and CUDA graph capture. The shared accuracy tests in the other
files run on CUDA too (their `cuda` parameter)."""

import pytest
import torch

import fcsa
from helpers import ATOL, assert_bounded, check_attention, dtype_id, qkv, random_mask, with_kwargs

pytestmark = pytest.mark.cuda


def inputs(b, h, hk, nq, nk, d, dtype, device="cuda"):
    q = torch.randn(b, h, nq, d, device=device, dtype=dtype)
    k = torch.randn(b, hk, nk, d, device=device, dtype=dtype)
    v = torch.randn(b, hk, nk, d, device=device, dtype=dtype)
    return q, k, v


def test_backend_name():
    q, k, v = inputs(1, 2, 2, 64, 64, 64, torch.float16)
    fcsa.flash_cosine_sim_attention(q, k, v)
    # The Hopper forward where it applies (test_cuda_sm90.py), else the portable one.
    assert fcsa.last_backend() in ("cuda-sm80", "cuda-sm90")
    assert fcsa.cuda_compiled() and fcsa.compiled_sm_targets()


def check_against_cpu_backend(d, dtype, deterministic=False, every_feature=True):
    """Grouped kv and causal, with every_feature also a key mask, a bias and a per-head
    scale (the kernels' general paths; without them their plain ones), on CUDA and on
    the CPU backend: outputs, lse and every gradient agree."""
    b, h, hk, nq, nk = 2, 4, 2, 100, 177
    q, k, v = (t.requires_grad_() for t in inputs(b, h, hk, nq, nk, d, dtype))
    features = {}
    if every_feature:
        mask = torch.rand(b, nk, device="cuda") < 0.8
        mask[:, 0] = True
        features = dict(mask=mask,
                        attn_bias=torch.randn(1, h, nq, nk, device="cuda", dtype=dtype, requires_grad=True),
                        scale=torch.full((h,), 9.0, device="cuda", requires_grad=True))
    leaves = [q, k, v] + [t for t in features.values() if t.requires_grad]
    names = ["q", "k", "v"] + [name for name, t in features.items() if t.requires_grad]
    cpu_features = {name: t.detach().cpu().requires_grad_(t.requires_grad) for name, t in features.items()}
    cpu_leaves = [t.detach().cpu().requires_grad_() for t in (q, k, v)]
    cpu_leaves += [cpu_features[name] for name in names[3:]]

    def run(q, k, v, features):
        return fcsa.flash_cosine_sim_attention(q, k, v, causal=True, return_lse=True,
                                               deterministic=deterministic, **features)

    out, lse = run(q, k, v, features)
    cpu_out, cpu_lse = run(*cpu_leaves[:3], cpu_features)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    cpu_grads = torch.autograd.grad(cpu_out, cpu_leaves, dout.cpu())

    tol = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(out.cpu(), cpu_out, atol=tol, rtol=tol)
    # The GPU rounds the normalized q and k to the dtype for its tensor cores; the CPU
    # keeps them in float32: the logits, and so lse, differ by the dtype's rounding.
    torch.testing.assert_close(lse.cpu(), cpu_lse, atol=tol, rtol=tol)
    for name, g, c in zip(names, grads, cpu_grads):
        scale_ = max(1.0, c.abs().max().item())
        torch.testing.assert_close(g.cpu().float(), c.float(), atol=tol * scale_, rtol=tol,
                                   msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("d", [32, 64, 128])
def test_matches_cpu_backend(d, dtype):
    check_against_cpu_backend(d, dtype)


# 16-bit d = 64 and 128 without mask or bias: the backward's shared-scores kernel where
# the shared memory allows it (d = 128: H100 class), its main kernel's plain variant
# elsewhere.
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("d", [64, 128])
def test_plain_paths_match_cpu_backend(d, dtype, deterministic):
    check_against_cpu_backend(d, dtype, deterministic, every_feature=False)


# From nq = 2048 (4096 with causal) the forward reads 1 / ||k|| from a pass over k (the
# key-norm pass, forward.cu) instead of computing it per key tile: long queries against a
# key count that is not a multiple of the key tile, grouped kv, and a key mask.
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=dtype_id)
def test_key_norm_pass(dtype, causal):
    b, h, hk, nq, nk, d = (1, 2, 1, 4100, 4097, 64) if causal else (1, 4, 2, 2050, 1030, 64)
    tensors = qkv(b, h, nq, nk, d, hk=hk)
    check_attention(tensors, dtype, "cuda", with_kwargs(causal=causal))
    tensors["mask"] = random_mask(b, nk)
    check_attention(tensors, dtype, "cuda", with_kwargs(causal=causal))


def test_float32_backward_long_causal():
    """dK and dV sum over every query row. Added straight into the accumulators, the
    tensor cores' truncating additions biased them (dK off by 3.4e-5 of its largest
    entry at n = 2050, 1.6x the bound) until each query tile's products were summed
    apart (backward_gemm.cuh)."""
    check_attention(qkv(1, 2, 2048, 2048, 64, hk=1), torch.float32, "cuda", with_kwargs(causal=True))


# (dtype, large, small): |q| ~ 3e3 is large for float16; bfloat16 also takes norms near
# the ends of float32's range, where its backward divides dS by ||q|| (backward.cu).
EXTREME_ROW_SCALES = [(torch.float16, 400.0, 1e-3), (torch.bfloat16, 400.0, 1e-3), (torch.bfloat16, 1e16, 1e-10)]


@pytest.mark.parametrize("dtype,large,small", EXTREME_ROW_SCALES,
                         ids=[f"{dtype_id(t)}-{a:g}-{b:g}" for t, a, b in EXTREME_ROW_SCALES])
@pytest.mark.parametrize("d", [64, 128])
def test_extreme_query_norms(d, dtype, large, small):
    """Rows of q with large and small norms: normalizing them inside the kernels loses
    nothing to the dtype's range. (Rows of zeros are covered elsewhere: their gradient,
    dq^ / eps, is beyond float16 by definition.)"""
    b, h, n = 1, 2, 96
    q, k, v = inputs(b, h, h, n, n, d, dtype)
    row_scale = torch.ones(b, h, n, 1, device="cuda")
    row_scale[..., 0::4, :] = large
    row_scale[..., 1::4, :] = small
    q = (q.float() * row_scale).to(dtype)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    cpu_leaves = [t.detach().cpu().requires_grad_() for t in leaves]
    out = fcsa.flash_cosine_sim_attention(*leaves, causal=True)
    cpu_out = fcsa.flash_cosine_sim_attention(*cpu_leaves, causal=True)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    cpu_grads = torch.autograd.grad(cpu_out, cpu_leaves, dout.cpu())
    tol = {torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(out.cpu(), cpu_out, atol=tol, rtol=tol)
    for name, g, c in zip("qkv", grads, cpu_grads):
        assert torch.isfinite(g).all(), name
        # dq scales as 1 / ||q||: compare each row relative to its own size (floored
        # at a hundredth of the typical row: the first causal row's gradient is 0).
        norms = c.float().norm(dim=-1, keepdim=True)
        size = torch.maximum(norms, 1e-2 * norms.mean(dim=-2, keepdim=True))
        err = (g.cpu().float() - c.float()).norm(dim=-1, keepdim=True) / size
        assert err.max().item() < 10 * tol, (name, err.max().item())


# The shared memory a block gets on sm_86, sm_89 and sm_120: the backward's compact shapes.
SMALL_GPU_SHARED_MEMORY = 99 * 1024


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("d", [64, 96, 128, 256])
def test_small_shared_memory_gpus(d, dtype, deterministic, monkeypatch):
    monkeypatch.setenv("FCSA_MAX_SHARED_MEMORY", str(SMALL_GPU_SHARED_MEMORY))
    check_against_cpu_backend(d, dtype, deterministic)


# A100's limit (163 KB): the full shapes, but not the d = 128 kernel that keeps P and dS
# in shared memory (171 KB), so the main kernel's 16-bit d = 128 path runs instead.
A100_SHARED_MEMORY = 163 * 1024


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_a100_shared_memory(dtype, deterministic, monkeypatch):
    monkeypatch.setenv("FCSA_MAX_SHARED_MEMORY", str(A100_SHARED_MEMORY))
    check_against_cpu_backend(128, dtype, deterministic, every_feature=False)


def test_shared_memory_limit_is_honoured(monkeypatch):
    # 50 KB: enough for the d = 64 forward, not for any d = 64 backward shape.
    monkeypatch.setenv("FCSA_MAX_SHARED_MEMORY", "50000")
    q, k, v = (t.requires_grad_() for t in inputs(1, 2, 2, 64, 64, 64, torch.bfloat16))
    out = fcsa.flash_cosine_sim_attention(q, k, v)
    with pytest.raises(NotImplementedError, match="shared memory"):
        out.sum().backward()
    monkeypatch.delenv("FCSA_MAX_SHARED_MEMORY")
    out = fcsa.flash_cosine_sim_attention(q, k, v)
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_runs_on_the_tensors_device_and_current_stream():
    q, k, v = inputs(2, 2, 2, 128, 128, 64, torch.float16)
    ref = fcsa.flash_cosine_sim_attention(q, k, v, causal=True)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = fcsa.flash_cosine_sim_attention(q, k, v, causal=True)
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    q, k, v = inputs(1, 2, 2, 64, 64, 64, torch.bfloat16, device="cuda:1")
    out = fcsa.flash_cosine_sim_attention(q, k, v)
    assert out.device == q.device
    ref = fcsa.flash_cosine_sim_attention(q.cpu(), k.cpu(), v.cpu())
    torch.testing.assert_close(out.cpu(), ref, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_cuda_graph_capture_of_forward(dtype):
    q, k, v = inputs(2, 4, 4, 200, 200, 64, dtype)
    mask = torch.ones(2, 200, dtype=torch.bool, device="cuda")

    # Warm up on a side stream, as torch recommends before capture.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fcsa.flash_cosine_sim_attention(q, k, v, mask=mask, causal=True)
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fcsa.flash_cosine_sim_attention(q, k, v, mask=mask, causal=True)

    for _ in range(2):
        q.copy_(torch.randn_like(q))
        mask.copy_(torch.rand(2, 200, device="cuda") < 0.7)
        mask[:, 0] = True
        graph.replay()
        torch.cuda.synchronize()
        ref = fcsa.flash_cosine_sim_attention(q, k, v, mask=mask, causal=True)
        torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_large_batch_many_heads():
    q, k, v = inputs(8, 16, 4, 512, 512, 128, torch.bfloat16)
    out = fcsa.flash_cosine_sim_attention(q, k, v, causal=True)
    ref = fcsa.plain_cosine_sim_attention(q.double(), k.double(), v.double(), causal=True)
    low = fcsa.plain_cosine_sim_attention(q, k, v, causal=True)
    err = (out.double() - ref).abs().max()
    assert err <= 2 * (low.double() - ref).abs().max() + 1.6e-2


def test_more_than_2_31_elements():
    """64-bit index arithmetic: q, out and dq of 2^31 + 1024 elements."""
    if torch.cuda.mem_get_info()[0] < 24 * 2**30:
        pytest.skip("needs 24 GiB of free GPU memory")
    nq, nk, d = 2**24 + 8, 64, 128
    q = torch.randn(1, 1, nq, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, 1, nk, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    out = fcsa.flash_cosine_sim_attention(q, k, v)
    dout = torch.randn_like(out)
    (dq,) = torch.autograd.grad(out, [q], dout)

    # Rows are independent: check the last ones (past 2^31 elements) and the first.
    for rows in (slice(nq - 100, nq), slice(0, 100)):
        results = {}
        for dtype in (torch.float64, torch.bfloat16):
            q_rows = q.detach()[:, :, rows].to(dtype).requires_grad_()
            o = fcsa.plain_cosine_sim_attention(q_rows, k.to(dtype), v.to(dtype))
            (g,) = torch.autograd.grad(o, [q_rows], dout[:, :, rows].to(dtype))
            results[dtype] = (o, g)
        (ref, ref_dq), (low, low_dq) = results[torch.float64], results[torch.bfloat16]
        assert_bounded("out", out[:, :, rows], ref, low, ATOL[torch.bfloat16])
        assert_bounded("dq", dq[:, :, rows], ref_dq, low_dq, ATOL[torch.bfloat16])
