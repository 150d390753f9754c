"""The Hopper kernels (cuda/src/sm90): on a compute capability 9.0 GPU with a build
that holds sm_90a code, the forwards and backwards they cover run there
(fcsa.last_backend() says "cuda-sm90"), agree with the float64 reference as closely as
the portable path does, and feed each other (the backward takes the forward's out and
lse); the calls they do not cover, and every call under FCSA_DISABLE_SM90=1, run on the
portable path."""

import pytest
import torch

import fcsa
from fcsa import _lib
from fcsa._ops import describe
from helpers import check_attention, dtype_id, qkv, random_mask, with_kwargs

pytestmark = pytest.mark.cuda


def hopper_available():
    return (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
            and 90 in fcsa.compiled_sm_targets())


needs_hopper = pytest.mark.skipif(not hopper_available(),
                                  reason="needs an sm_90 GPU and a build with sm_90a code")


def forward_backend(q, k, v, **kwargs):
    with torch.no_grad():
        fcsa.flash_cosine_sim_attention(q, k, v, **kwargs)
    return fcsa.last_backend()


def forward_backend_on(tensors, dtype, **kwargs):
    """forward_backend for check_attention's CPU tensors, moved to the GPU in dtype."""
    cuda = {n: t.cuda().to(dtype) if t.is_floating_point() else t.cuda() for n, t in tensors.items()}
    return forward_backend(**cuda, **kwargs)


def backward_backend(q, k, v, **kwargs):
    # Autograd runs a CUDA backward on its own thread, and last_backend is per thread:
    # a hook on that thread reads it.
    q = q.detach().clone().requires_grad_()
    seen = []
    q.register_hook(lambda grad: seen.append(fcsa.last_backend()))
    fcsa.flash_cosine_sim_attention(q, k, v, **kwargs).float().sum().backward()
    assert len(seen) == 1
    return seen[0]


@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("d", [16, 40, 64, 72, 128])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("nq,nk", [(1, 1), (65, 129), (129, 65), (200, 385), (300, 300)])
def test_matches_reference(dtype, d, causal, nq, nk):
    tensors = qkv(2, 4, nq, nk, d, hk=2)
    assert forward_backend(*(t.cuda().to(dtype) for t in tensors.values()), causal=causal) == "cuda-sm90"
    # Gradients too: the portable backward runs on the Hopper forward's out and lse.
    check_attention(tensors, dtype, "cuda", with_kwargs(causal=causal, return_lse=True))


@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
def test_long_sequences_and_layouts(dtype):
    # Many turns of the K/V ring; (b, n, h, d) memory layout as after a projection;
    # single-headed kv.
    q = torch.randn(1, 1500, 8, 128, device="cuda", dtype=dtype).transpose(1, 2)
    k = torch.randn(1, 3000, 1, 128, device="cuda", dtype=dtype).transpose(1, 2)
    v = torch.randn(1, 3000, 1, 128, device="cuda", dtype=dtype).transpose(1, 2)
    for causal in (False, True):
        assert forward_backend(q, k, v, causal=causal) == "cuda-sm90"
        tensors = {"q": q.float().cpu(), "k": k.float().cpu(), "v": v.float().cpu()}
        check_attention(tensors, dtype, "cuda", with_kwargs(causal=causal), grad=False)


