"""A value head dim of its own: v (and so out, dout and dv) d_v wide, q and k d wide.

softmax(scale q^ k^T + bias) v needs nothing of v's width but that it is one for all
keys: the output takes it. This is what the original package computes for q/k of 32
and v of 64, and what MLA-style models use (q/k 192, v 128).
"""

import pytest
import torch

import fcsa
from fcsa import _lib
from fcsa._ops import describe
from helpers import DTYPES, check_attention, dtype_id, random_mask, with_kwargs

# (d, d_v): wider and narrower values, the MLA shape, and widths that are not a
# multiple of 16 (the width of the CPU kernels' panels).
HEAD_DIMS = [(32, 64), (64, 32), (192, 128), (24, 40)]
B, H, NQ, NK = 2, 4, 37, 70


def tensors(d, d_v, *, hk=H, nq=NQ, nk=NK):
    return {"q": torch.randn(B, H, nq, d), "k": torch.randn(B, hk, nk, d),
            "v": torch.randn(B, hk, nk, d_v)}


def feature_case(feature, d, d_v):
    """(tensors, run) for one feature; every floating tensor gets a gradient."""
    t = tensors(d, d_v)
    kwargs = {}
    if feature == "causal":
        kwargs["causal"] = True
    elif feature == "cross_causal":
        t = tensors(d, d_v, nq=NK, nk=NQ)
        kwargs["causal"] = True
    elif feature == "mask":
        t["mask"] = random_mask(B, NK)
    elif feature == "bias":
        t["attn_bias"] = torch.randn(H, NQ, NK)
    elif feature == "bias_broadcast":
        t["attn_bias"] = torch.randn(B, 1, 1, NK)
    elif feature == "bias_per_query":  # broadcast over the keys: dbias sums each row
        t["attn_bias"] = torch.randn(1, H, NQ, 1)
    elif feature == "gqa":
        t = tensors(d, d_v, hk=2)
    elif feature == "single_kv":
        t = tensors(d, d_v)
        t["k"], t["v"] = t["k"][:, 0], t["v"][:, 0]  # (b, nk, d): one shared kv head
    elif feature == "scale_tensor":
        t["scale"] = 4 + 4 * torch.rand(H)
    elif feature == "groups":
        kwargs["groups"] = 2
    elif feature == "lse":
        kwargs["return_lse"] = True
    elif feature == "merged":
        t = {"q": torch.randn(B * H, NQ, d), "k": torch.randn(B * H, NK, d),
             "v": torch.randn(B * H, NK, d_v)}
    elif feature == "everything":
        t = tensors(d, d_v, hk=2)
        t["mask"] = random_mask(B, NK)
        t["attn_bias"] = torch.randn(B, H, NQ, NK)
        t["scale"] = 4 + 4 * torch.rand(())
        kwargs.update(causal=True, groups=2, return_lse=True)
    else:
        raise AssertionError(feature)
    return t, with_kwargs(**kwargs)


FEATURES = ["causal", "cross_causal", "mask", "bias", "bias_broadcast", "bias_per_query", "gqa",
            "single_kv", "scale_tensor", "groups", "lse", "merged", "everything"]
HEAD_DIM_IDS = [f"d{a}_dv{b}" for a, b in HEAD_DIMS]


@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("d,d_v", HEAD_DIMS, ids=HEAD_DIM_IDS)
def test_value_head_dim_on_cpu(d, d_v, feature):
    t, run = feature_case(feature, d, d_v)
    got = check_attention(t, torch.float32, "cpu", run)
    assert got["out"].shape[-1] == d_v and got["dv"].shape[-1] == d_v
    assert got["dq"].shape[-1] == d and got["dk"].shape[-1] == d


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("d,d_v", [(32, 64), (192, 128)], ids=["d32_dv64", "d192_dv128"])
def test_value_head_dim_16_bit_on_cpu(d, d_v, dtype):
    t, run = feature_case("everything", d, d_v)
    check_attention(t, dtype, "cpu", run)


@pytest.mark.parametrize("d,d_v", HEAD_DIMS, ids=HEAD_DIM_IDS)
def test_value_head_dim_deterministic(d, d_v):
    t, run = feature_case("everything", d, d_v)
    t.pop("scale")
    results = []
    for _ in range(2):
        torch.manual_seed(1)  # the same dout both times
        results.append(check_attention(t, torch.float32, "cpu", run, deterministic=True))
    got, again = results
    for name in got:
        assert torch.equal(got[name], again[name]), name


@pytest.mark.parametrize("d,d_v", [(64, 32), (24, 40)], ids=["d64_dv32", "d24_dv40"])
def test_value_head_dim_keys_split_and_chunked(d, d_v):
    """Long keys and a single kv head: the CPU backward splits the keys into ranges and
    walks them in chunks, both sized by d and d_v."""
    t = {"q": torch.randn(1, 2, 20, d), "k": torch.randn(1, 1, 700, d),
         "v": torch.randn(1, 1, 700, d_v), "attn_bias": torch.randn(1, 2, 1, 700)}
    check_attention(t, torch.float32, "cpu", with_kwargs(causal=True))


