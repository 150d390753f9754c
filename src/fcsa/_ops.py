"""The torch.library operators fcsa::forward and fcsa::backward.

They take tensors already in the canonical 4-D form (see _inputs.py), allocate every
output and the workspace through torch on the tensors' device, describe the tensors to
the C library through fcsa._lib and run it on the current CUDA stream. Fake (meta)
implementations and the autograd formula make them traceable by torch.compile.
"""

import contextlib
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _lib

if not hasattr(torch.library, "custom_op"):
    raise ImportError(f"fcsa needs torch >= 2.4 (torch.library.custom_op); "
                      f"this is torch {torch.__version__}")

_DTYPE_CODES = {
    torch.float32: _lib.DTYPE_FLOAT32,
    torch.float16: _lib.DTYPE_FLOAT16,
    torch.bfloat16: _lib.DTYPE_BFLOAT16,
    torch.bool: _lib.DTYPE_BOOL,
    torch.int32: _lib.DTYPE_INT32,
}
_DEVICE_CODES = {"cpu": _lib.DEVICE_CPU, "cuda": _lib.DEVICE_CUDA}


def describe(t: Optional[Tensor]):
    """The plain tuple fcsa._lib turns into an fcsa_tensor (None stays None)."""
    if t is None:
        return None
    if t.dtype not in _DTYPE_CODES:
        raise TypeError(f"fcsa cannot describe a tensor of dtype {t.dtype}")
    if t.device.type not in _DEVICE_CODES:
        raise NotImplementedError(f"fcsa runs on CPU and CUDA tensors, not {t.device.type}")
    return (t.data_ptr(), _DTYPE_CODES[t.dtype], _DEVICE_CODES[t.device.type],
            t.device.index or 0, tuple(t.shape), tuple(t.stride()))


def last_dim_contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    """The library reads rows with stride 1: copy only when the last stride is not 1."""
    if t is None or t.dim() == 0 or t.shape[-1] <= 1 or t.stride(-1) == 1:
        return t
    return t.contiguous()