@needs_hopper
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_every_element_written(causal):
    # Through the binding, into NaN-filled out and lse (strided: a gap after every row of
    # out), so that an element the kernel skips stays NaN.
    b, h, nq, nk, d = 3, 2, 333, 290, 72
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for n in (nq, nk, nk))
    out = torch.full((b, h, nq, d + 8), float("nan"), device="cuda", dtype=torch.bfloat16)[..., :d]
    lse = torch.full((b, h, nq), float("nan"), device="cuda")
    options = _lib.Options(causal=causal)
    tensors = dict(q=describe(q), k=describe(k), v=describe(v), out=describe(out), lse=describe(lse))
    nbytes = _lib.forward_workspace_size(options, **tensors)
    workspace = torch.empty(max(nbytes, 1), dtype=torch.uint8, device="cuda")
    _lib.forward(options, **tensors, workspace=workspace.data_ptr(), workspace_bytes=nbytes,
                 stream=torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    assert fcsa.last_backend() == "cuda-sm90"
    # With causal and nq > nk, the first nq - nk rows see no key: out 0, lse -inf.
    hidden = nq - nk if causal else 0
    assert torch.isfinite(out).all()
    assert (out[:, :, :hidden] == 0).all()
    assert torch.isfinite(lse[:, :, hidden:]).all() and (lse[:, :, :hidden] == float("-inf")).all()
    with torch.no_grad():
        ref = fcsa.flash_cosine_sim_attention(q, k, v, causal=causal)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("d,tile_rows", [(64, 192), (128, 128)])
def test_hidden_keys_contribute_nothing(dtype, d, tile_rows):
    # NaN and inf in v and k at keys no row of a query tile sees (past its last row's
    # causal reach, inside the last key tile it loads) must not reach any output. The
    # tile: 64 rows per consumer warpgroup, three of them at d = 64, two at d = 128.
    b, h, nk = 1, 2, 300
    nq = 2 * tile_rows
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=dtype) for n in (nq, nk, nk))
    reach = nk - nq + tile_rows  # the first query tile's last row sees keys j < reach
    v_bad, k_bad = v.clone(), k.clone()
    v_bad[:, :, reach + 5] = float("nan")
    v_bad[:, :, reach + 9] = float("inf")
    k_bad[:, :, reach + 5] = float("nan")
    with torch.no_grad():
        got = fcsa.flash_cosine_sim_attention(q, k_bad, v_bad, causal=True)
        assert fcsa.last_backend() == "cuda-sm90"
        clean = fcsa.flash_cosine_sim_attention(q, k, v, causal=True)
    rows = slice(0, tile_rows)  # the query tile whose reach stops before the poisoned keys
    assert torch.isfinite(got[:, :, rows]).all()
    torch.testing.assert_close(got[:, :, rows], clean[:, :, rows], atol=0, rtol=0)


@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_visible_nonfinite_key_reaches_every_row(dtype, d, poison):
    # A NaN or inf in a key every row sees makes every row of its head NaN: keys at
    # different places in a thread's score fragment (1, 25, 120) and in a second key tile
    # (130). The other head stays finite.
    b, h, n = 1, 2, 300
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=dtype) for _ in range(3))
    for key in (1, 25, 120, 130):
        k_bad = k.clone()
        k_bad[0, 0, key, 3] = poison
        with torch.no_grad():
            out, lse = fcsa.flash_cosine_sim_attention(q, k_bad, v, return_lse=True)
            assert fcsa.last_backend() == "cuda-sm90"
        assert torch.isnan(out[0, 0]).all() and torch.isnan(lse[0, 0]).all(), key
        assert torch.isfinite(out[0, 1]).all() and torch.isfinite(lse[0, 1]).all(), key


@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("d", [16, 40, 64, 72, 128])
def test_mask_with_every_key_visible_changes_no_bit(dtype, d):
    # The key-mask kernel on a mask that hides nothing gives the unmasked kernel's out and
    # lse bit for bit: head dims of every lane width of the key-norm pass, a zero key, and
    # in bfloat16 keys whose squares overflow float32 (the pass's rescaled path).
    b, h, nq, nk = 2, 2, 100, 300
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=dtype) for n in (nq, nk, nk))
    k[0, 0, 7] = 0
    if dtype == torch.bfloat16:
        k[0, 1, 130] *= 1e25
        k[1, 0, 299] *= 1e36
    everyone = torch.ones(b, nk, dtype=torch.bool, device="cuda")
    with torch.no_grad():
        out, lse = fcsa.flash_cosine_sim_attention(q, k, v, return_lse=True)
        assert fcsa.last_backend() == "cuda-sm90"
        out_mask, lse_mask = fcsa.flash_cosine_sim_attention(q, k, v, mask=everyone, return_lse=True)
        assert fcsa.last_backend() == "cuda-sm90"
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, out_mask, atol=0, rtol=0)
    torch.testing.assert_close(lse, lse_mask, atol=0, rtol=0)


