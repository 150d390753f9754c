"""fcsa._lib called directly: queries, poisoned outputs overwritten, failed validation
writes nothing, statuses mapped to the right exceptions."""

import pytest
import torch

import fcsa
from fcsa import _lib
from fcsa._ops import describe


def test_version_and_build_queries():
    assert fcsa.__version__ == _lib.version()
    assert _lib.abi_version() == _lib.ABI_VERSION
    info = fcsa.build_info()
    assert isinstance(info, str) and _lib.version() in info
    assert isinstance(fcsa.cuda_compiled(), bool)
    assert isinstance(fcsa.cuda_available(), bool)
    if not fcsa.cuda_compiled():
        assert not fcsa.cuda_available()
        assert fcsa.compiled_sm_targets() == ()
    else:
        assert all(isinstance(t, int) and t >= 80 for t in fcsa.compiled_sm_targets())
    assert _lib.status_string(0) == "FCSA_STATUS_SUCCESS"
    assert _lib.backend_name(_lib.BACKEND_CPU) == "cpu"


def test_last_backend_cpu():
    q, k, v = (torch.randn(1, 1, 4, 8) for _ in range(3))
    fcsa.flash_cosine_sim_attention(q, k, v)
    assert fcsa.last_backend() == "cpu"


def test_options_defaults_and_repr():
    text = repr(_lib.Options())
    assert "scale=8.0" in text and "groups=1" in text and "l2norm_qk=True" in text


def problem(b=2, h=4, hk=2, nq=13, nk=21, d=24):
    """Canonical inputs with a broadcast bias (1, h, nq, 1) and a per-head scale."""
    t = dict(q=torch.randn(b, h, nq, d), k=torch.randn(b, hk, nk, d),
             v=torch.randn(b, hk, nk, d), mask=torch.rand(b, nk) < 0.8,
             bias=torch.randn(1, h, nq, 1), scale=4 + 4 * torch.rand(h))
    t["mask"][:, 0] = True
    return t


def run_forward(options, **tensors):
    """Workspace query, then the call, with a workspace full of garbage."""
    nbytes = _lib.forward_workspace_size(options, **tensors)
    ws = torch.full((max(nbytes, 1),), 0xFF, dtype=torch.uint8)
    _lib.forward(options, **tensors, workspace=ws.data_ptr(), workspace_bytes=nbytes)


def run_backward(options, **tensors):
    nbytes = _lib.backward_workspace_size(options, **tensors)
    ws = torch.full((max(nbytes, 1),), 0xFF, dtype=torch.uint8)
    _lib.backward(options, **tensors, workspace=ws.data_ptr(), workspace_bytes=nbytes)


def poisoned(shape, dtype=torch.float32):
    return torch.full(shape, float("nan"), dtype=dtype)


def test_forward_and_backward_overwrite_poisoned_outputs():
    t = problem()
    b, h, nq, d = t["q"].shape
    opts = _lib.Options(causal=True)
    out, lse = poisoned(t["q"].shape), poisoned((b, h, nq))
    desc = {n: describe(x) for n, x in t.items()}
    run_forward(opts, **desc, out=describe(out), lse=describe(lse))
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()

    leaves = {n: x.double().requires_grad_() for n, x in t.items() if n != "mask"}
    ref, ref_lse = fcsa.plain_cosine_sim_attention(
        leaves["q"], leaves["k"], leaves["v"], mask=t["mask"], attn_bias=leaves["bias"],
        scale=leaves["scale"], causal=True, return_lse=True)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)

    dout = torch.randn_like(out)
    grads = {n: poisoned(x.shape) for n, x in leaves.items()}
    bdesc = dict(desc, out=describe(out), dout=describe(dout), lse=describe(lse),
                 dq=describe(grads["q"]), dk=describe(grads["k"]), dv=describe(grads["v"]),
                 dbias=describe(grads["bias"]), dscale=describe(grads["scale"]))
    run_backward(opts, **bdesc)

    ref_grads = torch.autograd.grad(ref, list(leaves.values()), dout.double())
    for (name, got), want in zip(grads.items(), ref_grads):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4, msg=name)


