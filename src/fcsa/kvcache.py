"""Attention over a KV cache, for inference: decoding and short queries.

    out = fcsa.flash_cosine_sim_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens,
                                                       k=k_step, v=v_step)

On the GPU the keys of each (sequence, kv head) are split over as many thread blocks as
fill the device, and the query heads that share a kv head are computed together, so K
and V are read once, at memory bandwidth; the partial results are combined exactly by
their lse (SPEC.md).
"""


import torch
from torch import Tensor

from . import _ops
from ._inputs import KERNEL_DTYPES, _canonical_scale, check_flags, check_groups


def _require(name, t, dims, dtype=None, device=None):
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}: "
                         "all tensors must be on one device")
    if t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")


def flash_cosine_sim_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=None, k=None,
                                            v=None, block_table=None, *, scale=8, groups=1,
                                            causal=True, l2norm_qk=True, return_lse=False):
    """Cosine-similarity attention of q over the keys held in a KV cache (forward only).

    Args:
        q: (b, h, nq, d): the new query rows (nq = 1 when decoding). float32, float16 or
            bfloat16.
        k_cache, v_cache: (b, hk, n_max, d) and (b, hk, n_max, d_v), h % hk == 0; or,
            with block_table, a paged cache (num_blocks, hk, page_size, d) and
            (num_blocks, hk, page_size, d_v). q's dtype and device; the head dim must be
            contiguous (the caches are written in place, never copied).
        cache_seqlens: int32 (b,): the keys each sequence holds in the cache before this
            call; None: every sequence holds the whole capacity (n_max, or max_blocks *
            page_size).
        k, v: (b, hk, nq_new, d) and (b, hk, nq_new, d_v), optional: new keys and values,
            written into the caches in place at positions cache_seqlens[b] onwards
            before attending (needs cache_seqlens; the caller advances cache_seqlens by
            nq_new afterwards).
        block_table: int32 (b, max_blocks): key j of sequence b lies in block
            block_table[b, j // page_size], row j % page_size.
        scale, groups, l2norm_qk: as in flash_cosine_sim_attention.
        causal: row i of q sees the keys j <= i + nk_b - nq, nk_b = cache_seqlens[b] +
            nq_new the keys of its sequence: aligned to the end, so the last row sees
            every key.
        return_lse: also return lse (b, h, nq), float32, -inf for a row that sees no key.

    Returns:
        out (b, h, nq, d_v) in q's dtype, or (out, lse). Forward only: a backward through
        it raises (no gradient formula is registered).

    Bad lengths (a cache too short for the new keys) and block numbers outside the cache
    are a ValueError before anything is written (on the GPU this costs one small
    transfer to the host, skipped while a CUDA graph is captured).
    """
    causal, l2norm_qk, return_lse = check_flags(causal=causal, l2norm_qk=l2norm_qk,
                                                return_lse=return_lse)
    _require("q", q, 4)
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(f"q must have dtype float32, float16 or bfloat16, got {q.dtype}")
    if q.device.type not in ("cpu", "cuda"):
        raise NotImplementedError(f"fcsa runs on CPU and CUDA tensors; q is on {q.device}")
    b, h, nq, d = q.shape
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        _require(name, t, 4, q.dtype, q.device)
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous head dim (it is written in "
                             f"place), got strides {t.stride()}")
    if k_cache.shape[:-1] != v_cache.shape[:-1]:
        raise ValueError(f"k_cache and v_cache must have the same shape but for the head "
                         f"dim, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    hk, d_v = k_cache.shape[1], v_cache.shape[3]
    if k_cache.shape[3] != d:
        raise ValueError(f"k_cache has head dim {k_cache.shape[3]} but q has {d}")
    if hk < 1 or h % hk != 0:
        raise ValueError(f"q's {h} heads must be a multiple of the caches' {hk} heads")
    if block_table is None:
        if k_cache.shape[0] != b:
            raise ValueError(f"k_cache has batch size {k_cache.shape[0]} but q has {b} "
                             "(a paged cache needs block_table)")
        capacity = k_cache.shape[2]
    else:
        _require("block_table", block_table, 2, torch.int32, q.device)
        if block_table.shape[0] != b:
            raise ValueError(f"block_table must have shape (b, max_blocks) with b = {b}, "
                             f"got {tuple(block_table.shape)}")
        if k_cache.shape[2] < 1:
            raise ValueError(f"a paged k_cache needs a page size of at least 1, got shape "
                             f"{tuple(k_cache.shape)}")
        capacity = block_table.shape[1] * k_cache.shape[2]
    if cache_seqlens is not None:
        _require("cache_seqlens", cache_seqlens, 1, torch.int32, q.device)
        if cache_seqlens.shape[0] != b:
            raise ValueError(f"cache_seqlens must have shape ({b},), got "
                             f"{tuple(cache_seqlens.shape)}")
    if (k is None) != (v is None):
        raise ValueError("k and v (the new keys and values) must be given together")
    if k is not None:
        if cache_seqlens is None:
            raise ValueError("cache_seqlens is required when k and v are given: the new "
                             "keys are written at cache_seqlens")
        _require("k", k, 4, q.dtype, q.device)
        _require("v", v, 4, q.dtype, q.device)
        if k.shape != (b, hk, k.shape[2], d) or v.shape != (b, hk, k.shape[2], d_v):
            raise ValueError(f"k and v must have shapes (b, hk, nq_new, d) = (..., {d}) and "
                             f"(b, hk, nq_new, d_v) = (..., {d_v}) with b = {b}, hk = {hk}, "
                             f"got {tuple(k.shape)} and {tuple(v.shape)}")
        if k.shape[2] > capacity:
            raise ValueError(f"k has {k.shape[2]} new keys, more than the cache's capacity "
                             f"of {capacity} keys per sequence")
    check_groups(groups, d)
    scale_t, scale_value = _canonical_scale(scale, h, q)
    if scale_t is not None and scale_t.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError("scale: KV-cache attention is forward only, and this scale "
                                  "requires grad (pass scale.detach(), or run under torch.no_grad())")
    if scale_t is not None:
        scale_t = scale_t.detach().float().contiguous()
    q, k, v = map(_ops.last_dim_contiguous, (q, k, v))

    flags = (scale_value, int(groups), causal, l2norm_qk, return_lse)
    if k is None:
        out, lse = torch.ops.fcsa.kvcache_forward(q, k_cache, v_cache, cache_seqlens,
                                                  block_table, scale_t, *flags)
    else:
        out, lse = torch.ops.fcsa.kvcache_append_forward(q, k_cache, v_cache, cache_seqlens,
                                                         block_table, k, v, scale_t, *flags)
    return (out, lse) if return_lse else out
