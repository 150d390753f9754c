"""Causal ring attention over the processes torchrun starts, checked against one process
attending to the whole sequence:

    torchrun --nproc-per-node 4 examples/ring_attention.py [--seq-len N] [--dtype bfloat16]

One GPU per process with NCCL where CUDA is available, else gloo on the CPU.
"""

import argparse
import os

import torch
import torch.distributed as dist

import fcsa
from fcsa.distributed import gather_sequence, ring_attention, shard_sequence


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--dtype", default="float32",
                        choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)

    cuda = torch.cuda.is_available()
    device = (torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda
              else torch.device("cpu"))
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    # The same whole sequence on every rank (one seed), so that each can check its part.
    torch.manual_seed(0)
    b, h, kv_heads, d, n = 1, 8, 2, 64, args.seq_len
    q = torch.randn(b, h, n, d, device=device, dtype=dtype)
    k = torch.randn(b, kv_heads, n, d, device=device, dtype=dtype)
    v = torch.randn(b, kv_heads, n, d, device=device, dtype=dtype)

    # Each rank keeps chunks r and 2 * world - 1 - r of the sequence (load-balanced causal).
    q_part, k_part, v_part = (shard_sequence(t, causal=True).requires_grad_()
                              for t in (q, k, v))
    out_part = ring_attention(q_part, k_part, v_part, causal=True)
    out_part.sum().backward()
    out = gather_sequence(out_part.detach(), causal=True)

    q, k, v = (t.requires_grad_() for t in (q, k, v))
    expected = fcsa.flash_cosine_sim_attention(q, k, v, causal=True)
    expected.sum().backward()
    errors = {"out": (out - expected).abs().max(),
              "dq": (q_part.grad - shard_sequence(q.grad, causal=True)).abs().max(),
              "dk": (k_part.grad - shard_sequence(k.grad, causal=True)).abs().max()}
    if rank == 0:
        differences = ", ".join(f"{name} {err.item():.2e}" for name, err in errors.items())
        print(f"{world} ranks, {n} positions, {args.dtype}: largest difference from one "
              f"process: {differences}")
    # Every rank done before any tears down: a peer that leaves early can abort a gloo
    # rank still shutting down.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