@contextlib.contextmanager
def _on_device(device: torch.device):
    """Makes `device` current (CUDA) and yields the stream handle to run on."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            yield torch.cuda.current_stream(device).cuda_stream
    else:
        yield 0


def _options(scale_value, groups, causal, l2norm_qk, deterministic):
    return _lib.Options(scale=scale_value, groups=groups, causal=causal,
                        l2norm_qk=l2norm_qk, deterministic=deterministic,
                        num_threads=torch.get_num_threads())


def _run(size_query, call, device, options, tensors):
    """Asks the library for the workspace size, allocates the workspace through torch
    on `device` and runs the call there, on the current stream. (On CUDA the work is
    only enqueued; torch's caching allocator hands the workspace out again only to
    work ordered after it on that stream.)"""
    with _on_device(device) as stream:
        nbytes = size_query(options, **tensors)
        ws = torch.empty(nbytes, dtype=torch.uint8, device=device) if nbytes else None
        call(options, **tensors, workspace=0 if ws is None else ws.data_ptr(),
             workspace_bytes=nbytes, stream=stream)


# ---------------------------------------------------------------- forward

def _out_dtype(q: Tensor, float32_out: bool) -> torch.dtype:
    return torch.float32 if float32_out else q.dtype


def _out_shape(q: Tensor, v: Tensor):
    """(b, h, nq, d_v): q's shape with v's head dim."""
    return (*q.shape[:-1], v.shape[-1])


@torch.library.custom_op("fcsa::forward", mutates_args=())
def forward_op(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor],
               bias: Optional[Tensor], scale: Optional[Tensor], scale_value: float,
               groups: int, causal: bool, l2norm_qk: bool, deterministic: bool,
               need_lse: bool, float32_out: bool) -> Tuple[Tensor, Tensor]:
    """out (b, h, nq, d_v), v's head dim, in q's dtype or, with float32_out, in float32
    (unrounded: the backward then takes delta = <dO, O> from it), and lse (b, h, nq)
    float32; lse is (0,) when need_lse is False."""
    b, h, nq, _ = q.shape
    out = torch.empty(_out_shape(q, v), dtype=_out_dtype(q, float32_out), device=q.device)
    lse = torch.empty((b, h, nq) if need_lse else (0,), dtype=torch.float32, device=q.device)
    tensors = dict(q=describe(q), k=describe(k), v=describe(v), mask=describe(mask),
                   bias=describe(bias), scale=describe(scale), out=describe(out),
                   lse=describe(lse) if need_lse else None)
    options = _options(scale_value, groups, causal, l2norm_qk, deterministic)
    _run(_lib.forward_workspace_size, _lib.forward, q.device, options, tensors)
    return out, lse


@forward_op.register_fake
def _forward_fake(q, k, v, mask, bias, scale, scale_value, groups, causal, l2norm_qk,
                  deterministic, need_lse, float32_out):
    b, h, nq, _ = q.shape
    out = q.new_empty(_out_shape(q, v), dtype=_out_dtype(q, float32_out))
    lse = q.new_empty((b, h, nq) if need_lse else (0,), dtype=torch.float32)
    return out, lse


# ---------------------------------------------------------------- backward

def _backward_outputs(q, k, v, bias, scale, need_dbias, need_dscale, empty):
    """dq, dk, dv like q, k, v; dbias like bias and dscale like scale (float32) when
    wanted, else of shape (0,). `empty` allocates (torch.empty, or new_empty when fake)."""
    dq = empty(q.shape, dtype=q.dtype, device=q.device)
    dk = empty(k.shape, dtype=k.dtype, device=q.device)
    dv = empty(v.shape, dtype=v.dtype, device=q.device)
    dbias = (empty(bias.shape, dtype=bias.dtype, device=q.device) if need_dbias
             else empty((0,), dtype=q.dtype, device=q.device))
    dscale = (empty(scale.shape, dtype=torch.float32, device=q.device) if need_dscale
              else empty((0,), dtype=torch.float32, device=q.device))
    return dq, dk, dv, dbias, dscale


@torch.library.custom_op("fcsa::backward", mutates_args=())
def backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor],
                bias: Optional[Tensor], scale: Optional[Tensor], out: Tensor, lse: Tensor,
                scale_value: float, groups: int, causal: bool, l2norm_qk: bool,
                deterministic: bool, need_dbias: bool,
                need_dscale: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dq, dk, dv, and dbias (bias' shape) and dscale (scale's shape) when asked for,
    else tensors of shape (0,) in their place. out is the forward's, in q's dtype or
    float32; dout is in q's dtype; both have v's head dim.

    out and lse may also be those of the attention over a larger set of keys, of which
    k and v are a part (combined through lse, as ring attention does): the kernel takes
    P = exp(s - lse) and delta = <dout, out> from them as given, so the results are
    then this part's share: dk, dv for these keys, and the terms of dq, dbias and
    dscale that these keys contribute (summing the shares over the parts gives the
    gradients of the whole attention)."""
    dq, dk, dv, dbias, dscale = _backward_outputs(q, k, v, bias, scale, need_dbias,
                                                  need_dscale, torch.empty)
    tensors = dict(q=describe(q), k=describe(k), v=describe(v), mask=describe(mask),
                   bias=describe(bias), scale=describe(scale), out=describe(out),
                   dout=describe(dout), lse=describe(lse), dq=describe(dq),
                   dk=describe(dk), dv=describe(dv),
                   dbias=describe(dbias) if need_dbias else None,
                   dscale=describe(dscale) if need_dscale else None)
    options = _options(scale_value, groups, causal, l2norm_qk, deterministic)
    _run(_lib.backward_workspace_size, _lib.backward, q.device, options, tensors)
    return dq, dk, dv, dbias, dscale