def key_masks(b, nk):
    """Masks the Hopper forward must take: about 25% of keys hidden at random; right
    padding to lengths that stop inside a key tile, on a tile edge, at 1 and at nk; and a
    batch with every key hidden (out 0, lse -inf)."""
    lengths = [nk - 37, 128, 1, nk][:b]
    padding = torch.arange(nk)[None, :] < torch.tensor(lengths)[:, None]
    none = padding.clone()
    none[0] = False
    return {"random": random_mask(b, nk, p=0.75), "padding": padding, "none_in_batch_0": none}


@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("masking", ["random", "padding", "none_in_batch_0"])
def test_key_mask_matches_reference(dtype, d, causal, masking):
    b, h, nq, nk = 4, 4, 200, 385
    tensors = qkv(b, h, nq, nk, d, hk=2)
    tensors["mask"] = key_masks(b, nk)[masking]
    assert forward_backend_on(tensors, dtype, causal=causal) == "cuda-sm90"
    results = check_attention(tensors, dtype, "cuda", with_kwargs(causal=causal, return_lse=True))
    if masking == "none_in_batch_0":
        assert (results["out"][0] == 0).all()
        assert (results["lse"][0] == float("-inf")).all()


@needs_hopper
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("masking", ["random", "padding"])
def test_key_mask_over_many_key_tiles(d, causal, masking):
    # Enough key tiles (1100 keys: 9) that every buffer of the K/V ring (2 stages at
    # d = 128, 4 at d = 64) is refilled and each barrier's parity flips more than once.
    b, h, nq, nk = 4, 2, 130, 1100
    tensors = qkv(b, h, nq, nk, d)
    tensors["mask"] = key_masks(b, nk)[masking]
    assert forward_backend_on(tensors, torch.bfloat16, causal=causal) == "cuda-sm90"
    check_attention(tensors, torch.bfloat16, "cuda", with_kwargs(causal=causal), grad=False)


@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("masking", ["random", "padding"])
def test_key_mask_hides_nonfinite_keys(dtype, d, causal, masking):
    # NaN and inf in hidden keys' k and v (uninitialized padding) change nothing: the
    # result equals, bit for bit, the one with zeros there.
    b, h, nq, nk = 4, 2, 300, 1100
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=dtype) for n in (nq, nk, nk))
    mask = key_masks(b, nk)[masking].cuda()
    hidden = ~mask[:, None, :, None]
    with torch.no_grad():
        clean = fcsa.flash_cosine_sim_attention(q, k.masked_fill(hidden, 0), v.masked_fill(hidden, 0), mask=mask,
                                                causal=causal)
        for poison in (float("nan"), float("inf"), -float("inf")):
            got = fcsa.flash_cosine_sim_attention(q, k.masked_fill(hidden, poison), v.masked_fill(hidden, poison),
                                                  mask=mask, causal=causal)
            assert fcsa.last_backend() == "cuda-sm90"
            assert torch.isfinite(got).all(), poison
            torch.testing.assert_close(got, clean, atol=0, rtol=0)


@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
def test_key_mask_holes_and_padding_in_one_launch(dtype):
    # Batch 0 has holes before its last visible key and right padding after it (the
    # zeroing warp and the consumers' tail zeroing in one tile), batch 1 only padding,
    # batch 2 every key: CTAs of one launch take different barrier paths. NaN in every
    # hidden key's k and v changes nothing.
    b, h, nq, nk, d = 3, 2, 200, 700, 128
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=dtype) for n in (nq, nk, nk))
    mask = torch.ones(b, nk, dtype=torch.bool)
    mask[0, 100:300:3] = False
    mask[0, 650:] = False
    mask[1, 333:] = False
    mask = mask.cuda()
    hidden = ~mask[:, None, :, None]
    for causal in (False, True):
        with torch.no_grad():
            clean = fcsa.flash_cosine_sim_attention(q, k.masked_fill(hidden, 0), v.masked_fill(hidden, 0),
                                                    mask=mask, causal=causal)
            got = fcsa.flash_cosine_sim_attention(q, k.masked_fill(hidden, float("nan")),
                                                  v.masked_fill(hidden, float("nan")), mask=mask, causal=causal)
            assert fcsa.last_backend() == "cuda-sm90"
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, clean, atol=0, rtol=0)
        tensors = {"q": q.float().cpu(), "k": k.float().cpu(), "v": v.float().cpu(), "mask": mask.cpu()}
        check_attention(tensors, dtype, "cuda", with_kwargs(causal=causal), grad=False)