# ---------------------------------------------------------------- CUDA
#
# The GPU forward runs (d, d_v) in the smallest instantiated (D, DV) that covers it:
# (B, B) for each head-dim bucket B, and (192, 128) (the MLA shape, its own kernel); the
# backward in the bucket of the wider of the two. The narrower is zero-padded.

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("d,d_v", HEAD_DIMS, ids=HEAD_DIM_IDS)
def test_value_head_dim_on_cuda(d, d_v, feature, dtype):
    t, run = feature_case(feature, d, d_v)
    got = check_attention(t, dtype, "cuda", run)
    assert got["out"].shape[-1] == d_v and got["dv"].shape[-1] == d_v
    assert got["dq"].shape[-1] == d and got["dk"].shape[-1] == d


# Pairs routed to padded instantiations: (192, 128) for a narrower d and d_v, (256, 256)
# for d_v beyond 128 with d in the 192 bucket, unequal widths in the backward's split
# head dim (256: two column halves, one with no column of the narrower tensor), and
# the extremes.
ROUTED_HEAD_DIMS = [(136, 64), (200, 128), (184, 136), (256, 128), (96, 200), (8, 256), (256, 8), (40, 96)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("feature", ["causal", "everything"])
@pytest.mark.parametrize("d,d_v", ROUTED_HEAD_DIMS, ids=[f"d{a}_dv{b}" for a, b in ROUTED_HEAD_DIMS])
def test_value_head_dim_routed_on_cuda(d, d_v, feature, dtype):
    t, run = feature_case(feature, d, d_v)
    check_attention(t, dtype, "cuda", run)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("feature", ["everything", "bias_broadcast", "bias_per_query"])
@pytest.mark.parametrize("d,d_v", HEAD_DIMS, ids=HEAD_DIM_IDS)
def test_value_head_dim_deterministic_on_cuda(d, d_v, feature, dtype):
    """deterministic=True: bitwise the same gradients twice (dbias by the kernels' fixed
    orders: stored as is, owned keys, owned query rows), and right."""
    t, run = feature_case(feature, d, d_v)
    results = []
    for _ in range(2):
        torch.manual_seed(1)  # the same dout both times
        results.append(check_attention(t, dtype, "cuda", run, deterministic=True))
    got, again = results
    for name in got:
        assert torch.equal(got[name], again[name]), name


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d,d_v", [(192, 128), (32, 64), (64, 32)], ids=["d192_dv128", "d32_dv64", "d64_dv32"])
def test_value_head_dim_long_queries_on_cuda(d, d_v, causal, dtype):
    """Many query and key tiles, and from 2048 queries (4096 with causal) the forward's
    key-norm pass; grouped kv and a key count that is no multiple of a tile (causal:
    the first rows see no key)."""
    nq, nk = (4100, 3001) if causal else (2100, 1001)
    t = {"q": torch.randn(1, 2, nq, d), "k": torch.randn(1, 1, nk, d), "v": torch.randn(1, 1, nk, d_v)}
    check_attention(t, dtype, "cuda", with_kwargs(causal=causal))


@pytest.mark.cuda
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("d,d_v", HEAD_DIMS + [(256, 128)], ids=HEAD_DIM_IDS + ["d256_dv128"])
def test_value_head_dim_small_shared_memory_gpus(d, d_v, dtype, deterministic, monkeypatch):
    """The 99 KB of shared memory per block of sm_86, sm_89 and sm_120: the backward's
    compact shapes (the forward's fit it as they are)."""
    monkeypatch.setenv("FCSA_MAX_SHARED_MEMORY", str(99 * 1024))
    t, run = feature_case("everything", d, d_v)
    check_attention(t, dtype, "cuda", run, deterministic=deterministic)


@pytest.mark.cuda
@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("d,d_v", HEAD_DIMS, ids=HEAD_DIM_IDS)
def test_masked_values_contribute_nothing_on_cuda(d, d_v, dtype, poison):
    """v's rows of masked keys holding NaN or inf: every result is that of zeros there
    (V's tile rows of masked keys are zeroed in the kernels), and their dv is 0."""
    b, h, n = 2, 2, 300
    q, k = torch.randn(b, h, n, d), torch.randn(b, h, n, d)
    v = torch.randn(b, h, n, d_v)
    mask = random_mask(b, n)
    hidden = ~mask[:, None, :, None]
    dout = torch.randn(b, h, n, d_v, device="cuda", dtype=dtype)

    def results(fill):
        leaves = [x.to("cuda", dtype).requires_grad_() for x in (q, k, v.masked_fill(hidden, fill))]
        out = fcsa.flash_cosine_sim_attention(*leaves, mask=mask.cuda(), deterministic=True)
        return [out] + list(torch.autograd.grad(out, leaves, dout))

    got, ref = results(poison), results(0.0)
    for name, g, r in zip(["out", "dq", "dk", "dv"], got, ref):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, r, msg=name)
    assert (got[3].masked_select(hidden.cuda()) == 0).all()


