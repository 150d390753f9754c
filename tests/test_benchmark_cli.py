"""The benchmark's command line on the CPU, with tiny sizes: tables, JSON, plots, oom."""

import json
import re

import pytest
import torch

import fcsa
from fcsa import benchmark

TINY = ["--device", "cpu", "--batch", "1", "--heads", "2", "--dim", "16",
        "--num-times", "1", "--warmup", "0"]
FOUR = ["sdpa-cos", "sdpa-flash-cos", "plain", "naive"]
NUM = r"[0-9][0-9.e+-]*"
ROW = re.compile(
    rf"^seq_len: (?P<n>\d+)\s+slower: (?P<slower>{NUM})x\s+"
    rf"kernel: (?P<kms>{NUM})ms \((?P<ktf>{NUM}) TFLOP/s\)\s+"
    rf"sdpa-cos: (?P<bms>{NUM})ms \({NUM} TFLOP/s, (?P<ratio>{NUM})x\)\s+"
    rf"plain: {NUM}ms \({NUM} TFLOP/s, {NUM}x\)\s+"
    rf"naive: {NUM}ms \({NUM} TFLOP/s, {NUM}x\)$")


def run_cli(capsys, *argv):
    assert benchmark.main(list(argv)) == 0
    return capsys.readouterr().out


def sections(out):
    """{section title line: [row lines]} in print order."""
    found, title, lines, i = {}, None, out.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line == benchmark.RULE and i + 2 < len(lines) and lines[i + 2] == benchmark.RULE:
            title = lines[i + 1]
            found[title] = []
            i += 3
            continue
        if title is not None and line.startswith("seq_len:"):
            found[title].append(line)
        i += 1
    return found


def test_tables_json_and_plot(capsys, tmp_path):
    jpath, ppath = tmp_path / "bench.json", tmp_path / "bench.png"
    out = run_cli(capsys, *TINY, "--seq-lens", "32", "64", "--baselines", *FOUR,
                  "--json", str(jpath), "--plot", str(ppath))

    assert out.startswith("fcsa benchmark")
    assert f"fcsa:      {fcsa.__version__}" in out
    assert f"torch:     {torch.__version__}" in out
    assert "backend cpu" in out
    assert "backward alone" in out
    assert "sdpa-flash-cos skipped: it needs a CUDA device" in out

    secs = sections(out)
    assert [t.split()[-1] for t in secs] == ["forward", "backward", "backward"]
    assert all("batch: 1    heads: 2    dim 16" in t for t in secs)
    rows = [ROW.match(line) for lines in secs.values() for line in lines]
    assert all(rows), "\n".join(line for lines in secs.values() for line in lines)
    assert [int(m["n"]) for m in rows] == [32, 64] * 3

    data = json.loads(jpath.read_text())
    meta = data["meta"]
    for key in ("date", "device", "device_name", "torch_version", "cuda_version",
                "fcsa_version", "fcsa_build_info", "fcsa_backend", "timer",
                "backward_method", "implementations", "args"):
        assert key in meta
    assert meta["fcsa_version"] == fcsa.__version__
    assert meta["implementations"] == ["kernel", "sdpa-cos", "plain", "naive"]
    results = data["results"]
    assert len(results) == 3 * 2 * 4
    assert {r["status"] for r in results} == {"ok"}
    factor = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
    for r in results:
        assert r["flops"] == factor[r["mode"]] * 4 * 1 * 2 * r["seq_len"] ** 2 * 16
        assert r["ms"] > 0
        assert r["tflops"] == pytest.approx(r["flops"] / (r["ms"] * 1e-3) / 1e12)

    # The printed table is the JSON's numbers.
    by_key = {(r["mode"], r["seq_len"], r["impl"]): r for r in results}
    for mode, m in zip(["fwd", "fwd", "bwd", "bwd", "fwd+bwd", "fwd+bwd"], rows):
        kern, base = by_key[mode, int(m["n"]), "kernel"], by_key[mode, int(m["n"]), "sdpa-cos"]
        assert float(m["kms"]) == pytest.approx(kern["ms"], abs=0.006)
        assert float(m["bms"]) == pytest.approx(base["ms"], abs=0.006)
        assert m["slower"] == f"{kern['ms'] / base['ms']:.2f}" == m["ratio"]

    assert ppath.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "bench-memory.png").exists()


def test_forwards_only_causal_with_mask(capsys, tmp_path):
    jpath = tmp_path / "b.json"
    out = run_cli(capsys, *TINY, "--seq-lens", "48", "--only-forwards", "--causal",
                  "--mask-prob", "0.25", "--baselines", "sdpa-cos", "plain", "naive",
                  "--dtype", "float32", "bfloat16", "--json", str(jpath))
    secs = sections(out)
    assert len(secs) == 2
    for title in secs:
        assert "forward" in title and "causal" in title and "25% of keys masked" in title
        assert "backward" not in title
    assert [t.split()[0] for t in secs] == ["float32", "bfloat16"]
    assert all(ROW.match(line) for lines in secs.values() for line in lines)
    assert "SDPA the same as a boolean attn_mask" in out
    results = json.loads(jpath.read_text())["results"]
    assert {r["mode"] for r in results} == {"fwd"}
    assert all(r["causal"] and r["mask_prob"] == 0.25 for r in results)
    assert all(r["flops"] == 4 * 2 * 48 * 48 * 16 / 2 for r in results)