@backward_op.register_fake
def _backward_fake(dout, q, k, v, mask, bias, scale, out, lse, scale_value, groups, causal,
                   l2norm_qk, deterministic, need_dbias, need_dscale):
    return _backward_outputs(q, k, v, bias, scale, need_dbias, need_dscale, q.new_empty)


# ---------------------------------------------------------------- autograd

def _setup_context(ctx, inputs, output):
    (q, k, v, mask, bias, scale, scale_value, groups, causal, l2norm_qk, deterministic,
     need_lse, _float32_out) = inputs
    out, lse = output
    # lse is a statistic for composing partial results, returned without a gradient.
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, mask, bias, scale, out, lse)
    ctx.flags = (scale_value, groups, causal, l2norm_qk, deterministic)
    ctx.has_lse = need_lse


def _check_backward_possible(ctx):
    """What every fused backward needs: no graph of its own to build, and the forward's lse."""
    # Autograd runs a backward with grad mode on only when asked for create_graph=True.
    # The fused backward has no derivative of its own: refuse here rather than let a
    # second backward fail without saying why.
    if torch.is_grad_enabled():
        raise NotImplementedError(
            "fcsa: double backward (create_graph=True) is not supported: the fused "
            "backward is not differentiable; use fcsa.plain_cosine_sim_attention for "
            "higher-order gradients")
    if not ctx.has_lse:
        raise RuntimeError("fcsa: the forward ran without lse, so it cannot be "
                           "differentiated (no input required grad when it ran)")


def _backward(ctx, dout, _dlse):
    _check_backward_possible(ctx)
    q, k, v, mask, bias, scale, out, lse = ctx.saved_tensors
    need_dbias = bias is not None and ctx.needs_input_grad[4]
    need_dscale = scale is not None and ctx.needs_input_grad[5]
    # With a float32 out, dout arrives in float32 too: it is the gradient of the caller's
    # out in q's dtype, widened, so narrowing it back is exact.
    dq, dk, dv, dbias, dscale = torch.ops.fcsa.backward(
        last_dim_contiguous(dout.to(q.dtype)), q, k, v, mask, bias, scale, out, lse,
        *ctx.flags, need_dbias, need_dscale)
    return (dq, dk, dv, None, dbias if need_dbias else None,
            dscale if need_dscale else None, None, None, None, None, None, None, None)


forward_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------- KV-cache attention