@pytest.mark.cuda
@pytest.mark.parametrize("d,d_v,named", [(32, 12, "value head dim 12"), (32, 264, "value head dim 264"),
                                         (12, 32, "head dim 12")])
def test_head_dims_the_gpu_does_not_run(d, d_v, named):
    """Each head dim a multiple of 8 up to 256 on the GPU; another is refused, named."""
    q, k, v = (t.cuda() for t in tensors(d, d_v).values())
    with pytest.raises(NotImplementedError, match=named):
        fcsa.flash_cosine_sim_attention(q, k, v)


def test_plain_reference_takes_its_value_head_dim():
    q, k, v = (t.double() for t in tensors(24, 40).values())
    out = fcsa.plain_cosine_sim_attention(q, k, v, causal=True)
    qn, kn = fcsa.l2norm_tensors(q, k)
    scores = (8 * qn @ kn.transpose(-1, -2)).masked_fill(
        torch.ones(NQ, NK, dtype=torch.bool).tril(NK - NQ).logical_not(), float("-inf"))
    torch.testing.assert_close(out, scores.softmax(-1) @ v)


# ---------------------------------------------------------------- shapes refused

def test_k_and_v_must_agree_but_for_the_head_dim():
    q, k, v = tensors(32, 64).values()
    with pytest.raises(ValueError, match="but for the head dim"):
        fcsa.flash_cosine_sim_attention(q, k, v[:, :, :-1])
    with pytest.raises(ValueError, match="v must have a head dim"):
        fcsa.flash_cosine_sim_attention(q, k, v[..., :0])


def run(call, size_query, options, **tensors):
    nbytes = size_query(options, **tensors)
    workspace = torch.empty(max(nbytes, 1), dtype=torch.uint8)
    call(options, **tensors, workspace=workspace.data_ptr(), workspace_bytes=nbytes)


def test_c_abi_checks_out_and_gradients_against_v():
    q, k, v = tensors(32, 64, hk=2).values()
    b, h, nq, _ = q.shape
    opts = _lib.Options()
    desc = dict(q=describe(q), k=describe(k), v=describe(v))
    # out is (b, h, nq, d_v); one of q's shape is refused, naming out.
    with pytest.raises(ValueError, match="out"):
        _lib.forward(opts, **desc, out=describe(torch.empty(q.shape)))
    out, lse = torch.empty(b, h, nq, 64), torch.empty(b, h, nq)
    run(_lib.forward, _lib.forward_workspace_size, opts, **desc, out=describe(out),
        lse=describe(lse))
    torch.testing.assert_close(out, fcsa.plain_cosine_sim_attention(q, k, v))

    grads = dict(dq=torch.empty(q.shape), dk=torch.empty(k.shape), dv=torch.empty(v.shape))
    dout = torch.randn(out.shape)
    common = dict(desc, out=describe(out), lse=describe(lse))
    run(_lib.backward, _lib.backward_workspace_size, opts, **common, dout=describe(dout),
        **{n: describe(g) for n, g in grads.items()})
    ref = [t.requires_grad_() for t in (q.clone(), k.clone(), v.clone())]
    expected = torch.autograd.grad(fcsa.plain_cosine_sim_attention(*ref), ref, dout)
    for got, want in zip(grads.values(), expected):
        torch.testing.assert_close(got, want)
    for name, wrong in (("dout", dict(dout=torch.empty(q.shape))),
                        ("dv", dict(dv=torch.empty(k.shape)))):
        tensors_ = dict(dict(grads, dout=dout), **wrong)
        with pytest.raises(ValueError, match=name):
            _lib.backward(opts, **common, **{n: describe(x) for n, x in tensors_.items()})


# ---------------------------------------------------------------- module

def test_module_with_its_own_value_head_dim():
    torch.manual_seed(0)
    module = fcsa.CosineSimAttention(48, heads=4, dim_head=24, dim_head_v=40, kv_heads=2,
                                     causal=True)
    assert module.to_kv.out_features == 2 * (24 + 40)
    assert module.to_out.in_features == 4 * 40
    assert "dim_head_v=40" in repr(module)
    x = torch.randn(2, 19, 48, requires_grad=True)
    out = module(x)
    assert out.shape == x.shape
    out.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())

    # The same layer by hand, with the plain reference.
    q = module.to_q(x).view(2, 19, 4, 24).transpose(1, 2)
    k, v = module.to_kv(x).split([2 * 24, 2 * 40], dim=-1)
    k = k.reshape(2, 19, 2, 24).transpose(1, 2)
    v = v.reshape(2, 19, 2, 40).transpose(1, 2)
    ref = fcsa.plain_cosine_sim_attention(q, k, v, causal=True)
    ref = module.to_out(ref.transpose(1, 2).reshape(2, 19, 160))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_module_default_value_head_dim_keeps_the_layout():
    module = fcsa.CosineSimAttention(32, heads=2, dim_head=16)
    assert module.dim_head_v == 16
    assert module.to_kv.out_features == 2 * 2 * 16
