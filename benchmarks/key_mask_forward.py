"""The forward under a key mask against the same call without one, in one process.

bf16, the fa shape (batch = 16384/n, heads = 2048/d), forward only, no autograd. Each
mask runs on the path the library picks (the Hopper kernel on an H100/H200) and again
with FCSA_DISABLE_SM90=1 (the portable kernels). Masks: none (the plain call), every key
visible, 25% of the keys hidden at random, and right padding of the last 25% and 50%.
Times are medians of 20 CUDA-event timings (fcsa.benchmark_decode's timer); the table
gives each mask's time over the plain call's.

    python benchmarks/key_mask_forward.py [--json PATH]
"""

import argparse
import datetime
import json
import os

import torch

import fcsa
from fcsa.benchmark_decode import median_ms


def masks(b, n):
    keys = torch.arange(n, device="cuda")[None].expand(b, n)
    return {"none": None,
            "all visible": torch.ones(b, n, dtype=torch.bool, device="cuda"),
            "25% random": torch.rand(b, n, device="cuda") >= 0.25,
            "25% padding": (keys < int(0.75 * n)).contiguous(),
            "50% padding": (keys < n // 2).contiguous()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="PATH", help="write every measurement here")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    print(f"{'d':>4} {'n':>6} {'':6} {'mask':12} {'picked, ms':>11} {'x plain':>8} {'portable, ms':>13}  backend")
    for d, n in ((128, 4096), (64, 4096), (128, 16384)):
        b, h = 16384 // n, 2048 // d
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        for causal in (False, True):
            plain_ms = None
            for name, mask in masks(b, n).items():
                row = {"d": d, "n": n, "causal": causal, "mask": name}
                for path, disable in (("picked", "0"), ("portable", "1")):
                    os.environ["FCSA_DISABLE_SM90"] = disable
                    with torch.no_grad():
                        row[path + "_ms"] = median_ms(
                            lambda: fcsa.flash_cosine_sim_attention(q, k, v, mask=mask, causal=causal),
                            q.device, runs=20, warmup=5)[0]
                        row[path + "_backend"] = fcsa.last_backend()
                os.environ.pop("FCSA_DISABLE_SM90")
                plain_ms = plain_ms or row["picked_ms"]
                row["over_plain_call"] = row["picked_ms"] / plain_ms
                rows.append(row)
                print(f"{d:4d} {n:6d} {'causal' if causal else '':6} {name:12} {row['picked_ms']:11.3f} "
                      f"{row['over_plain_call']:8.3f} {row['portable_ms']:13.3f}  {row['picked_backend']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "date": str(datetime.date.today()), "rows": rows},
                      f, indent=1)


if __name__ == "__main__":
    main()
