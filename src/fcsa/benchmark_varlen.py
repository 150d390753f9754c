"""Packed variable-length sequences: fcsa's varlen attention against its alternatives.

    python -m fcsa.benchmark --varlen                      # the issue's batch, bf16, d 128
    python -m fcsa.benchmark --varlen --causal --json varlen.json
    python -m fcsa.benchmark_varlen --docs 4 --min-len 64 --max-len 512 --device cpu

What is measured. A batch of --docs documents with lengths drawn uniformly from
[--min-len, --max-len] (seeded), h heads of head dim d, fresh random inputs (--dtype),
three ways, in this process on this device:

  varlen      fcsa.flash_cosine_sim_attention_varlen on the packed batch (no padding)
  one seq     fcsa.flash_cosine_sim_attention on one sequence of the mean length: the
              same kernel's speed without raggedness (the issue's 0.95x bar)
  padded      fcsa.flash_cosine_sim_attention on the batch padded to the longest
              document, with the key mask hiding the padding (what a user without varlen
              runs; the issue's 1.5x bar). Its kernels skip keys past a document's end
              but not its padded queries, so it computes at least sum_s M n_s pairs
              (M the longest; causal: sum_s n_s^2 / 2 + (M - n_s) n_s): that over the
              real pairs bounds how much faster packing can be, and is printed with it.

FLOPs count real query-key pairs only, for all three: 4*h*d * sum of n_s^2 for the
forward (halved when causal), 2.5x that for the backward. The backward is timed alone:
the forward runs once, then out.backward(dout, retain_graph=True) is timed (CUDA events;
wall time on the CPU), the median of --runs runs after --warmup.
"""

from __future__ import annotations

import argparse
import datetime
import json

import torch

from fcsa.benchmark_decode import median_ms


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MODES = ("fwd", "bwd")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m fcsa.benchmark --varlen",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--docs", type=int, default=16, help="documents in the batch")
    p.add_argument("--min-len", type=int, default=512)
    p.add_argument("--max-len", type=int, default=8192)
    p.add_argument("--dim", type=int, default=128, help="head dimension")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--runs", type=int, default=20, help="timed runs per row")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--json", metavar="PATH", help="write every measurement here")
    args = p.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.kv_heads = args.kv_heads or args.heads
    if not 1 <= args.min_len <= args.max_len:
        p.error("--min-len and --max-len: expected 1 <= min <= max")
    if args.docs < 1 or args.heads % args.kv_heads != 0:
        p.error("--docs must be positive and --heads a multiple of --kv-heads")
    return args


def inputs(args, lengths):
    """The packed batch, the same rows padded to the longest document (with the key mask),
    and one sequence of the mean length; every tensor a leaf that wants a gradient."""
    dtype, device = DTYPES[args.dtype], args.device
    h, hk, d = args.heads, args.kv_heads, args.dim
    total, longest, b = sum(lengths), max(lengths), len(lengths)
    q = torch.randn(total, h, d, dtype=dtype, device=device)
    k = torch.randn(total, hk, d, dtype=dtype, device=device)
    v = torch.randn(total, hk, d, dtype=dtype, device=device)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32,
                      device=device)
    padded = [torch.zeros(b, n_heads, longest, d, dtype=dtype, device=device)
              for n_heads in (h, hk, hk)]
    mask = torch.zeros(b, longest, dtype=torch.bool, device=device)
    start = 0
    for s, n in enumerate(lengths):
        for dst, src in zip(padded, (q, k, v)):
            dst[s, :, :n] = src[start:start + n].transpose(0, 1)
        mask[s, :n] = True
        start += n
    mean = round(total / b)
    one = [torch.randn(1, n_heads, mean, d, dtype=dtype, device=device) for n_heads in (h, hk, hk)]
    grad = lambda ts: [t.requires_grad_() for t in ts]  # noqa: E731
    return (grad([q, k, v]), cu), (grad(padded), mask), grad(one)