@needs_hopper
@pytest.mark.parametrize("layout", ["strided", "broadcast", "left_padding"])
def test_key_mask_layouts(layout):
    # A mask read with a key stride of 2, one row broadcast over the batch, and keys
    # hidden at the start (the kernel then reads every tile).
    b, h, nq, nk, d = 3, 2, 150, 300, 128
    tensors = qkv(b, h, nq, nk, d)
    if layout == "strided":
        mask = random_mask(b, 2 * nk)[:, ::2]
        mask[:, 0] = True
    elif layout == "broadcast":
        mask = random_mask(1, nk).expand(b, nk)
    else:
        mask = torch.arange(nk)[None, :] >= torch.tensor([0, 130, 299])[:, None]
    tensors["mask"] = mask
    assert forward_backend_on(tensors, torch.bfloat16) == "cuda-sm90"
    check_attention(tensors, torch.bfloat16, "cuda", grad=False)


def packed(lengths_q, lengths_k, h, hk, d, dtype):
    """Packed q (total_q, h, d), k and v (total_k, hk, d) on the GPU and their offsets."""
    def offsets(lengths):
        return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    q = torch.randn(sum(lengths_q), h, d, device="cuda", dtype=dtype)
    k, v = (torch.randn(sum(lengths_k), hk, d, device="cuda", dtype=dtype) for _ in range(2))
    return q, k, v, offsets(lengths_q), offsets(lengths_k)


@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("d", [40, 64, 128])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_packed_sequences_equal_each_sequence_alone(dtype, d, causal):
    # The packed kernel tiles each sequence as the plain kernel tiles it alone, and the
    # rows its tiles read past a sequence's end (the next sequence's) give P = 0 and
    # zeroed V rows: out and lse equal, bit for bit. Lengths: empty, one row, a tile
    # edge, many tiles, more keys than queries and the reverse, a sequence without keys.
    lengths_q = [300, 0, 1, 129, 1000, 64, 7]
    lengths_k = [280, 5, 1, 129, 1000, 0, 200]
    q, k, v, cu_q, cu_k = packed(lengths_q, lengths_k, 4, 2, d, dtype)
    with torch.no_grad():
        out, lse = fcsa.flash_cosine_sim_attention_varlen(q, k, v, cu_q, cu_k, causal=causal, return_lse=True)
        assert fcsa.last_backend() == "cuda-sm90"
        bq, bk = cu_q.tolist(), cu_k.tolist()
        for s in range(len(lengths_q)):
            rows, keys = slice(bq[s], bq[s + 1]), slice(bk[s], bk[s + 1])
            if lengths_q[s] == 0:
                continue
            if lengths_k[s] == 0:
                assert torch.equal(out[rows], torch.zeros_like(out[rows]))
                assert torch.equal(lse[:, rows], torch.full_like(lse[:, rows], float("-inf")))
                continue
            alone, alone_lse = fcsa.flash_cosine_sim_attention(
                *(t[r].transpose(0, 1)[None] for t, r in ((q, rows), (k, keys), (v, keys))),
                causal=causal, return_lse=True)
            assert fcsa.last_backend() == "cuda-sm90"
            torch.testing.assert_close(out[rows], alone[0].transpose(0, 1), atol=0, rtol=0)
            torch.testing.assert_close(lse[:, rows], alone_lse[0], atol=0, rtol=0)


