"""Attention over variable-length sequences packed end to end (no padding).

    out = fcsa.flash_cosine_sim_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k)

The layout is FlashAttention's varlen one: the b sequences of a batch lie one after
another along the first dim, q (total_q, h, d), k and v (total_k, hk, d), and int32
offsets cu_seqlens (b + 1,) say where each starts. Sequence s's queries attend to its
own keys only. Nothing is computed for padding, because there is none.
"""

import numbers

import torch
from torch import Tensor

from . import _ops
from ._inputs import KERNEL_DTYPES, _canonical_scale, check_flags, check_groups


class OffsetsDtypeError(TypeError, ValueError):
    """Offsets that are not int32: a wrong dtype (TypeError, as everywhere in fcsa) that
    is also a wrong offsets value (ValueError, as for every other bad offsets)."""


def _require_packed(name, t, q=None):
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q is not None:
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}: q, k and v "
                            "must have one dtype")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}: all tensors "
                             "must be on one device")
    if t.dim() != 3:
        raise ValueError(f"{name} must be 3-D (total length, heads, head dim), packed like "
                         f"FlashAttention's varlen inputs, got shape {tuple(t.shape)}")


def _require_offsets(name, t, q):
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise OffsetsDtypeError(f"{name} must have dtype torch.int32, got {t.dtype}")
    if t.device != q.device:
        raise ValueError(f"{name} is on {t.device} but q is on {q.device}: the offsets must "
                         "be on q's device")
    if t.dim() != 1 or t.shape[0] < 1:
        raise ValueError(f"{name} must have shape (b + 1,), starting at 0, got shape "
                         f"{tuple(t.shape)}")


def _require_length(name, value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be None or an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


def flash_cosine_sim_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None,
                                      max_seqlen_k=None, *, attn_bias=None, scale=8,
                                      groups=1, causal=False, l2norm_qk=True,
                                      return_lse=False, deterministic=False):
    """Fused cosine-similarity attention over packed variable-length sequences.

    Args:
        q: (total_q, h, d): the queries of every sequence, one sequence after another.
            float32, float16 or bfloat16.
        k, v: (total_k, hk, d) and (total_k, hk, d_v), h % hk == 0 (grouped-query kv).
            q's dtype and device.
        cu_seqlens_q, cu_seqlens_k: int32 (b + 1,) on q's device: sequence s holds rows
            cu_seqlens_q[s] to cu_seqlens_q[s + 1] - 1 of q and rows cu_seqlens_k[s] to
            cu_seqlens_k[s + 1] - 1 of k and v. 0 first, non-decreasing, total_q (total_k)
            last; a sequence may be empty (its rows see no key: out 0, lse -inf).
        max_seqlen_q, max_seqlen_k: accepted for FlashAttention compatibility and checked
            (no sequence may be longer), not needed: the library finds its tiles itself.
        attn_bias: not supported with packed sequences (NotImplementedError): a bias per
            sequence has no natural packed shape; add it by running that sequence alone
            through flash_cosine_sim_attention.
        scale, groups, l2norm_qk, deterministic: as in flash_cosine_sim_attention; a
            scale tensor of shape () or (h,) receives a gradient.
        causal: row i of sequence s sees its keys j <= i + nk_s - nq_s (aligned to the
            end of each sequence).
        return_lse: also return lse (h, total_q), float32, without a gradient.

    Returns:
        out (total_q, h, d_v) in q's dtype, or (out, lse). Gradients flow to q, k, v and
        a scale tensor.

    Bad offsets are a ValueError naming them before anything runs (offsets that are not
    int32 raise an error that is both a TypeError and a ValueError). On the GPU the
    values are checked with one small transfer to the host, skipped while a CUDA graph
    is captured: the kernels then keep every access inside the tensors whatever the
    offsets hold, but wrong offsets give wrong results.
    """
    causal, l2norm_qk, return_lse, deterministic = check_flags(
        causal=causal, l2norm_qk=l2norm_qk, return_lse=return_lse, deterministic=deterministic)
    _require_packed("q", q)
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(f"q must have dtype float32, float16 or bfloat16, got {q.dtype}")
    if q.device.type not in ("cpu", "cuda"):
        raise NotImplementedError(f"fcsa runs on CPU and CUDA tensors; q is on {q.device}")
    _require_packed("k", k, q)
    _require_packed("v", v, q)
    total_q, h, d = q.shape
    total_k, hk = k.shape[0], k.shape[1]
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"k and v must have the same shape but for the head dim, got k "
                         f"{tuple(k.shape)} and v {tuple(v.shape)}")
    if k.shape[2] != d:
        raise ValueError(f"k has head dim {k.shape[2]} but q has {d}")
    if d < 1 or v.shape[2] < 1:
        raise ValueError(f"q and v need head dims of at least 1, got {tuple(q.shape)} and "
                         f"{tuple(v.shape)}")
    if hk < 1 or h % hk != 0:
        raise ValueError(f"q's {h} heads must be a multiple of k's and v's {hk} heads")
    _require_offsets("cu_seqlens_q", cu_seqlens_q, q)
    _require_offsets("cu_seqlens_k", cu_seqlens_k, q)
    if cu_seqlens_k.shape != cu_seqlens_q.shape:
        raise ValueError(f"cu_seqlens_k must have cu_seqlens_q's shape (b + 1,) = "
                         f"{tuple(cu_seqlens_q.shape)} (one entry per sequence and one more), "
                         f"got {tuple(cu_seqlens_k.shape)}")
    max_seqlen_q = _require_length("max_seqlen_q", max_seqlen_q)
    max_seqlen_k = _require_length("max_seqlen_k", max_seqlen_k)
    if attn_bias is not None:
        raise NotImplementedError(
            "attn_bias is not supported by flash_cosine_sim_attention_varlen; run the "
            "sequences that need a bias through flash_cosine_sim_attention")
    check_groups(groups, d)
    scale_t, scale_value = _canonical_scale(scale, h, q)
    if scale_t is not None:
        scale_t = _ops.last_dim_contiguous(scale_t.float())
    _ops.check_offset_values(cu_seqlens_q, cu_seqlens_k, total_q, total_k, max_seqlen_q,
                             max_seqlen_k)
    q, k, v = map(_ops.last_dim_contiguous, (q, k, v))

    grad = torch.is_grad_enabled()
    need_lse = return_lse or (grad and any(
        t is not None and t.requires_grad for t in (q, k, v, scale_t)))
    # As in flash_cosine_sim_attention: dscale sums dS over the keys, which needs delta
    # from the unrounded out.
    float32_out = (q.dtype != torch.float32 and grad and scale_t is not None
                   and scale_t.requires_grad)
    out, lse = torch.ops.fcsa.varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, scale_t,
                                             scale_value, int(groups), causal, l2norm_qk,
                                             deterministic, need_lse, float32_out)
    if float32_out:
        out = out.to(q.dtype)
    return (out, lse) if return_lse else out