def check_cache_values(cache_seqlens: Optional[Tensor], block_table: Optional[Tensor],
                       n_new: int, capacity: int, page_size: int, num_blocks: int):
    """The values the C library reads on the GPU without checking (that would make every
    call wait for the device): each length leaves room for the new keys, and each block
    a sequence uses is in the cache. One small transfer to the host; skipped while a
    CUDA graph is being captured (the values are the caller's business there)."""
    if cache_seqlens is None and block_table is None:
        return
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return
    if cache_seqlens is None:
        lengths = torch.full((block_table.shape[0],), capacity, dtype=torch.int64,
                             device=block_table.device)
    else:
        lengths = cache_seqlens.long() + n_new
    bad_length = (lengths < n_new) | (lengths > capacity)
    checks = [bad_length.any()]
    if block_table is not None:
        used = (torch.arange(block_table.shape[1], device=block_table.device)[None, :]
                < ((lengths + page_size - 1) // page_size)[:, None])
        outside = used & ((block_table < 0) | (block_table >= num_blocks))
        checks.append(outside.any())
    flags = torch.stack(checks).tolist()
    if flags[0]:
        batch = int(bad_length.nonzero()[0, 0])
        raise ValueError(f"cache_seqlens[{batch}] is {int(lengths[batch]) - n_new}, expected "
                         f"0 to {capacity - n_new} (a capacity of {capacity} keys, {n_new} "
                         f"of them new)")
    if len(flags) > 1 and flags[1]:
        batch, i = (int(x) for x in outside.nonzero()[0])
        raise ValueError(f"block_table[{batch}, {i}] is {int(block_table[batch, i])}, "
                         f"expected a block of the cache, 0 to {num_blocks - 1}")
    if block_table is not None and n_new > 0 and block_table.shape[0] > 0:
        # Appends write key positions lengths - n_new .. lengths - 1 of each sequence:
        # no two may land in the same (block, row), or the writes race.
        position = (lengths - n_new)[:, None] + torch.arange(n_new, device=block_table.device)[None, :]
        blocks = torch.gather(block_table.long(), 1, position // page_size)
        slots = (blocks * page_size + position % page_size).flatten()
        if torch.unique(slots).numel() != slots.numel():
            raise ValueError("block_table: two appended keys would be written to the same cache "
                             "slot (a block used twice where keys are appended)")


def _kvcache_forward(q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new, scale,
                     scale_value, groups, causal, l2norm_qk, need_lse):
    b, h, nq, _ = q.shape
    out = torch.empty(_out_shape(q, v_cache), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, nq) if need_lse else (0,), dtype=torch.float32, device=q.device)
    if q.device.type == "cuda":
        paged = block_table is not None
        page_size = k_cache.shape[2]
        capacity = block_table.shape[1] * page_size if paged else page_size
        check_cache_values(cache_seqlens, block_table, 0 if k_new is None else k_new.shape[2],
                           capacity, page_size, k_cache.shape[0])
    tensors = dict(q=describe(q), k_cache=describe(k_cache), v_cache=describe(v_cache),
                   cache_seqlens=describe(cache_seqlens), block_table=describe(block_table),
                   k_new=describe(k_new), v_new=describe(v_new), scale=describe(scale),
                   out=describe(out), lse=describe(lse) if need_lse else None)
    options = _options(scale_value, groups, causal, l2norm_qk, False)
    _run(_lib.kvcache_forward_workspace_size, _lib.kvcache_forward, q.device, options, tensors)
    return out, lse


def _kvcache_fake(q, v_cache, need_lse):
    b, h, nq, _ = q.shape
    out = q.new_empty(_out_shape(q, v_cache))
    lse = q.new_empty((b, h, nq) if need_lse else (0,), dtype=torch.float32)
    return out, lse


# Two operators, so that a step without new keys declares no mutation: under
# torch.compile a mutated input may be copied, and a cache is the largest tensor there is.
@torch.library.custom_op("fcsa::kvcache_forward", mutates_args=())
def kvcache_forward_op(q: Tensor, k_cache: Tensor, v_cache: Tensor,
                       cache_seqlens: Optional[Tensor], block_table: Optional[Tensor],
                       scale: Optional[Tensor], scale_value: float, groups: int, causal: bool,
                       l2norm_qk: bool, need_lse: bool) -> Tuple[Tensor, Tensor]:
    """out (b, h, nq, d_v) in q's dtype and lse (b, h, nq) float32 ((0,) without
    need_lse) of q over the cache's valid keys."""
    return _kvcache_forward(q, k_cache, v_cache, cache_seqlens, block_table, None, None, scale,
                            scale_value, groups, causal, l2norm_qk, need_lse)


@kvcache_forward_op.register_fake
def _kvcache_forward_fake(q, k_cache, v_cache, cache_seqlens, block_table, scale, scale_value,
                          groups, causal, l2norm_qk, need_lse):
    return _kvcache_fake(q, v_cache, need_lse)


@torch.library.custom_op("fcsa::kvcache_append_forward", mutates_args=("k_cache", "v_cache"))
def kvcache_append_forward_op(q: Tensor, k_cache: Tensor, v_cache: Tensor,
                              cache_seqlens: Tensor, block_table: Optional[Tensor],
                              k_new: Tensor, v_new: Tensor, scale: Optional[Tensor],
                              scale_value: float, groups: int, causal: bool, l2norm_qk: bool,
                              need_lse: bool) -> Tuple[Tensor, Tensor]:
    """Writes k_new, v_new into the caches at cache_seqlens (in place), then as
    fcsa::kvcache_forward over the longer sequences."""
    return _kvcache_forward(q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new,
                            scale, scale_value, groups, causal, l2norm_qk, need_lse)


@kvcache_append_forward_op.register_fake
def _kvcache_append_forward_fake(q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new,
                                 scale, scale_value, groups, causal, l2norm_qk, need_lse):
    return _kvcache_fake(q, v_cache, need_lse)


# ---------------------------------------------------------------- packed sequences
#
# q (total_q, h, d), k (total_k, hk, d), v (total_k, hk, d_v), out (total_q, h, d_v):
# the library sees them as (1, heads, total, d) views (a transpose, no copy), with the
# offsets cu_seqlens_q and cu_seqlens_k (int32 (b + 1,)) saying where each sequence
# starts. lse is (h, total_q).

def _packed(t: Tensor) -> Tensor:
    """(total, heads, d) -> the (1, heads, total, d) view the C library reads."""
    return t.transpose(0, 1).unsqueeze(0)


def _varlen_outputs(q, v, need_lse, float32_out, empty):
    out = empty((q.shape[0], q.shape[1], v.shape[2]), dtype=_out_dtype(q, float32_out),
                device=q.device)
    lse = empty((q.shape[1], q.shape[0]) if need_lse else (0,), dtype=torch.float32,
                device=q.device)
    return out, lse


@torch.library.custom_op("fcsa::varlen_forward", mutates_args=())
def varlen_forward_op(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                      cu_seqlens_k: Tensor, scale: Optional[Tensor], scale_value: float,
                      groups: int, causal: bool, l2norm_qk: bool, deterministic: bool,
                      need_lse: bool, float32_out: bool) -> Tuple[Tensor, Tensor]:
    """out (total_q, h, d_v) in q's dtype (float32 with float32_out, as fcsa::forward) and
    lse (h, total_q) float32, (0,) when need_lse is False."""
    out, lse = _varlen_outputs(q, v, need_lse, float32_out, torch.empty)
    tensors = dict(q=describe(_packed(q)), k=describe(_packed(k)), v=describe(_packed(v)),
                   scale=describe(scale), out=describe(_packed(out)),
                   lse=describe(lse.unsqueeze(0)) if need_lse else None,
                   cu_seqlens_q=describe(cu_seqlens_q), cu_seqlens_k=describe(cu_seqlens_k))
    options = _options(scale_value, groups, causal, l2norm_qk, deterministic)
    _run(_lib.forward_workspace_size, _lib.forward, q.device, options, tensors)
    return out, lse


@varlen_forward_op.register_fake
def _varlen_forward_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, scale_value, groups,
                         causal, l2norm_qk, deterministic, need_lse, float32_out):
    return _varlen_outputs(q, v, need_lse, float32_out, q.new_empty)


def _varlen_gradients(q, k, v, scale, need_dscale, empty):
    dq = empty(q.shape, dtype=q.dtype, device=q.device)
    dk = empty(k.shape, dtype=k.dtype, device=q.device)
    dv = empty(v.shape, dtype=v.dtype, device=q.device)
    dscale = empty(scale.shape if need_dscale else (0,), dtype=torch.float32, device=q.device)
    return dq, dk, dv, dscale


@torch.library.custom_op("fcsa::varlen_backward", mutates_args=())
def varlen_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                       cu_seqlens_k: Tensor, scale: Optional[Tensor], out: Tensor, lse: Tensor,
                       scale_value: float, groups: int, causal: bool, l2norm_qk: bool,
                       deterministic: bool,
                       need_dscale: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """dq, dk, dv in q's packed shapes, and dscale (scale's shape; (0,) unless asked for)."""
    dq, dk, dv, dscale = _varlen_gradients(q, k, v, scale, need_dscale, torch.empty)
    tensors = dict(q=describe(_packed(q)), k=describe(_packed(k)), v=describe(_packed(v)),
                   scale=describe(scale), out=describe(_packed(out)),
                   dout=describe(_packed(dout)), lse=describe(lse.unsqueeze(0)),
                   dq=describe(_packed(dq)), dk=describe(_packed(dk)), dv=describe(_packed(dv)),
                   dscale=describe(dscale) if need_dscale else None,
                   cu_seqlens_q=describe(cu_seqlens_q), cu_seqlens_k=describe(cu_seqlens_k))
    options = _options(scale_value, groups, causal, l2norm_qk, deterministic)
    _run(_lib.backward_workspace_size, _lib.backward, q.device, options, tensors)
    return dq, dk, dv, dscale


@varlen_backward_op.register_fake
def _varlen_backward_fake(dout, q, k, v, cu_seqlens_q, cu_seqlens_k, scale, out, lse,
                          scale_value, groups, causal, l2norm_qk, deterministic, need_dscale):
    return _varlen_gradients(q, k, v, scale, need_dscale, q.new_empty)


def _varlen_setup_context(ctx, inputs, output):
    (q, k, v, cu_seqlens_q, cu_seqlens_k, scale, scale_value, groups, causal, l2norm_qk,
     deterministic, need_lse, _float32_out) = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, out, lse)
    ctx.flags = (scale_value, groups, causal, l2norm_qk, deterministic)
    ctx.has_lse = need_lse


