"""examples/train.py: a tiny byte-level GPT learns on the CPU through fcsa's CPU kernel."""

import gzip
import importlib.util
import math
import zipfile
from pathlib import Path

import pytest
import torch

import fcsa

TRAIN_PY = Path(__file__).resolve().parents[1] / "examples" / "train.py"
TINY = ["--device", "cpu", "--dim", "64", "--depth", "2", "--heads", "2", "--dim-head", "32",
        "--seq-len", "64", "--batch-size", "8", "--grad-accum", "1", "--no-progress",
        "--threads", "1"]  # a tiny model: one thread is faster, and steady on a busy machine


@pytest.fixture(scope="module")
def train():
    spec = importlib.util.spec_from_file_location("fcsa_example_train", TRAIN_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_loss_falls_with_the_fused_kernel(train, tmp_path, capsys):
    ckpt = tmp_path / "ckpt" / "gpt.pt"
    steps = 30
    history = train.main(TINY + [
        "--data", str(tmp_path / "absent-enwik8.gz"), "--use-cuda-kernel",
        "--steps", str(steps), "--lr", "3e-3", "--validate-every", "15",
        "--val-batches", "2", "--generate-every", "0", "--checkpoint", str(ckpt)])
    out = capsys.readouterr().out
    assert "not found: training on the Python standard library" in out
    assert "attention fcsa.flash_cosine_sim_attention" in out
    assert history["backend"] == "cpu"  # the library's CPU kernel ran, not a fallback

    losses = history["loss"]
    assert len(losses) == steps and all(math.isfinite(x) for x in losses)
    # Uniform over 256 bytes is ln(256) = 5.55 nats; a few dozen steps learn the byte
    # statistics of Python source.
    assert losses[0] > 5.0
    first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert last < first - 0.5, (first, last)
    (s0, bpb0), *_, (s_end, bpb_end) = history["val_bpb"]
    assert (s0, s_end) == (0, steps - 1)
    assert bpb_end < bpb0 - 1.0 and bpb_end > 0

    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert set(state) >= {"model", "optimizer", "args", "step"}
    assert state["args"]["use_cuda_kernel"] is True and state["step"] == steps
    model = train.ByteGPT(dim=64, depth=2, heads=2, dim_head=32, max_seq_len=64)
    model.load_state_dict(state["model"])
    assert state["optimizer"]["state"], "the optimizer state was saved empty"


def test_plain_attention_path_and_sampling(train, tmp_path, capsys):
    history = train.main(TINY + [
        "--data", str(tmp_path / "absent"), "--steps", "2", "--validate-every", "1",
        "--val-batches", "1", "--generate-every", "1", "--generate-length", "12",
        "--prime-length", "16", "--checkpoint", ""])
    out = capsys.readouterr().out
    assert "attention fcsa.plain_cosine_sim_attention" in out
    assert history["backend"] is None and "checkpoint" not in history
    assert len(history["samples"]) == 1  # generated at step 1, not at step 0
    assert "sampled" in out


def test_both_attentions_agree(train):
    torch.manual_seed(0)
    fused = train.ByteGPT(dim=32, depth=1, heads=2, dim_head=16, max_seq_len=24,
                          use_kernel=True)
    plain = train.ByteGPT(dim=32, depth=1, heads=2, dim_head=16, max_seq_len=24,
                          use_kernel=False)
    plain.load_state_dict(fused.state_dict())
    tokens = torch.randint(0, 256, (3, 24))
    torch.testing.assert_close(fused(tokens), plain(tokens), atol=1e-5, rtol=1e-4)
    # causal: the logits at position i do not depend on bytes after i
    changed = tokens.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % 256
    torch.testing.assert_close(fused(changed)[:, :12], fused(tokens)[:, :12])


def test_generate_and_decode(train):
    torch.manual_seed(0)
    model = train.ByteGPT(dim=32, depth=1, heads=2, dim_head=16, max_seq_len=16).eval()
    prime = torch.tensor(list(b"def f(x):"))
    sample = model.generate(prime, 20, gen=torch.Generator().manual_seed(0))
    assert sample.shape == (20,) and sample.dtype == torch.long
    assert 0 <= int(sample.min()) and int(sample.max()) < 256
    assert train.decode(torch.tensor([0xE2, 0x82, 0xAC, 0xFF])) == "\u20ac\ufffd"


@pytest.mark.parametrize("kind", ["plain", "gz", "zip"])
def test_data_files_and_split(train, tmp_path, capsys, kind):
    raw = bytes(range(256)) * 8  # 2048 bytes
    path = tmp_path / {"plain": "corpus.txt", "gz": "corpus.gz", "zip": "corpus.zip"}[kind]
    if kind == "plain":
        path.write_bytes(raw)
    elif kind == "gz":
        path.write_bytes(gzip.compress(raw))
    else:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("enwik8", raw)
    tr, va, te = train.load_splits(str(path))
    assert (len(tr), len(va), len(te)) == (1843, 102, 103)
    assert bytes(torch.cat([tr, va, te]).tolist()) == raw
    assert str(path) in capsys.readouterr().out


def test_batches_are_shifted_windows(train):
    data = torch.arange(200, dtype=torch.uint8)
    batch = train.sample_batch(data, 5, 16, torch.Generator().manual_seed(0), "cpu")
    assert batch.shape == (5, 17) and batch.dtype == torch.long
    assert torch.equal(batch[:, 1:] - batch[:, :-1], torch.ones(5, 16, dtype=torch.long))
