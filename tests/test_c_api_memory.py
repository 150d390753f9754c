"""libfcsa's C API refuses descriptors whose sizes overflow 64 bits and outputs that share
memory with an input, another output or themselves; it accepts inputs that share memory
(a packed qkv tensor) and outputs interleaved in one packed gradient.

Called through ctypes (cuda/tests/cpu/fcsa_ctypes.py) on the installed library, so that
any descriptor can be written, NULL and foreign data pointers included. Every refused
call must leave the workspace size it was asked for and every output untouched.
"""

import ctypes
import sys
from pathlib import Path

import pytest
import torch

import fcsa

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cuda" / "tests" / "cpu"))
import fcsa_ctypes as fc  # noqa: E402

INVALID_ARGUMENT = 2
UNTOUCHED = 0x5EED  # what the size query's answer holds before a call
INT64_MAX = 2**63 - 1
FORWARD = ("q", "k", "v", "mask", "bias", "scale", "out", "lse")
BACKWARD = ("q", "k", "v", "mask", "bias", "scale", "out", "dout", "lse", "dq", "dk", "dv",
            "dbias", "dscale")


@pytest.fixture(scope="module")
def lib():
    return fc.load(fcsa.get_library())


def call(lib, descriptors, backward=False, run=True):
    """The size query, then (when it succeeds and `run`) the call with that workspace.
    Returns (status, message, the size query's answer)."""
    names, kind = (BACKWARD, fc.BackwardTensors) if backward else (FORWARD, fc.ForwardTensors)
    tensors = kind(ctypes.sizeof(kind), *[fc.pointer(descriptors.get(n)) for n in names])
    options = fc.make_options(lib)
    size = ctypes.c_size_t(UNTOUCHED)
    query = lib.fcsa_backward_workspace_size if backward else lib.fcsa_forward_workspace_size
    status = query(ctypes.byref(options), ctypes.byref(tensors), ctypes.byref(size))
    if status == 0 and run:
        workspace = torch.empty(max(size.value, 1), dtype=torch.uint8)
        function = lib.fcsa_backward if backward else lib.fcsa_forward
        status = function(ctypes.byref(options), ctypes.byref(tensors), workspace.data_ptr(),
                          size.value, None)
    return status, lib.fcsa_last_error_message().decode(), size.value


def forward_tensors(b=2, h=2, nq=5, nk=5, d=16, bias=False):
    t = {"q": torch.randn(b, h, nq, d), "k": torch.randn(b, h, nk, d),
         "v": torch.randn(b, h, nk, d), "out": torch.full((b, h, nq, d), 7.0),
         "lse": torch.full((b, h, nq), 7.0)}
    if bias:
        t["bias"] = torch.randn(1, h, nq, nk)
    return t


def backward_tensors(lib, b=2, h=2, nq=5, nk=5, d=16):
    """Inputs of a backward with a bias, and its outputs filled with 7."""
    t = forward_tensors(b, h, nq, nk, d, bias=True)
    t["out"], t["lse"] = fc.forward(lib, t["q"], t["k"], t["v"], bias=t["bias"])
    t["dout"] = torch.randn(b, h, nq, d)
    for name, like in (("dq", "q"), ("dk", "k"), ("dv", "v"), ("dbias", "bias")):
        t[name] = torch.full_like(t[like], 7.0)
    return t


def describe_all(tensors):
    return {name: fc.describe(t) for name, t in tensors.items()}


def assert_refused(result, *words):
    status, message, size = result
    assert status == INVALID_ARGUMENT, (status, message)
    assert size == UNTOUCHED, f"the size query wrote {size}"
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


# ---------------------------------------------------------------- 64-bit overflow

def with_shape(descriptor, shape, strides=None):
    for i, n in enumerate(shape):
        descriptor.shape[i] = n
    if strides is not None:
        for i, s in enumerate(strides):
            descriptor.strides[i] = s
    return descriptor


def test_key_count_beyond_int64_is_refused(lib):
    # 2^59 keys of 16 elements: 2^63 elements; without the check the count wrapped and
    # the size query answered 64 bytes.
    for nk in (2**59, INT64_MAX):
        for backward in (False, True):
            t = backward_tensors(lib) if backward else forward_tensors()
            d = describe_all(t)
            for name in ("k", "v"):
                with_shape(d[name], (2, 2, nk, 16))
            assert_refused(call(lib, d, backward, run=False), "k: shape (2, 2, %d, 16)" % nk,
                           "more than 2^63 - 1 elements")