@needs_hopper
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("hk", [4, 1], ids=["mha", "mqa"])
def test_packed_sequences_do_not_see_their_neighbours(d, hk):
    # NaN and inf in the queries, keys and values of sequences 1 and 3, which the last
    # tiles of sequences 0 and 2 read past their ends, reach none of 0's and 2's outputs.
    lengths = [200, 100, 300, 90]
    q, k, v, cu_q, cu_k = packed(lengths, lengths, 4, hk, d, torch.bfloat16)
    bad = [slice(200, 300), slice(600, 690)]
    good = [slice(0, 200), slice(300, 600)]
    q_bad, k_bad, v_bad = q.clone(), k.clone(), v.clone()
    for rows in bad:
        q_bad[rows, :, 1] = float("nan")
        k_bad[rows] = float("nan")
        v_bad[rows, :, :3] = float("inf")
    with torch.no_grad():
        for causal in (False, True):
            got = fcsa.flash_cosine_sim_attention_varlen(q_bad, k_bad, v_bad, cu_q, cu_k, causal=causal)
            assert fcsa.last_backend() == "cuda-sm90"
            clean = fcsa.flash_cosine_sim_attention_varlen(q, k, v, cu_q, cu_k, causal=causal)
            for rows in good:
                assert torch.isfinite(got[rows]).all()
                torch.testing.assert_close(got[rows], clean[rows], atol=0, rtol=0)
            for rows in bad:
                assert torch.isnan(got[rows]).all()


@needs_hopper
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("hk", [4, 1], ids=["mha", "mqa"])
def test_packed_backward_keeps_neighbours_apart(hk, causal):
    # The Hopper backward over packed sequences (bf16, d = 128): NaN in sequence 1's
    # queries, keys, values and dout, which the last key and query tiles of sequence 0
    # read past its end, reaches none of sequence 0's or 2's gradients; those equal the
    # gradients without the NaN, bit for bit (at most 256 keys a sequence: two key tiles,
    # so dq's two atomic additions give one sum in either order).
    lengths = [200, 100, 250]
    q, k, v, cu_q, cu_k = packed(lengths, lengths, 4, hk, 128, torch.bfloat16)
    dout = torch.randn_like(q)
    bad, good = slice(200, 300), [slice(0, 200), slice(300, 550)]

    def grads(poison):
        tensors = [t.clone() for t in (q, k, v, dout)]
        if poison:
            for t in tensors:
                t[bad, :, 5] = float("nan")
        leaves = [t.requires_grad_() for t in tensors[:3]]
        seen = []
        leaves[0].register_hook(lambda grad: seen.append(fcsa.last_backend()))
        fcsa.flash_cosine_sim_attention_varlen(*leaves, cu_q, cu_k, causal=causal).backward(tensors[3])
        assert seen == ["cuda-sm90"]
        return [t.grad.float() for t in leaves]

    got, want = grads(True), grads(False)
    for g, w in zip(got, want):
        for rows in good:
            assert torch.isfinite(g[rows]).all()
            torch.testing.assert_close(g[rows], w[rows], rtol=0, atol=0)