def test_failed_validation_writes_nothing():
    t = problem()
    b, h, nq, d = t["q"].shape
    sentinel = 12345.0
    out = torch.full(t["q"].shape, sentinel)
    bad_lse = torch.full((b, h, nq + 1), sentinel)  # wrong shape
    desc = {n: describe(x) for n, x in t.items()}
    with pytest.raises(ValueError, match="lse"):
        run_forward(_lib.Options(), **desc, out=describe(out), lse=describe(bad_lse))
    assert (out == sentinel).all() and (bad_lse == sentinel).all()

    grads = [torch.full(x.shape, sentinel) for x in (t["q"], t["k"], t["v"])]
    good_lse = torch.zeros(b, h, nq)
    bad_dout = torch.randn(b, h, nq, d).half()  # dtype differs from q's
    with pytest.raises(TypeError):
        run_backward(_lib.Options(), **desc, out=describe(out), dout=describe(bad_dout),
                     lse=describe(good_lse), dq=describe(grads[0]), dk=describe(grads[1]),
                     dv=describe(grads[2]))
    for g in grads:
        assert (g == sentinel).all()


def test_library_errors_map_to_exceptions():
    t = problem()
    opts = _lib.Options()
    out = torch.empty(t["q"].shape)
    desc = {n: describe(x) for n, x in t.items()}

    # Wrong dtype -> TypeError, wrong shape -> ValueError, with the library's message.
    half_v = describe(t["v"].half())
    with pytest.raises(TypeError) as info:
        _lib.forward(opts, **dict(desc, v=half_v), out=describe(out))
    assert "v" in str(info.value)
    with pytest.raises(ValueError) as info:
        _lib.forward(opts, **dict(desc, out=describe(torch.empty(3, 3))))
    assert "out" in str(info.value)
    # Last-dim stride other than 1 -> ValueError naming the tensor.
    ptr, dtype, dev, idx, shape, strides = desc["q"]
    with pytest.raises(ValueError, match="q"):
        _lib.forward(opts, **dict(desc, q=(ptr, dtype, dev, idx, shape, strides[:3] + (2,))),
                     out=describe(out))
    # A groups value that does not divide d -> ValueError naming groups.
    with pytest.raises(ValueError, match="groups"):
        _lib.forward(_lib.Options(groups=5), **desc, out=describe(out))
    # Malformed descriptors are refused by the binding itself.
    with pytest.raises(TypeError, match="q"):
        _lib.forward(opts, **dict(desc, q=(1, 2)), out=describe(out))
    with pytest.raises(ValueError, match="q"):
        _lib.forward(opts, **dict(desc, q=(ptr, dtype, dev, idx, (1,) * 5, (1,) * 5)),
                     out=describe(out))
    # The process keeps working.
    run_forward(opts, **desc, out=describe(out))
    assert torch.isfinite(out).all()


@pytest.mark.skipif(fcsa.cuda_compiled(), reason="libfcsa has CUDA backends")
def test_cuda_descriptor_in_cpu_only_build_is_not_supported():
    t = problem()
    out = torch.empty(t["q"].shape)
    cuda = {}
    for name, x in dict(t, out=out).items():
        ptr, dtype, _, _, shape, strides = describe(x)
        cuda[name] = (ptr, dtype, _lib.DEVICE_CUDA, 0, shape, strides)
    with pytest.raises(NotImplementedError, match="CUDA"):
        _lib.forward(_lib.Options(), **cuda)


@pytest.mark.skipif(not torch.cuda.is_available() or fcsa.cuda_compiled(),
                    reason="needs a CUDA GPU and a CPU-only libfcsa")
def test_cuda_tensors_in_cpu_only_build_raise_not_implemented():
    q, k, v = (torch.randn(1, 2, 8, 16, device="cuda") for _ in range(3))
    with pytest.raises(NotImplementedError):
        fcsa.flash_cosine_sim_attention(q, k, v)


def test_workspace_too_small_is_refused():
    t = problem(nq=300, nk=300)
    desc = {n: describe(x) for n, x in t.items()}
    out = torch.empty(t["q"].shape)
    nbytes = _lib.forward_workspace_size(_lib.Options(), **desc, out=describe(out))
    if nbytes == 0:
        pytest.skip("this call needs no workspace")
    with pytest.raises(RuntimeError, match="WORKSPACE"):
        _lib.forward(_lib.Options(), **desc, out=describe(out), workspace=0,
                     workspace_bytes=nbytes - 1)