def test_query_count_beyond_int64_is_refused_before_any_work(lib):
    t = backward_tensors(lib)
    d = describe_all(t)
    for name in ("q", "out", "dout", "dq"):
        with_shape(d[name], (1, 1, 2**60, 16))
    d["lse"] = with_shape(d["lse"], (1, 1, 2**60))
    assert_refused(call(lib, d, backward=True, run=False), "q:", "more than 2^63 - 1 elements")

    # (2^32, 2^32, 1, 16): the element count wrapped to 0, and a NULL q was "empty".
    t = forward_tensors()
    d = describe_all(t)
    with_shape(d["q"], (2**32, 2**32, 1, 16))
    d["q"].data = None
    assert_refused(call(lib, d, run=False), "q: shape (4294967296, 4294967296, 1, 16)",
                   "more than 2^63 - 1 elements")
    status, message, _ = call(lib, d, run=True)
    assert status == INVALID_ARGUMENT and message.startswith("q:")
    assert (t["out"] == 7.0).all() and (t["lse"] == 7.0).all()


def test_broadcast_lengths_beyond_the_size_bound_are_refused(lib):
    # Stride-0 dims describe huge tensors in little memory. Their element counts fit,
    # but the backends' workspaces (b * hk * nk * d floats of packed keys, ...) would not.
    t = forward_tensors(d=1)
    d = describe_all(t)
    for name in ("k", "v"):
        with_shape(d[name], (1, 1, 2**57, 1), (0, 0, 0, 1))
    for name in ("q", "out"):
        with_shape(d[name], (1, 1, 5, 1))
    d["lse"] = with_shape(d["lse"], (1, 1, 5))
    assert_refused(call(lib, d, run=False), "k: shape (1, 1, 144115188075855872, 1)",
                   "too large", "b * hk * nk * d")

    # A backward with nq = 2^60 rows read from one row of q: refused before dq (which
    # would overlap itself) is even looked at.
    t = backward_tensors(lib, b=1, h=1, d=1)
    d = describe_all(t)
    for name in ("q", "out", "dout", "dq"):
        with_shape(d[name], (1, 1, 2**60, 1), (0, 0, 0, 1))
    d["lse"] = with_shape(d["lse"], (1, 1, 2**60), (0, 0, 0))
    assert_refused(call(lib, d, backward=True, run=False), "q:", "too large",
                   "b * h * nq * d")

    # b * h * nq * nk without a bias: 2^80 scores.
    t = forward_tensors(b=1, h=1)
    d = describe_all(t)
    for name in ("q", "out", "k", "v"):
        with_shape(d[name], (1, 1, 2**40, 16), (0, 0, 0, 1))
    d["lse"] = None
    assert_refused(call(lib, d, run=False), "k:", "too large", "b * h * nq * nk", "2^62")

    # b * h * nq * nk with a bias (2^62 here): the scores dbias is summed over.
    t = forward_tensors(bias=True)
    d = describe_all(t)
    for name in ("q", "out"):
        with_shape(d[name], (2, 2, 2**30, 16), (0, 0, 0, 1))
    for name in ("k", "v"):
        with_shape(d[name], (2, 2, 2**30, 16), (0, 0, 0, 1))
    d["lse"] = None
    d["bias"] = with_shape(d["bias"], (1, 1, 1, 1))
    assert_refused(call(lib, d, run=False), "bias:", "too large", "b * h * nq * nk")


def test_huge_strides_are_refused(lib):
    cases = {
        # (dim, stride): the extent overflows int64 in elements, or in bytes.
        "elements": (0, INT64_MAX),
        "bytes": (0, 2**61 + 1),
    }
    for what, (dim, stride) in cases.items():
        t = forward_tensors()
        d = describe_all(t)
        d["q"].strides[dim] = stride
        assert_refused(call(lib, d, run=False), "q: shape (2, 2, 5, 16) with strides",
                       f"spans more than 2^63 - 1 {what}")
    # In range for int64, but past the end of the address space from where v starts.
    t = forward_tensors()
    d = describe_all(t)
    d["v"].data = 2**64 - 1024
    assert_refused(call(lib, d, run=False), "v:", "past the end of the address space")
    # Negative strides are refused (size-1 dims may still have any stride).
    d = describe_all(forward_tensors())
    d["k"].strides[2] = -16
    assert_refused(call(lib, d, run=False), "k: negative stride on dimension 2")


def test_lengths_at_the_bound_still_answer_a_size(lib):
    # 2^40 keys broadcast from one row: large but within the bound; the answer is the
    # backend's honest size (the packed keys alone take 4 * nk * d bytes).
    t = forward_tensors(b=1, h=1, d=16)
    d = describe_all(t)
    for name in ("k", "v"):
        with_shape(d[name], (1, 1, 2**40, 16), (0, 0, 0, 1))
    status, message, size = call(lib, d, run=False)
    assert status == 0, message
    assert 4 * 2**40 * 16 <= size < 2**63


# ---------------------------------------------------------------- overlapping outputs

def snapshot(tensors):
    return {name: t.clone() for name, t in tensors.items()}


def assert_unchanged(before, tensors):
    for name, t in before.items():
        assert torch.equal(t, tensors[name]), f"{name} was written"


