"""fcsa's forward and backward against cuDNN's plain attention in one process, for A/B
runs of two builds of the library (install one, run this, install the other, run again,
and compare the ratios: the baseline in each run absorbs the device's drift).

bf16, the fa shape (batch = 16384/n, heads = 2048/d), n = 1024, 4096, 16384, causal and
not; forward at d = 64 and 128, backward at d = 128 (the Hopper backward's head dim).
Times are triton's do_bench medians (L2 flushed between runs). The backward times
torch.autograd.grad of a kept graph, so the forward is not in it.

    python benchmarks/same_process_ab.py --tag NAME [--only fwd:64] [--json PATH]
"""

import argparse
import datetime
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import fcsa


def plain(q, k, v, causal):
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def fused(q, k, v, causal):
    return fcsa.flash_cosine_sim_attention(q, k, v, causal=causal)


def time_ms(fn, mode, q, k, v, causal):
    if mode == "fwd":
        with torch.no_grad():
            return do_bench(lambda: fn(q, k, v, causal), warmup=25, rep=100)
    out = fn(q, k, v, causal)
    dout = torch.randn_like(out)
    return do_bench(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True), warmup=25, rep=100)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tag", required=True, help="names this build in the table and the JSON")
    parser.add_argument("--only", metavar="MODE:D", help="one mode (fwd or bwd) at one head dim, e.g. fwd:64")
    parser.add_argument("--json", metavar="PATH", help="write every measurement here")
    args = parser.parse_args()
    plan = (("fwd", (64, 128)), ("bwd", (128,)))
    if args.only:
        mode, d = args.only.split(":")
        plan = ((mode, (int(d),)),)
    torch.manual_seed(0)
    rows = []
    for mode, dims in plan:
        for d in dims:
            for causal in (False, True):
                for n in (1024, 4096, 16384):
                    b, h = 16384 // n, 2048 // d
                    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16,
                                           requires_grad=mode == "bwd") for _ in range(3))
                    ms = time_ms(fused, mode, q, k, v, causal)
                    plain_ms = time_ms(plain, mode, q, k, v, causal)
                    flops = 4 * b * h * n * n * d * (0.5 if causal else 1) * (2.5 if mode == "bwd" else 1)
                    row = {"tag": args.tag, "mode": mode, "d": d, "n": n, "causal": causal, "ms": ms,
                           "plain_ms": plain_ms, "tflops": flops / ms / 1e9, "plain_tflops": flops / plain_ms / 1e9}
                    rows.append(row)
                    print(f"{args.tag:8s} {mode} d {d:3d} n {n:5d} {'causal' if causal else 'full  '} "
                          f"fcsa {row['tflops']:6.1f} plain {row['plain_tflops']:6.1f} TFLOP/s  "
                          f"fcsa / plain speed {plain_ms / ms:.3f}", flush=True)
                    del q, k, v
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "date": str(datetime.date.today()),
                       "fcsa": fcsa.build_info(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
