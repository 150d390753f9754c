"""Train a small byte-level GPT with cosine-similarity attention.

    python examples/train.py --use-cuda-kernel              # fcsa's fused kernel
    python examples/train.py                                # plain PyTorch attention (n x n)
    python examples/train.py --seq-len 8192 --use-cuda-kernel
    python examples/train.py --help                         # every option and its default

Every byte is a token (vocabulary 256). The model: pre-norm blocks, each cosine-sim
attention (heads of 64, a fixed scale of 8, causal) and a feed-forward. Its size follows
the device (--preset auto): on a GPU, 8 blocks of width 512 over 1024 bytes for 100,000
steps (the original example's run); on a CPU, 4 blocks of width 256 over 256 bytes for
600 steps, a few minutes on 2 cores. Any option given on the command line overrides the
preset. Progress shows from the first step, with the time still to go.

--use-cuda-kernel runs the attention through fcsa.flash_cosine_sim_attention (the CUDA
kernel on a GPU, the library's CPU backend on a CPU); without it, through
fcsa.plain_cosine_sim_attention, which materializes the n x n attention matrix and runs
out of memory at long sequence lengths.

Data: --data (default data/enwik8.gz; a .gz, .zip or plain file), split 90% / 5% / 5%
(enwik8's standard 90M / 5M / 5M). When the file is absent, a corpus made of the Python
standard library's own source files stands in, so that the script runs anywhere.
Validation loss is reported in bits per byte.
"""

from __future__ import annotations

import argparse
import gzip
import math
import sysconfig
import time
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fcsa

try:
    from tqdm import tqdm
except ImportError:  # the loop works without a progress bar
    tqdm = None


# ----------------------------------------------------------------------------------------
# data


def read_bytes(path: Path) -> bytes:
    if path.suffix == ".gz":
        with gzip.open(path, "rb") as f:
            return f.read()
    if path.suffix == ".zip":
        with zipfile.ZipFile(path) as z:
            members = [i for i in z.infolist() if not i.is_dir()]
            if not members:
                raise SystemExit(f"{path}: the archive holds no file")
            return z.read(members[0])
    return path.read_bytes()


