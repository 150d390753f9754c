"""Decoding over a KV cache: achieved memory bandwidth of fcsa against SDPA.

    python -m fcsa.benchmark --decode                     # the issue's shapes, d 64 and 128
    python -m fcsa.benchmark --decode --nq 1 4 16 --paged 16 64 --json decode.json
    python -m fcsa.benchmark_decode --case 2,8,2,4096 --dims 64 --device cpu   # any shape

What is measured. Each case is (b, h, hk, nk): b sequences of nk cached keys each, h query
heads over hk kv heads, nq query rows (1: decoding). Every implementation gets the same
fresh random bf16 inputs (--dtype) and runs in this process on this device:

  fcsa        fcsa.flash_cosine_sim_attention_with_kvcache(q, k_cache, v_cache, seqlens)
              (causal, end-aligned; with --paged, the same cache in shuffled blocks)
  sdpa-cos    F.scaled_dot_product_attention(F.normalize(q), F.normalize(k_cache), v_cache,
              scale=8, enable_gqa=True): what a cosine-sim model runs without fcsa
  plain       F.scaled_dot_product_attention(q, k_cache, v_cache, enable_gqa=True):
              regular attention, the bar for a memory-bound decode step

(The SDPA rows get no mask: for nq = 1 that is the same attention; for nq > 1 causal
hides nq(nq-1)/2 scores of b*h*nq*nk, which changes no time measurably.)

Bandwidth: the bytes of K and V, read once, over the median time (CUDA events; on the
CPU, wall time). On CUDA each implementation is captured in a CUDA graph and the graph's
replays are timed, as a server runs its decode steps: no host overhead is counted (nor
fcsa's check of the lengths, which needs the host and is skipped inside a capture);
--no-graphs times plain calls instead. The device's copy bandwidth (read + write of a 2 GiB buffer, or 1/8
of free memory) is measured first, and each row shows its share of it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time

import torch
import torch.nn.functional as F

# (b, h, hk, nk): the shapes of issue #16.
CASES = ((8, 32, 8, 131072), (32, 32, 8, 16384), (64, 32, 32, 4096), (1, 32, 8, 524288))
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m fcsa.benchmark --decode",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--case", action="append", metavar="B,H,HK,NK",
                   help="a shape (repeatable); default: the issue's four")
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--nq", type=int, nargs="+", default=[1], help="query rows per sequence")
    p.add_argument("--paged", type=int, nargs="*", default=[], metavar="PAGE",
                   help="also time fcsa on a paged cache with these page sizes")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    p.add_argument("--runs", type=int, default=30, help="timed runs per row")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--baselines", nargs="*", choices=("sdpa-cos", "plain"),
                   default=["sdpa-cos", "plain"])
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--no-graphs", action="store_true",
                   help="on CUDA, time plain calls rather than CUDA-graph replays")
    p.add_argument("--json", metavar="PATH", help="write every measurement here")
    args = p.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.cases = [tuple(int(x) for x in c.split(",")) for c in args.case] if args.case else CASES
    for c in args.cases:
        if len(c) != 4 or c[1] % c[2] != 0:
            p.error(f"--case {c}: expected B,H,HK,NK with H a multiple of HK")
    return args


def median_ms(fn, device, runs, warmup, reset=None):
    """The median time of fn() in milliseconds, its min and max; reset() (untimed) before each."""
    for _ in range(warmup):
        if reset:
            reset()
        fn()
    times = []
    for _ in range(runs):
        if reset:
            reset()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times), max(times)


def graphed(fn, device, use_graphs):
    """fn as a CUDA-graph replay on CUDA (warmed up on a side stream first, as capture
    needs), else fn itself."""
    if device.type != "cuda" or not use_graphs:
        return fn
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def copy_bandwidth(device, runs, warmup) -> float:
    """Bytes per second of a device-to-device copy, read + write counted."""
    nbytes = 2 << 30
    if device.type == "cuda":
        nbytes = min(nbytes, torch.cuda.mem_get_info(device)[0] // 8)
    else:
        nbytes = 256 << 20
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms, _, _ = median_ms(lambda: dst.copy_(src), device, runs, warmup)
    return 2 * src.numel() * 4 / (ms * 1e-3)


def to_pages(cache, table, page):
    """The contiguous cache (b, hk, nk, d) as blocks (num_blocks, hk, page, d), sequence
    b's j-th block at table[b, j]."""
    b, hk, nk, d = cache.shape
    per_seq = table.shape[1]
    padded = cache.new_zeros(b, hk, per_seq * page, d)
    padded[:, :, :nk] = cache
    blocks = cache.new_empty(b * per_seq, hk, page, d)
    blocks[table.flatten().long()] = (padded.view(b, hk, per_seq, page, d)
                                      .permute(0, 2, 1, 3, 4).reshape(-1, hk, page, d))
    return blocks


