"""The public functions: fused attention, its plain PyTorch counterpart, l2norm."""

import numbers

import torch
from torch import Tensor

from . import _ops
from ._inputs import KERNEL_DTYPES, REFERENCE_DTYPES, canonical_inputs, check_flags

L2NORM_EPS = 1e-12


def flash_cosine_sim_attention(q, k, v, mask=None, attn_bias=None, scale=8, groups=1,
                               causal=False, l2norm_qk=True, attn_bias_batch_dim=False,
                               use_triton=False, sequence_parallel=False, *,
                               return_lse=False, deterministic=False):
    """Fused cosine-similarity attention.

    For each query row i: s_ij = scale * <l2norm(q_i), l2norm(k_j)> + bias_ij over the
    visible keys j, out_i = softmax(s_i) @ v. The n x n matrix is never materialized.

    Args:
        q: (b, h, nq, d), or (B, nq, d) with batch and heads merged.
        k: (b, hk, nk, d) with h % hk == 0, or (b, nk, d) single-headed; (B, nk, d)
            with a 3-D q. Same dtype as q: float32, float16 or bfloat16.
        v: k's shape but for the head dim d_v, which is its own (it may differ from
            d; the output takes it). Same dtype as q.
        mask: bool (b, nk), True where a key may be attended.
        attn_bias: (h, nq, nk); (b, nq, nk) with attn_bias_batch_dim=True; or 4-D
            broadcastable to (b, h, nq, nk). q's dtype or float32.
        scale: a float, finite in float32; or a tensor of shape () or (h,) (learnable
            per-head temperature), whose values are not inspected.
        groups: l2norm over this many equal chunks of the head dim.
        causal: key j is hidden from row i when j > i + nk - nq (aligned to the end).
        l2norm_qk: normalize q and k inside the kernel (False: they come normalized).
        return_lse: also return lse = log sum_j exp(s_ij), float32 (b, h, nq) or
            (B, nq), -inf for a row that sees no key. It carries no gradient.
        use_triton, sequence_parallel: accepted for compatibility with the original
            package's 0.2 releases, and ignored: fcsa has one fused implementation per
            device, and its backward needs no choice of parallelization.
        deterministic: make the backward bitwise reproducible.
        The flags (causal, l2norm_qk, attn_bias_batch_dim, use_triton,
        sequence_parallel, return_lse, deterministic) take a bool, a numpy bool or 0/1;
        anything else is a TypeError.

    Returns:
        out, of q's shape but for the head dim, v's (d_v), and q's dtype; or (out, lse)
        when return_lse. The gradient is of
        first order only: a backward with create_graph=True raises NotImplementedError.
    """
    causal, l2norm_qk, attn_bias_batch_dim, return_lse, deterministic = check_flags(
        causal=causal, l2norm_qk=l2norm_qk, attn_bias_batch_dim=attn_bias_batch_dim,
        return_lse=return_lse, deterministic=deterministic)
    check_flags(use_triton=use_triton, sequence_parallel=sequence_parallel)  # no-ops
    x = canonical_inputs(q, k, v, mask, attn_bias, scale, groups, attn_bias_batch_dim,
                         KERNEL_DTYPES)
    if x.q.device.type not in ("cpu", "cuda"):
        raise NotImplementedError(f"fcsa runs on CPU and CUDA tensors; q is on {x.q.device}")
    q, k, v, mask, bias = map(_ops.last_dim_contiguous, (x.q, x.k, x.v, x.mask, x.bias))
    scale_t = None if x.scale is None else _ops.last_dim_contiguous(x.scale.float())

    # The backward needs lse: compute it whenever a gradient may be asked for.
    grad = torch.is_grad_enabled()
    need_lse = return_lse or (grad and any(
        t is not None and t.requires_grad for t in (q, k, v, bias, scale_t)))
    # The gradients that sum dS = P (dP - delta) over the keys, dscale and the dbias of a
    # bias broadcast over the keys, are small sums of large terms that cancel (for the
    # bias exactly: its gradient is 0). delta = <dO, O> taken from O rounded to 16 bits
    # shifts every term of a row alike, which such a sum does not cancel (dscale in
    # bfloat16 could be off by its own size). So for them the forward keeps out in float32
    # for the backward, and the caller gets it rounded. Other gradients sum dS over
    # batches, heads or queries, where those shifts do not add up: they keep the cheaper
    # 16-bit out.
    float32_out = q.dtype != torch.float32 and grad and (
        (scale_t is not None and scale_t.requires_grad) or
        (bias is not None and bias.requires_grad and bias.shape[-1] == 1))
    out, lse = torch.ops.fcsa.forward(q, k, v, mask, bias, scale_t, x.scale_value,
                                      int(groups), causal, l2norm_qk, deterministic,
                                      need_lse, float32_out)
    if float32_out:
        out = out.to(q.dtype)
    if x.merged:
        out = out.squeeze(1)
        lse = lse.squeeze(1) if return_lse else lse
    return (out, lse) if return_lse else out