def _varlen_backward(ctx, dout, _dlse):
    _check_backward_possible(ctx)
    q, k, v, cu_seqlens_q, cu_seqlens_k, scale, out, lse = ctx.saved_tensors
    need_dscale = scale is not None and ctx.needs_input_grad[5]
    dq, dk, dv, dscale = torch.ops.fcsa.varlen_backward(
        last_dim_contiguous(dout.to(q.dtype)), q, k, v, cu_seqlens_q, cu_seqlens_k, scale,
        out, lse, *ctx.flags, need_dscale)
    return (dq, dk, dv, None, None, dscale if need_dscale else None, None, None, None, None,
            None, None, None)


varlen_forward_op.register_autograd(_varlen_backward, setup_context=_varlen_setup_context)


def check_offset_values(cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, total_q: int,
                        total_k: int, max_seqlen_q: Optional[int],
                        max_seqlen_k: Optional[int]):
    """The offsets' values, which the C library reads on the GPU without checking (that
    would make every call wait for the device): 0 first, non-decreasing, the totals last,
    and no sequence longer than a max_seqlen given. One small transfer to the host;
    skipped while a CUDA graph is being captured or torch.compile traces."""
    # Under torch.compile a host copy would break the graph: there the C library checks
    # host offsets itself, and device ones are the caller's business, as under capture.
    # (Asked first: the capture query below cannot be traced.)
    if torch.compiler.is_compiling():
        return
    if (cu_seqlens_q.is_cuda and torch.cuda.is_available()
            and torch.cuda.is_current_stream_capturing()):
        return
    offsets = torch.stack([cu_seqlens_q, cu_seqlens_k]).tolist()
    named = (("cu_seqlens_q", offsets[0], total_q, max_seqlen_q, "max_seqlen_q", "q"),
             ("cu_seqlens_k", offsets[1], total_k, max_seqlen_k, "max_seqlen_k", "k"))
    for name, values, total, most, most_name, tensor in named:
        if values[0] != 0:
            raise ValueError(f"{name} must start at 0, got {values[0]}")
        for i in range(1, len(values)):
            if values[i] < values[i - 1]:
                raise ValueError(f"{name} must be non-decreasing, got {values[i]} after "
                                 f"{values[i - 1]} (entry {i})")
        if values[-1] != total:
            raise ValueError(f"{name} must end at {total}, the rows of {tensor} "
                             f"({tensor}.shape[0]), got {values[-1]}")
        longest = max((b - a for a, b in zip(values, values[1:])), default=0)
        if most is not None and longest > most:
            raise ValueError(f"{most_name} is {most}, but {name} holds a sequence of "
                             f"{longest}")
