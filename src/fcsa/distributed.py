"""Context parallelism: exact ring attention over a torch.distributed process group.

Each rank of the group holds a part of the sequence (shard_sequence). ring_attention
passes the keys and values around the ring, one hop per step: at each step a rank
attends its queries to the block it holds while it sends that block on to the next
rank and receives the following one from the previous, and it combines the partial
results exactly through their log-sum-exp (SPEC.md, "Statistics for composition").
The backward passes the keys and values around again, and with them the running sums
of their gradients, which arrive back at their owner after one full turn; each step's
backward takes the combined out and lse of the forward, so that its gradients are that
block's exact share.

With causal=True the sequence is cut into 2 * world chunks and rank r holds chunks r
and 2 * world - 1 - r: every rank then does the same work (a rank holding only the
start of the sequence would otherwise skip most of it), and each step computes only
the blocks that causality leaves visible.

The communication is torch.distributed's point-to-point operations (NCCL on GPUs, gloo
on CPUs); nothing here is specific to a backend.
"""

import numbers

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _ops
from ._inputs import KERNEL_DTYPES, canonical_inputs, check_flags
from .module import CosineSimAttention

__all__ = ["RingCosineSimAttention", "gather_sequence", "ring_attention", "shard_sequence"]


# ---------------------------------------------------------------- the group

def _rank_and_size(group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("fcsa.distributed needs torch.distributed initialized "
                           "(torch.distributed.init_process_group)")
    return dist.get_rank(group), dist.get_world_size(group)


class _Ring:
    """This rank's place in the ring of `group`: it sends to the next rank and
    receives from the previous one."""

    def __init__(self, group):
        self.group = group
        self.rank, self.size = _rank_and_size(group)
        peer = (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))
        self.next = peer((self.rank + 1) % self.size)
        self.prev = peer((self.rank - 1) % self.size)

    def pass_on(self, tensors, tag):
        """Starts sending `tensors` (contiguous) to the next rank and receiving tensors
        of the same shapes from the previous one; returns a _Transfer. Every rank must
        call it in the same order: the transfers are matched by their order, and by
        tag (tag + i for the i-th tensor) where the backend has tags (gloo)."""
        if self.size == 1:
            return _Transfer([], tensors, tensors)
        received = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group, tag + i)
               for i, t in enumerate(tensors)]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group, tag + i)
                for i, t in enumerate(received)]
        return _Transfer(dist.batch_isend_irecv(ops), tensors, received)


class _Transfer:
    def __init__(self, requests, sent, received):
        # The tensors being sent stay referenced until the transfer is waited for: on a
        # GPU the communication stream may still read them after Python lets go.
        self.requests, self.sent, self.received = requests, sent, received

    def wait(self):
        """The received tensors, once every send and receive has completed (on a GPU:
        once the current stream waits for them)."""
        for request in self.requests:
            request.wait()
        self.sent = None
        return self.received


# ---------------------------------------------------------------- shards

def _check_dim(x, dim):
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must index one of x's {x.dim()} dims, got {dim}")
    return dim % x.dim()


def _chunk_count(n, size, causal, what):
    """The number of equal chunks a sequence of n positions is cut into; a ValueError
    naming `what` when n does not split evenly."""
    chunks = 2 * size if causal else size
    if n % chunks != 0:
        how = (f"2 * world size = {chunks} equal chunks (causal=True: two per rank)"
               if causal else f"world size = {size} equal parts")
        raise ValueError(f"{what} has {n} positions, which do not split into {how}; "
                         "pad the sequence to a multiple")
    return chunks


