"""fcsa.distributed: ring attention across processes (gloo on the CPU), checked against
one-process fcsa on the whole sequence.

Each distributed test starts its own group of 2, 3 or 4 processes (torch.multiprocessing,
a file store under pytest's tmp_path, one thread each) and runs every case there, so
that a group is started once per world size: the cases are small, the start is what
costs (about two seconds a process on two cores).
"""

import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fcsa
from fcsa.distributed import (RingCosineSimAttention, gather_sequence, ring_attention,
                              shard_sequence)

# Allowed error relative to the reference's largest magnitude (and at least 1): the ring
# adds the same terms as the one-process kernel, in another order and rounding each
# step's partial result (16-bit gradients: each step's share rounds once before the
# float32 sum).
ATOL = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2}
# Where torch was built without torch.distributed (or gloo), only the one-process
# tests run.
needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="needs torch.distributed with gloo")
# A group that has not finished by then is stuck (a mismatched send, say): fail, do not hang.
GROUP_TIMEOUT_S = 120


# ---------------------------------------------------------------- one process

@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_causal_blocks_cover_exactly_the_visible_pairs_with_equal_work(world):
    """The blocks each rank computes with causal=True: over all the steps, every visible
    (query, key) pair exactly once, no block that causality hides entirely, and the same
    number of logits on every rank."""
    from fcsa.distributed import _blocks

    chunk = 3
    n = 2 * world * chunk
    positions = torch.arange(n).chunk(2 * world)
    # The global positions rank r holds: chunks r and 2W - 1 - r.
    held = [torch.cat([positions[r], positions[2 * world - 1 - r]]) for r in range(world)]
    covered = torch.zeros(n, n, dtype=torch.int64)
    work = []
    for rank in range(world):
        logits = 0
        for step in range(world):
            source = (rank - step) % world
            rows, keys, causal = _blocks(rank, source, 2 * chunk, True)
            qpos, kpos = held[rank][rows], held[source][keys]
            visible = kpos[None, :] <= qpos[:, None]
            if causal:  # the block's own (end-aligned) causal mask must be the same
                assert torch.equal(visible, torch.ones_like(visible).tril(0))
            else:
                assert visible.all(), (rank, source)
            covered[qpos[:, None], kpos[None, :]] += visible.long()
            logits += visible.numel()
        work.append(logits)
    assert torch.equal(covered, torch.ones(n, n, dtype=torch.int64).tril())
    assert len(set(work)) == 1, work


def test_needs_an_initialized_process_group():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="init_process_group"):
        ring_attention(q, q, q)
    with pytest.raises(RuntimeError, match="init_process_group"):
        shard_sequence(q)


# ---------------------------------------------------------------- process groups

def _run_group(world, tmp_path, cases):
    """Runs _worker on `world` processes; a failure in any is raised here, with its
    traceback."""
    context = mp.start_processes(_worker, args=(world, str(tmp_path / "store"), cases),
                                 nprocs=world, join=False, start_method="spawn")
    waited = 0.0
    while not context.join(timeout=1.0):
        waited += 1.0
        if waited > GROUP_TIMEOUT_S:
            for process in context.processes:
                process.terminate()
            pytest.fail(f"the group of {world} processes did not finish in "
                        f"{GROUP_TIMEOUT_S} s")


def _worker(rank, world, store, cases):
    torch.set_num_threads(1)  # several processes share two cores
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world)
    try:
        for name in cases:
            CASES[name](rank, world)
        dist.barrier()  # every rank done before any tears down
    finally:
        dist.destroy_process_group()


def _assert_close(name, got, ref, dtype):
    atol = ATOL[dtype] * max(1.0, ref.abs().max().item())
    err = (got.double() - ref.double()).abs().max().item()
    assert err <= atol, f"rank {dist.get_rank()}: {name} off by {err:.3g} (allowed {atol:.3g})"


def _sum_over_ranks(t, group=None):
    t = t.clone()
    dist.all_reduce(t, group=group)
    return t


def _check_ring(world, *, causal, b=2, h=4, hk=4, chunk=3, nk_chunk=None, d=8, dv=8,
                scale=8.0, groups=1, l2norm_qk=True, qk_size=1.0, dtype=torch.float32,
                group=None):
    """ring_attention on this rank's part against one-process fcsa on the whole sequence
    (the same random tensors on every rank): out, lse and every gradient."""
    torch.manual_seed(1234)
    parts = 2 * world if causal else world
    nq, nk = chunk * parts, (nk_chunk or chunk) * parts
    q = torch.randn(b, h, nq, d, dtype=dtype) * qk_size
    k = torch.randn(b, hk, nk, d, dtype=dtype) * qk_size
    v = torch.randn(b, hk, nk, dv, dtype=dtype)
    dout = torch.randn(b, h, nq, dv, dtype=dtype)
    if scale == "per-head":
        scale = (torch.rand(h) * 4 + 4).requires_grad_()
    elif scale == "shared":
        scale = torch.tensor(6.0, requires_grad=True)
    kwargs = dict(causal=causal, scale=scale, groups=groups, l2norm_qk=l2norm_qk,
                  return_lse=True)
    ring_kwargs = dict(kwargs, group=group)
    wrt = [t for t in (scale,) if isinstance(t, torch.Tensor)]

    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = fcsa.flash_cosine_sim_attention(*ref_in, **kwargs)
    ref_grads = torch.autograd.grad(ref_out, ref_in + wrt, dout)

    def shard(t):
        return shard_sequence(t, causal=causal, group=group)

    ring_in = [shard(t).detach().requires_grad_() for t in (q, k, v)]
    out, lse = ring_attention(*ring_in, **ring_kwargs)
    grads = torch.autograd.grad(out, ring_in + wrt, shard(dout))

    assert out.dtype == dtype and out.shape == ring_in[0].shape[:-1] + (dv,)
    _assert_close("out", out, shard(ref_out), dtype)
    _assert_close("lse", lse, shard(ref_lse), torch.float32)
    for name, got, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
        _assert_close(name, got, shard(ref), dtype)
    if wrt:
        # Each rank's share: its own queries' part, summed over the ranks.
        _assert_close("dscale", _sum_over_ranks(grads[3], group), ref_grads[3], dtype)


