"""CosineSimAttention: a multi-head attention layer built on the fused kernel."""

import torch
from torch import nn

from ._inputs import check_flags, check_scale_value
from .attention import flash_cosine_sim_attention
from .varlen import flash_cosine_sim_attention_varlen


class CosineSimAttention(nn.Module):
    """Multi-head cosine-similarity attention with its projections.

    x (b, n, dim) -> (b, n, dim), or a packed batch (total, dim) -> (total, dim) with
    cu_seqlens (see forward). Queries come from x; keys and values from `context` when
    given (cross attention), else from x.

    Args:
        dim: model width of x.
        heads: query heads.
        dim_head: width of each head of the queries and keys.
        dim_head_v: width of each value head (and so of the attention's output per
            head); None: dim_head.
        kv_heads: key/value heads (grouped-query attention); None: heads. Must divide
            heads; 1 is single-headed key/values.
        scale: the logit scale (temperature), a number finite in float32.
        learned_scale: make the scale a learnable per-head parameter, initialized to
            `scale` (a bool).
        causal: each position attends to itself and the ones before it (aligned to the
            end when the context is longer); a bool.
        groups: l2norm over this many chunks of each head.
        dim_context: width of `context`; None: dim.
    """

    def __init__(self, dim, *, heads=8, dim_head=64, kv_heads=None, scale=8.0,
                 learned_scale=False, causal=False, groups=1, dim_context=None,
                 dim_head_v=None):
        super().__init__()
        causal, learned_scale = check_flags(causal=causal, learned_scale=learned_scale)
        scale = check_scale_value("scale", scale, "a number")
        kv_heads = heads if kv_heads is None else kv_heads
        if kv_heads < 1 or heads % kv_heads != 0:
            raise ValueError(f"kv_heads ({kv_heads}) must divide heads ({heads})")
        dim_head_v = dim_head if dim_head_v is None else dim_head_v
        self.heads, self.kv_heads, self.dim_head = heads, kv_heads, dim_head
        self.dim_head_v = dim_head_v
        self.causal, self.groups = causal, groups
        dim_context = dim if dim_context is None else dim_context
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim_context, kv_heads * (dim_head + dim_head_v), bias=False)
        self.to_out = nn.Linear(heads * dim_head_v, dim, bias=False)
        if learned_scale:
            self.scale = nn.Parameter(torch.full((heads,), scale))
        else:
            self.scale = scale

    def forward(self, x, context=None, mask=None, attn_bias=None, *, cu_seqlens=None,
                cu_seqlens_context=None):
        """mask: bool (b, context length), True = attend. attn_bias: as in
        flash_cosine_sim_attention, (heads, n, context length) or 4-D broadcastable.

        A packed batch (no padding): x (total, dim) holds the sequences one after another
        and cu_seqlens (int32 (b + 1,)) where each starts; context (total_context,
        dim_context) with cu_seqlens_context likewise (default: x and cu_seqlens). Each
        sequence attends to its own context only (flash_cosine_sim_attention_varlen);
        returns (total, dim). No mask or attn_bias then."""
        if cu_seqlens is not None or cu_seqlens_context is not None:
            return self._forward_packed(x, context, mask, attn_bias, cu_seqlens,
                                        cu_seqlens_context)
        q, k, v = self._project(x, context)
        out = flash_cosine_sim_attention(q, k, v, mask=mask, attn_bias=attn_bias,
                                         scale=self.scale, groups=self.groups,
                                         causal=self.causal)
        return self._merge_heads(out)

    def _project(self, x, context):
        """q (b, heads, n, dim_head), k and v (b, kv_heads, m, dim_head[_v]) of x and
        the context (x itself when None)."""
        context = x if context is None else context
        b, n, _ = x.shape
        m = context.shape[1]
        # (b, n, heads * dim_head) -> (b, heads, n, dim_head): views, no copies.
        q = self.to_q(x).view(b, n, self.heads, self.dim_head).transpose(1, 2)
        k, v = self.to_kv(context).split(
            [self.kv_heads * self.dim_head, self.kv_heads * self.dim_head_v], dim=-1)
        k = k.reshape(b, m, self.kv_heads, self.dim_head).transpose(1, 2)
        v = v.reshape(b, m, self.kv_heads, self.dim_head_v).transpose(1, 2)
        return q, k, v

    def _merge_heads(self, out):
        """The attention's (b, heads, n, dim_head_v) through the output projection."""
        b, _, n, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head_v))

    def _forward_packed(self, x, context, mask, attn_bias, cu_seqlens, cu_seqlens_context):
        if cu_seqlens is None:
            raise ValueError("cu_seqlens_context needs cu_seqlens (the offsets of x)")
        if mask is not None or attn_bias is not None:
            raise ValueError("a packed batch (cu_seqlens) takes no mask or attn_bias: leave "
                             "the masked keys out of the packed context instead")
        if x.dim() != 2:
            raise ValueError(f"x must be (total, dim) with cu_seqlens, got shape {tuple(x.shape)}")
        if context is None:
            context = x
            cu_seqlens_context = cu_seqlens if cu_seqlens_context is None else cu_seqlens_context
        elif cu_seqlens_context is None:
            raise ValueError("a packed context needs cu_seqlens_context (its offsets)")
        if context.dim() != 2:
            raise ValueError(f"context must be (total, dim_context) with cu_seqlens, got shape "
                             f"{tuple(context.shape)}")
        n, m = x.shape[0], context.shape[0]
        q = self.to_q(x).view(n, self.heads, self.dim_head)
        k, v = self.to_kv(context).split(
            [self.kv_heads * self.dim_head, self.kv_heads * self.dim_head_v], dim=-1)
        k = k.reshape(m, self.kv_heads, self.dim_head)
        v = v.reshape(m, self.kv_heads, self.dim_head_v)
        out = flash_cosine_sim_attention_varlen(q, k, v, cu_seqlens, cu_seqlens_context,
                                                scale=self.scale, groups=self.groups,
                                                causal=self.causal)
        return self.to_out(out.reshape(n, self.heads * self.dim_head_v))

    def extra_repr(self):
        return (f"heads={self.heads}, kv_heads={self.kv_heads}, dim_head={self.dim_head}, "
                f"dim_head_v={self.dim_head_v}, causal={self.causal}, groups={self.groups}")