def test_oom_is_reported_per_cell(capsys, monkeypatch, tmp_path):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("out of memory (simulated)")

    monkeypatch.setattr(fcsa, "flash_cosine_sim_attention", out_of_memory)
    jpath = tmp_path / "b.json"
    out = run_cli(capsys, *TINY, "--seq-lens", "32", "--only-backwards",
                  "--baselines", "sdpa-cos", "--json", str(jpath))
    (rows,) = sections(out).values()
    assert len(rows) == 1
    assert re.match(rf"seq_len: 32\s+slower: -\s+kernel: oom\s+sdpa-cos: {NUM}ms ", rows[0])
    status = {r["impl"]: r["status"] for r in json.loads(jpath.read_text())["results"]}
    assert status == {"kernel": "oom", "sdpa-cos": "ok"}


def test_peak_memory_on_cpu(capsys, tmp_path):
    jpath, ppath = tmp_path / "m.json", tmp_path / "m.png"
    out = run_cli(capsys, "--device", "cpu", "--batch", "1", "--heads", "4", "--dim", "16",
                  "--seq-lens", "2048", "--baselines", "naive", "--memory-only",
                  "--json", str(jpath), "--plot", str(ppath))
    assert "peak memory, forward + backward" in out
    assert "fresh interpreter" in out
    assert re.search(rf"^seq_len: 2048\s+kernel: {NUM}MiB\s+naive: {NUM}[MG]iB \({NUM}x\)$",
                     out, re.M), out
    peaks = {r["impl"]: r["peak_bytes"] for r in json.loads(jpath.read_text())["results"]
             if r["kind"] == "memory"}
    assert set(peaks) == {"kernel", "naive"}
    # naive keeps (h, n, n) float32 matrices alive for its backward: 64 MiB each here.
    assert peaks["naive"] > peaks["kernel"] + 64 * 2**20
    assert not ppath.exists()  # --memory-only draws only the memory figure
    assert (tmp_path / "m-memory.png").read_bytes()[:4] == b"\x89PNG"


def test_baselines_compute_what_the_kernel_computes():
    s = benchmark.Shape(batch=2, heads=3, seq_len=40, dim=16)
    gen = torch.Generator().manual_seed(1)
    q, k, v, mask = benchmark.make_inputs(s, torch.float32, torch.device("cpu"), 0.3, gen)
    impls = benchmark.build_impls(["kernel", "sdpa-cos", "naive"], mask, True, 8.0, s.seq_len)
    outs = [impl.fn(q, k, v) for impl in impls]
    torch.testing.assert_close(outs[1], outs[0], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(outs[2], outs[0], atol=2e-5, rtol=1e-4)


def test_mask_has_the_asked_fraction_and_a_visible_first_key():
    s = benchmark.Shape(batch=3, heads=1, seq_len=64, dim=8)
    gen = torch.Generator().manual_seed(0)
    *_, mask = benchmark.make_inputs(s, torch.float32, torch.device("cpu"), 0.25, gen)
    assert mask.dtype == torch.bool and mask.shape == (3, 64)
    assert (~mask).sum(dim=1).tolist() == [16, 16, 16]
    assert mask[:, 0].all()
    assert not torch.equal(mask[0], mask[1])


def test_shapes_and_flops():
    args = benchmark.parse_args(["--shape", "fa", "--dim", "64"])
    assert benchmark.shape_for(args, 1024) == benchmark.Shape(16, 32, 1024, 64)
    assert benchmark.shape_for(args, 32768) == benchmark.Shape(1, 32, 32768, 64)
    args = benchmark.parse_args(["--batch", "4", "--heads", "8"])
    s = benchmark.shape_for(args, 512)
    assert s == benchmark.Shape(4, 8, 512, 64)
    assert benchmark.forward_flops(s, causal=False) == 4 * 4 * 8 * 512 * 512 * 64
    assert benchmark.forward_flops(s, causal=True) == 2 * 4 * 8 * 512 * 512 * 64


def test_defaults_and_bad_arguments():
    args = benchmark.finish_args(benchmark.parse_args(["--device", "cpu"]))
    assert args.modes == ["fwd", "bwd", "fwd+bwd"]
    assert args.seq_lens == [128, 256, 512, 1024]
    assert args.dtype == ["float32"]
    assert benchmark.finish_args(
        benchmark.parse_args(["--device", "cpu", "--only-backwards"])).modes == ["bwd"]
    for bad in (["--mask-prob", "1.5"], ["--only-forwards", "--only-backwards"],
                ["--baselines", "flash3"], ["--dtype", "float64"], ["--num-times", "0"]):
        with pytest.raises(SystemExit):
            benchmark.parse_args(bad)
