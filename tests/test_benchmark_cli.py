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
# One table row: the sequence length (on an implementation's first row), the name, then
# median, min-max and TFLOP/s, and for a baseline how fcsa compares; or a failed cell.
ROW = re.compile(
    rf"^ *(?P<n>\d*)  (?P<impl>[\w-]+) +(?:(?P<ms>{NUM}) +(?P<lo>{NUM})-(?P<hi>{NUM}) +"
    rf"(?P<tflops>{NUM})(?:  (?P<verdict>~?{NUM}× (?:faster|slower)))?|(?P<failed>oom.*|n/a))$")


def run_cli(capsys, *argv):
    assert benchmark.main(list(argv)) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 100, out
    return out


def sections(out):
    """{section title line: [row matches]} in print order; each table's column line is
    checked on the way."""
    found, title, lines, i = {}, None, out.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line == benchmark.RULE and i + 2 < len(lines) and lines[i + 2] == benchmark.RULE:
            title = lines[i + 1]
            assert lines[i + 3] in (benchmark.TIME_COLUMNS, benchmark.MEMORY_COLUMNS)
            found[title] = []
            i += 4
            continue
        row = ROW.match(line) if title is not None else None
        if row:
            found[title].append(row)
        i += 1
    return found


def groups(rows):
    """[(n, {implementation: row})] from the rows of one table."""
    out = []
    for row in rows:
        if row["n"]:
            out.append((int(row["n"]), {}))
        out[-1][1][row["impl"]] = row
    return out


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
    tables = [groups(rows) for rows in secs.values()]
    assert [[n for n, _ in table] for table in tables] == [[32, 64]] * 3
    for table in tables:
        for _, cells in table:
            assert list(cells) == ["fcsa", "sdpa-cos", "plain", "naive"]
            assert cells["fcsa"]["verdict"] is None
            assert all(cells[b]["verdict"] for b in ("sdpa-cos", "plain", "naive"))

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
        assert 0 < r["min_ms"] <= r["ms"] <= r["max_ms"] and r["runs"] == 1
        assert r["tflops"] == pytest.approx(r["flops"] / (r["ms"] * 1e-3) / 1e12)

    # The printed table is the JSON's numbers, and its verdicts say them plainly.
    by_key = {(r["mode"], r["seq_len"], r["impl"]): r for r in results}
    for mode, table in zip(["fwd", "bwd", "fwd+bwd"], tables):
        for n, cells in table:
            kernel = by_key[mode, n, "kernel"]
            for label, row in cells.items():
                r = by_key[mode, n, "kernel" if label == "fcsa" else label]
                for column, key in (("ms", "ms"), ("lo", "min_ms"), ("hi", "max_ms")):
                    assert float(row[column]) == pytest.approx(r[key], rel=1e-2, abs=1e-4)
                if label == "fcsa":
                    continue
                ratio = r["ms"] / kernel["ms"]
                words = f"{ratio:.2f}× faster" if ratio >= 1 else f"{1 / ratio:.2f}× slower"
                assert row["verdict"].lstrip("~") == words

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
    for rows in secs.values():
        ((n, cells),) = groups(rows)
        assert n == 48 and list(cells) == ["fcsa", "sdpa-cos", "plain", "naive"]
    assert "SDPA the same as a boolean attn_mask" in " ".join(out.split())  # wrapped
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
    ((n, cells),) = groups(rows)
    assert n == 32 and cells["fcsa"]["failed"] == "oom"
    assert cells["sdpa-cos"]["ms"] and cells["sdpa-cos"]["verdict"] is None
    status = {r["impl"]: r["status"] for r in json.loads(jpath.read_text())["results"]}
    assert status == {"kernel": "oom", "sdpa-cos": "ok"}


