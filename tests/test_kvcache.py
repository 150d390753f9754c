"""flash_cosine_sim_attention_with_kvcache: decoding over a contiguous or paged KV cache.

Every result is checked against plain_cosine_sim_attention in float64 over each
sequence's valid keys, gathered from the cache by hand; the in-place appends are
checked element by element, and the slots a call may not touch are poisoned (NaN) and
must come back unchanged and unread.
"""

import ctypes

import pytest
import torch

import fcsa
from fcsa import _lib, _ops
from helpers import ATOL, DEVICES, DTYPES, assert_bounded, dtype_id


def make_cache(b, hk, capacity, d, d_v, dtype, device, page_size=None):
    """Random caches holding `capacity` keys per sequence, contiguous or paged (blocks
    shuffled, and spare blocks left over, all poisoned with NaN where unused later)."""
    if page_size is None:
        k = torch.randn(b, hk, capacity, d)
        v = torch.randn(b, hk, capacity, d_v)
        return k.to(device, dtype), v.to(device, dtype), None
    per_seq = -(-capacity // page_size)
    num_blocks = b * per_seq + 3
    k = torch.randn(num_blocks, hk, page_size, d)
    v = torch.randn(num_blocks, hk, page_size, d_v)
    table = torch.randperm(num_blocks)[: b * per_seq].view(b, per_seq).to(torch.int32)
    return k.to(device, dtype), v.to(device, dtype), table.to(device)


def gather(cache, table, batch, keys):
    """Keys [0, keys) of sequence `batch`, (hk, keys, d), from a contiguous or paged cache."""
    if table is None:
        return cache[batch, :, :keys]
    page = cache.shape[2]
    rows = [cache[int(table[batch, j // page]), :, j % page] for j in range(keys)]
    if not rows:
        return cache.new_zeros(cache.shape[1], 0, cache.shape[3])
    return torch.stack(rows, dim=1)


def poison_unused(k_cache, v_cache, table, lengths):
    """NaN into every cache slot past each sequence's valid keys (and every spare block):
    no result may depend on them."""
    if table is None:
        for batch, n in enumerate(lengths):
            k_cache[batch, :, n:] = float("nan")
            v_cache[batch, :, n:] = float("nan")
        return
    page = k_cache.shape[2]
    used = set()
    for batch, n in enumerate(lengths):
        for j in range(table.shape[1]):
            block = int(table[batch, j])
            if j * page >= n:
                continue
            used.add(block)
            if (j + 1) * page > n:
                k_cache[block, :, n - j * page:] = float("nan")
                v_cache[block, :, n - j * page:] = float("nan")
    for block in range(k_cache.shape[0]):
        if block not in used:
            k_cache[block] = float("nan")
            v_cache[block] = float("nan")


def reference(q, k_cache, v_cache, table, lengths, dtype, **kwargs):
    """(out, lse) of each sequence over its first lengths[b] keys: plain attention in
    `dtype` (float64: the reference; q's dtype: PyTorch's own error)."""
    outs, lses = [], []
    b, h, nq, _ = q.shape
    for batch, n in enumerate(lengths):
        qb = q[batch:batch + 1].cpu().to(dtype)
        kb = gather(k_cache.cpu(), table, batch, n)[None].to(dtype)
        vb = gather(v_cache.cpu(), table, batch, n)[None].to(dtype)
        if n == 0:
            outs.append(torch.zeros(1, h, nq, v_cache.shape[-1], dtype=dtype))
            lses.append(torch.full((1, h, nq), float("-inf"), dtype=torch.float64))
            continue
        out, lse = fcsa.plain_cosine_sim_attention(qb, kb, vb, return_lse=True, **kwargs)
        outs.append(out)
        lses.append(lse.double())
    return torch.cat(outs), torch.cat(lses)


def check_kvcache(device, dtype, *, b=4, h=8, hk=2, nq=1, d=32, d_v=None, capacity=80,
                  page_size=None, lengths=None, n_new=0, causal=True, scale=8.0, groups=1,
                  l2norm_qk=True, q_scale=1.0, k_scale=1.0):
    """Runs one call with fresh random inputs (q and the keys times q_scale and k_scale)
    and checks out, lse and the caches."""
    d_v = d if d_v is None else d_v
    k_cache, v_cache, table = make_cache(b, hk, capacity, d, d_v, dtype, device, page_size)
    k_cache.mul_(k_scale)
    if lengths is None:
        lengths = [int(x) for x in torch.randint(0, capacity - n_new + 1, (b,))]
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
    total = [n + n_new for n in lengths]
    # Slots the call neither reads nor writes hold NaN, and must still hold it after.
    poison_unused(k_cache, v_cache, table, total)
    q = (torch.randn(b, h, nq, d) * q_scale).to(device, dtype)
    k_new = (torch.randn(b, hk, n_new, d) * k_scale).to(device, dtype) if n_new else None
    v_new = torch.randn(b, hk, n_new, d_v).to(device, dtype) if n_new else None

    # The caches as they must be after the call: the new keys at lengths[b] onwards.
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    page = k_cache.shape[2]
    for batch, n in enumerate(lengths):
        for t in range(n_new):
            slot, row = ((batch, n + t) if table is None else
                         (int(table[batch, (n + t) // page]), (n + t) % page))
            k_expected[slot, :, row] = k_new[batch, :, t]
            v_expected[slot, :, row] = v_new[batch, :, t]

    scale_arg = scale.to(device) if isinstance(scale, torch.Tensor) else scale
    out, lse = fcsa.flash_cosine_sim_attention_with_kvcache(
        q, k_cache, v_cache, seqlens if (n_new or lengths != [capacity] * b) else None,
        k=k_new, v=v_new, block_table=table, scale=scale_arg, groups=groups, causal=causal,
        l2norm_qk=l2norm_qk, return_lse=True)
    assert out.shape == (b, h, nq, d_v) and out.dtype == dtype and out.device.type == device
    assert lse.shape == (b, h, nq) and lse.dtype == torch.float32
    # Element by element, NaN where NaN was left.
    assert torch.equal(k_cache.isnan(), k_expected.isnan())
    assert torch.equal(k_cache.nan_to_num(), k_expected.nan_to_num())
    assert torch.equal(v_cache.isnan(), v_expected.isnan())
    assert torch.equal(v_cache.nan_to_num(), v_expected.nan_to_num())

    kwargs = dict(scale=scale, groups=groups, causal=causal, l2norm_qk=l2norm_qk)
    ref_out, ref_lse = reference(q, k_expected, v_expected, table, total, torch.float64, **kwargs)
    low_out, low_lse = reference(q, k_expected, v_expected, table, total, dtype, **kwargs)
    assert_bounded("out", out, ref_out, low_out, ATOL[dtype])
    assert_bounded("lse", lse, ref_lse, low_lse, ATOL[dtype])
    return out


LAYOUTS = {"contiguous": None, "paged16": 16, "paged64": 64}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("nq", [1, 5])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_ragged_lengths_with_appends(causal, nq, layout, dtype, device):
    # Cached lengths: empty and one key; after the append, a page boundary and the whole
    # capacity.
    capacity = 128
    page = LAYOUTS[layout] or 16
    check_kvcache(device, dtype, nq=nq, capacity=capacity, page_size=LAYOUTS[layout],
                  lengths=[0, 1, page - nq, capacity - nq], n_new=nq, causal=causal)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (6, 1)], ids=["mha", "gqa", "mqa"])
def test_without_appends(heads, layout, dtype, device):
    # Lengths: no key at all, one key (fewer than the 3 rows: causal hides it from the
    # first two), a page boundary, the whole capacity.
    h, hk = heads
    check_kvcache(device, dtype, h=h, hk=hk, nq=3, capacity=96, page_size=LAYOUTS[layout],
                  lengths=[0, 1, LAYOUTS[layout] or 16, 96])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_full_cache_without_seqlens(layout, device):
    check_kvcache(device, torch.float32, b=2, nq=2, capacity=64, page_size=LAYOUTS[layout],
                  lengths=[64, 64])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d", [8, 24, 64, 128, 256])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("nq", [2, 5])
def test_head_dims(nq, dtype, d, device):
    # 2 x 2 and 2 x 5 packed rows per kv head (16-bit types: the GPU's tensor cores,
    # float32: its FMA kernel); d = 8 and 24 leave part of a 16-wide tensor-core step empty.
    check_kvcache(device, dtype, b=2, h=4, hk=2, nq=nq, d=d, capacity=70, n_new=2,
                  page_size=16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_speculative_queries_over_many_splits(dtype, device):
    # Long sequences, few units: the GPU splits each over many CTAs; 16 rows x 4 heads
    # per kv head take two row blocks.
    check_kvcache(device, dtype, b=2, h=8, hk=2, nq=16, d=64, capacity=3000,
                  lengths=[2984, 1500], n_new=16, page_size=64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("d", [64, 128])
def test_split_keys_with_ragged_lengths(d, dtype, device):
    # Capacity for many splits on the GPU; an empty sequence, one where most splits are
    # empty, one that fills the cache: the combination must ignore the empty parts.
    check_kvcache(device, dtype, b=3, h=4, hk=1, nq=3, d=d, capacity=2000,
                  lengths=[0, 2, 1997], n_new=3, page_size=16 if d == 64 else None)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("nq", [1, 5])
@pytest.mark.parametrize("option", ["groups", "no_l2norm", "scale_tensor", "scale_scalar_tensor",
                                    "large_scale"])
def test_options(option, nq, dtype, device):
    kwargs = {"groups": dict(groups=4), "no_l2norm": dict(l2norm_qk=False, scale=0.3),
              "scale_tensor": dict(scale=torch.rand(8) * 10),
              "scale_scalar_tensor": dict(scale=torch.tensor(3.5)),
              "large_scale": dict(scale=200.0)}[option]
    check_kvcache(device, dtype, nq=nq, n_new=1, page_size=16, **kwargs)


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["fma", "mma", "mma-two-tiles", "mma-deep-ring"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("nq", [1, 3, 16])
@pytest.mark.parametrize("layout", ["contiguous", "paged16"])
def test_each_gpu_kernel_on_every_shape(layout, nq, dtype, kernel, monkeypatch):
    # The library picks the tensor cores for 16-bit types: one m-tile on the shallow ring
    # up to 16 packed rows (here nq = 1 and 3 with 4 query heads per kv head), two beyond.
    # FCSA_DECODE_KERNEL=fma forces the FMA kernel (float32's and several groups'),
    # FCSA_DECODE_MTILES=2 the two-m-tile kernels and FCSA_DECODE_RING=deep the deep ring,
    # so that every kernel is checked on these shapes too.
    monkeypatch.setenv("FCSA_DECODE_KERNEL", kernel.split("-")[0])
    if kernel == "mma-two-tiles":
        monkeypatch.setenv("FCSA_DECODE_MTILES", "2")
    if kernel == "mma-deep-ring":
        monkeypatch.setenv("FCSA_DECODE_RING", "deep")
    for d in (32, 128):
        check_kvcache("cuda", dtype, b=3, h=8, hk=2, nq=nq, d=d, capacity=1200,
                      page_size=LAYOUTS[layout], lengths=[0, 17, 1200 - nq], n_new=nq)


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["fma", "mma"])
def test_small_shared_memory_gpus(kernel, monkeypatch):
    # 99 KB per block (sm_86, sm_89, sm_120): the tensor-core kernel takes a ring that
    # fits (the shallow one at d = 256), and the FMA kernel's packed rows per CTA shrink
    # to fit (32 of d = 256 need more).
    monkeypatch.setenv("FCSA_MAX_SHARED_MEMORY", "101376")
    monkeypatch.setenv("FCSA_DECODE_KERNEL", kernel)
    for d, heads in ((64, (32, 4)), (256, (32, 1))):
        check_kvcache("cuda", torch.bfloat16, b=2, h=heads[0], hk=heads[1], nq=3, d=d, capacity=700,
                      page_size=None, lengths=[5, 697], n_new=3)


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["fma", "mma"])
@pytest.mark.parametrize("d", [64, 256])
def test_huge_norms_on_the_gpu(d, kernel, monkeypatch):
    # Rows of norm ~1e20: their sums of squares overflow float32, and both kernels take
    # the rescaled path (the tensor cores' key norms, the diagonal of K K^T, included).
    monkeypatch.setenv("FCSA_DECODE_KERNEL", kernel)
    check_kvcache("cuda", torch.bfloat16, b=2, h=8, hk=2, nq=2, d=d, capacity=300,
                  page_size=None, lengths=[100, 298], n_new=2, q_scale=1e20, k_scale=1e20)


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["fma", "mma"])
@pytest.mark.parametrize("page_size", [1, 8, 24])
def test_page_sizes_not_multiples_of_16(page_size, kernel, monkeypatch):
    # The tensor-core kernel locates a 16-key block once when the page size is a multiple
    # of 16, and key by key otherwise; head dims off the 16-column steps, one packed row
    # and 17 of them.
    monkeypatch.setenv("FCSA_DECODE_KERNEL", kernel)
    for d, h, nq in ((40, 1, 1), (200, 4, 4), (72, 17, 1)):
        check_kvcache("cuda", torch.bfloat16, b=3, h=h, hk=1, nq=nq, d=d, capacity=130,
                      page_size=page_size, lengths=[0, 61, 130 - nq], n_new=nq)
    # long enough for the keys to be split over several CTAs
    check_kvcache("cuda", torch.bfloat16, b=2, h=8, hk=2, nq=2, d=64, capacity=1500,
                  page_size=page_size, lengths=[1498, 700], n_new=2)


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["fma", "mma"])
def test_hidden_values_on_the_causal_diagonal(kernel, monkeypatch):
    # The last new key is seen only by the last query row (causal, end-aligned): a NaN
    # in its value must reach that row alone, and leave the others exactly as with 0.
    monkeypatch.setenv("FCSA_DECODE_KERNEL", kernel)
    b, h, hk, nq, d, capacity = 2, 8, 2, 4, 64, 300
    q = torch.randn(b, h, nq, d, device="cuda", dtype=torch.bfloat16)
    k_new, v_new = (torch.randn(b, hk, nq, d, device="cuda", dtype=torch.bfloat16)
                    for _ in range(2))
    k_cache, v_cache, _ = make_cache(b, hk, capacity, d, d, torch.bfloat16, "cuda")
    outs = []
    for hidden in (0.0, float("nan")):
        v_new[:, :, -1] = hidden
        outs.append(fcsa.flash_cosine_sim_attention_with_kvcache(
            q, k_cache.clone(), v_cache.clone(),
            torch.tensor([100, 250], dtype=torch.int32, device="cuda"), k=k_new, v=v_new))
    assert torch.isnan(outs[1][:, :, -1]).all()
    assert torch.equal(outs[1][:, :, :-1], outs[0][:, :, :-1])


@pytest.mark.cuda
def test_float16_logits_beyond_its_range():
    # q * scale past float16's range (q of 1e4, no l2norm) runs where the scores stay
    # float32: the output is finite and right.
    check_kvcache("cuda", torch.float16, b=1, h=16, hk=1, nq=1, d=64, capacity=300,
                  page_size=None, lengths=[300], n_new=0, l2norm_qk=False, scale=8.0, q_scale=1e4,
                  k_scale=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_block_table_is_a_paged_cache_of_no_keys(device):
    # An empty table has no data pointer: still a paged cache, of capacity 0.
    q = torch.randn(2, 2, 1, 8).to(device)
    k_cache, v_cache = (torch.randn(2, 2, 4, 8).to(device) for _ in range(2))
    table = torch.empty(2, 0, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="cache_seqlens"):
        fcsa.flash_cosine_sim_attention_with_kvcache(
            q, k_cache, v_cache, torch.tensor([3, 3], dtype=torch.int32, device=device),
            block_table=table)
    out, lse = fcsa.flash_cosine_sim_attention_with_kvcache(q, k_cache, v_cache, None,
                                                            block_table=table, return_lse=True)
    assert (out == 0).all() and (lse == float("-inf")).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("table", [[[0, 0]], [[0], [0]]], ids=["within", "across"])
def test_appends_into_one_slot_twice_are_refused(table, device):
    # page_size 1: a block listed twice where keys are appended would take two writes.
    table = torch.tensor(table, dtype=torch.int32, device=device)
    b, n_new = table.shape[0], 2 if table.shape[1] == 2 else 1
    q = torch.randn(b, 2, n_new, 8).to(device)
    k_cache, v_cache = (torch.randn(4, 2, 1, 8).to(device) for _ in range(2))
    before = k_cache.clone()
    k_new, v_new = (torch.randn(b, 2, n_new, 8).to(device) for _ in range(2))
    with pytest.raises(ValueError, match="block_table"):
        fcsa.flash_cosine_sim_attention_with_kvcache(
            q, k_cache, v_cache, torch.zeros(b, dtype=torch.int32, device=device), k=k_new,
            v=v_new, block_table=table)
    assert torch.equal(k_cache, before)


def test_value_head_dim_on_cpu():
    check_kvcache("cpu", torch.float32, d=16, d_v=24, nq=2, n_new=2, page_size=16)


@pytest.mark.parametrize("device", DEVICES)
def test_every_row_written_and_poison_ignored_through_the_binding(device):
    """Outputs poisoned with NaN before the call: every element must be written."""
    b, h, hk, nq, d, capacity = 3, 4, 2, 2, 16, 40
    k_cache, v_cache, _ = make_cache(b, hk, capacity, d, d, torch.float32, device)
    seqlens = torch.tensor([0, 7, 40], dtype=torch.int32, device=device)
    poison_unused(k_cache, v_cache, None, [0, 7, 40])
    q = torch.randn(b, h, nq, d, device=device)
    out = torch.full((b, h, nq, d), float("nan"), device=device)
    lse = torch.full((b, h, nq), float("nan"), device=device)
    tensors = dict(q=_ops.describe(q), k_cache=_ops.describe(k_cache),
                   v_cache=_ops.describe(v_cache), cache_seqlens=_ops.describe(seqlens),
                   out=_ops.describe(out), lse=_ops.describe(lse))
    options = _lib.Options(causal=True)
    _ops._run(_lib.kvcache_forward_workspace_size, _lib.kvcache_forward, q.device, options,
              tensors)
    ref_out, ref_lse = reference(q, k_cache, v_cache, None, [0, 7, 40], torch.float64,
                                 causal=True)
    assert not out.isnan().any() and not lse.isnan().any()
    assert_bounded("out", out, ref_out, ref_out, 2e-5)
    assert_bounded("lse", lse, ref_lse, ref_lse, 2e-5)
    # Rows that see no key: 0 and -inf (sequence 0 is empty; in sequence 1 every row sees keys).
    assert torch.equal(out[0].cpu(), torch.zeros(h, nq, d))
    assert torch.isneginf(lse[0]).all()


# ---------------------------------------------------------------- errors

def error_case(device, **overrides):
    b, h, hk, nq, d = 2, 4, 2, 1, 16
    args = dict(q=torch.randn(b, h, nq, d, device=device),
                k_cache=torch.randn(b, hk, 32, d, device=device),
                v_cache=torch.randn(b, hk, 32, d, device=device),
                cache_seqlens=torch.tensor([3, 31], dtype=torch.int32, device=device),
                k=torch.randn(b, hk, 1, d, device=device),
                v=torch.randn(b, hk, 1, d, device=device))
    args.update(overrides)
    return args


def paged_case(device, table):
    return error_case(device, k_cache=torch.randn(5, 2, 16, 16, device=device),
                      v_cache=torch.randn(5, 2, 16, 16, device=device),
                      block_table=torch.tensor(table, dtype=torch.int32, device=device))


ERRORS = {
    "seqlen_past_capacity": (lambda dev: error_case(dev, cache_seqlens=torch.tensor(
        [3, 32], dtype=torch.int32, device=dev)), ValueError, "cache_seqlens"),
    "negative_seqlen": (lambda dev: error_case(dev, cache_seqlens=torch.tensor(
        [-1, 0], dtype=torch.int32, device=dev)), ValueError, "cache_seqlens"),
    "block_outside_cache": (lambda dev: paged_case(dev, [[0, 1], [2, 5]]), ValueError,
                            "block_table"),
    "negative_block": (lambda dev: paged_case(dev, [[-1, 1], [2, 3]]), ValueError,
                       "block_table"),
    "seqlens_int64": (lambda dev: error_case(dev, cache_seqlens=torch.tensor(
        [3, 4], device=dev)), TypeError, "cache_seqlens"),
    "k_without_v": (lambda dev: error_case(dev, v=None), ValueError, "k and v"),
    "k_without_seqlens": (lambda dev: error_case(dev, cache_seqlens=None), ValueError,
                          "cache_seqlens"),
    "cache_dtype": (lambda dev: error_case(dev, v_cache=torch.randn(
        2, 2, 32, 16, device=dev, dtype=torch.float64)), TypeError, "v_cache"),
    "cache_heads": (lambda dev: error_case(dev, k_cache=torch.randn(2, 3, 32, 16, device=dev),
                                           v_cache=torch.randn(2, 3, 32, 16, device=dev)),
                    ValueError, "heads"),
    "new_keys_shape": (lambda dev: error_case(dev, k=torch.randn(2, 2, 1, 8, device=dev)),
                       ValueError, "k and v"),
    "too_many_new_keys": (lambda dev: error_case(dev, k=torch.randn(2, 2, 33, 16, device=dev),
                                                 v=torch.randn(2, 2, 33, 16, device=dev)),
                          ValueError, "capacity"),
    "block_table_batch": (lambda dev: dict(paged_case(dev, [[0, 1], [2, 3]]), block_table=torch.zeros(
        3, 2, dtype=torch.int32, device=dev)), ValueError, "block_table"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(ERRORS))
def test_errors_write_nothing(case, device):
    make, error, words = ERRORS[case]
    args = make(device)
    before = (args["k_cache"].clone(), args["v_cache"].clone())
    with pytest.raises(error, match=words):
        fcsa.flash_cosine_sim_attention_with_kvcache(**args)
    assert torch.equal(args["k_cache"], before[0]) and torch.equal(args["v_cache"], before[1])


@pytest.mark.parametrize("case", ["seqlen_past_capacity", "block_outside_cache"])
def test_c_library_checks_values_on_the_host(case):
    """The C library itself refuses bad lengths and blocks in host memory (no Python check)."""
    args = ERRORS[case][0]("cpu")
    q = args["q"]
    out = torch.empty_like(q)
    tensors = dict(q=_ops.describe(q), k_cache=_ops.describe(args["k_cache"]),
                   v_cache=_ops.describe(args["v_cache"]),
                   cache_seqlens=_ops.describe(args["cache_seqlens"]),
                   block_table=_ops.describe(args.get("block_table")),
                   k_new=_ops.describe(args["k"]), v_new=_ops.describe(args["v"]),
                   out=_ops.describe(out))
    before = args["k_cache"].clone()
    with pytest.raises(ValueError, match="cache_seqlens|block_table"):
        _lib.kvcache_forward(_lib.Options(), **tensors)
    assert torch.equal(args["k_cache"], before)


def test_caches_overlapping_q_are_refused():
    cache = torch.randn(2, 2, 32, 16)
    q = cache[:, :, :1]  # (2, 2, 1, 16): the new rows would overwrite what q reads
    with pytest.raises(ValueError, match="overlaps"):
        fcsa.flash_cosine_sim_attention_with_kvcache(
            q, cache, torch.randn(2, 2, 32, 16), torch.tensor([3, 4], dtype=torch.int32),
            k=torch.randn(2, 2, 1, 16), v=torch.randn(2, 2, 1, 16))


# ---------------------------------------------------------------- torch integration

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("append", [False, True], ids=["read", "append"])
def test_opcheck(append, device):
    b, h, hk, d = 2, 4, 2, 16
    cache = (torch.randn(b, h, 1, d, device=device), torch.randn(b, hk, 20, d, device=device),
             torch.randn(b, hk, 20, d, device=device),
             torch.tensor([5, 12], dtype=torch.int32, device=device), None)
    flags = (None, 8.0, 1, True, True, True)
    if append:
        new = (torch.randn(b, hk, 1, d, device=device), torch.randn(b, hk, 1, d, device=device))
        torch.library.opcheck(torch.ops.fcsa.kvcache_append_forward.default, cache + new + flags)
    else:
        torch.library.opcheck(torch.ops.fcsa.kvcache_forward.default, cache + flags)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_decode_step(device):
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile is unavailable")
    b, h, hk, d, page = 2, 4, 2, 16, 8

    def step(q, k_cache, v_cache, seqlens, k, v, table):
        out = fcsa.flash_cosine_sim_attention_with_kvcache(q, k_cache, v_cache, seqlens, k=k,
                                                           v=v, block_table=table)
        return out * 2

    k_cache = torch.randn(6, hk, page, d, device=device)
    v_cache = torch.randn(6, hk, page, d, device=device)
    table = torch.tensor([[4, 0, 2], [1, 3, 5]], dtype=torch.int32, device=device)
    inputs = (torch.randn(b, h, 1, d, device=device), torch.tensor([9, 16], dtype=torch.int32,
                                                                   device=device),
              torch.randn(b, hk, 1, d, device=device), torch.randn(b, hk, 1, d, device=device))
    eager_caches = (k_cache.clone(), v_cache.clone())
    expected = step(inputs[0], *eager_caches, *inputs[1:], table)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(inputs[0], k_cache, v_cache, *inputs[1:], table)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(k_cache, eager_caches[0])  # the append happened in place
    torch.testing.assert_close(v_cache, eager_caches[1])
    # A step that reads the cache only: the same, compiled.
    read = torch.compile(lambda q, kc, vc, n: fcsa.flash_cosine_sim_attention_with_kvcache(
        q, kc, vc, n, block_table=table, return_lse=True), fullgraph=True, backend="aot_eager")
    got = read(inputs[0], k_cache, v_cache, inputs[1])
    expected = fcsa.flash_cosine_sim_attention_with_kvcache(inputs[0], k_cache, v_cache, inputs[1],
                                                            block_table=table, return_lse=True)
    torch.testing.assert_close(got, expected)


# ---------------------------------------------------------------- the C entry points

class _CTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("ndim", ctypes.c_int32), ("dtype", ctypes.c_int32),
                ("device_type", ctypes.c_int32), ("device_index", ctypes.c_int32),
                ("shape", ctypes.c_int64 * 4), ("strides", ctypes.c_int64 * 4)]


class _CKvCacheTensors(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t)] + [
        (name, ctypes.POINTER(_CTensor)) for name in (
            "q", "k_cache", "v_cache", "cache_seqlens", "block_table", "k_new", "v_new", "scale",
            "out", "lse")]


def _c_tensor(t):
    data, dtype, device_type, device_index, shape, strides = _ops.describe(t)
    c = _CTensor(data, len(shape), dtype, device_type, device_index)
    for i, (n, s) in enumerate(zip(shape, strides)):
        c.shape[i], c.strides[i] = n, s
    return c


def test_c_entry_points_refuse_bad_structs():
    """NULL and short structs, and a missing tensor, straight through the C ABI."""
    lib = ctypes.CDLL(fcsa.get_library())
    lib.fcsa_last_error_message.restype = ctypes.c_char_p
    size = ctypes.c_size_t(123)
    q, cache, out = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 4, 8), torch.empty(1, 2, 1, 8)
    tensors = [_c_tensor(t) for t in (q, cache, cache, out)]
    full = _CKvCacheTensors(ctypes.sizeof(_CKvCacheTensors), ctypes.pointer(tensors[0]),
                            ctypes.pointer(tensors[1]), ctypes.pointer(tensors[2]))
    full.out = ctypes.pointer(tensors[3])

    def message(status):
        assert status == 2  # FCSA_STATUS_INVALID_ARGUMENT
        return lib.fcsa_last_error_message().decode()

    assert "tensors: required" in message(lib.fcsa_kvcache_forward_workspace_size(
        None, None, ctypes.byref(size)))
    short = _CKvCacheTensors(8)
    assert "struct_size" in message(lib.fcsa_kvcache_forward(None, ctypes.byref(short), None,
                                                             ctypes.c_size_t(0), None))
    assert "workspace_bytes: required" in message(lib.fcsa_kvcache_forward_workspace_size(
        None, ctypes.byref(full), None))
    no_cache = _CKvCacheTensors(ctypes.sizeof(_CKvCacheTensors), ctypes.pointer(tensors[0]))
    no_cache.out = ctypes.pointer(tensors[3])
    assert "k_cache: required" in message(lib.fcsa_kvcache_forward(
        None, ctypes.byref(no_cache), None, ctypes.c_size_t(0), None))
    assert size.value == 123  # a failed query leaves it alone
    assert lib.fcsa_kvcache_forward_workspace_size(None, ctypes.byref(full), ctypes.byref(size)) == 0
    assert lib.fcsa_kvcache_forward(None, ctypes.byref(full), None, ctypes.c_size_t(0), None) == 0
    ref_out, _ = reference(q, cache, cache, None, [4], torch.float64)
    assert_bounded("out", out, ref_out, ref_out, 2e-5)


def test_decode_benchmark_runs_on_cpu(capsys, tmp_path):
    import json

    from fcsa import benchmark

    path = tmp_path / "decode.json"
    assert benchmark.main(["--decode", "--case", "2,4,2,300", "--dims", "16", "--nq", "1", "2",
                           "--paged", "16", "--runs", "2", "--warmup", "1",
                           "--device", "cpu", "--json", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "copy bandwidth" in printed
    for row in ("fcsa ", "fcsa paged 16", "sdpa-cos", "plain"):
        assert row in printed
    assert "failed" not in printed
    data = json.loads(path.read_text())
    assert data["date"][:4].isdigit() and data["device"] and data["copy_bytes_per_s"] > 0
    assert {r["nq"] for r in data["records"]} == {1, 2}
