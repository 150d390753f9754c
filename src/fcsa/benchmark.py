"""Speed (and memory) of fcsa against the attention a user would otherwise run.

    python -m fcsa.benchmark                         # forward, backward, forward+backward
    python -m fcsa.benchmark --causal
    python -m fcsa.benchmark --only-forwards --mask-prob 0.25
    python -m fcsa.benchmark --shape fa --dtype bfloat16 --dim 128 --json out.json --plot out.png
    python -m fcsa.benchmark --decode                # KV-cache decoding, in TB/s (benchmark_decode.py)
    python -m fcsa.benchmark --varlen                # packed variable-length sequences (benchmark_varlen.py)

The CPU comparison the README reports (b=2, h=8, d=64, float32): time against sdpa-cos,

    python -m fcsa.benchmark --device cpu --batch 2 --heads 8 --dim 64 --dtype float32 \
        --seq-lens 512 1024 2048 4096 --modes fwd fwd+bwd --baselines sdpa-cos

and peak memory of one forward+backward at n=16384 against the n x n implementation,

    python -m fcsa.benchmark --device cpu --batch 2 --heads 8 --dim 64 --dtype float32 \
        --seq-lens 16384 --baselines naive sdpa-cos --memory-only

(`make benchmark_cpu` runs both.)

What is measured. Every cell gets fresh random inputs (torch.randn; never zeros) and every
implementation of a row runs in the same process on the same device:

  kernel          fcsa.flash_cosine_sim_attention(q, k, v, mask, scale=S, causal=...)
  sdpa-cos        F.scaled_dot_product_attention(F.normalize(q), F.normalize(k), v, scale=S)
  sdpa-flash-cos  the same, forced onto SDPA's FlashAttention backend (CUDA only)
  plain           F.scaled_dot_product_attention(q, k, v): regular attention, default scale
  naive           fcsa.plain_cosine_sim_attention: plain PyTorch, materializes n x n

With --mask-prob, fcsa gets the (b, n) key mask and SDPA an equivalent boolean attn_mask
(which keeps SDPA off its flash kernels: that is the comparison a user with padding faces).

FLOPs: 4*b*h*nq*nk*d for the forward, 2*b*h*nq*nk*(d + d_v) with --dim-v (halved when
causal; masked keys count as computed), 2.5x that for the backward, 3.5x for
forward+backward.

The tables (80 columns): for each sequence length, one row per implementation with its
median time, the min-max of its timed runs, TFLOP/s, and for each baseline how fcsa
compares: "1.30× faster" (the baseline's median over fcsa's) or "1.15× slower", marked
"~" when the two min-max ranges overlap (the difference is within the runs' noise).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import textwrap
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

MODES = ("fwd", "bwd", "fwd+bwd")
MODE_TITLES = {"fwd": "forward", "bwd": "backward", "fwd+bwd": "forward + backward"}
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
BASELINES = ("sdpa-cos", "sdpa-flash-cos", "plain", "naive")
CUDA_ONLY = ("sdpa-flash-cos",)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CPU_SEQ_LENS = (128, 256, 512, 1024)
CUDA_SEQ_LENS = (128, 256, 512, 1024, 2048, 4096, 8192)
KERNEL = "kernel"
RULE = "-" * 80
HEADER_WIDTH = 100
CHILD_TAG = "FCSA_BENCHMARK_CHILD "

BACKWARD_METHOD = (
    "backward alone: the forward runs once, then out.backward(dout, retain_graph=True) "
    "is timed on that graph (gradients reset between runs)"
)
FORWARD_METHOD = "forward without autograd (torch.no_grad), as at inference"


# ----------------------------------------------------------------------------------------
# problem set-up


@dataclass
class Shape:
    batch: int
    heads: int
    seq_len: int
    dim: int
    dim_v: Optional[int] = None  # v's head dim; None: dim

    @property
    def value_dim(self) -> int:
        return self.dim if self.dim_v is None else self.dim_v


def shape_for(args, seq_len: int) -> Shape:
    if args.shape == "fa":
        # The FlashAttention papers' sweep: b*n = 16k tokens, h*d = 2048.
        return Shape(max(1, 16384 // seq_len), max(1, 2048 // args.dim), seq_len, args.dim,
                     args.dim_v)
    return Shape(args.batch, args.heads, seq_len, args.dim, args.dim_v)


def forward_flops(s: Shape, causal: bool) -> float:
    # 2 b h n^2 d for q k^T and 2 b h n^2 d_v for P v
    flops = 2.0 * s.batch * s.heads * s.seq_len * s.seq_len * (s.dim + s.value_dim)
    return flops / 2 if causal else flops


def make_inputs(s: Shape, dtype, device, mask_prob: float, gen: torch.Generator):
    def randn(dim):
        return torch.randn(s.batch, s.heads, s.seq_len, dim, generator=gen,
                           dtype=torch.float32).to(device=device, dtype=dtype)

    q, k, v = randn(s.dim), randn(s.dim), randn(s.value_dim)
    mask = None
    if mask_prob > 0:
        # Exactly round(p * n) keys masked per batch element, chosen at random; key 0 stays
        # visible so that no query row (causal or not) is left without a key.
        n = s.seq_len
        n_masked = min(n - 1, int(round(mask_prob * n)))
        order = torch.rand(s.batch, n - 1, generator=gen).argsort(dim=-1)
        mask = torch.ones(s.batch, n, dtype=torch.bool)
        mask[:, 1:].scatter_(1, order[:, :n_masked], False)
        mask = mask.to(device)
    return q, k, v, mask


def sdpa_attn_mask(mask, causal: bool, n: int):
    """The boolean attn_mask (True = attend) that SDPA needs to compute what fcsa does."""
    if mask is None:
        return None
    m = mask[:, None, None, :]
    if causal:  # SDPA refuses attn_mask together with is_causal: fold causality in
        m = m & torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
    return m


@dataclass
class Impl:
    name: str
    fn: Callable
    context: Optional[Callable] = None  # a context-manager factory the runs happen under


def build_impls(names, mask, causal: bool, scale: float, n: int):
    import fcsa

    am = sdpa_attn_mask(mask, causal, n)
    sdpa_causal = causal and am is None

    def kernel(q, k, v):
        return fcsa.flash_cosine_sim_attention(q, k, v, mask=mask, scale=scale, causal=causal)

    def sdpa_cos(q, k, v):
        return F.scaled_dot_product_attention(
            F.normalize(q, dim=-1), F.normalize(k, dim=-1), v,
            attn_mask=am, is_causal=sdpa_causal, scale=scale)

    def plain(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=am, is_causal=sdpa_causal)

    def naive(q, k, v):
        return fcsa.plain_cosine_sim_attention(q, k, v, mask=mask, scale=scale, causal=causal)

    @contextlib.contextmanager
    def flash_only():
        from torch.nn.attention import SDPBackend, sdpa_kernel
        # When the flash kernel cannot take a case (a mask, float32), SDPA warns about each
        # backend it skipped and then raises; the row's note already says why.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                yield

    table = {
        KERNEL: Impl(KERNEL, kernel),
        "sdpa-cos": Impl("sdpa-cos", sdpa_cos),
        "sdpa-flash-cos": Impl("sdpa-flash-cos", sdpa_cos, flash_only),
        "plain": Impl("plain", plain),
        "naive": Impl("naive", naive),
    }
    return [table[name] for name in names]


# ----------------------------------------------------------------------------------------
# timing


def is_oom(err: BaseException) -> bool:
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    if isinstance(err, RuntimeError):
        msg = str(err).lower()
        return any(s in msg for s in ("out of memory", "can't allocate memory",
                                      "not enough memory", "cannot allocate memory"))
    return False


def random_dout(q, v):
    """A random gradient of the output: q's rows, v's head dim."""
    return torch.randn(*q.shape[:-1], v.shape[-1], device=q.device, dtype=q.dtype)


def make_runner(impl: Impl, mode: str, q, k, v):
    """A no-argument callable doing one timed unit of work, and the leaves whose .grad
    must be cleared between runs."""
    fn = impl.fn
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(q, k, v)
        return run, []
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    dout = random_dout(q, v)
    if mode == "bwd":
        out = fn(*leaves)
        def run():
            out.backward(dout, retain_graph=True)
    else:
        def run():
            fn(*leaves).backward(dout)
    return run, leaves


def _clear(leaves):
    for t in leaves:
        t.grad = None


@dataclass
class Timing:
    """One implementation's times in a cell: the median and the spread of the timed runs
    (min and max; with do_bench, the fastest and slowest of its own repeats)."""
    ms: float
    min_ms: float
    max_ms: float
    runs: Optional[int] = None  # None: do_bench chose the count

    @classmethod
    def of(cls, times):
        return cls(statistics.median(times), min(times), max(times), len(times))


def _failure(err: BaseException):
    return ("oom" if is_oom(err) else "n/a", None, _one_line(err))


class Timer:
    """Times every implementation of one row; returns {name: (status, ms, error)}.

    CUDA timers run one implementation after the other. The wall-clock timer (CPU)
    interleaves them: each round runs every implementation once, so that load from
    other processes on the machine falls on all of them alike."""

    def __init__(self, kind: str, device: torch.device, num_times: int, warmup: int):
        self.kind, self.device, self.num_times, self.warmup = kind, device, num_times, warmup

    def describe(self) -> str:
        if self.kind == "do_bench":
            import triton
            return (f"triton.testing.do_bench (triton {triton.__version__}), median and "
                    "min-max of its runs, warm-up 25 ms, repeat 100 ms, L2 flushed between runs")
        if self.kind == "events":
            return (f"CUDA events, median and min-max of {self.num_times} runs after "
                    f"{self.warmup} warm-up runs")
        return (f"wall clock (time.perf_counter), median and min-max of {self.num_times} runs "
                f"after {self.warmup} warm-up run(s); implementations interleaved run by run")

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def measure(self, impls, mode, q, k, v) -> dict:
        if self.kind == "wall":
            return self._interleaved(impls, mode, q, k, v)
        cells = {}
        for impl in impls:
            run = leaves = None
            try:
                with _maybe(impl.context):
                    run, leaves = make_runner(impl, mode, q, k, v)
                    cells[impl.name] = ("ok", self._cuda_ms(run, leaves), None)
            except Exception as err:  # one cell failing must not end the sweep
                cells[impl.name] = _failure(err)
            finally:
                run = leaves = None
                torch.cuda.empty_cache()
        return cells

    def _cuda_ms(self, run, leaves) -> Timing:
        if self.kind == "do_bench":
            from triton.testing import do_bench
            # Untimed calls first: one-time costs (modules loaded on first launch, the
            # allocator's first blocks) would otherwise enter do_bench's estimate of one
            # call, which sets how many it times. (The first cell of a process measured
            # 0.6x its rerun without them.)
            for _ in range(self.warmup):
                _clear(leaves)
                run()
            self.sync()
            median, fastest, slowest = do_bench(run, warmup=25, rep=100,
                                                grad_to_none=leaves or None,
                                                quantiles=[0.5, 0.0, 1.0])
            return Timing(float(median), float(fastest), float(slowest))
        for _ in range(self.warmup):
            _clear(leaves)
            run()
        self.sync()
        times = []
        for _ in range(self.num_times):
            _clear(leaves)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return Timing.of(times)

    def _interleaved(self, impls, mode, q, k, v) -> dict:
        cells, live, times = {}, {}, {}
        for impl in impls:
            try:
                with _maybe(impl.context):
                    run, leaves = make_runner(impl, mode, q, k, v)
                    for _ in range(self.warmup):
                        _clear(leaves)
                        run()
                    self.sync()
                live[impl.name] = (impl, run, leaves)
                times[impl.name] = []
            except Exception as err:
                cells[impl.name] = _failure(err)
        for _ in range(self.num_times):
            for name, (impl, run, leaves) in list(live.items()):
                try:
                    _clear(leaves)
                    with _maybe(impl.context):
                        self.sync()
                        t0 = time.perf_counter()
                        run()
                        self.sync()
                        times[name].append((time.perf_counter() - t0) * 1e3)
                except Exception as err:
                    cells[name] = _failure(err)
                    del live[name]
        for name in live:
            cells[name] = ("ok", Timing.of(times[name]), None)
        live.clear()
        return {impl.name: cells[impl.name] for impl in impls}


# ----------------------------------------------------------------------------------------
# peak memory


MEMORY_METHOD_CUDA = (
    "torch.cuda.max_memory_allocated over one forward+backward after reset_peak_memory_stats, "
    "minus what was allocated before the inputs were made (inputs, gradients and dout "
    "included, the same for every implementation)"
)
MEMORY_METHOD_CPU = (
    "each cell runs in a fresh interpreter that imports torch and fcsa, runs one small "
    "forward+backward of the same implementation (n <= 256: pages in the code, starts the "
    "thread pool), resets its peak RSS (Linux /proc/self/clear_refs), then runs the cell's "
    "forward+backward; reported: the peak RSS then (VmHWM) minus the idle RSS before it "
    "(inputs, gradients and dout included, the same for every implementation). getrusage's "
    "ru_maxrss is not used: it cannot be reset, and a spawned child's value also counts the "
    "parent's memory at exec")


def _step_once(impl: Impl, q, k, v):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    dout = random_dout(q, v)
    with _maybe(impl.context):
        impl.fn(*leaves).backward(dout)
    return leaves


class _maybe:
    def __init__(self, factory):
        self.cm = factory() if factory is not None else None

    def __enter__(self):
        return self.cm.__enter__() if self.cm is not None else None

    def __exit__(self, *exc):
        return self.cm.__exit__(*exc) if self.cm is not None else False


def peak_memory_cuda(impl_name, s: Shape, dtype, device, args, seed):
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    gen = torch.Generator().manual_seed(seed)
    try:
        q, k, v, mask = make_inputs(s, dtype, device, args.mask_prob, gen)
        (impl,) = build_impls([impl_name], mask, args.causal, args.scale, s.seq_len)
        _step_once(impl, q, k, v)
        torch.cuda.synchronize(device)
        return "ok", torch.cuda.max_memory_allocated(device) - before, None
    except Exception as err:  # one cell failing must not end the sweep
        return ("oom" if is_oom(err) else "n/a"), None, _one_line(err)
    finally:
        torch.cuda.empty_cache()


def _run_child(spec: dict) -> dict:
    """Run one memory cell in a fresh interpreter and return what it reports."""
    cmd = [sys.executable, "-m", "fcsa.benchmark", "--_memory-cell", json.dumps(spec)]
    # A fixed mmap threshold: glibc then maps every large block afresh and unmaps it when
    # freed, so the warm-up leaves no heap behind that the measured run could reuse.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       env=env)
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(CHILD_TAG):
            return json.loads(line[len(CHILD_TAG):])
    why = f"exit status {p.returncode}"
    if p.returncode < 0:
        why = f"killed by signal {-p.returncode}"
    tail = p.stdout.strip().splitlines()[-1:] or [""]
    return {"status": "oom" if p.returncode == -9 else "error",
            "error": f"{why}: {tail[0]}"[:300]}


def _reset_peak_rss():
    """Lower this process's peak RSS to its current RSS (Linux: clear_refs 5), so that the
    transient peak of importing torch does not hide what the cell itself allocates."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def memory_child_main(spec: dict) -> int:
    """Inside the child interpreter: one forward+backward, report how it went."""
    import fcsa  # noqa: F401  (the idle baseline imports it too)

    _limit_address_space(spec["limit_bytes"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    s = Shape(**spec["shape"])
    dtype = DTYPES[spec["dtype"]]
    cpu = torch.device("cpu")

    def step(shape: Shape):
        gen = torch.Generator().manual_seed(spec["seed"])
        q, k, v, mask = make_inputs(shape, dtype, cpu, spec["mask_prob"], gen)
        (impl,) = build_impls([spec["impl"]], mask, spec["causal"], spec["scale"],
                              shape.seq_len)
        _step_once(impl, q, k, v)

    try:
        step(Shape(s.batch, s.heads, min(s.seq_len, 256), s.dim, s.dim_v))
        _reset_peak_rss()
        idle = _proc_status_bytes("VmRSS")
        step(s)
        res = {"status": "ok", "idle_rss": idle, "peak_rss": _proc_status_bytes("VmHWM")}
    except Exception as err:
        res = {"status": "oom" if is_oom(err) else "n/a", "error": _one_line(err)}
    print(CHILD_TAG + json.dumps(res), flush=True)
    return 0


# ----------------------------------------------------------------------------------------
# guarding a shared CPU machine


def _mem_available_bytes() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _proc_status_bytes(key: str) -> Optional[int]:
    """A kB field of /proc/self/status (VmSize, VmRSS, ...) in bytes; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _limit_address_space(budget: Optional[int]):
    """Let allocations beyond `budget` more bytes fail (and be reported as oom) instead of
    pushing the machine into its OOM killer. Returns the previous limit to restore."""
    if not budget:
        return None
    try:
        import resource
    except ImportError:
        return None
    vm = _proc_status_bytes("VmSize")
    if vm is None:
        return None
    old = resource.getrlimit(resource.RLIMIT_AS)
    new = vm + budget
    if old[1] != resource.RLIM_INFINITY:
        new = min(new, old[1])
    resource.setrlimit(resource.RLIMIT_AS, (new, old[1]))
    return old


def _restore_address_space(old):
    if old is not None:
        import resource
        resource.setrlimit(resource.RLIMIT_AS, old)


# ----------------------------------------------------------------------------------------
# formatting


def oom_text(err: Optional[str]) -> str:
    """'oom', with the size of the allocation that failed when the message gives it."""
    m = re.search(r"allocate (\d+) bytes", err or "")
    return f"oom (tried {fmt_bytes(int(m.group(1)))})" if m else "oom"


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:200]


def _rounded(value: float, steps, smaller: str) -> str:
    """value with the decimals of the first (threshold, decimals) step it reaches, else
    in the format `smaller`."""
    for threshold, decimals in steps:
        if value >= threshold:
            return f"{value:.{decimals}f}"
    return format(value, smaller)


def fmt_ms(ms: float) -> str:
    """Three or four significant digits: 0.0123, 1.234, 12.34, 123.4, 1234."""
    return _rounded(ms, ((1000, 0), (100, 1), (10, 2), (0.1, 3)), ".4f")


def fmt_tflops(t: float) -> str:
    return _rounded(t, ((100, 0), (10, 1), (1, 2)), ".3g")


def fmt_bytes(b: float) -> str:
    if b >= 2**30:
        return f"{b / 2**30:.2f} GiB"
    return f"{b / 2**20:.1f} MiB"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return (f"{p.name} (sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
                f"{p.total_memory / 2**30:.0f} GiB)")
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def _build_info_text(info) -> str:
    if isinstance(info, dict):
        return ", ".join(f"{k}={v}" for k, v in info.items())
    return str(info)


# The tables' columns (at most 80 characters a row).
N_WIDTH, NAME_WIDTH = 6, 16
TIME_COLUMNS = (f"{'n':>{N_WIDTH}}  {'':<{NAME_WIDTH}}{'median ms':>9}  {'min-max ms':>17}  "
                f"{'TFLOP/s':>8}  fcsa is")
MEMORY_COLUMNS = f"{'n':>{N_WIDTH}}  {'':<{NAME_WIDTH}}{'peak':>11}  fcsa needs"


def impl_label(name: str) -> str:
    return "fcsa" if name == KERNEL else name


def section_header(dtype: str, s: Shape, args, title: str, columns: str) -> str:
    if args.shape == "fa":
        sizes = f"batch: 16384/n    heads: {s.heads}    dim {s.dim}"
    else:
        sizes = f"batch: {s.batch}    heads: {s.heads}    dim {s.dim}"
    if s.dim_v is not None:
        sizes += f"    dim_v {s.dim_v}"
    extra = [title]
    if args.causal:
        extra.append("causal")
    if args.mask_prob > 0:
        extra.append(f"{args.mask_prob:.0%} of keys masked")
    return f"{RULE}\n{dtype:<11} {sizes}    {'    '.join(extra)}\n{RULE}\n{columns}"


# ----------------------------------------------------------------------------------------
# the sweep


@dataclass
class Record:
    kind: str  # "time" or "memory"
    dtype: str
    mode: str
    causal: bool
    mask_prob: float
    seq_len: int
    batch: int
    heads: int
    dim: int
    impl: str
    status: str  # ok, oom, n/a, error
    ms: Optional[float] = None
    flops: Optional[float] = None
    tflops: Optional[float] = None
    peak_bytes: Optional[int] = None
    min_ms: Optional[float] = None  # the spread of the timed runs
    max_ms: Optional[float] = None
    runs: Optional[int] = None  # timed runs (None: do_bench chose)
    error: Optional[str] = None
    dim_v: Optional[int] = None  # v's head dim where it differs from dim


@dataclass
class Run:
    args: argparse.Namespace
    device: torch.device
    impl_names: list
    timer: Optional[Timer]
    notes: list = field(default_factory=list)
    records: list = field(default_factory=list)

    def note(self, text: str):
        if text not in self.notes:
            self.notes.append(text)
            print(textwrap.fill(f"  note: {text}", HEADER_WIDTH, subsequent_indent=" " * 8,
                                break_on_hyphens=False))


def time_row(run: Run, dtype: str, mode: str, s: Shape, seed: int):
    args = run.args
    gen = torch.Generator().manual_seed(seed)
    flops = forward_flops(s, args.causal) * FLOP_FACTOR[mode]
    cells = {}
    try:
        q, k, v, mask = make_inputs(s, DTYPES[dtype], run.device, args.mask_prob, gen)
        impls = build_impls(run.impl_names, mask, args.causal, args.scale, s.seq_len)
    except Exception as err:
        if not is_oom(err):
            raise
        impls, q = None, None
        for name in run.impl_names:
            cells[name] = ("oom", None, "inputs do not fit")
    if impls is not None:
        cells = run.timer.measure(impls, mode, q, k, v)
    q = k = v = mask = impls = None

    for name, (status, t, err) in cells.items():
        run.records.append(Record(
            "time", dtype, mode, args.causal, args.mask_prob, s.seq_len, s.batch, s.heads,
            s.dim, name, status, t and t.ms, flops,
            (flops / (t.ms * 1e-3) / 1e12) if t else None,
            min_ms=t and t.min_ms, max_ms=t and t.max_ms, runs=t and t.runs, error=err,
            dim_v=s.dim_v))
    print("\n".join(format_time_rows(run, s, cells, flops)), flush=True)
    for name, (status, _, err) in cells.items():
        if status == "n/a":
            run.note(f"{name} n/a: {err}")


def speed_verdict(base: Timing, kernel: Timing) -> str:
    """'1.30× faster' (fcsa against this baseline) or '1.15× slower', from the medians;
    a leading '~' when the two min-max ranges overlap (within the noise of the runs)."""
    ratio = base.ms / kernel.ms
    text = f"{ratio:.2f}× faster" if ratio >= 1 else f"{1 / ratio:.2f}× slower"
    overlap = kernel.min_ms <= base.max_ms and base.min_ms <= kernel.max_ms
    return "~" + text if overlap else text


def table_rows(run: Run, s: Shape, cells: dict, describe) -> list:
    """One line per implementation, fcsa first, the sequence length on the first: the name,
    then describe(name, value) for a cell that ran, or what stopped it."""
    lines = []
    for i, name in enumerate(run.impl_names):
        status, value, err = cells[name]
        start = f"{s.seq_len if i == 0 else '':>{N_WIDTH}}  {impl_label(name):<{NAME_WIDTH}}"
        if status != "ok":
            lines.append(start + (oom_text(err) if status == "oom" else status))
        else:
            lines.append(start + describe(name, value))
    return lines


def format_time_rows(run: Run, s: Shape, cells: dict, flops: float) -> list:
    kstatus, kernel, _ = cells[KERNEL]

    def describe(name: str, t: Timing) -> str:
        tflops = fmt_tflops(flops / (t.ms * 1e-3) / 1e12)
        spread = f"{fmt_ms(t.min_ms)}-{fmt_ms(t.max_ms)}"
        text = f"{fmt_ms(t.ms):>9}  {spread:>17}  {tflops:>8}"
        if name != KERNEL and kstatus == "ok":
            text += "  " + speed_verdict(t, kernel)
        return text

    return table_rows(run, s, cells, describe)


def memory_row(run: Run, dtype: str, s: Shape, seed: int):
    args = run.args
    cells = {}
    for name in run.impl_names:
        if run.device.type == "cuda":
            status, peak, err = peak_memory_cuda(name, s, DTYPES[dtype], run.device, args,
                                                 seed)
        else:
            spec = {"impl": name, "shape": asdict(s), "dtype": dtype, "seed": seed,
                    "mask_prob": args.mask_prob, "causal": args.causal, "scale": args.scale,
                    "limit_bytes": args.cpu_mem_limit_bytes, "threads": args.threads}
            res = _run_child(spec)
            status, err = res["status"], res.get("error")
            peak = None
            if status == "ok":
                if res.get("idle_rss") is None or res.get("peak_rss") is None:
                    status, err = "n/a", "no /proc/self/status to read the RSS from"
                else:
                    peak = max(0, res["peak_rss"] - res["idle_rss"])
        cells[name] = (status, peak, err)
        run.records.append(Record(
            "memory", dtype, "fwd+bwd", args.causal, args.mask_prob, s.seq_len, s.batch,
            s.heads, s.dim, name, status, peak_bytes=peak, error=err, dim_v=s.dim_v))
    print("\n".join(format_memory_rows(run, s, cells)), flush=True)
    for name, (status, _, err) in cells.items():
        if status in ("n/a", "error"):
            run.note(f"{name} {status}: {err}")


def format_memory_rows(run: Run, s: Shape, cells: dict) -> list:
    kpeak = cells[KERNEL][1]

    def describe(name: str, peak: int) -> str:
        text = f"{fmt_bytes(peak):>11}"
        if name != KERNEL and kpeak and peak:
            ratio = peak / kpeak
            text += f"  {ratio:.2f}× less" if ratio >= 1 else f"  {1 / ratio:.2f}× more"
        return text

    return table_rows(run, s, cells, describe)


# ----------------------------------------------------------------------------------------
# plots


def plot_speed(records, run: Run, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = run.args.dtype
    modes = run.args.modes
    fig, axes = plt.subplots(len(dtypes), len(modes), squeeze=False,
                             figsize=(5.2 * len(modes), 4.0 * len(dtypes)))
    for i, dtype in enumerate(dtypes):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            for name in run.impl_names:
                pts = sorted((r.seq_len, r.tflops) for r in records
                             if r.kind == "time" and r.dtype == dtype and r.mode == mode
                             and r.impl == name and r.status == "ok")
                if pts:
                    label = "fcsa" if name == KERNEL else name
                    ax.plot(*zip(*pts), marker="o", label=label)
            _seq_len_axis(ax, run.args.seq_lens)
            ax.set_ylabel("TFLOP/s")
            title = f"{dtype}, {MODE_TITLES[mode]}"
            if run.args.causal:
                title += ", causal"
            if run.args.mask_prob > 0:
                title += f", {run.args.mask_prob:.0%} masked"
            ax.set_title(title)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize="small")
    fig.suptitle(_plot_subtitle(run))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _seq_len_axis(ax, seq_lens):
    ax.set_xscale("log", base=2)
    ax.set_xticks(seq_lens, labels=[str(n) for n in seq_lens])
    ax.minorticks_off()
    ax.set_xlabel("sequence length")


def memory_plot_path(path: str) -> str:
    root, ext = os.path.splitext(path)
    return f"{root}-memory{ext or '.png'}"


def plot_memory(records, run: Run, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = run.args.dtype
    fig, axes = plt.subplots(1, len(dtypes), squeeze=False, figsize=(5.6 * len(dtypes), 4.2))
    for j, dtype in enumerate(dtypes):
        ax = axes[0][j]
        for name in run.impl_names:
            mine = [r for r in records if r.kind == "memory" and r.dtype == dtype
                    and r.impl == name]
            pts = sorted((r.seq_len, r.peak_bytes / 2**20) for r in mine
                         if r.status == "ok" and r.peak_bytes)
            label = "fcsa" if name == KERNEL else name
            ooms = [r.seq_len for r in mine if r.status == "oom"]
            if ooms:
                label += f" (oom from n={min(ooms)})"
            if pts or ooms:
                ax.plot(*(zip(*pts) if pts else ([], [])), marker="o", label=label)
        _seq_len_axis(ax, run.args.seq_lens)
        ax.set_yscale("log")
        ax.set_ylabel("peak memory, forward+backward (MiB)")
        ax.set_title(dtype + (", causal" if run.args.causal else ""))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(_plot_subtitle(run))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_subtitle(run: Run) -> str:
    a = run.args
    sizes = ("batch 16384/n, heads 2048/d" if a.shape == "fa"
             else f"batch {a.batch}, heads {a.heads}")
    dims = ", ".join(f"{d}" if dv is None else f"{d}/v {dv}" for d, dv in a.dim_pairs)
    return f"{_device_name(run.device)}: {sizes}, dim {dims}"


# ----------------------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m fcsa.benchmark",
        description="Time fcsa's fused cosine-sim attention against SDPA and plain PyTorch.")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--only-forwards", action="store_true", help="time the forward only")
    which.add_argument("--only-backwards", action="store_true", help="time the backward only")
    which.add_argument("--modes", nargs="+", choices=MODES,
                       help="modes to time (default: all three)")
    p.add_argument("--causal", action="store_true", help="autoregressive (causal) attention")
    p.add_argument("--mask-prob", type=float, default=0.0, metavar="P",
                   help="mask this fraction of the keys of each batch element at random")
    p.add_argument("--num-times", type=int, default=None,
                   help="timed runs per cell (default: 3 on CPU, 20 on CUDA; do_bench "
                        "chooses its own)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed runs first (default: 1 on CPU, 5 on CUDA)")
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=None,
                   help="default: float32 on CPU, float32 float16 on CUDA")
    p.add_argument("--dim", type=int, nargs="+", default=[64],
                   help="head dimension; several: one table each, in one run (default: 64)")
    p.add_argument("--dim-v", type=int, nargs="+", default=None,
                   help="v's head dimension where it differs from q's and k's: one for every "
                        "--dim, or one per --dim (FLOPs: 2*b*h*n*n*(d + d_v))")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-lens", type=int, nargs="+", default=None,
                   help=f"default: {' '.join(map(str, CPU_SEQ_LENS))} on CPU, "
                        f"{' '.join(map(str, CUDA_SEQ_LENS))} on CUDA")
    p.add_argument("--shape", choices=("seed", "fa"), default="seed",
                   help="seed: --batch x --heads; fa: batch = 16384/n, heads = 2048/d")
    p.add_argument("--scale", type=float, default=8.0,
                   help="cosine-sim temperature, for fcsa and the cos baselines")
    p.add_argument("--baselines", nargs="+", choices=BASELINES, default=None,
                   help="default: all (each gets a row, with fcsa's speed against it)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--timer", choices=("auto", "do_bench", "events", "wall"), default="auto",
                   help="auto: do_bench when triton imports, else CUDA events; wall on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--json", metavar="PATH", help="write every measurement here")
    p.add_argument("--plot", metavar="PATH", help="TFLOP/s vs sequence length, a PNG")
    p.add_argument("--memory", action="store_true",
                   help="also measure peak memory of one forward+backward")
    p.add_argument("--memory-only", action="store_true",
                   help="measure peak memory only, no timing")
    p.add_argument("--cpu-mem-limit", type=float, default=None, metavar="GIB",
                   help="on CPU, allocations beyond this many GiB fail and count as oom "
                        "(default: half the memory available at start)")
    p.add_argument("--_memory-cell", dest="memory_cell", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.mask_prob < 0 or args.mask_prob >= 1:
        p.error("--mask-prob must be in [0, 1)")
    if args.num_times is not None and args.num_times < 1:
        p.error("--num-times must be at least 1")
    if any(d < 1 for d in args.dim + (args.dim_v or [])):
        p.error("--dim and --dim-v must be positive")
    values = args.dim_v or [None]
    if len(values) not in (1, len(args.dim)):
        p.error(f"--dim-v takes one value, or one per --dim ({len(args.dim)}); got {len(values)}")
    # (q/k, v) head-dim pairs, each timed in turn; args.dim and args.dim_v hold the one
    # being timed (shape_for reads them).
    args.dim_pairs = list(zip(args.dim, values * len(args.dim) if len(values) == 1 else values))
    args.dim, args.dim_v = args.dim_pairs[0]
    return args


def checked_device(name: Optional[str]) -> torch.device:
    """The device to run on; a clean exit (no traceback) when it cannot be had."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise SystemExit(f"--device {name}: not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is a CPU-only build" if torch.version.cuda is None
                   else "torch finds no usable NVIDIA GPU or driver")
            raise SystemExit(f"--device {name}: CUDA is not available here ({why}); "
                             "run on the CPU with --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise SystemExit(f"--device {name}: there are {count} CUDA device(s)")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        raise SystemExit(f"--device {name}: the benchmark runs on cpu or cuda")
    return device


def finish_args(args):
    args.device = checked_device(args.device)
    cuda = args.device.type == "cuda"
    if args.only_forwards:
        args.modes = ["fwd"]
    elif args.only_backwards:
        args.modes = ["bwd"]
    elif not args.modes:
        args.modes = list(MODES)
    args.modes = [m for m in MODES if m in args.modes]
    args.dtype = list(dict.fromkeys(args.dtype or (["float32", "float16"] if cuda
                                                  else ["float32"])))
    args.seq_lens = list(args.seq_lens or (CUDA_SEQ_LENS if cuda else CPU_SEQ_LENS))
    if any(n < 1 for n in args.seq_lens):
        raise SystemExit("--seq-lens must be positive")
    args.baselines = list(dict.fromkeys(args.baselines or BASELINES))
    args.num_times = args.num_times or (20 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    if args.memory_only:
        args.memory = True
    limit = args.cpu_mem_limit
    if limit is None:
        avail = _mem_available_bytes()
        args.cpu_mem_limit_bytes = int(avail * 0.5) if avail else None
    else:
        args.cpu_mem_limit_bytes = int(limit * 2**30)
    return args


def choose_timer(args) -> Timer:
    kind = args.timer
    if args.device.type != "cuda":
        if kind in ("do_bench", "events"):
            raise SystemExit(f"--timer {kind} needs a CUDA device")
        kind = "wall"
    elif kind == "auto":
        try:
            import triton.testing  # noqa: F401
            kind = "do_bench"
        except ImportError:
            kind = "events"
    elif kind == "do_bench":
        try:
            import triton.testing  # noqa: F401
        except ImportError:
            raise SystemExit("--timer do_bench needs triton (pip install triton); "
                             "--timer events needs nothing more") from None
    return Timer(kind, args.device, args.num_times, args.warmup)


def probe_kernel(device, dtype):
    """Call fcsa once on a tiny input: which backend runs, or why none does."""
    import fcsa
    q = torch.randn(1, 1, 8, 16, device=device, dtype=DTYPES[dtype])
    try:
        fcsa.flash_cosine_sim_attention(q, q, q)
    except Exception as err:
        return None, _one_line(err)
    backend = fcsa.last_backend() if hasattr(fcsa, "last_backend") else None
    return backend, None


def print_header(run: Run, backend, probe_error):
    import fcsa
    a = run.args
    lines = [f"fcsa benchmark    {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M:%S %Z}"]
    lines.append(f"device:    {a.device}: {_device_name(a.device)}")
    cuda_v = torch.version.cuda or "none"
    lines.append(f"torch:     {torch.__version__}    CUDA (torch built with): {cuda_v}    "
                 f"python {platform.python_version()}")
    info = fcsa.build_info() if hasattr(fcsa, "build_info") else "unknown"
    lines.append(f"fcsa:      {getattr(fcsa, '__version__', 'unknown')}    "
                 f"build: {_build_info_text(info)}")
    lines.append(f"kernel:    fcsa.flash_cosine_sim_attention, backend "
                 + (f"{backend}" if probe_error is None else f"unavailable ({probe_error})"))
    if not a.memory_only:
        lines.append(f"timing:    {run.timer.describe()}")
        if "fwd" in a.modes:
            lines.append(f"forward:   {FORWARD_METHOD}")
        if "bwd" in a.modes:
            lines.append(f"backward:  {BACKWARD_METHOD}")
        own_v = any(dv is not None for _, dv in a.dim_pairs)
        lines.append("flops:     forward " + ("2*b*h*n*n*(d + d_v)" if own_v else "4*b*h*n*n*d")
                     + (" / 2 (causal)" if a.causal else "")
                     + ", backward 2.5x, forward+backward 3.5x"
                     + ("; masked keys count as computed" if a.mask_prob > 0 else ""))
        lines.append("table:     each implementation's median time and the min-max of its runs; "
                     "'fcsa is': the baseline's median over fcsa's, as 'N× faster' (or fcsa's "
                     "over the baseline's, 'N× slower'); '~' when the two min-max ranges "
                     "overlap (a difference within the noise)")
    if a.mask_prob > 0:
        shape = "(b, 1, n, n), causality folded in" if a.causal else "(b, 1, 1, n)"
        lines.append(f"mask:      {a.mask_prob:.0%} of each batch element's keys masked at "
                     f"random; fcsa gets mask (b, n), SDPA the same as a boolean attn_mask "
                     f"{shape}")
    if a.memory:
        lines.append("memory:    " + (MEMORY_METHOD_CUDA if a.device.type == "cuda"
                                      else MEMORY_METHOD_CPU))
    if a.device.type == "cpu" and a.cpu_mem_limit_bytes:
        lines.append(f"oom:       allocations beyond {a.cpu_mem_limit_bytes / 2**30:.1f} GiB "
                     "fail and show as oom (--cpu-mem-limit)")
    lines.append(f"scale:     {a.scale:g}    baselines: {', '.join(run.impl_names[1:]) or 'none'}")
    print("\n".join(wrap_header_line(line) for line in lines), flush=True)


def wrap_header_line(line: str, width: int = HEADER_WIDTH) -> str:
    """'key:      text' wrapped to `width` columns, the text's lines aligned."""
    key, sep, text = line.partition(":")
    if not sep or len(line) <= width:
        return line
    indent = " " * (len(line) - len(text.lstrip()))
    return textwrap.fill(line, width, subsequent_indent=indent, break_on_hyphens=False)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--decode" in argv:  # decoding over a KV cache: its own table (benchmark_decode.py)
        from .benchmark_decode import main as decode_main
        return decode_main([a for a in argv if a != "--decode"])
    if "--varlen" in argv:  # packed variable-length sequences: their own table (benchmark_varlen.py)
        from .benchmark_varlen import main as varlen_main
        return varlen_main([a for a in argv if a != "--varlen"])
    args = parse_args(argv)
    if args.memory_cell:
        return memory_child_main(json.loads(args.memory_cell))
    args = finish_args(args)
    import fcsa  # (fail early, before any work, when the package is missing)

    if args.device.type == "cuda" and not fcsa.cuda_compiled():
        raise SystemExit(f"--device {args.device}: this fcsa was built without its CUDA "
                         f"backends ({fcsa.build_info()}); build it for this GPU with "
                         "`pip install .` on a machine that has the GPU and nvcc, or name the "
                         "targets: FCSA_CUDA_ARCHITECTURES=\"80-real\" pip install .")

    if args.threads:
        torch.set_num_threads(args.threads)

    skipped = []
    names = [KERNEL]
    for b in args.baselines:
        if b in CUDA_ONLY and args.device.type != "cuda":
            skipped.append(b)
        else:
            names.append(b)
    timer = None if args.memory_only else choose_timer(args)
    run = Run(args, args.device, names, timer)
    backend, probe_error = probe_kernel(args.device, args.dtype[0])
    print_header(run, backend, probe_error)
    for b in skipped:
        run.note(f"{b} skipped: it needs a CUDA device")

    old_limit = None
    if args.device.type == "cpu":
        old_limit = _limit_address_space(args.cpu_mem_limit_bytes)
    try:
        seed = args.seed
        for args.dim, args.dim_v in args.dim_pairs:
            if not args.memory_only:
                for mode in args.modes:
                    for dtype in args.dtype:
                        print(section_header(dtype, shape_for(args, args.seq_lens[0]), args,
                                             MODE_TITLES[mode], TIME_COLUMNS), flush=True)
                        for n in args.seq_lens:
                            seed += 1
                            time_row(run, dtype, mode, shape_for(args, n), seed)
            if args.memory:
                for dtype in args.dtype:
                    print(section_header(dtype, shape_for(args, args.seq_lens[0]), args,
                                         "peak memory, forward + backward", MEMORY_COLUMNS),
                          flush=True)
                    for n in args.seq_lens:
                        seed += 1
                        memory_row(run, dtype, shape_for(args, n), seed)
    finally:
        _restore_address_space(old_limit)

    if args.json:
        write_json(run, backend, probe_error, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        if not args.memory_only:
            plot_speed(run.records, run, args.plot)
            print(f"wrote {args.plot}")
        if args.memory:
            mpath = memory_plot_path(args.plot)
            plot_memory(run.records, run, mpath)
            print(f"wrote {mpath}")
    return 0


def write_json(run: Run, backend, probe_error, path: str):
    import fcsa
    a = run.args
    info = fcsa.build_info() if hasattr(fcsa, "build_info") else None
    try:
        json.dumps(info)
    except TypeError:
        info = str(info)
    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": str(a.device),
        "device_name": _device_name(a.device),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "python_version": platform.python_version(),
        "fcsa_version": getattr(fcsa, "__version__", None),
        "fcsa_build_info": info,
        "fcsa_backend": backend,
        "fcsa_unavailable": probe_error,
        "timer": run.timer.describe() if run.timer else None,
        "forward_method": FORWARD_METHOD,
        "backward_method": BACKWARD_METHOD,
        "memory_method": (MEMORY_METHOD_CUDA if a.device.type == "cuda" else MEMORY_METHOD_CPU)
        if a.memory else None,
        "flops": "forward 2*b*h*n*n*(d + d_v), 4*b*h*n*n*d when d_v = d (halved when causal), backward 2.5x, fwd+bwd 3.5x",
        "implementations": run.impl_names,
        "notes": run.notes,
        "args": {k: (str(v) if isinstance(v, torch.device) else v)
                 for k, v in vars(a).items() if k != "memory_cell"},
    }
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": [asdict(r) for r in run.records]}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