def test_peak_memory_on_cpu(capsys, tmp_path):
    jpath, ppath = tmp_path / "m.json", tmp_path / "m.png"
    out = run_cli(capsys, "--device", "cpu", "--batch", "1", "--heads", "4", "--dim", "16",
                  "--seq-lens", "2048", "--baselines", "naive", "--memory-only",
                  "--json", str(jpath), "--plot", str(ppath))
    assert "peak memory, forward + backward" in out
    assert "fresh interpreter" in out
    assert re.search(rf"^  2048  fcsa +{NUM} MiB\n {{8}}naive +{NUM} [MG]iB  {NUM}× less$",
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
    # v's own head dim: q k^T costs 2 b h n^2 d, P v 2 b h n^2 d_v
    args = benchmark.parse_args(["--batch", "4", "--heads", "8", "--dim", "192", "--dim-v", "128"])
    s = benchmark.shape_for(args, 512)
    assert s == benchmark.Shape(4, 8, 512, 192, 128) and s.value_dim == 128
    assert benchmark.forward_flops(s, causal=False) == 2 * 4 * 8 * 512 * 512 * (192 + 128)


def test_value_head_dims_in_one_run(capsys, tmp_path):
    # (16, 24) and (8, 24) in one process, every mode: each cell must run (a failed cell
    # prints n/a in place of its numbers), and the records carry both head dims.
    jpath = tmp_path / "dims.json"
    out = run_cli(capsys, "--device", "cpu", "--batch", "1", "--heads", "2", "--dim", "16", "8",
                  "--dim-v", "24", "--num-times", "1", "--warmup", "0", "--seq-lens", "32",
                  "--baselines", "naive", "--json", str(jpath))
    assert "2*b*h*n*n*(d + d_v)" in out
    found = sections(out)
    assert len(found) == 2 * 3  # two head-dim pairs, three modes
    for title, rows in found.items():
        assert ("dim 16    dim_v 24" in title) != ("dim 8    dim_v 24" in title), title
        ((n, cells),) = groups(rows)
        assert n == 32 and set(cells) == {"fcsa", "naive"}
        assert all(row["failed"] is None for row in cells.values()), title
    records = json.loads(jpath.read_text())["results"]
    assert {(r["dim"], r["dim_v"]) for r in records} == {(16, 24), (8, 24)}
    assert all(r["status"] == "ok" for r in records)
    s = benchmark.Shape(1, 2, 32, 16, 24)
    q, k, v, _ = benchmark.make_inputs(s, torch.float32, torch.device("cpu"), 0.0,
                                       torch.Generator().manual_seed(0))
    assert q.shape[-1] == k.shape[-1] == 16 and v.shape[-1] == 24


def test_head_dim_arguments_are_checked():
    for bad in (["--dim", "0"], ["--dim-v", "-8"], ["--dim", "16", "32", "64", "--dim-v", "8", "8"]):
        with pytest.raises(SystemExit):
            benchmark.parse_args(bad)
    args = benchmark.parse_args(["--dim", "192", "128", "--dim-v", "128"])
    assert args.dim_pairs == [(192, 128), (128, 128)]
    assert benchmark.parse_args(["--dim", "32", "64"]).dim_pairs == [(32, None), (64, None)]


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


def test_speed_verdicts_say_faster_or_slower():
    t = benchmark.Timing
    assert benchmark.speed_verdict(t(2.6, 2.5, 2.7), t(2.0, 1.9, 2.1)) == "1.30× faster"
    assert benchmark.speed_verdict(t(1.0, 0.9, 1.1), t(2.0, 1.9, 2.1)) == "2.00× slower"
    # Overlapping min-max ranges: the difference is within the noise of the runs.
    assert benchmark.speed_verdict(t(2.2, 1.5, 3.0), t(2.0, 1.9, 2.1)) == "~1.10× faster"
    timing = t.of([3.0, 1.0, 2.0])
    assert (timing.ms, timing.min_ms, timing.max_ms, timing.runs) == (2.0, 1.0, 3.0, 3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_asked_for_without_cuda_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--device", "cuda", "--seq-lens", "32"])
    message = str(exit_info.value.code)
    assert message.startswith("--device cuda: CUDA is not available here") and "--device cpu" in message
    assert capsys.readouterr().out == ""  # refused before any output or work


def test_an_unknown_device_exits_cleanly():
    with pytest.raises(SystemExit, match="--device gpu7: not a device name"):
        benchmark.main(["--device", "gpu7"])


def test_varlen_table_and_json(capsys, tmp_path):
    """--varlen: the packed batch, one sequence of the mean length and the padded batch,
    forward and backward, with the ratios the issue's bars ask for, and the JSON."""
    from fcsa import benchmark_varlen

    path = tmp_path / "varlen.json"
    assert benchmark.main(["--varlen", "--device", "cpu", "--docs", "3", "--min-len", "5",
                           "--max-len", "70", "--dim", "16", "--heads", "2", "--dtype",
                           "float32", "--runs", "1", "--warmup", "0", "--causal",
                           "--json", str(path)]) == 0
    text = capsys.readouterr().out
    for line in ("forward:", "backward:", "varlen / one seq", "varlen / padded",
                 "the padded batch computes at least"):
        assert line in text
    data = json.loads(path.read_text())
    assert data["date"][:4].isdigit() and data["device"]
    assert len(data["lengths"]) == 3 and all(5 <= n <= 70 for n in data["lengths"])
    # causal: the padded batch's padded queries see every key of their document
    n, m = data["lengths"], max(data["lengths"])
    floor = sum(x * x / 2 + (m - x) * x for x in n) / sum(x * x / 2 for x in n)
    assert data["padded_floor"] == pytest.approx(floor) and data["padded_floor"] >= 1
    ok = [r for r in data["records"] if r["status"] == "ok"]
    assert {(r["impl"], r["mode"]) for r in ok} == {
        (impl, mode) for impl in ("varlen", "one seq", "padded") for mode in ("fwd", "bwd")}
    assert all(r["tflops"] > 0 for r in ok)
    with pytest.raises(SystemExit):
        benchmark_varlen.parse_args(["--min-len", "9", "--max-len", "3"])
