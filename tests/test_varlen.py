"""Packed variable-length sequences: flash_cosine_sim_attention_varlen against each
sequence run alone through flash_cosine_sim_attention and against the float64 plain
reference, forward and every gradient; every output element written; the errors; the
torch.library ops, torch.compile and the nn.Module."""

import pytest
import torch

import fcsa
from fcsa import _lib, _ops
from helpers import DEVICES, dtype_id

LENGTHS = [0, 1, 7, 127, 128, 129, 1000]
# Between two runs of fcsa that differ in tiling or backend (test_cuda.py's bounds): the
# GPU's float32 products are 3xTF32, and it rounds q^ and k^ to 16-bit dtypes.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def offsets(lengths, device):
    cumulative = [0]
    for n in lengths:
        cumulative.append(cumulative[-1] + n)
    return torch.tensor(cumulative, dtype=torch.int32, device=device)


def packed_inputs(lengths_q, lengths_k, h, hk, d, d_v, dtype, device, scale_tensor=True):
    total_q, total_k = sum(lengths_q), sum(lengths_k)
    q = torch.randn(total_q, h, d, dtype=dtype, device=device).requires_grad_()
    k = torch.randn(total_k, hk, d, dtype=dtype, device=device).requires_grad_()
    v = torch.randn(total_k, hk, d_v, dtype=dtype, device=device).requires_grad_()
    scale = (torch.linspace(4.0, 10.0, h, device=device).requires_grad_() if scale_tensor
             else 8.0)
    return q, k, v, offsets(lengths_q, device), offsets(lengths_k, device), scale


def leaves(q, k, v, scale):
    return [t for t in (q, k, v, scale) if isinstance(t, torch.Tensor)]


def each_sequence_alone(attention, q, k, v, cu_q, cu_k, scale, **kwargs):
    """out (total_q, h, d_v) and lse (h, total_q) from running each sequence alone
    through `attention` (flash or plain) on (1, heads, n, d) views of the packed rows."""
    outs, lses = [], []
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    for s in range(len(bounds_q) - 1):
        a, b = bounds_q[s], bounds_q[s + 1]
        c, e = bounds_k[s], bounds_k[s + 1]
        if a == b:
            continue
        seq = [t[lo:hi].transpose(0, 1).unsqueeze(0) for t, lo, hi in
               ((q, a, b), (k, c, e), (v, c, e))]
        if e == c:  # no key: out 0, lse -inf (SPEC), whatever the backend does with nk = 0
            outs.append(seq[0].new_zeros(b - a, q.shape[1], v.shape[2]) * seq[0].sum())
            lses.append(torch.full((q.shape[1], b - a), float("-inf"), dtype=torch.float64
                                   if q.dtype == torch.float64 else torch.float32,
                                   device=q.device))
            continue
        out, lse = attention(*seq, scale=scale, return_lse=True, **kwargs)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    if not outs:
        return (q.new_zeros(0, q.shape[1], v.shape[2]),
                torch.zeros(q.shape[1], 0, device=q.device))
    return torch.cat(outs), torch.cat(lses, dim=1)


def results(out, lse, wrt, dout):
    grads = torch.autograd.grad(out, wrt, dout)
    return [out.detach(), lse.detach(), *grads]


NAMES = ["out", "lse", "dq", "dk", "dv", "dscale"]


def compare(got, expected, atol, rtol=None):
    """Each result within atol (times its largest expected magnitude, when that is
    above 1: gradients summed over many rows) and rtol."""
    for name, g, e in zip(NAMES, got, expected):
        e = e.float()
        finite = e[e.isfinite()]
        size = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
        torch.testing.assert_close(g.float(), e, atol=atol * size,
                                   rtol=atol if rtol is None else rtol,
                                   msg=lambda m: f"{name}: {m}")