def shard_sequence(x, dim=2, group=None, causal=False):
    """This rank's part of the sequence in x (the whole of it, the same on every rank)
    along `dim`: the rank-th of world equal parts; with causal=True chunks rank and
    2 * world - 1 - rank of 2 * world equal chunks, concatenated (the load-balanced
    layout ring_attention(causal=True) expects, the same as PyTorch's head-tail load
    balancer). Differentiable. A length that does not split evenly is a ValueError."""
    dim = _check_dim(x, dim)
    (causal,) = check_flags(causal=causal)
    rank, size = _rank_and_size(group)
    chunks = _chunk_count(x.shape[dim], size, causal, f"x along dim {dim}")
    pieces = x.chunk(chunks, dim)
    if not causal:
        return pieces[rank]
    return torch.cat([pieces[rank], pieces[chunks - 1 - rank]], dim)


def _reorder(parts, dim, causal):
    """The whole sequence from the ranks' parts, in rank order."""
    if not causal:
        return torch.cat(parts, dim)
    halves = [p.chunk(2, dim) for p in parts]
    return torch.cat([h[0] for h in halves] + [h[1] for h in reversed(halves)], dim)


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group, causal):
        ctx.dim, ctx.group, ctx.causal = dim, group, causal
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x, group=group)
        return _reorder(parts, dim, causal)

    @staticmethod
    def backward(ctx, grad):
        # Every rank's result depends on every rank's part: a part's gradient is the
        # sum over the ranks of the gradients of their results. (An all-reduce, which
        # every backend has; a reduce-scatter would move less, but older torch's gloo
        # lacks it, and gathering a sequence is not on the training path.)
        grad = grad.clone(memory_format=torch.contiguous_format)  # autograd's, or the caller's
        dist.all_reduce(grad, group=ctx.group)
        return shard_sequence(grad, ctx.dim, ctx.group, ctx.causal), None, None, None


def gather_sequence(x, dim=2, group=None, causal=False):
    """The whole sequence from every rank's part x along `dim` (the inverse of
    shard_sequence with the same dim and causal); every rank's x must have the same
    shape. Differentiable: the gradient of a part is the sum over the ranks of the
    gradients of their gathered results."""
    dim = _check_dim(x, dim)
    (causal,) = check_flags(causal=causal)
    _, size = _rank_and_size(group)
    if causal and x.shape[dim] % 2 != 0:
        raise ValueError(f"x along dim {dim} has {x.shape[dim]} positions: with "
                         "causal=True a rank's part is two equal chunks, an even number")
    return _GatherSequence.apply(x, dim, group, causal)


# ---------------------------------------------------------------- ring attention

def _blocks(rank, source, n, causal):
    """(query rows, key rows, causal) of the block that this rank's queries attend to
    in the keys of rank `source` (n positions each); the rest of the n x n pairs is
    hidden by causality and not computed. With causal=True a rank holds chunks r and
    2W-1-r (of length c = n / 2 each):
      its own keys: its own two chunks, causal (chunk r precedes chunk 2W-1-r);
      source < rank: both query chunks see all of the source's first chunk (it is
        earlier than both) and none of its second (later than both);
      source > rank: the first query chunk sees nothing (both key chunks are later), the
        second sees both key chunks (both earlier)."""
    everything = slice(None)
    if not causal:
        return everything, everything, False
    c = n // 2
    if source == rank:
        return everything, everything, True
    if source < rank:
        return everything, slice(0, c), False
    return slice(c, n), everything, False


# The backward has a block of keys and values and the sums of their gradients in flight
# at once: distinct tags keep them apart.
_KV_TAG, _DKV_TAG = 0, 2