def l2norm_tensors(*tensors, groups=1):
    """Each tensor divided by its l2 norm over the last dim, taken separately over
    `groups` equal chunks: x / max(|x|, 1e-12), the norm computed in float32 (or
    float64 for float64 input) without overflow or underflow, for rows of any size.
    Returns a tuple, each tensor in its own dtype."""
    if not tensors:
        raise ValueError("l2norm_tensors needs at least one tensor")
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral):
        raise TypeError(f"groups must be an int, got {type(groups).__name__}")
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise TypeError(f"tensors[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"tensors[{i}] must be floating point, got {t.dtype}")
        if t.dim() == 0 or groups < 1 or t.shape[-1] % groups != 0:
            raise ValueError(f"groups must be a positive divisor of the last dim of "
                             f"tensors[{i}] (shape {tuple(t.shape)}), got {groups}")
    return tuple(_l2norm(t, groups) for t in tensors)


def _l2norm(t: Tensor, groups: int) -> Tensor:
    """x / max(|x|, 1e-12) per group, with |x| computed without overflow or underflow.

    Each group is first divided by a power of two near its largest |x_i|, which is
    exact, so the sum of squares is taken on numbers near 1: rows whose squares would
    overflow (|x| above ~1.8e19 in float32) or underflow keep their direction. Where
    |x|^2 is representable the result is the very number x / |x| gives."""
    x = t.to(torch.promote_types(t.dtype, torch.float32))
    x = x.unflatten(-1, (groups, t.shape[-1] // groups))
    # The power 2^(e - 1) <= max |x_i| < 2^e (1/2 for a group of zeros). x / |x| does
    # not change when x is scaled, so the power needs no gradient of its own.
    _, exponent = torch.frexp(x.detach().abs().amax(dim=-1, keepdim=True))
    power = torch.pow(2.0, (exponent - 1).to(x.dtype))
    scaled = x / power
    scaled_norm = torch.linalg.vector_norm(scaled, dim=-1, keepdim=True)
    # The true norm, for the clamp: it may overflow to inf, never to a wrong small value.
    clamped = power * scaled_norm < L2NORM_EPS
    # Both branches are evaluated: keep the unused one finite for the gradient.
    normalized = scaled / torch.where(clamped, 1.0, scaled_norm)
    x = torch.where(clamped, x / L2NORM_EPS, normalized)
    return x.flatten(-2).to(t.dtype)


def plain_cosine_sim_attention(q, k, v, mask=None, attn_bias=None, scale=8, groups=1,
                               causal=False, l2norm_qk=True, attn_bias_batch_dim=False, *,
                               return_lse=False):
    """The same function as flash_cosine_sim_attention, written in plain PyTorch: it
    materializes the (nq, nk) score matrix and runs in the inputs' dtype (float64
    included), so it works on any device and serves as the reference."""
    causal, l2norm_qk, attn_bias_batch_dim, return_lse = check_flags(
        causal=causal, l2norm_qk=l2norm_qk, attn_bias_batch_dim=attn_bias_batch_dim,
        return_lse=return_lse)
    x = canonical_inputs(q, k, v, mask, attn_bias, scale, groups, attn_bias_batch_dim,
                         REFERENCE_DTYPES)
    q, k, v = x.q, x.k, x.v
    b, h, nq, _ = q.shape
    hk, nk = k.shape[1], k.shape[2]
    if l2norm_qk:
        q, k = l2norm_tensors(q, k, groups=groups)
    if hk != h:
        k = k.repeat_interleave(h // hk, dim=1)
        v = v.repeat_interleave(h // hk, dim=1)

    sim = q @ k.transpose(-1, -2)
    if x.scale is None:
        sim = sim * x.scale_value
    else:
        s = x.scale.to(sim.dtype)
        sim = sim * (s.view(1, h, 1, 1) if s.dim() == 1 else s)
    if x.bias is not None:
        sim = sim + x.bias.to(sim.dtype)

    visible = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=q.device)
    if x.mask is not None:
        visible = visible & x.mask[:, None, None, :]
    if causal:
        rows = torch.ones(nq, nk, dtype=torch.bool, device=q.device)
        visible = visible & rows.tril(nk - nq)
    visible = visible.expand(b, h, nq, nk)

    # A row that sees no key gets weights of zero: out 0, no gradient, no NaN.
    attn = sim.masked_fill(~visible, torch.finfo(sim.dtype).min).softmax(dim=-1)
    attn = attn.masked_fill(~visible, 0.0)
    out = attn @ v
    if x.merged:
        out = out.squeeze(1)
    if not return_lse:
        return out
    # lse in float32 (float64 for float64 input); -inf for a row that sees no key, with
    # a gradient of 0 there rather than NaN.
    s32 = sim.to(torch.promote_types(sim.dtype, torch.float32))
    lse = s32.masked_fill(~visible, torch.finfo(s32.dtype).min).logsumexp(dim=-1)
    lse = lse.masked_fill(~visible.any(dim=-1), float("-inf"))
    return out, (lse.squeeze(1) if x.merged else lse)