def run_case(args, case, d, nq, copy_bps, records):
    import fcsa

    b, h, hk, nk = case
    dtype, device = DTYPES[args.dtype], args.device
    q = torch.randn(b, h, nq, d, dtype=dtype, device=device)
    k_cache = torch.randn(b, hk, nk, d, dtype=dtype, device=device)
    v_cache = torch.randn(b, hk, nk, d, dtype=dtype, device=device)
    seqlens = torch.full((b,), nk, dtype=torch.int32, device=device)
    kv_bytes = 2 * k_cache.numel() * k_cache.element_size()

    impls = {"fcsa": lambda: fcsa.flash_cosine_sim_attention_with_kvcache(
        q, k_cache, v_cache, seqlens)}
    for page in args.paged:
        per_seq = -(-nk // page)
        table = torch.randperm(b * per_seq, device=device).view(b, per_seq).to(torch.int32)
        kp, vp = to_pages(k_cache, table, page), to_pages(v_cache, table, page)
        impls[f"fcsa paged {page}"] = (lambda kp=kp, vp=vp, table=table:
                                       fcsa.flash_cosine_sim_attention_with_kvcache(
                                           q, kp, vp, seqlens, block_table=table))
    if "sdpa-cos" in args.baselines:
        impls["sdpa-cos"] = lambda: F.scaled_dot_product_attention(
            F.normalize(q, dim=-1), F.normalize(k_cache, dim=-1), v_cache, scale=8.0,
            enable_gqa=hk != h)
    if "plain" in args.baselines:
        impls["plain"] = lambda: F.scaled_dot_product_attention(q, k_cache, v_cache,
                                                                enable_gqa=hk != h)

    print(f"b {b}, heads {h}/{hk}, keys {nk}, d {d}, nq {nq}, {args.dtype}: "
          f"K+V {kv_bytes / 2**30:.2f} GiB")
    rows = {}
    with torch.no_grad():
        for name, fn in impls.items():
            try:
                run = graphed(fn, device, not args.no_graphs)
                ms, fastest, slowest = median_ms(run, device, args.runs, args.warmup)
            except (RuntimeError, NotImplementedError, ValueError) as err:
                print(f"  {name:<16} failed: {str(err).splitlines()[0][:60]}")
                continue
            bps = kv_bytes / (ms * 1e-3)
            rows[name] = ms
            rate = f"{bps / 1e12:6.2f} TB/s" if bps >= 1e11 else f"{bps / 1e9:6.2f} GB/s"
            print(f"  {name:<16} {ms:9.3f} ms ({fastest:.3f}-{slowest:.3f})  {rate}  "
                  f"{100 * bps / copy_bps:5.1f}% of copy")
            records.append(dict(impl=name, b=b, h=h, hk=hk, nk=nk, d=d, nq=nq,
                                dtype=args.dtype, ms=ms, min_ms=fastest, max_ms=slowest,
                                kv_bytes=kv_bytes, tb_per_s=bps / 1e12,
                                copy_fraction=bps / copy_bps))
    if "fcsa" in rows and "plain" in rows:
        ratio = rows["plain"] / rows["fcsa"]
        print(f"  fcsa vs plain SDPA: {ratio:.2f}x {'faster' if ratio >= 1 else 'slower'}")
    # Free this case's memory before the next.
    del q, k_cache, v_cache, impls
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    args = parse_args(argv)
    import fcsa

    torch.manual_seed(0)
    copy_bps = copy_bandwidth(args.device, args.runs, args.warmup)
    name = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "cpu"
    print(f"decode over a KV cache on {name}; {fcsa.build_info()}")
    print(f"copy bandwidth (read + write): {copy_bps / 1e12:.3f} TB/s")
    records = []
    for case in args.cases:
        for d in args.dims:
            for nq in args.nq:
                run_case(args, case, d, nq, copy_bps, records)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                           device=name, build=fcsa.build_info(), copy_bytes_per_s=copy_bps,
                           records=records), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
