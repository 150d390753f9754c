"""Times libfcsa's CPU backend against PyTorch's CPU path for the same function:

    F.scaled_dot_product_attention(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, scale=8)

    python cuda/tests/cpu/bench_cpu_backend.py [--threads 2] [--lengths 512 1024 2048 4096]

float32, b=2, h=8, d=64 by default; torch.set_num_threads and the library's num_threads
are the same. Reports, in ms, the fastest of several runs of the forward and of forward +
backward, fcsa and torch taking turns (the machine may be shared), and the ratio
fcsa / torch (below 1: fcsa is faster), then the process's peak resident memory.
"""
import argparse
import ctypes
import os
import resource
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fcsa_ctypes as fc  # noqa: E402


def best_ms(functions, repeats):
    """The fastest of `repeats` runs of each function, taking turns between them, so that
    a busy spell on a shared machine hits every contender alike."""
    for fn in functions:
        fn()  # warm-up
    best = [float("inf")] * len(functions)
    for _ in range(repeats):
        for i, fn in enumerate(functions):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], (time.perf_counter() - start) * 1e3)
    return best


class FcsaCall:
    """Descriptors, outputs and workspaces built once, so a timed call is the library alone."""

    def __init__(self, lib, q, k, v, dout, threads, causal):
        self.lib = lib
        self.out = torch.empty_like(q)
        self.lse = torch.empty(q.shape[:3])
        self.dq, self.dk, self.dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        self.keep = [fc.describe(x) for x in (q, k, v, self.out, self.lse, dout, self.dq, self.dk, self.dv)]
        dq_, dk_, dv_ = self.keep[6:]
        q_, k_, v_, out_, lse_, dout_ = self.keep[:6]
        p = fc.pointer
        self.options = fc.make_options(lib, 8.0, 1, causal, True, threads)
        self.forward_tensors = fc.ForwardTensors(ctypes.sizeof(fc.ForwardTensors), p(q_), p(k_), p(v_), None,
                                                 None, None, p(out_), p(lse_))
        self.backward_tensors = fc.BackwardTensors(ctypes.sizeof(fc.BackwardTensors), p(q_), p(k_), p(v_), None,
                                                   None, None, p(out_), p(dout_), p(lse_), p(dq_), p(dk_), p(dv_),
                                                   None, None)
        size = ctypes.c_size_t()
        fc.check(lib, lib.fcsa_forward_workspace_size(ctypes.byref(self.options), ctypes.byref(self.forward_tensors),
                                                      ctypes.byref(size)))
        self.forward_workspace = torch.empty(max(size.value, 1), dtype=torch.uint8)
        fc.check(lib, lib.fcsa_backward_workspace_size(ctypes.byref(self.options),
                                                       ctypes.byref(self.backward_tensors), ctypes.byref(size)))
        self.backward_workspace = torch.empty(max(size.value, 1), dtype=torch.uint8)

    def forward(self):
        w = self.forward_workspace
        fc.check(self.lib, self.lib.fcsa_forward(ctypes.byref(self.options), ctypes.byref(self.forward_tensors),
                                                 w.data_ptr(), w.numel(), None))

    def forward_backward(self):
        self.forward()
        w = self.backward_workspace
        fc.check(self.lib, self.lib.fcsa_backward(ctypes.byref(self.options), ctypes.byref(self.backward_tensors),
                                                  w.data_ptr(), w.numel(), None))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--library", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lib = fc.load(args.library)
    print(lib.fcsa_build_info().decode(), f"| torch {torch.__version__}, {args.threads} threads", flush=True)
    print(f"b={args.batch} h={args.heads} d={args.dim} float32 causal={args.causal}; best ms of {args.repeats}")
    print(f"{'n':>6} {'fwd fcsa':>9} {'fwd torch':>9} {'ratio':>6} {'f+b fcsa':>9} {'f+b torch':>9} {'ratio':>6}")
    for n in args.lengths:
        torch.manual_seed(0)
        shape = (args.batch, args.heads, n, args.dim)
        q, k, v, dout = (torch.randn(shape) for _ in range(4))
        call = FcsaCall(lib, q, k, v, dout, args.threads, args.causal)
        repeats = args.repeats if n <= 4096 else 1
        if args.no_torch:
            fwd, fwd_bwd = best_ms([call.forward, call.forward_backward], repeats)
            print(f"{n:6d} {fwd:9.1f} {'-':>9} {'-':>6} {fwd_bwd:9.1f} {'-':>9} {'-':>6}", flush=True)
            continue
        qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))

        def torch_forward():
            with torch.no_grad():
                F.scaled_dot_product_attention(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, scale=8.0,
                                               is_causal=args.causal)

        def torch_forward_backward():
            out = F.scaled_dot_product_attention(F.normalize(qg, dim=-1), F.normalize(kg, dim=-1), vg, scale=8.0,
                                                 is_causal=args.causal)
            out.backward(dout)
            qg.grad = kg.grad = vg.grad = None

        fwd, tf = best_ms([call.forward, torch_forward], repeats)
        fwd_bwd, tfb = best_ms([call.forward_backward, torch_forward_backward], repeats)
        print(f"{n:6d} {fwd:9.1f} {tf:9.1f} {fwd / tf:6.2f} {fwd_bwd:9.1f} {tfb:9.1f} {fwd_bwd / tfb:6.2f}",
              flush=True)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory of this process: {peak_mib:.0f} MiB")


if __name__ == "__main__":
    main()