@needs_hopper
def test_declined_calls_run_on_the_portable_path(monkeypatch):
    q, k, v = (torch.randn(2, 2, 100, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    assert forward_backend(q, k, v) == "cuda-sm90"
    assert forward_backend(q, k, v, attn_bias=torch.randn(2, 100, 100, device="cuda",
                                                          dtype=torch.bfloat16)) == "cuda-sm80"
    assert forward_backend(q, k, v, l2norm_qk=False) == "cuda-sm80"
    assert forward_backend(q, k, v, groups=2) == "cuda-sm80"
    assert forward_backend(q.float(), k.float(), v.float()) == "cuda-sm80"
    assert forward_backend(q, k, v, scale=40) == "cuda-sm80"  # beyond the fixed offset's range
    monkeypatch.setenv("FCSA_DISABLE_SM90", "1")
    assert forward_backend(q, k, v) == "cuda-sm80"


@needs_hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
def test_agrees_with_portable_path(dtype, monkeypatch):
    q, k, v = (torch.randn(2, 4, 517, 128, device="cuda", dtype=dtype) for _ in range(3))
    with torch.no_grad():
        hopper = fcsa.flash_cosine_sim_attention(q, k, v, causal=True, return_lse=True)
        assert fcsa.last_backend() == "cuda-sm90"
        monkeypatch.setenv("FCSA_DISABLE_SM90", "1")
        portable = fcsa.flash_cosine_sim_attention(q, k, v, causal=True, return_lse=True)
        assert fcsa.last_backend() == "cuda-sm80"
    tol = 2e-3 if dtype == torch.float16 else 1.6e-2
    torch.testing.assert_close(hopper[0], portable[0], atol=tol, rtol=0)
    torch.testing.assert_close(hopper[1], portable[1], atol=tol, rtol=0)


@needs_hopper
@pytest.mark.parametrize("d", [64, 128])
def test_without_ping_pong(d, monkeypatch):
    # FCSA_SM90_PINGPONG=0 (for timing) changes only when each consumer issues its
    # products, not what they compute: the same bits.
    q, k, v = (torch.randn(2, 3, 700, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with torch.no_grad():
        turns = fcsa.flash_cosine_sim_attention(q, k, v, causal=True, return_lse=True)
        monkeypatch.setenv("FCSA_SM90_PINGPONG", "0")
        free = fcsa.flash_cosine_sim_attention(q, k, v, causal=True, return_lse=True)
    assert fcsa.last_backend() == "cuda-sm90"
    assert torch.equal(turns[0], free[0]) and torch.equal(turns[1], free[1])


# ---------------------------------------------------------------- the backward

@needs_hopper
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("nq,nk", [(1, 1), (65, 129), (129, 65), (200, 385), (300, 300)])
def test_backward_matches_reference(causal, nq, nk):
    # Key and query tiles cut short, causal both ways (nq > nk hides every key from the
    # first rows), two query heads per kv head.
    tensors = qkv(2, 4, nq, nk, 128, hk=2)
    q, k, v = (t.cuda().to(torch.bfloat16) for t in tensors.values())
    assert backward_backend(q, k, v, causal=causal) == "cuda-sm90"
    check_attention(tensors, torch.bfloat16, "cuda", with_kwargs(causal=causal))


@needs_hopper
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_backward_long_sequences_and_layouts(causal):
    # Many query tiles per key tile and eight query heads summed into one kv head's dk
    # and dv, from the (b, n, h, d) memory layout of a projection.
    q = torch.randn(1, 1100, 8, 128).transpose(1, 2)
    k = torch.randn(1, 1300, 1, 128).transpose(1, 2)
    v = torch.randn(1, 1300, 1, 128).transpose(1, 2)
    tensors = {"q": q, "k": k, "v": v}
    assert backward_backend(*(t.cuda().to(torch.bfloat16) for t in (q, k, v)), causal=causal) == "cuda-sm90"
    check_attention(tensors, torch.bfloat16, "cuda", with_kwargs(causal=causal))


@needs_hopper
def test_backward_agrees_with_portable_path(monkeypatch):
    def gradients():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fcsa.flash_cosine_sim_attention(*leaves, causal=True)
        out.backward(dout)
        return [t.grad for t in leaves]

    q, k, v, dout = (torch.randn(2, 4, 517, 128, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    assert backward_backend(q, k, v, causal=True) == "cuda-sm90"
    hopper = gradients()
    monkeypatch.setenv("FCSA_DISABLE_SM90", "1")
    assert backward_backend(q, k, v, causal=True) == "cuda-sm80"
    portable = gradients()
    for got, want in zip(hopper, portable):
        assert torch.isfinite(got).all()
        scale = want.float().abs().max().item()
        torch.testing.assert_close(got.float(), want.float(), atol=2e-2 * scale, rtol=0)


@needs_hopper
def test_backward_declined_calls_run_on_the_portable_path():
    q, k, v = (torch.randn(2, 2, 100, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    assert backward_backend(q, k, v) == "cuda-sm90"
    # d = 64 measured faster on the portable path (benchmarks/NOTES.md)
    assert backward_backend(q[..., :64], k[..., :64], v[..., :64]) == "cuda-sm80"
    assert backward_backend(q.half(), k.half(), v.half()) == "cuda-sm80"
    assert backward_backend(q, k, v, deterministic=True) == "cuda-sm80"
    assert backward_backend(q, k, v, mask=random_mask(2, 100).cuda()) == "cuda-sm80"
    assert backward_backend(q, k, v, l2norm_qk=False) == "cuda-sm80"
    assert backward_backend(q[..., :96], k[..., :96], v[..., :96]) == "cuda-sm80"


@needs_hopper
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_backward_every_gradient_written(causal):
    # Through the binding, into NaN-filled dq, dk and dv (dv strided: a gap after every
    # row that must stay NaN), with a workspace of 0xFF bytes: an element the kernels skip
    # stays NaN. nq > nk: with causal the first rows see no key (their dq is 0).
    b, h, hk, nq, nk, d = 2, 4, 2, 333, 290, 128
    q, dout = (torch.randn(b, h, nq, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(b, hk, nk, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    with torch.no_grad():
        out, lse = fcsa.flash_cosine_sim_attention(q, k, v, causal=causal, return_lse=True)
    dq = torch.full_like(q, float("nan"))
    dk = torch.full_like(k, float("nan"))
    dv_rows = torch.full((b, hk, nk, d + 8), float("nan"), device="cuda", dtype=torch.bfloat16)
    dv = dv_rows[..., :d]
    options = _lib.Options(causal=causal)
    tensors = {name: describe(t) for name, t in dict(q=q, k=k, v=v, out=out, dout=dout, lse=lse,
                                                      dq=dq, dk=dk, dv=dv).items()}
    nbytes = _lib.backward_workspace_size(options, **tensors)
    workspace = torch.full((max(nbytes, 1),), 0xFF, dtype=torch.uint8, device="cuda")
    _lib.backward(options, **tensors, workspace=workspace.data_ptr(), workspace_bytes=nbytes,
                  stream=torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    assert fcsa.last_backend() == "cuda-sm90"
    assert all(torch.isfinite(t).all() for t in (dq, dk, dv))
    assert torch.isnan(dv_rows[..., d:]).all()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    fcsa.flash_cosine_sim_attention(*leaves, causal=causal).backward(dout)
    for got, want in zip((dq, dk, dv), (t.grad for t in leaves)):
        # (dq adds by atomics: the same sums in another order)
        torch.testing.assert_close(got.float(), want.float(), atol=1e-2 * want.float().abs().max().item(),
                                   rtol=0)


@needs_hopper
@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_backward_causally_hidden_key_holding_nonfinite_values(poison):
    # Rows 128-169 are in query tiles that read key 170's tile but do not see key 170:
    # their dq must be what it is with that key finite (two atomic additions per element,
    # in either order the same sum). Rows that see it have a NaN lse, so their dq is NaN,
    # and so is dv of every key they see (all of them).
    n, d = 300, 128
    q, k, v, dout = (torch.randn(1, 2, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    k_bad = k.clone()
    k_bad[:, :, 170, :5] = poison

    def grads_of(keys):
        leaves = [t.clone().requires_grad_() for t in (q, v)]
        fcsa.flash_cosine_sim_attention(leaves[0], keys, leaves[1], causal=True).backward(dout)
        return [t.grad for t in leaves]

    assert backward_backend(q, k_bad, v, causal=True) == "cuda-sm90"
    (got, dv), (want, _) = grads_of(k_bad), grads_of(k)
    assert torch.isfinite(got[:, :, :170]).all()
    assert torch.isnan(got[:, :, 170:]).all()
    assert torch.isnan(dv).all()
    rows = slice(128, 170)
    torch.testing.assert_close(got[:, :, rows], want[:, :, rows], atol=0, rtol=0)