def stdlib_corpus() -> bytes:
    """The standard library's *.py files in sorted order, concatenated."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(f for f in root.rglob("*.py")
                   if not {"site-packages", "dist-packages"} & set(f.relative_to(root).parts))
    return b"".join(f.read_bytes() for f in files)


def load_splits(data_path: str):
    """(train, valid, test) as uint8 tensors, 90% / 5% / 5% of the corpus."""
    path = Path(data_path)
    if path.exists():
        raw = read_bytes(path)
        source = str(path)
    else:
        print(f"{path} not found: training on the Python standard library's source files "
              "instead (download enwik8 to data/enwik8.gz for the real task)")
        raw = stdlib_corpus()
        source = "python stdlib *.py"
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    n_train, n_val = int(len(data) * 0.90), int(len(data) * 0.05)
    splits = data[:n_train], data[n_train:n_train + n_val], data[n_train + n_val:]
    print(f"data: {source}, {len(data):,} bytes: train {len(splits[0]):,}, "
          f"valid {len(splits[1]):,}, test {len(splits[2]):,}")
    return splits


def sample_batch(data: torch.Tensor, batch_size: int, seq_len: int, gen: torch.Generator,
                 device) -> torch.Tensor:
    """batch_size random windows of seq_len + 1 bytes (input and shifted target)."""
    if len(data) < seq_len + 1:
        raise SystemExit(f"a split of {len(data)} bytes is shorter than --seq-len + 1")
    starts = torch.randint(0, len(data) - seq_len, (batch_size,), generator=gen)
    idx = starts[:, None] + torch.arange(seq_len + 1)
    return data[idx].long().to(device, non_blocking=True)


# ----------------------------------------------------------------------------------------
# model


class Attention(nn.Module):
    def __init__(self, dim, heads, dim_head, scale, use_kernel):
        super().__init__()
        self.heads, self.dim_head, self.scale = heads, dim_head, scale
        self.attend = (fcsa.flash_cosine_sim_attention if use_kernel
                       else fcsa.plain_cosine_sim_attention)
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, x):
        b, n, _ = x.shape
        # (b, n, 3 * h * d) -> three (b, h, n, d) views
        q, k, v = self.to_qkv(x).view(b, n, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        out = self.attend(q, k, v, scale=self.scale, causal=True)
        return self.to_out(out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head))


class Block(nn.Module):
    def __init__(self, dim, heads, dim_head, scale, use_kernel, ff_mult=4):
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dim_head, scale, use_kernel)
        self.ff_norm = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, dim * ff_mult), nn.GELU(),
                                nn.Linear(dim * ff_mult, dim))

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.ff(self.ff_norm(x))


class ByteGPT(nn.Module):
    def __init__(self, *, num_tokens=256, dim=512, depth=8, heads=8, dim_head=64, scale=8.0,
                 max_seq_len=1024, use_kernel=True):
        super().__init__()
        self.max_seq_len = max_seq_len
        self.token_emb = nn.Embedding(num_tokens, dim)
        self.pos_emb = nn.Embedding(max_seq_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, dim_head, scale, use_kernel)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.to_logits = nn.Linear(dim, num_tokens)
        nn.init.normal_(self.token_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)

    def forward(self, tokens):
        n = tokens.shape[1]
        x = self.token_emb(tokens) + self.pos_emb(torch.arange(n, device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.to_logits(self.norm(x))

    def loss(self, seq):
        """Mean next-byte cross entropy in nats; seq is (b, n + 1)."""
        logits = self(seq[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                               seq[:, 1:].reshape(-1))

    @torch.no_grad()
    def generate(self, prime, length, *, temperature=1.0, top_k=25, gen=None):
        """Sample `length` bytes after `prime` (1-D), seeing the last max_seq_len bytes."""
        out = prime[None]
        for _ in range(length):
            logits = self(out[:, -self.max_seq_len:])[:, -1].float() / temperature
            top = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
            probs = torch.zeros_like(logits).scatter_(-1, top.indices, top.values.softmax(-1))
            nxt = torch.multinomial(probs.cpu(), 1, generator=gen).to(out.device)
            out = torch.cat((out, nxt), dim=1)
        return out[0, prime.shape[0]:]


def decode(tokens) -> str:
    return bytes(tokens.tolist()).decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------------------
# training


# The sizes that follow the device: "gpu" is the original example's run, "cpu" one that
# finishes in a few minutes on 2 cores and still learns visibly.
PRESETS = {
    "gpu": dict(dim=512, depth=8, heads=8, dim_head=64, seq_len=1024, batch_size=4,
                grad_accum=4, steps=100_000, lr=2e-4, validate_every=100, val_batches=4,
                generate_every=500, generate_length=512, prime_length=128),
    "cpu": dict(dim=256, depth=4, heads=4, dim_head=64, seq_len=256, batch_size=8,
                grad_accum=1, steps=600, lr=1e-3, validate_every=100, val_batches=8,
                generate_every=300, generate_length=128, prime_length=64),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default; a preset's options show both presets' values."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.dest in PRESETS["cpu"] and action.default is None:
            cpu, gpu = PRESETS["cpu"][action.dest], PRESETS["gpu"][action.dest]
            return f"{text} (default: {cpu:,} on the CPU, {gpu:,} on CUDA)".lstrip()
        if action.default is None or action.nargs == 0:  # nothing to show, or a flag
            return text
        return super()._get_help_string(action)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train a byte-level GPT with cosine-sim attention.",
                                formatter_class=HelpFormatter)
    p.add_argument("--data", default="data/enwik8.gz",
                   help="enwik8 (.gz, .zip or plain); absent: the Python stdlib's sources")
    p.add_argument("--preset", choices=("auto", "cpu", "gpu"), default="auto",
                   help="model and run size: auto follows the device (the options marked "
                        "'on the CPU, ... on CUDA' below)")
    p.add_argument("--seq-len", type=int, help="bytes per sequence")
    p.add_argument("--use-cuda-kernel", action="store_true",
                   help="attention through fcsa.flash_cosine_sim_attention (CUDA, or the "
                        "library's CPU backend on a CPU); without it fcsa's plain PyTorch "
                        "attention")
    p.add_argument("--use-float32", action="store_true",
                   help="train in float32 on CUDA too (without it: bfloat16 autocast there; "
                        "the CPU always trains in float32)")
    p.add_argument("--batch-size", type=int, help="sequences per batch")
    p.add_argument("--grad-accum", type=int, help="batches per optimizer step")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--lr", type=float, help="Adam's learning rate")
    p.add_argument("--validate-every", type=int, help="steps between validations (0: never)")
    p.add_argument("--val-batches", type=int, help="batches per validation")
    p.add_argument("--generate-every", type=int, help="steps between samples (0: never)")
    p.add_argument("--generate-length", type=int, help="bytes per sample")
    p.add_argument("--prime-length", type=int, help="bytes of validation text before a sample")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--seed", type=int, default=0, help="for the weights and the batches")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--checkpoint", default="checkpoints/byte-gpt.pt", metavar="PATH",
                   help="where the final model, optimizer state and arguments go")
    p.add_argument("--dim", type=int, help="model width")
    p.add_argument("--depth", type=int, help="blocks")
    p.add_argument("--heads", type=int, help="attention heads")
    p.add_argument("--dim-head", type=int, help="width of a head")
    p.add_argument("--scale", type=float, default=8.0, help="the fixed cosine-sim scale")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (progress lines are printed instead)")
    return p.parse_args(argv)


def apply_preset(args, device: torch.device) -> str:
    """Fills the options not given from the preset; returns the preset's name."""
    name = args.preset if args.preset != "auto" else ("gpu" if device.type == "cuda" else "cpu")
    for key, value in PRESETS[name].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return name


def fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


@torch.no_grad()
def validate(model, data, args, gen, device, autocast) -> float:
    """Validation loss in bits per byte."""
    model.eval()
    losses = []
    for _ in range(args.val_batches):
        with autocast():
            losses.append(model.loss(sample_batch(data, args.batch_size, args.seq_len,
                                                  gen, device)).item())
    model.train()
    return sum(losses) / len(losses) / math.log(2)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset = apply_preset(args, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    train_data, val_data, _ = load_splits(args.data)
    model = ByteGPT(dim=args.dim, depth=args.depth, heads=args.heads, dim_head=args.dim_head,
                    scale=args.scale, max_seq_len=args.seq_len,
                    use_kernel=args.use_cuda_kernel).to(device)
    optim = torch.optim.Adam(model.parameters(), lr=args.lr)

    mixed = device.type == "cuda" and not args.use_float32
    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed)

    attention = ("fcsa.flash_cosine_sim_attention" if args.use_cuda_kernel
                 else "fcsa.plain_cosine_sim_attention")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters ({args.depth} blocks of width {args.dim}, "
          f"{args.heads} heads of {args.dim_head}), attention {attention}, "
          f"{'bfloat16 autocast' if mixed else 'float32'} on {device}")
    print(f"run: {preset} preset, {args.steps:,} steps of {args.batch_size * args.grad_accum} "
          f"sequences of {args.seq_len} bytes (python examples/train.py --help: the options)",
          flush=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    history = {"loss": [], "val_bpb": [], "samples": []}
    tokens_per_step = args.batch_size * args.grad_accum * args.seq_len
    steps = range(args.steps)
    bar = tqdm(steps, mininterval=1.0, dynamic_ncols=True) \
        if tqdm is not None and not args.no_progress else None
    say = (bar.write if bar is not None else print)
    # Without a bar: a line after the first step (with the time to go), then every 5%.
    report_every = max(1, args.steps // 20)
    start = time.perf_counter()
    model.train()
    for step in (bar if bar is not None else steps):
        total = 0.0
        for _ in range(args.grad_accum):
            batch = sample_batch(train_data, args.batch_size, args.seq_len, gen, device)
            with autocast():
                loss = model.loss(batch)
            (loss / args.grad_accum).backward()
            total += loss.item() / args.grad_accum
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optim.step()
        optim.zero_grad(set_to_none=True)
        history["loss"].append(total)
        elapsed = time.perf_counter() - start
        tok_s = tokens_per_step * (step + 1) / elapsed
        if bar is not None:
            bar.set_postfix(loss=f"{total:.3f}", tok_s=f"{tok_s:,.0f}")
        elif step == 0 or (step + 1) % report_every == 0:
            to_go = elapsed / (step + 1) * (args.steps - step - 1)
            say(f"step {step + 1}/{args.steps}: loss {total:.3f} nats, {tok_s:,.0f} tokens/s, "
                f"{fmt_duration(elapsed)} so far, about {fmt_duration(to_go)} to go", flush=True)

        last = step == args.steps - 1
        if args.validate_every and (step % args.validate_every == 0 or last):
            bpb = validate(model, val_data, args, gen, device, autocast)
            history["val_bpb"].append((step, bpb))
            say(f"step {step + 1}/{args.steps}: validation loss {bpb:.3f} bits/byte "
                f"(train loss {total:.3f} nats)", flush=True)
        if args.generate_every and step % args.generate_every == 0 and step > 0:
            model.eval()
            prime_len = min(args.prime_length, args.seq_len)
            i = int(torch.randint(0, len(val_data) - prime_len, (1,), generator=gen))
            prime = val_data[i:i + prime_len].long().to(device)
            with autocast():
                sample = model.generate(prime, args.generate_length, gen=gen)
            model.train()
            history["samples"].append(decode(sample))
            say(f"{'-' * 40} prime\n{decode(prime)}\n{'-' * 40} sampled\n{decode(sample)}\n"
                f"{'-' * 40}")
    if bar is not None:
        bar.close()

    elapsed = time.perf_counter() - start
    print(f"{args.steps} steps in {fmt_duration(elapsed)}, "
          f"{tokens_per_step * args.steps / elapsed:,.0f} tokens/s")
    if history["val_bpb"]:
        print(f"final validation loss: {history['val_bpb'][-1][1]:.3f} bits per byte")
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        history["peak_memory_bytes"] = peak
        print(f"peak GPU memory: {peak / 2**30:.2f} GiB")
    if args.checkpoint:
        path = Path(args.checkpoint)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict(), "optimizer": optim.state_dict(),
                    "args": vars(args), "step": args.steps}, path)
        print(f"checkpoint: {path}")
        history["checkpoint"] = str(path)
    history["backend"] = fcsa.last_backend() if args.use_cuda_kernel else None
    return history


if __name__ == "__main__":
    main()