def _merge(out, lse, part_out, part_lse):
    """out, lse (float32 views) := the combination with a partial result over other
    keys, in place: out = (e^lse out + e^part_lse part_out) / (e^lse + e^part_lse)."""
    total = torch.logaddexp(lse, part_lse)
    # A row that no key reaches keeps lse = -inf and out = 0 (never exp(-inf + inf)).
    safe = torch.where(total == float("-inf"), 0.0, total)
    out.mul_(torch.exp(lse - safe).unsqueeze(-1))
    out.add_(part_out * torch.exp(part_lse - safe).unsqueeze(-1))
    lse.copy_(total)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, scale_value, groups, causal, l2norm_qk, float32_out,
                group):
        ring = _Ring(group)
        n = q.shape[2]
        flags = (scale_value, groups)
        out = lse = None
        kv = (k, v)
        for step in range(ring.size):
            # The next block travels while this one is computed.
            transfer = ring.pass_on(kv, _KV_TAG) if step + 1 < ring.size else None
            rows, keys, block_causal = _blocks(ring.rank, (ring.rank - step) % ring.size,
                                               n, causal)
            part_out, part_lse = torch.ops.fcsa.forward(
                q[:, :, rows], kv[0][:, :, keys], kv[1][:, :, keys], None, None, scale,
                *flags, block_causal, l2norm_qk, False, True, float32_out)
            if out is None:  # step 0: this rank's own keys, which cover every row
                # Combined in float32; the backward takes delta = <dO, O> from it.
                out, lse = part_out.float(), part_lse
            else:
                _merge(out[:, :, rows], lse[:, :, rows], part_out, part_lse)
            if transfer is not None:
                kv = tuple(transfer.wait())
        ctx.save_for_backward(q, k, v, scale, out, lse)
        ctx.flags = (scale_value, groups, causal, l2norm_qk)
        ctx.group = group
        ctx.mark_non_differentiable(lse)
        return out.to(q.dtype), lse

    @staticmethod
    @once_differentiable  # fcsa's backward has no derivative: say so on a double backward
    def backward(ctx, dout, _dlse):
        q, k, v, scale, out, lse = ctx.saved_tensors
        scale_value, groups, causal, l2norm_qk = ctx.flags
        ring = _Ring(ctx.group)
        n = q.shape[2]
        need_dscale = scale is not None and ctx.needs_input_grad[3]
        dout = _ops.last_dim_contiguous(dout.to(q.dtype))
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dscale = torch.zeros_like(scale) if need_dscale else None
        kv = (k, v)
        dkv = None  # the transfer bringing the running dk, dv of the block held now
        for step in range(ring.size):
            transfer = ring.pass_on(kv, _KV_TAG) if step + 1 < ring.size else None
            rows, keys, block_causal = _blocks(ring.rank, (ring.rank - step) % ring.size,
                                               n, causal)
            gq, gk, gv, _, gscale = torch.ops.fcsa.backward(
                dout[:, :, rows], q[:, :, rows], kv[0][:, :, keys], kv[1][:, :, keys],
                None, None, scale, out[:, :, rows], lse[:, :, rows], scale_value, groups,
                block_causal, l2norm_qk, False, False, need_dscale)
            dq[:, :, rows] += gq
            if need_dscale:
                dscale += gscale
            # The sums of the block's gradients over the ranks it has visited so far
            # (float32, so that the ring's additions do not round).
            if dkv is None:
                dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
                dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
            else:
                dk, dv = dkv.wait()
            dk[:, :, keys] += gk
            dv[:, :, keys] += gv
            # On to the next rank, overlapped with the next step's compute; after the
            # last step this brings back the sums for this rank's own keys.
            dkv = ring.pass_on((dk, dv), _DKV_TAG)
            if transfer is not None:
                kv = tuple(transfer.wait())
        dk, dv = dkv.wait()
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dscale,
                None, None, None, None, None, None)