def timed(name, forward, leaves, mode, args):
    """(median, min, max) ms of the forward (no autograd) or of the backward alone."""
    device = args.device
    if mode == "fwd":
        with torch.no_grad():
            return median_ms(forward, device, args.runs, args.warmup)
    out = forward()
    dout = torch.randn_like(out)

    def reset():
        for t in leaves:
            t.grad = None

    return median_ms(lambda: out.backward(dout, retain_graph=True), device, args.runs,
                     args.warmup, reset)


def main(argv=None) -> int:
    args = parse_args(argv)
    import fcsa

    gen = torch.Generator().manual_seed(args.seed)
    lengths = torch.randint(args.min_len, args.max_len + 1, (args.docs,), generator=gen).tolist()
    (packed, cu), (padded, mask), one = inputs(args, lengths)
    mean = one[0].shape[2]
    h, d = args.heads, args.dim
    causal = args.causal

    def pair_flops(ns):
        return 4 * h * d * sum(n * n for n in ns) * (0.5 if causal else 1.0)

    # The least the padded batch computes (padded queries, not padded keys), over the real pairs.
    longest = max(lengths)
    padded_pairs = sum(n * n / 2 + (longest - n) * n if causal else longest * n for n in lengths)
    padded_floor = padded_pairs / (sum(n * n for n in lengths) * (0.5 if causal else 1.0))

    impls = {
        "varlen": (lambda: fcsa.flash_cosine_sim_attention_varlen(
            *packed, cu, cu, causal=causal), packed, pair_flops(lengths)),
        "one seq": (lambda: fcsa.flash_cosine_sim_attention(*one, causal=causal), one,
                    pair_flops([mean])),
        "padded": (lambda: fcsa.flash_cosine_sim_attention(*padded, mask=mask, causal=causal),
                   padded, pair_flops(lengths)),
    }
    name = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "cpu"
    print(f"packed sequences on {name}; {fcsa.build_info()}")
    print(f"{args.docs} documents, lengths {args.min_len}-{args.max_len} (seed {args.seed}): "
          f"total {sum(lengths)}, longest {max(lengths)}, mean {mean}; heads {h}/"
          f"{args.kv_heads}, d {d}, {args.dtype}{', causal' if causal else ''}")
    print("TFLOP/s count real query-key pairs only (padding excluded)")
    records = []
    for mode in args.modes:
        print(f"{'forward' if mode == 'fwd' else 'backward'}:")
        rates = {}
        for label, (forward, leaves, flops) in impls.items():
            try:
                ms, fastest, slowest = timed(label, forward, leaves, mode, args)
            except (RuntimeError, NotImplementedError, ValueError) as err:
                print(f"  {label:<8} failed: {str(err).splitlines()[0][:70]}")
                records.append(dict(impl=label, mode=mode, status="failed", error=str(err)))
                continue
            tflops = flops * FLOP_FACTOR[mode] / (ms * 1e-3) / 1e12
            rates[label] = tflops
            print(f"  {label:<8} {ms:9.3f} ms ({fastest:.3f}-{slowest:.3f})  {tflops:7.2f} TFLOP/s")
            records.append(dict(impl=label, mode=mode, status="ok", ms=ms, min_ms=fastest,
                                max_ms=slowest, tflops=tflops))
        if "varlen" in rates:
            for other, bar in (("one seq", 0.95), ("padded", 1.5)):
                if other in rates:
                    ratio = rates["varlen"] / rates[other]
                    verdict = "meets" if ratio >= bar else "misses"
                    print(f"  varlen / {other}: {ratio:.2f}x ({verdict} the {bar}x bar)")
                    if other == "padded":
                        print(f"  (the padded batch computes at least {padded_floor:.2f}x the real pairs: "
                              f"{ratio / padded_floor:.0%} of that)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                           device=name, build=fcsa.build_info(), lengths=lengths,
                           padded_floor=padded_floor,
                           args={k: str(v) if isinstance(v, torch.device) else v
                                 for k, v in vars(args).items()},
                           records=records), f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