def test_forward_outputs_sharing_memory_are_refused(lib):
    # out = v.
    t = forward_tensors()
    before = snapshot(t)
    d = describe_all(t)
    d["out"] = fc.describe(t["v"])
    assert_refused(call(lib, d), "out: overlaps v in memory",
                   "outputs must not share memory with any input or other output")
    assert_unchanged(before, t)

    # lse in the middle of out.
    t = forward_tensors()
    before = snapshot(t)
    d = describe_all(t)
    d["lse"] = fc.describe(t["out"].view(-1)[16:16 + 20].view(2, 2, 5))
    assert_refused(call(lib, d), "lse: overlaps out in memory")
    assert_unchanged(before, t)

    # out whose rows all lie on one row (stride 0): the rows would race.
    t = forward_tensors()
    before = snapshot(t)
    d = describe_all(t)
    d["out"].strides[2] = 0
    assert_refused(call(lib, d), "out: shape (2, 2, 5, 16) with strides (160, 80, 0, 1)",
                   "must not overlap itself")
    assert_unchanged(before, t)

    # Heads that overlap rows: strides (80, 8, 16, 1) reach one element twice.
    d = describe_all(t)
    d["out"].strides[1] = 8
    assert_refused(call(lib, d), "out:", "must not overlap itself")
    assert_unchanged(before, t)


def test_backward_outputs_sharing_memory_are_refused(lib):
    t = backward_tensors(lib)
    before = snapshot(t)

    # dq and dk in one buffer, dk starting halfway through dq.
    buffer = torch.full((2 * t["dq"].numel(),), 7.0)
    d = describe_all(t)
    n = t["dq"].numel()
    d["dq"] = fc.describe(buffer[:n].view(t["dq"].shape))
    d["dk"] = fc.describe(buffer[n // 2:n // 2 + n].view(t["dk"].shape))
    assert_refused(call(lib, d, backward=True), "dk: overlaps dq in memory")
    assert (buffer == 7.0).all()

    d = describe_all(t)
    d["dv"] = fc.describe(t["k"])
    assert_refused(call(lib, d, backward=True), "dv: overlaps k in memory")

    d = describe_all(t)
    d["dbias"] = fc.describe(t["bias"])
    assert_refused(call(lib, d, backward=True), "dbias: overlaps bias in memory")

    # dq over dout, and over lse: inputs of the backward only.
    d = describe_all(t)
    d["dq"] = fc.describe(t["dout"])
    assert_refused(call(lib, d, backward=True), "dq: overlaps dout in memory")
    assert_unchanged(before, t)

    shared = torch.full((t["dq"].numel() + 8,), 7.0)
    shared[:t["lse"].numel()] = t["lse"].view(-1)
    d = describe_all(t)
    d["lse"] = fc.describe(shared[:t["lse"].numel()].view(t["lse"].shape))
    d["dq"] = fc.describe(shared[8:].view(t["dq"].shape))
    before_shared = shared.clone()
    assert_refused(call(lib, d, backward=True), "dq: overlaps lse in memory")
    assert torch.equal(shared, before_shared)


def packed_qkv(b=2, n=6, h=2, d=16):
    """q, k, v as (b, h, n, d) views of one (b, n, 3, h, d) tensor."""
    qkv = torch.randn(b, n, 3, h, d)
    return qkv, [qkv[:, :, i].transpose(1, 2) for i in range(3)]


def test_inputs_may_share_memory_and_outputs_may_interleave(lib):
    qkv, (q, k, v) = packed_qkv()
    out, lse = fc.forward(lib, q, k, v)
    ref_out, ref_lse = fc.forward(lib, q.contiguous(), k.contiguous(), v.contiguous())
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)

    # q = k = v: one tensor read three times.
    out_same, _ = fc.forward(lib, q, q, q)
    ref_same, _ = fc.forward(lib, q.contiguous(), q.contiguous(), q.contiguous())
    assert torch.equal(out_same, ref_same)

    # dq, dk and dv written into one packed (b, n, 3, h, d) gradient: their spans meet,
    # but no element is shared.
    dout = torch.randn_like(out)
    dqkv = torch.full_like(qkv, float("nan"))
    grads = [dqkv[:, :, i].transpose(1, 2) for i in range(3)] + [None, None]
    fc.backward(lib, q, k, v, out, dout, lse, grads=grads)
    ref = fc.backward(lib, q, k, v, out, dout, lse)
    for got, want in zip(grads[:3], ref[:3]):
        assert torch.equal(got, want)

    # The same layout with dk moved by half a head into dq's place is refused.
    dqkv.fill_(7.0)
    d = {name: fc.describe(x) for name, x in
         dict(q=q, k=k, v=v, out=out, dout=dout, lse=lse, dq=grads[0], dk=grads[1],
              dv=grads[2]).items()}
    d["dk"].data = grads[0].data_ptr() + 8 * 4
    assert_refused(call(lib, d, backward=True), "dk: overlaps dq in memory")
    assert (dqkv == 7.0).all()