def _case_plain(rank, world):
    _check_ring(world, causal=False)


def _case_causal(rank, world):
    _check_ring(world, causal=True)


def _case_causal_gqa_scale_groups(rank, world):
    _check_ring(world, causal=True, hk=2, scale="per-head", groups=2, d=16, dv=12)


def _case_causal_single_kv_head_no_l2norm(rank, world):
    # Without l2norm q and k come normalized: norms near 1 keep the logits near the
    # scale, where float32's dscale (a sum that cancels) has the precision asked for.
    _check_ring(world, causal=True, hk=1, scale="shared", l2norm_qk=False, chunk=2,
                qk_size=8 ** -0.5)


def _case_cross_attention_gqa(rank, world):
    _check_ring(world, causal=False, hk=2, chunk=2, nk_chunk=5, scale="per-head")


def _case_causal_bfloat16(rank, world):
    _check_ring(world, causal=True, hk=2, dtype=torch.bfloat16)


def _case_bfloat16_scale_tensor(rank, world):
    # With a scale gradient the partial outputs stay in float32 (as in one process).
    _check_ring(world, causal=False, scale="per-head", dtype=torch.bfloat16)


def _case_subgroup(rank, world):
    """A group other than the default one: its ranks are not the global ones."""
    if world < 3:
        return
    # Every rank takes part in making the group; rank 0 stays out of it.
    group = dist.new_group(list(range(1, world)))
    if rank > 0:
        _check_ring(world - 1, causal=True, hk=2, scale="per-head", group=group)


def _case_module(rank, world):
    """RingCosineSimAttention on this rank's part equals CosineSimAttention on the whole,
    its parameters' gradients summed over the ranks."""
    torch.manual_seed(99)
    b, n, dim = 2, 4 * world, 16
    settings = dict(heads=4, dim_head=8, kv_heads=2, learned_scale=True, causal=True)
    ref = fcsa.CosineSimAttention(dim, **settings)
    ring = RingCosineSimAttention(dim, **settings)
    ring.load_state_dict(ref.state_dict())
    x, dout = torch.randn(b, n, dim), torch.randn(b, n, dim)

    x_ref = x.clone().requires_grad_()
    ref(x_ref).backward(dout)
    x_ring = shard_sequence(x, dim=1, causal=True).requires_grad_()
    out = ring(x_ring)
    out.backward(shard_sequence(dout, dim=1, causal=True))

    _assert_close("out", out, shard_sequence(ref(x), dim=1, causal=True), torch.float32)
    _assert_close("dx", x_ring.grad, shard_sequence(x_ref.grad, dim=1, causal=True),
                  torch.float32)
    for (name, p_ref), p_ring in zip(ref.named_parameters(), ring.parameters()):
        _assert_close("d" + name, _sum_over_ranks(p_ring.grad), p_ref.grad, torch.float32)


def _case_shard_and_gather(rank, world):
    """gather_sequence inverts shard_sequence (along any dim, causal or not), and its
    gradient sums the ranks' gradients."""
    torch.manual_seed(7)
    x = torch.randn(3, 4 * world, 2, 5)
    for causal, dim in itertools.product((False, True), (1, -3)):
        part = shard_sequence(x, dim=dim, causal=causal)
        assert part.shape[1] == x.shape[1] // world
        assert torch.equal(gather_sequence(part, dim=dim, causal=causal), x)
    if world > 1:
        # Rank r's part really is chunks r and 2W - 1 - r.
        pieces = x.chunk(2 * world, dim=1)
        assert torch.equal(shard_sequence(x, dim=1, causal=True),
                           torch.cat([pieces[rank], pieces[2 * world - 1 - rank]], 1))
    weight = torch.randn(x.shape)  # the same on every rank
    kept = weight.clone()
    part = shard_sequence(x, dim=1, causal=True).requires_grad_()
    gather_sequence(part, dim=1, causal=True).backward(weight)
    assert torch.equal(part.grad, world * shard_sequence(weight, dim=1, causal=True))
    assert torch.equal(weight, kept), "the caller's gradient was summed in place"