def check_against_each_sequence(lengths_q, lengths_k, h, hk, d, dtype, device, causal,
                                d_v=None):
    q, k, v, cu_q, cu_k, scale = packed_inputs(lengths_q, lengths_k, h, hk, d, d_v or d,
                                               dtype, device)
    wrt = leaves(q, k, v, scale)
    out, lse = fcsa.flash_cosine_sim_attention_varlen(q, k, v, cu_q, cu_k, scale=scale,
                                                      causal=causal, return_lse=True)
    assert out.shape == (q.shape[0], h, v.shape[2]) and out.dtype == dtype
    assert lse.shape == (h, q.shape[0]) and lse.dtype == torch.float32
    dout = torch.randn_like(out)
    got = results(out, lse, wrt, dout)
    alone = each_sequence_alone(fcsa.flash_cosine_sim_attention, q, k, v, cu_q, cu_k, scale,
                                causal=causal)
    expected = results(*alone, wrt, dout)
    # On the CPU each sequence runs the very kernel it runs alone: equal but for the
    # order dscale is summed in. On the GPU the key-norm pass may run for one and not
    # the other, and atomics add in another order: equal to rounding.
    atol = 1e-5 if device == "cpu" and dtype == torch.float32 else TOLERANCE[dtype]
    compare(got, expected, atol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("hk", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("kv", ["self", "cross"])
def test_matches_each_sequence_alone(kv, hk, causal, device):
    lengths_q = [129, 0, 7, 1000, 1, 128, 127]
    # Cross: other key counts, an empty one under a non-empty query sequence and the
    # reverse, so causal's end alignment differs per sequence.
    lengths_k = lengths_q if kv == "self" else [300, 5, 0, 640, 64, 1, 200]
    check_against_each_sequence(lengths_q, lengths_k, 4, hk, 32, torch.float32, device, causal)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_matches_each_sequence_alone_16bit(causal, dtype, device):
    check_against_each_sequence(LENGTHS[::-1], LENGTHS[::-1], 4, 2, 64, dtype, device, causal)


@pytest.mark.parametrize("device", DEVICES)
def test_long_sequence(device):
    """One sequence of 4097 among short and empty ones (several query tiles, a ragged
    last key tile), causal, single-headed kv."""
    check_against_each_sequence([3, 4097, 0, 129], [3, 4097, 0, 129], 2, 1, 32,
                                torch.float32, device, True)


@pytest.mark.parametrize("device", DEVICES)
def test_value_head_dim_of_its_own(device):
    check_against_each_sequence([7, 128, 0, 129], [9, 127, 3, 129], 4, 2, 32,
                                torch.float32, device, True, d_v=64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_float64_reference(causal, device):
    """Against plain_cosine_sim_attention in float64, sequence by sequence."""
    lengths_q, lengths_k = LENGTHS, [5, 0, 7, 100, 128, 200, 1000]
    q, k, v, cu_q, cu_k, scale = packed_inputs(lengths_q, lengths_k, 4, 2, 32, 32,
                                               torch.float32, device)
    wrt = leaves(q, k, v, scale)
    out, lse = fcsa.flash_cosine_sim_attention_varlen(q, k, v, cu_q, cu_k, scale=scale,
                                                      causal=causal, return_lse=True)
    dout = torch.randn_like(out)
    got = results(out, lse, wrt, dout)
    wide = [t.detach().double().requires_grad_() for t in wrt]
    ref = each_sequence_alone(fcsa.plain_cosine_sim_attention, *wide[:3], cu_q, cu_k,
                              wide[3], causal=causal)
    expected = results(*ref, wide, dout.double())
    compare(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_scale_as_a_number_and_no_lse(device):
    """A number scale (no dscale), the default flags, out alone."""
    q, k, v, cu_q, cu_k, _ = packed_inputs([0, 33, 70], [0, 33, 70], 2, 2, 16, 16,
                                           torch.float32, device)
    out = fcsa.flash_cosine_sim_attention_varlen(q, k, v, cu_q, cu_k, scale=5.0)
    alone, _ = each_sequence_alone(fcsa.flash_cosine_sim_attention, q, k, v, cu_q, cu_k, 5.0)
    torch.testing.assert_close(out, alone, atol=1e-5, rtol=1e-5)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    expected = torch.autograd.grad(alone, (q, k, v), dout)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_backward_is_bitwise_reproducible(device):
    q, k, v, cu_q, cu_k, scale = packed_inputs([200, 0, 333], [150, 9, 333], 4, 2, 32, 32,
                                               torch.float16 if device == "cuda" else torch.float32,
                                               device)
    runs = []
    for _ in range(2):
        out = fcsa.flash_cosine_sim_attention_varlen(q, k, v, cu_q, cu_k, scale=scale,
                                                     causal=True, deterministic=True)
        runs.append(torch.autograd.grad(out, leaves(q, k, v, scale), torch.ones_like(out)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- every element written

def library_call(q, k, v, cu_q, cu_k, out, lse, dq=None, dk=None, dv=None, dout=None,
                 scale=None, dscale=None, causal=True):
    """fcsa_forward (or, with dq, fcsa_backward) straight through the binding, on the
    caller's output tensors."""
    packed = _ops._packed
    tensors = dict(q=_ops.describe(packed(q)), k=_ops.describe(packed(k)),
                   v=_ops.describe(packed(v)), scale=_ops.describe(scale),
                   out=_ops.describe(packed(out)), lse=_ops.describe(lse.unsqueeze(0)),
                   cu_seqlens_q=_ops.describe(cu_q), cu_seqlens_k=_ops.describe(cu_k))
    options = _ops._options(8.0, 1, causal, True, False)
    if dq is None:
        _ops._run(_lib.forward_workspace_size, _lib.forward, q.device, options, tensors)
        return
    tensors.update(dout=_ops.describe(packed(dout)), dq=_ops.describe(packed(dq)),
                   dk=_ops.describe(packed(dk)), dv=_ops.describe(packed(dv)),
                   dscale=_ops.describe(dscale))
    _ops._run(_lib.backward_workspace_size, _lib.backward, q.device, options, tensors)


@pytest.mark.parametrize("device", DEVICES)
def test_every_output_element_written(device):
    """Outputs filled with NaN beforehand: afterwards none is left, the rows of a
    sequence without keys hold out 0 and lse -inf, the keys of a sequence without
    queries get dk = dv = 0, and the values equal the ops'."""
    lengths_q, lengths_k = [5, 0, 64, 3, 129], [0, 6, 70, 3, 129]
    h, hk, d = 4, 2, 32
    q, k, v, cu_q, cu_k, _ = packed_inputs(lengths_q, lengths_k, h, hk, d, d, torch.float32,
                                           device)
    q, k, v = q.detach(), k.detach(), v.detach()
    scale = torch.linspace(3.0, 9.0, h, device=device)
    nan = float("nan")
    out = torch.full((q.shape[0], h, d), nan, device=device)
    lse = torch.full((h, q.shape[0]), nan, device=device)
    library_call(q, k, v, cu_q, cu_k, out, lse, scale=scale)
    expected_out, expected_lse = torch.ops.fcsa.varlen_forward(
        q, k, v, cu_q, cu_k, scale, 8.0, 1, True, True, False, True, False)
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out, expected_out)
    torch.testing.assert_close(lse, expected_lse)
    assert torch.equal(out[:5], torch.zeros_like(out[:5]))  # sequence 0 has no key
    assert torch.equal(lse[:, :5], torch.full_like(lse[:, :5], float("-inf")))

    dout = torch.randn_like(out)
    dq, dk, dv = (torch.full_like(t, nan) for t in (q, k, v))
    dscale = torch.full((h,), nan, device=device)
    library_call(q, k, v, cu_q, cu_k, out, lse, dq, dk, dv, dout, scale, dscale)
    expected = torch.ops.fcsa.varlen_backward(dout, q, k, v, cu_q, cu_k, scale, out, lse,
                                              8.0, 1, True, True, False, True)
    for got, want in zip((dq, dk, dv, dscale), expected):
        assert not got.isnan().any()
        torch.testing.assert_close(got, want)
    assert torch.equal(dq[:5], torch.zeros_like(dq[:5]))   # no key: no gradient
    assert torch.equal(dk[:6], torch.zeros_like(dk[:6]))   # no query: no gradient
    assert torch.equal(dv[:6], torch.zeros_like(dv[:6]))
    assert dq[5:].abs().sum() > 0 and dk[6:].abs().sum() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_no_sequences_and_all_empty(device):
    """b = 0 (offsets (1,)) and sequences that are all empty: nothing to compute."""
    for lengths in ([], [0, 0]):
        q, k, v, cu_q, cu_k, scale = packed_inputs(lengths, lengths, 2, 2, 8, 8,
                                                   torch.float32, device)
        out, lse = fcsa.flash_cosine_sim_attention_varlen(q, k, v, cu_q, cu_k, scale=scale,
                                                          return_lse=True)
        assert out.shape == (0, 2, 8) and lse.shape == (2, 0)
        dq, dk, dv, dscale = torch.autograd.grad(out, (q, k, v, scale), torch.ones_like(out))
        assert dq.shape == q.shape and torch.equal(dscale, torch.zeros(2, device=device))
    # Keys but no queries: dk = dv = 0.
    q, k, v, cu_q, cu_k, scale = packed_inputs([0, 0], [4, 5], 2, 1, 8, 8, torch.float32,
                                               device)
    out = fcsa.flash_cosine_sim_attention_varlen(q, k, v, cu_q, cu_k, scale=scale)
    dq, dk, dv, dscale = torch.autograd.grad(out, (q, k, v, scale), torch.ones_like(out))
    assert torch.equal(dk, torch.zeros_like(dk)) and torch.equal(dv, torch.zeros_like(dv))


# ---------------------------------------------------------------- errors

def good_args(device="cpu"):
    q, k, v, cu_q, cu_k, _ = packed_inputs([3, 0, 5], [4, 2, 5], 4, 2, 16, 16, torch.float32,
                                           device)
    return dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


def int32(values, device="cpu"):
    return torch.tensor(values, dtype=torch.int32, device=device)


BAD_OFFSETS = {
    "q_int64": ("cu_seqlens_q", lambda a: a["cu_seqlens_q"].long(), "torch.int32"),
    "k_float": ("cu_seqlens_k", lambda a: a["cu_seqlens_k"].float(), "torch.int32"),
    "q_not_from_0": ("cu_seqlens_q", lambda a: int32([1, 3, 3, 8]), "start at 0"),
    "k_not_from_0": ("cu_seqlens_k", lambda a: int32([2, 4, 6, 11]), "start at 0"),
    "q_decreasing": ("cu_seqlens_q", lambda a: int32([0, 5, 3, 8]), "non-decreasing"),
    "k_decreasing": ("cu_seqlens_k", lambda a: int32([0, 4, 2, 11]), "non-decreasing"),
    "q_short_of_total": ("cu_seqlens_q", lambda a: int32([0, 3, 3, 7]), "end at 8"),
    "k_past_total": ("cu_seqlens_k", lambda a: int32([0, 4, 6, 12]), "end at 11"),
    "q_2d": ("cu_seqlens_q", lambda a: a["cu_seqlens_q"][None], r"shape \(b \+ 1,\)"),
    "q_empty": ("cu_seqlens_q", lambda a: int32([]), r"shape \(b \+ 1,\)"),
    "b_mismatch": ("cu_seqlens_k", lambda a: int32([0, 4, 6, 11, 11]), "cu_seqlens_q's shape"),
    "q_other_device": ("cu_seqlens_q", lambda a: a["cu_seqlens_q"].to("meta"), "q's device"),
    "k_other_device": ("cu_seqlens_k", lambda a: a["cu_seqlens_k"].to("meta"), "q's device"),
    "k_not_a_tensor": ("cu_seqlens_k", lambda a: [0, 4, 6, 11], "torch.Tensor"),
}


@pytest.mark.parametrize("case", list(BAD_OFFSETS))
def test_bad_offsets_raise_naming_them(case):
    name, make, match = BAD_OFFSETS[case]
    args = good_args()
    args[name] = make(args)
    error = TypeError if case == "k_not_a_tensor" else ValueError
    with pytest.raises(error, match=f"{name}.*{match}|{match}.*{name}"):
        fcsa.flash_cosine_sim_attention_varlen(**args)


@pytest.mark.cuda
@pytest.mark.parametrize("which", ["cu_seqlens_q", "cu_seqlens_k"])
@pytest.mark.parametrize("bad", [[1, 3, 3, 8], [0, 5, 3, 8], [0, 3, 3, 9]],
                         ids=["not_from_0", "decreasing", "past_total"])
def test_bad_device_offsets_raise_on_cuda(bad, which):
    args = good_args("cuda")
    if which == "cu_seqlens_k":
        bad = [x if i < len(bad) - 1 else x + 3 for i, x in enumerate(bad)]
    args[which] = int32(bad, "cuda")
    with pytest.raises(ValueError, match=which):
        fcsa.flash_cosine_sim_attention_varlen(**args)


@pytest.mark.cuda
def test_offsets_on_the_cpu_for_cuda_tensors_raise():
    args = good_args("cuda")
    args["cu_seqlens_q"] = args["cu_seqlens_q"].cpu()
    with pytest.raises(ValueError, match="cu_seqlens_q is on cpu"):
        fcsa.flash_cosine_sim_attention_varlen(**args)


def test_dtype_error_is_both_type_and_value_error():
    args = good_args()
    args["cu_seqlens_q"] = args["cu_seqlens_q"].long()
    with pytest.raises(TypeError, match="cu_seqlens_q"):
        fcsa.flash_cosine_sim_attention_varlen(**args)


def test_other_bad_arguments():
    args = good_args()
    with pytest.raises(NotImplementedError, match="attn_bias"):
        fcsa.flash_cosine_sim_attention_varlen(**args, attn_bias=torch.zeros(4, 8, 11))
    with pytest.raises(ValueError, match="max_seqlen_q is 4.*holds a sequence of 5"):
        fcsa.flash_cosine_sim_attention_varlen(**args, max_seqlen_q=4)
    with pytest.raises(ValueError, match="max_seqlen_k is 4.*holds a sequence of 5"):
        fcsa.flash_cosine_sim_attention_varlen(**args, max_seqlen_q=5, max_seqlen_k=4)
    with pytest.raises(ValueError, match="max_seqlen_k"):
        fcsa.flash_cosine_sim_attention_varlen(**args, max_seqlen_k=-1)
    fcsa.flash_cosine_sim_attention_varlen(**args, max_seqlen_q=5, max_seqlen_k=5)
    bad = dict(args, q=args["q"][None])
    with pytest.raises(ValueError, match="q must be 3-D"):
        fcsa.flash_cosine_sim_attention_varlen(**bad)
    bad = dict(args, k=args["k"][:, :1])
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        fcsa.flash_cosine_sim_attention_varlen(**bad)
    bad = dict(args, k=args["k"][:, :1].expand(11, 3, 16), v=args["v"][:, :1].expand(11, 3, 16))
    with pytest.raises(ValueError, match="multiple of k's and v's 3 heads"):
        fcsa.flash_cosine_sim_attention_varlen(**bad)
    with pytest.raises(TypeError, match="v has dtype"):
        fcsa.flash_cosine_sim_attention_varlen(**dict(args, v=args["v"].double()))
    with pytest.raises(ValueError, match="scale"):
        fcsa.flash_cosine_sim_attention_varlen(**args, scale=torch.ones(3))


def test_library_refuses_bad_offsets_before_writing():
    """The C library checks host offsets itself (the Python checks skipped): a
    ValueError naming them, and out untouched."""
    a = good_args()
    q, k, v = (a[n].detach() for n in "qkv")
    for name, bad, match in (("cu_seqlens_q", int32([0, 3, 2, 8]), "non-decreasing"),
                             ("cu_seqlens_k", int32([1, 4, 6, 11]), "0 first"),
                             ("cu_seqlens_k", int32([0, 4, 6, 10]), "11 last")):
        cu = dict(cu_q=a["cu_seqlens_q"], cu_k=a["cu_seqlens_k"])
        cu["cu_q" if name == "cu_seqlens_q" else "cu_k"] = bad
        out = torch.full((8, 4, 16), 7.0)
        lse = torch.full((4, 8), 7.0)
        with pytest.raises(ValueError, match=f"{name}: expected {match}"):
            library_call(q, k, v, cu["cu_q"], cu["cu_k"], out, lse)
        assert torch.equal(out, torch.full_like(out, 7.0))
        assert torch.equal(lse, torch.full_like(lse, 7.0))


def test_library_refuses_what_varlen_does_not_take():
    a = good_args()
    q, k, v = (a[n].detach() for n in "qkv")
    packed = _ops._packed
    out, lse = torch.empty(8, 4, 16), torch.empty(4, 8)
    base = dict(q=packed(q), k=packed(k), v=packed(v), out=packed(out), lse=lse[None],
                cu_seqlens_q=a["cu_seqlens_q"], cu_seqlens_k=a["cu_seqlens_k"])
    options = _ops._options(8.0, 1, False, True, False)

    def call(**changes):
        tensors = {name: _ops.describe(t) for name, t in dict(base, **changes).items()}
        _lib.forward_workspace_size(options, **tensors)

    call()
    with pytest.raises(ValueError, match="cu_seqlens_k: given without cu_seqlens_q"):
        call(cu_seqlens_q=None)
    with pytest.raises(NotImplementedError, match="mask: not supported with cu_seqlens_q"):
        call(mask=torch.ones(1, 11, dtype=torch.bool))
    with pytest.raises(NotImplementedError, match="bias: not supported with cu_seqlens_q"):
        call(bias=torch.zeros(1, 4, 8, 11))
    with pytest.raises(ValueError, match="q: expected a batch dim of 1"):
        two = torch.zeros(2, 4, 8, 16)
        call(q=two, k=torch.zeros(2, 2, 11, 16), v=torch.zeros(2, 2, 11, 16),
             out=torch.zeros(2, 4, 8, 16), lse=torch.zeros(2, 4, 8))
    with pytest.raises(ValueError, match="cu_seqlens_k: expected shape \\(4,\\)"):
        call(cu_seqlens_k=int32([0, 11]))
    with pytest.raises(TypeError, match="cu_seqlens_q: expected dtype int32"):
        call(cu_seqlens_q=a["cu_seqlens_q"].float())
    with pytest.raises(ValueError, match="lse: overlaps cu_seqlens_q"):
        shared = torch.zeros(40)
        offsets_in_lse = shared[28:32].view(torch.int32)
        offsets_in_lse.copy_(a["cu_seqlens_q"])
        call(lse=shared[:32].view(1, 4, 8), cu_seqlens_q=offsets_in_lse)


# ---------------------------------------------------------------- torch integration

def op_args(device, *, grad, scale_tensor=True):
    q, k, v, cu_q, cu_k, _ = packed_inputs([3, 0, 9, 1], [5, 2, 9, 0], 4, 2, 16, 16,
                                           torch.float32, device)
    q, k, v = (t.detach().requires_grad_(grad) for t in (q, k, v))
    scale = torch.full((4,), 6.0, device=device, requires_grad=grad) if scale_tensor else None
    return (q, k, v, cu_q, cu_k, scale, 8.0, 1, True, True, False, True, False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("scale_tensor", [False, True], ids=["number", "tensor"])
def test_opcheck_varlen_forward(scale_tensor, grad, device):
    args = op_args(device, grad=grad, scale_tensor=scale_tensor)
    torch.library.opcheck(torch.ops.fcsa.varlen_forward.default, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("need_dscale", [False, True])
def test_opcheck_varlen_backward(need_dscale, device):
    q, k, v, cu_q, cu_k, scale, *flags = op_args(device, grad=False)
    out, lse = torch.ops.fcsa.varlen_forward(q, k, v, cu_q, cu_k, scale, *flags)
    dout = torch.randn_like(out)
    args = (dout, q, k, v, cu_q, cu_k, scale, out, lse, *flags[:5], need_dscale)
    torch.library.opcheck(torch.ops.fcsa.varlen_backward.default, args)


def varlen_loss(q, k, v, cu_q, cu_k, scale):
    out = fcsa.flash_cosine_sim_attention_varlen(q, k, v, cu_q, cu_k, scale=scale, causal=True)
    return (out * torch.linspace(-1, 1, out.shape[-1], device=out.device)).sum()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend, device):
    torch._dynamo.reset()
    q, k, v, cu_q, cu_k, scale = packed_inputs([30, 0, 17, 64], [20, 4, 17, 64], 4, 2, 32, 32,
                                               torch.float32, device)
    eager = [t.detach().clone().requires_grad_() for t in (q, k, v, scale)]
    compiled = [t.detach().clone().requires_grad_() for t in (q, k, v, scale)]
    loss = varlen_loss(*eager[:3], cu_q, cu_k, eager[3])
    loss.backward()
    compiled_fn = torch.compile(varlen_loss, fullgraph=True, backend=backend)
    compiled_loss = compiled_fn(*compiled[:3], cu_q, cu_k, compiled[3])
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=1e-4)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c.grad, e.grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_module_packed_batch(cross, device):
    """CosineSimAttention on a packed batch equals it on each sequence alone."""
    torch.manual_seed(1)
    layer = fcsa.CosineSimAttention(32, heads=4, dim_head=16, kv_heads=2, causal=True,
                                    learned_scale=True, dim_context=24 if cross else None)
    layer = layer.to(device)
    lengths = [5, 0, 40, 1]
    lengths_context = [7, 3, 40, 0] if cross else lengths
    x = torch.randn(sum(lengths), 32, device=device, requires_grad=True)
    cu = offsets(lengths, device)
    kwargs = dict(cu_seqlens=cu)
    context = None
    if cross:
        context = torch.randn(sum(lengths_context), 24, device=device, requires_grad=True)
        kwargs.update(context=context, cu_seqlens_context=offsets(lengths_context, device))
    out = layer(x, **kwargs)
    assert out.shape == x.shape
    pieces = []
    bounds, bounds_c = cu.tolist(), offsets(lengths_context, device).tolist()
    for s in range(len(lengths)):
        xs = x[bounds[s]:bounds[s + 1]][None]
        if xs.shape[1] == 0:
            continue
        cs = None if context is None else context[bounds_c[s]:bounds_c[s + 1]][None]
        pieces.append(layer(xs, context=cs)[0])
    alone = torch.cat(pieces)
    torch.testing.assert_close(out, alone, atol=1e-5, rtol=1e-5)
    wrt = [x, layer.scale, layer.to_q.weight] + ([context] if cross else [])
    dout = torch.randn_like(out)
    for g, e in zip(torch.autograd.grad(out, wrt, dout), torch.autograd.grad(alone, wrt, dout)):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-4)


def test_module_packed_batch_errors():
    layer = fcsa.CosineSimAttention(32, heads=2, dim_head=16)
    x = torch.randn(9, 32)
    with pytest.raises(ValueError, match="cu_seqlens_context"):
        layer(x, cu_seqlens_context=int32([0, 9]))
    with pytest.raises(ValueError, match="mask"):
        layer(x, cu_seqlens=int32([0, 9]), mask=torch.ones(1, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"x must be \(total, dim\)"):
        layer(x[None], cu_seqlens=int32([0, 9]))


# ---------------------------------------------------------------- CUDA only

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("d", [32, 64, 128, 256])
def test_cuda_against_cpu_backend(d, dtype):
    """The GPU's packed forward and backward against the CPU backend's, head dims of
    every bucket, causal and grouped kv."""
    lengths_q, lengths_k = [129, 0, 1000, 7, 1, 64], [140, 3, 1000, 0, 1, 64]
    q, k, v, cu_q, cu_k, scale = packed_inputs(lengths_q, lengths_k, 4, 2, d, d, dtype, "cuda")
    wrt = leaves(q, k, v, scale)
    out, lse = fcsa.flash_cosine_sim_attention_varlen(q, k, v, cu_q, cu_k, scale=scale,
                                                      causal=True, return_lse=True)
    assert fcsa.last_backend() == "cuda-sm80"
    dout = torch.randn_like(out)
    got = results(out, lse, wrt, dout)
    cpu = [t.detach().cpu().requires_grad_() for t in wrt]
    cpu_out, cpu_lse = fcsa.flash_cosine_sim_attention_varlen(
        *cpu[:3], cu_q.cpu(), cu_k.cpu(), scale=cpu[3], causal=True, return_lse=True)
    expected = results(cpu_out, cpu_lse, cpu, dout.cpu())
    compare([g.cpu() for g in got], expected, TOLERANCE[dtype])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_cuda_common_case_against_each_sequence(deterministic, causal, d, dtype):
    """A number scale and no dscale: the backward's shared-scores kernel where the GPU
    has the shared memory for it (bf16: q's norm folded into the scores), and the
    deterministic dq kernel, on packed sequences against each sequence alone."""
    lengths_q, lengths_k = [300, 0, 1, 129, 1000, 64], [280, 5, 1, 129, 1000, 0]
    q, k, v, cu_q, cu_k, _ = packed_inputs(lengths_q, lengths_k, 4, 2, d, d, dtype, "cuda",
                                           scale_tensor=False)
    out, lse = fcsa.flash_cosine_sim_attention_varlen(q, k, v, cu_q, cu_k, causal=causal,
                                                      return_lse=True,
                                                      deterministic=deterministic)
    dout = torch.randn_like(out)
    got = results(out, lse, [q, k, v], dout)
    alone = each_sequence_alone(fcsa.flash_cosine_sim_attention, q, k, v, cu_q, cu_k, 8.0,
                                causal=causal, deterministic=deterministic)
    compare(got, results(*alone, [q, k, v], dout), TOLERANCE[dtype])


@pytest.mark.cuda
def test_cuda_graph_capture():
    """Captured with the offsets' checks skipped, replayed with other offsets of the same
    count: the kernels read the offsets from the device at every replay."""
    q, k, v, cu_q, cu_k, _ = packed_inputs([100, 0, 28], [100, 0, 28], 4, 4, 64, 64,
                                           torch.float16, "cuda")
    q, k, v = (t.detach() for t in (q, k, v))
    fcsa.flash_cosine_sim_attention_varlen(q, k, v, cu_q, cu_k, causal=True)  # warm up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fcsa.flash_cosine_sim_attention_varlen(q, k, v, cu_q, cu_k, causal=True)
    for lengths in ([100, 0, 28], [1, 64, 63]):
        cu_q.copy_(offsets(lengths, "cuda"))
        cu_k.copy_(cu_q)
        graph.replay()
        expected = fcsa.flash_cosine_sim_attention_varlen(q, k, v, cu_q, cu_k, causal=True)
        torch.testing.assert_close(out, expected, atol=0, rtol=0)


@pytest.mark.cuda
def test_cuda_wrong_offsets_stay_inside_the_tensors():
    """Offsets that the checks would refuse, passed while a graph is captured (no
    check): the kernels clamp them, so the call neither faults nor writes outside out."""
    q, k, v, cu_q, cu_k, _ = packed_inputs([64, 64], [64, 64], 2, 2, 64, 64, torch.float16,
                                           "cuda")
    q, k, v = (t.detach() for t in (q, k, v))
    guard = torch.full((3 * 128 * 2 * 64,), 5.0, dtype=torch.float16, device="cuda")
    fcsa.flash_cosine_sim_attention_varlen(q, k, v, cu_q, cu_k)  # warm up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fcsa.flash_cosine_sim_attention_varlen(q, k, v, cu_q, cu_k)
    cu_q.copy_(int32([0, 1000, -50], "cuda"))
    cu_k.copy_(int32([7, 3, 100000], "cuda"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(guard, torch.full_like(guard, 5.0))
    assert out.shape == (128, 2, 64)