def test_misaligned_workspace_is_refused_before_any_write():
    t = problem(nq=300, nk=300)
    desc = {n: describe(x) for n, x in t.items()}
    out = torch.full(t["q"].shape, float("nan"))
    nbytes = _lib.forward_workspace_size(_lib.Options(), **desc, out=describe(out))
    if nbytes == 0:
        pytest.skip("this call needs no workspace")
    ws = torch.empty(nbytes + 16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="workspace.*16-byte aligned"):
        _lib.forward(_lib.Options(), **desc, out=describe(out), workspace=ws.data_ptr() + 4,
                     workspace_bytes=nbytes)
    assert torch.isnan(out).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_float32_out_for_16_bit_inputs(dtype):
    # out may be float32 for 16-bit q: the forward writes it unrounded, the backward takes
    # delta = <dO, O> from it. Any other dtype of out is refused.
    t = {n: x.to(dtype) if n in ("q", "k", "v", "bias") else x for n, x in problem().items()}
    b, h, nq, d = t["q"].shape
    desc = {n: describe(x) for n, x in t.items()}
    opts = _lib.Options(causal=True)
    out16, out32 = poisoned(t["q"].shape, dtype), poisoned(t["q"].shape)
    lse16, lse32 = poisoned((b, h, nq)), poisoned((b, h, nq))
    run_forward(opts, **desc, out=describe(out16), lse=describe(lse16))
    run_forward(opts, **desc, out=describe(out32), lse=describe(lse32))
    assert torch.equal(out32.to(dtype), out16) and torch.equal(lse32, lse16)

    dout = torch.randn(t["q"].shape).to(dtype)
    grads = {n: poisoned(x.shape, x.dtype) for n, x in t.items() if n != "mask"}
    run_backward(opts, **desc, out=describe(out32), dout=describe(dout), lse=describe(lse32),
                 **{"d" + n: describe(g) for n, g in grads.items()})
    leaves = {n: x.double().requires_grad_() for n, x in t.items() if n != "mask"}
    ref = fcsa.plain_cosine_sim_attention(
        leaves["q"], leaves["k"], leaves["v"], mask=t["mask"], attn_bias=leaves["bias"],
        scale=leaves["scale"], causal=True)
    ref_grads = dict(zip(leaves, torch.autograd.grad(ref, list(leaves.values()), dout.double())))
    for name, got in grads.items():
        assert torch.isfinite(got).all(), name
    # The two gradients that sum dS over the keys: float32 accuracy, not 16-bit (the
    # bias broadcasts over the keys: its exact gradient is 0).
    scale_error = (grads["scale"].double() - ref_grads["scale"]).abs().max()
    assert scale_error <= 1e-5 * ref_grads["scale"].abs().max()
    assert grads["bias"].abs().max() <= 1e-5

    other = torch.float16 if dtype == torch.bfloat16 else torch.bfloat16
    with pytest.raises(TypeError, match="out"):
        run_forward(opts, **desc, out=describe(poisoned(t["q"].shape, other)))


def test_broadcast_bias_backward_workspace_is_not_one_per_batch_and_head():
    # The items that share dbias elements add into one float32 accumulator in turn:
    # before, each (batch, kv head) had its own copy, 32 x 16 MiB here.
    b, h, n, d = 4, 8, 2048, 8
    q, k, v, out, dout, dq, dk, dv = (torch.empty(b, h, n, d) for _ in range(8))
    bias, dbias = torch.empty(1, 1, n, n), torch.empty(1, 1, n, n)
    lse = torch.empty(b, h, n)
    tensors = {n_: describe(x) for n_, x in dict(q=q, k=k, v=v, out=out, dout=dout, dq=dq, dk=dk,
                                                 dv=dv, bias=bias, lse=lse).items()}
    opts = _lib.Options(causal=True)
    without = _lib.backward_workspace_size(opts, **tensors)
    with_dbias = _lib.backward_workspace_size(opts, **tensors, dbias=describe(dbias))
    bias_bytes = bias.numel() * bias.element_size()
    assert with_dbias - without <= 2 * bias_bytes