def _case_torch_context_parallel_layout(rank, world):
    """Within PyTorch's context_parallel (load balancing on, its default), the buffers
    it shards are shard_sequence(causal=True)'s parts, so ring_attention can take them."""
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.experimental import context_parallel
    except ImportError:  # a torch without it: nothing to check
        return
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(5)
    q, k, v = (torch.randn(1, 2, 4 * world, 8) for _ in range(3))
    whole = fcsa.flash_cosine_sim_attention(q, k, v, causal=True)
    buffers = [q.clone(), k.clone(), v.clone()]
    with context_parallel(mesh, buffers=buffers, buffer_seq_dims=[2, 2, 2]):
        for buffer, t in zip(buffers, (q, k, v)):
            assert torch.equal(buffer, shard_sequence(t, causal=True))
        out = ring_attention(*buffers, mesh.get_group(), causal=True)
    _assert_close("out", out, shard_sequence(whole, causal=True), torch.float32)


def _case_errors(rank, world):
    x = torch.randn(1, 2, 2 * world + 1, 8)
    with pytest.raises(ValueError, match=f"x along dim 2 has {2 * world + 1} positions"):
        shard_sequence(x)
    x = torch.randn(1, 2, 3 * world, 8)
    with pytest.raises(ValueError, match="causal=True: two per rank"):
        shard_sequence(x, causal=True)
    with pytest.raises(ValueError, match="dim must index"):
        shard_sequence(x, dim=4)
    with pytest.raises(ValueError, match="has 3 positions: with causal=True"):
        gather_sequence(torch.randn(1, 2, 3, 8), causal=True)
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="even length; got 3"):
        ring_attention(q, q, q, causal=True)
    with pytest.raises(ValueError, match="4 queries and 6 keys"):
        ring_attention(q[:, :, :2].repeat(1, 1, 2, 1), torch.randn(1, 2, 6, 8),
                       torch.randn(1, 2, 6, 8), causal=True)
    with pytest.raises(ValueError, match="q must be 4-D"):
        ring_attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="heads"):
        ring_attention(q, torch.randn(1, 3, 3, 8), torch.randn(1, 3, 3, 8))
    with pytest.raises(ValueError, match="context is not supported with causal=True"):
        RingCosineSimAttention(8, heads=2, dim_head=4, causal=True)(
            torch.randn(1, 2, 8), context=torch.randn(1, 2, 8))


CASES = {name[len("_case_"):]: fn for name, fn in globals().items()
         if name.startswith("_case_")}


@pytest.mark.distributed
@needs_gloo
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ring_attention_matches_one_process(world, tmp_path):
    _run_group(world, tmp_path, [name for name in CASES if name not in ("errors",)])


@pytest.mark.distributed
@needs_gloo
def test_errors_name_the_argument(tmp_path):
    _run_group(2, tmp_path, ["errors"])


# The examples under torchrun, opt-in: on a loaded 2-core machine a gloo rank has aborted
# at interpreter exit ("terminate called without an active exception") after printing
# correct results, about 1 run in 10, cause not found (not reproduced in 75 runs alone).
# The same code runs in the spawned groups above on every run.
needs_torchrun_opt_in = pytest.mark.skipif(
    os.environ.get("FCSA_TEST_TORCHRUN") != "1",
    reason="the torchrun examples run with FCSA_TEST_TORCHRUN=1 (a rare abort at gloo's exit)")


@pytest.mark.distributed
@needs_gloo
@needs_torchrun_opt_in
def test_example_under_torchrun():
    """examples/ring_attention.py as the README runs it, on two CPU processes."""
    example = Path(__file__).resolve().parents[1] / "examples" / "ring_attention.py"
    if not example.is_file():
        pytest.skip("examples/ring_attention.py is not here")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
         "2", str(example), "--seq-len", "48"],
        capture_output=True, text=True, timeout=GROUP_TIMEOUT_S,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    line = re.search(r"2 ranks, 48 positions, float32: .*: out (\S+), dq (\S+), dk (\S+)",
                     result.stdout)
    assert line, result.stdout
    assert all(float(err) < 1e-4 for err in line.groups()), line[0]


@pytest.mark.distributed
@needs_gloo
@needs_torchrun_opt_in
def test_benchmark_under_torchrun():
    """examples/ring_attention_benchmark.py runs (tiny, on two CPU processes) and reports
    what the README says it reports."""
    script = Path(__file__).resolve().parents[1] / "examples" / "ring_attention_benchmark.py"
    if not script.is_file():
        pytest.skip("examples/ring_attention_benchmark.py is not here")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
         "2", str(script), "--seq-len-per-rank", "32", "--heads", "2", "--dim-head", "8",
         "--dtype", "float32", "--warmup", "1", "--iters", "2"],
        capture_output=True, text=True, timeout=GROUP_TIMEOUT_S,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["world"] == 2 and report["seq_len"] == 64
    assert report["step_ms"] > 0
    assert report["tokens_per_s_per_rank"] == pytest.approx(32e3 / report["step_ms"], rel=0.01)
