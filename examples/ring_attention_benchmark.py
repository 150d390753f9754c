"""Step time, throughput and peak memory of causal ring attention (forward and backward)
with a fixed sequence length per rank (weak scaling):

    torchrun --nproc-per-node 8 examples/ring_attention_benchmark.py --seq-len-per-rank 131072
    torchrun --nproc-per-node 1 examples/ring_attention_benchmark.py --seq-len-per-rank 131072 --single

--single times flash_cosine_sim_attention itself on one rank's sequence (the one-device
baseline). Each rank makes only its own part of q, k, v, so the whole sequence never has
to fit one device. Prints one JSON line (rank 0): the world size, the whole length, the
median step time (the slowest rank's), tokens per second per rank, attention TFLOP/s per
rank (4·b·h·n²·d for the forward, halved for causal, times 3.5 for forward and backward,
divided over the ranks) and the largest peak of allocated GPU memory.

Tokens per second per rank cannot stay flat as ranks are added: the attention's work per
token grows with the whole length. TFLOP/s per rank is what stays flat when the ring
hides its communication.
"""

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

import fcsa
from fcsa.distributed import ring_attention


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len-per-rank", type=int, default=131072)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--dim-head", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16",
                        choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--single", action="store_true",
                        help="flash_cosine_sim_attention on one rank, no ring (the baseline)")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device = (torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda
              else torch.device("cpu"))
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.single and world != 1:
        raise SystemExit("--single is the one-device baseline: run it with one process")

    n = args.seq_len_per_rank
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(rank)
    shape = (args.batch, args.heads, n, args.dim_head)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    dout = torch.randn(shape, device=device, dtype=dtype)

    def step():
        if args.single:
            out = fcsa.flash_cosine_sim_attention(q, k, v, causal=True)
        else:
            out = ring_attention(q, k, v, causal=True)
        out.backward(dout)
        q.grad = k.grad = v.grad = None

    def synchronize():
        if cuda:
            torch.cuda.synchronize(device)
        dist.barrier()

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.iters):
        synchronize()
        start = time.perf_counter()
        step()
        synchronize()
        times.append(time.perf_counter() - start)

    # The slowest rank's median, the largest peak: what the group as a whole achieves.
    summary = torch.tensor([statistics.median(times),
                            torch.cuda.max_memory_allocated(device) if cuda else 0.0],
                           dtype=torch.float64, device=device)
    dist.all_reduce(summary, op=dist.ReduceOp.MAX)
    seconds, peak = summary.tolist()
    whole = n * world
    flops = 4.0 * args.batch * args.heads * whole * whole * args.dim_head / 2 * 3.5
    if rank == 0:
        print(json.dumps({
            "world": world, "single": args.single, "seq_len": whole, "seq_len_per_rank": n,
            "batch": args.batch, "heads": args.heads, "dim_head": args.dim_head,
            "dtype": args.dtype, "device": torch.cuda.get_device_name(device) if cuda else "cpu",
            "step_ms": round(seconds * 1e3, 3),
            "tokens_per_s_per_rank": round(n * args.batch / seconds, 1),
            "tflops_per_rank": round(flops / world / seconds / 1e12, 3),
            "peak_memory_gib": round(peak / 2**30, 3)}))
    # Every rank done before any tears down: a peer that leaves early can abort a gloo
    # rank still shutting down.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