def ring_attention(q, k, v, group=None, *, causal=False, scale=8, groups=1, l2norm_qk=True,
                   return_lse=False):
    """flash_cosine_sim_attention over a sequence split across the ranks of `group`
    (None: the default group), exact: each rank gets the rows of the whole attention
    that its queries own.

    Args:
        q: (b, h, n_q, d), this rank's part of the queries (shard_sequence along dim 2,
            with the same causal).
        k, v: (b, hk, n_k, d) and (b, hk, n_k, d_v) with h % hk == 0 (grouped-query and
            single-headed kv as in flash_cosine_sim_attention; 3-D (b, n_k, d) is
            single-headed), this rank's part of the keys and values. Every rank's k and
            v have the same shapes. Without causal, n_k may differ from n_q (cross
            attention); with causal the queries and keys are the same positions.
        causal: each position attends to itself and the ones before it; the parts must
            then be shard_sequence(..., causal=True)'s load-balanced ones.
        scale: a float, or a tensor of shape () or (h,) (the same on every rank). Its
            gradient on each rank is that of the rank's own queries' outputs, as for
            every parameter the ranks share (the projections too): summing the ranks'
            gradients over the group, as data parallelism does for replicated
            parameters, gives the gradient of the whole.
        groups, l2norm_qk: as in flash_cosine_sim_attention.
        return_lse: also return lse (b, h, n_q), float32, of this rank's queries over
            the whole sequence; it carries no gradient.

    Every rank of the group must call it with the same arguments but for the tensors'
    values; the gradients of q, k and v come back on the rank that holds them.
    """
    (causal, l2norm_qk, return_lse) = check_flags(causal=causal, l2norm_qk=l2norm_qk,
                                                  return_lse=return_lse)
    if isinstance(q, Tensor) and q.dim() == 3:
        raise ValueError(f"q must be 4-D (batch, heads, seq, dim) for ring_attention, got "
                         f"shape {tuple(q.shape)}: the sequence is split along dim 2")
    x = canonical_inputs(q, k, v, None, None, scale, groups, False, KERNEL_DTYPES)
    if x.q.device.type not in ("cpu", "cuda"):
        raise NotImplementedError(f"fcsa runs on CPU and CUDA tensors; q is on {x.q.device}")
    nq, nk = x.q.shape[2], x.k.shape[2]
    if causal and nq != nk:
        raise ValueError(f"with causal=True, q and k must be the same positions (this "
                         f"rank's part of one sequence), got {nq} queries and {nk} keys")
    if causal and nq % 2 != 0:
        raise ValueError(f"with causal=True, q's part of the sequence (dim 2) is two equal "
                         f"chunks (shard_sequence(..., causal=True)), so an even length; "
                         f"got {nq}")
    _rank_and_size(group)
    # Contiguous: they are sent as they are (the kernels only need the last dim so).
    q = _ops.last_dim_contiguous(x.q)
    k, v = x.k.contiguous(), x.v.contiguous()
    scale_t = None if x.scale is None else x.scale.float().contiguous()
    # As in flash_cosine_sim_attention: 16-bit partial outputs, but for dscale, a sum
    # that cancels, whose delta = <dO, O> needs O unrounded. (The Hopper forward writes
    # 16-bit outputs only.)
    float32_out = (q.dtype != torch.float32 and scale_t is not None and
                   scale_t.requires_grad and torch.is_grad_enabled())
    out, lse = _RingAttention.apply(q, k, v, scale_t, x.scale_value, int(groups), causal,
                                    l2norm_qk, float32_out, group)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------- module

class RingCosineSimAttention(CosineSimAttention):
    """CosineSimAttention over a sequence split across the ranks of `group` (None: the
    default group): x (b, n, dim) is this rank's part of the sequence,
    shard_sequence(x, dim=1, causal=causal), and so is the result. The same arguments
    as CosineSimAttention, and `group`. Its parameters' gradients on each rank are
    those of the rank's part: sum (or, for a mean loss per rank, average) them over the
    group, as DistributedDataParallel does for the ranks of a batch."""

    def __init__(self, dim, *, group=None, **kwargs):
        super().__init__(dim, **kwargs)
        self.group = group

    def forward(self, x, context=None):
        """context: this rank's part of a sequence to attend to (cross attention, not
        causal); None: x."""
        if context is not None and self.causal:
            raise ValueError("context is not supported with causal=True: ring attention "
                             "is causal over one sequence, x's")
        q, k, v = self._project(x, context)
        out = ring_attention(q, k, v, self.group, causal=self.causal, scale=self.scale,
                             groups=self.groups)
        return self._merge_heads(out)
