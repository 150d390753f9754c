"""Where a short sequence's forward goes: host time per call, and each kernel's device
time, fcsa against cuDNN's plain attention.

bf16, the fa shape (batch = 16384/n, heads = 2048/d), no mask. "host" is the CPU time
per call with the GPU running behind (50 calls, no synchronization); "wall" adds the
final synchronization; the kernels' times are torch.profiler's device times per call
over 20 calls.

    python benchmarks/small_forward_breakdown.py
"""

import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

import fcsa


def plain(q, k, v):
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


def main():
    torch.manual_seed(0)
    for d, n in ((128, 512), (128, 1024), (64, 1024), (128, 4096)):
        b, h = 16384 // n, 2048 // d
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        for name, fn in (("fcsa", fcsa.flash_cosine_sim_attention), ("plain", plain)):
            with torch.no_grad():
                for _ in range(10):
                    fn(q, k, v)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(50):
                    fn(q, k, v)
                t1 = time.perf_counter()
                torch.cuda.synchronize()
                t2 = time.perf_counter()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(20):
                        fn(q, k, v)
                    torch.cuda.synchronize()
            kernels = "; ".join(f"{e.key[:60]} {e.device_time_total / e.count:.1f} us x{e.count // 20}"
                                for e in prof.key_averages() if e.device_time_total > 0)
            print(f"d {d} n {n} {name:5s} host {1e6 * (t1 - t0) / 50:7.1f} us/call  "
                  f"wall {1e6 * (t2 - t0) / 50:7.1f} us/call  kernels: {kernels}", flush=True)


if __name__ == "__main__":
    main()
