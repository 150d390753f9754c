#!/usr/bin/env bash
# The GPU validation run: build for the local GPU, the whole test suite on CUDA,
# compute-sanitizer on a subset, the long-sequence check, the benchmark and the training
# example. Everything it prints also lands in $RESULTS (default ./gpu-results).
#
#   bash benchmarks/gpu_run.sh build test sanitize long   # correctness
#   bash benchmarks/gpu_run.sh bench train                 # speed, memory, training
#   bash benchmarks/gpu_run.sh decode varlen valuedim       # issues #16, #17, #21's tables
#
# Needs python3 with torch, cmake, ninja, cython and scikit-build-core already installed
# (it builds with --no-build-isolation, so it works on a machine without a network).
# Instead of `build`, `install` takes a wheel built elsewhere from $PREBUILT (default
# .wheel/), and `checks` runs the device check programs found there (check_forward,
# check_backward: cuda/tests/, linked against the same build's objects).
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${RESULTS:-gpu-results}
ARCH=${FCSA_CUDA_ARCHITECTURES:-90a-real}
PY=${PYTHON:-python3}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1

stage_build() {
    "$PY" -m pip install -q --no-build-isolation --no-deps -Cbuild-dir=build/gpu \
        -Ccmake.define.FCSA_CUDA=ON -Ccmake.define.FCSA_CUDA_ARCHITECTURES="$ARCH" \
        -Ccmake.define.FCSA_LINEINFO=ON . \
        >"$RESULTS/build.log" 2>&1 || { tail -40 "$RESULTS/build.log"; return 1; }
    "$PY" -c "import fcsa; print(fcsa.build_info())"
}

stage_install() {
    "$PY" -m pip install -q --no-deps --no-index --force-reinstall "${PREBUILT:-.wheel}"/fcsa-*.whl \
        >"$RESULTS/install.log" 2>&1 || { tail -20 "$RESULTS/install.log"; return 1; }
    "$PY" -c "import fcsa; print(fcsa.build_info())"
}

stage_checks() {
    # float64-referenced sweeps of the kernels alone; the backward again with A100's
    # shared memory (no 171 KB kernel) and with the compact shapes of 99 KB GPUs; each
    # under memcheck and racecheck in its quick form.
    local dir=${PREBUILT:-.wheel}
    "$dir/check_forward" --no-time 2>&1 | grep -E "^FAIL|^correctness"
    for limit in "" 166912 101376; do
        FCSA_MAX_SHARED_MEMORY=$limit "$dir/check_backward" --no-timing 2>&1 | grep -E "^FAIL|cases passed"
    done
    "$dir/check_backward" --sm90 --no-timing 2>&1 | grep -E "^FAIL|cases passed" # the Hopper main kernel
    for tool in memcheck racecheck synccheck; do
        for program in check_forward check_backward "check_forward --sm90" "check_backward --sm90"; do
            local log="$RESULTS/sanitizer-$tool-${program// /}.txt"
            compute-sanitizer --tool "$tool" --error-exitcode 3 --print-limit 20 "$dir/"$program --quick >"$log" 2>&1
            echo "compute-sanitizer $tool $program: exit $? ($(tail -n 1 "$log"))"
        done
    done
}

# pytest workers: one per core, each with one CPU thread. The float64 references run on
# the CPU; workers that each start an OpenMP pool of every core starve one another (on 16
# cores, 16 x 16 threads ran a third of the CUDA tests in 300 s; one thread each, all of
# them in 90 s).
WORKERS=${WORKERS:-$(nproc)}

stage_test() {
    # The whole suite; the tests marked cuda run because a GPU is present.
    OMP_NUM_THREADS=1 "$PY" -m pytest -q -n "$WORKERS" -p no:cacheprovider tests 2>&1 | tail -25
}

stage_cudatest() {
    # Only the tests marked cuda (the GPU's share of the suite, a third of its time).
    OMP_NUM_THREADS=1 "$PY" -m pytest -q -n "$WORKERS" -p no:cacheprovider -m cuda -rfE tests 2>&1 | tail -12
}

stage_sanitize() {
    # One case of each feature under memcheck and racecheck (slow tools: a small subset).
    local pick="test_matches_cpu_backend and (64-bfloat16 or 32-float32) or test_small_shared_memory_gpus and 128-bfloat16"
    pick+=" or test_plain_paths_match_cpu_backend and 128-bfloat16"
    local subset=(tests/test_cuda.py -k "$pick")
    for tool in memcheck racecheck; do
        compute-sanitizer --tool "$tool" --error-exitcode 3 --print-limit 20 \
            "$PY" -m pytest -q -x -p no:cacheprovider "${subset[@]}" 2>&1 | tail -6
        echo "compute-sanitizer $tool exit ${PIPESTATUS[0]}"
    done
}

stage_long() {
    # 128k tokens, b=1, h=8, d=64, bf16, causal: forward and backward, peak memory.
    "$PY" - <<'EOF'
import time, torch, fcsa
torch.manual_seed(0)
n = 131072
q, k, v = (torch.randn(1, 8, n, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
           for _ in range(3))
# The first call in a process pays one-time setup (torch.library's dispatch imports
# torch._dynamo, the CUDA modules load): a short warm-up keeps it out of the timing.
start = time.perf_counter()
warm = [t[:, :, :1024].detach().requires_grad_() for t in (q, k, v)]
fcsa.flash_cosine_sim_attention(*warm, causal=True).sum().backward()
torch.cuda.synchronize()
print(f"first call (n = 1024, one-time setup included): {time.perf_counter() - start:.1f} s")
torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
base = torch.cuda.memory_allocated()
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
start.record()
out = fcsa.flash_cosine_sim_attention(q, k, v, causal=True)
out.backward(torch.randn_like(out))
end.record(); torch.cuda.synchronize()
peak = torch.cuda.max_memory_allocated() - base
finite = all(torch.isfinite(t).all().item() for t in (out, q.grad, k.grad, v.grad))
print(f"128k causal bf16 d=64: forward+backward {start.elapsed_time(end):.0f} ms, "
      f"peak memory beyond inputs {peak / 2**20:.0f} MiB, all finite: {finite}, "
      f"backend {fcsa.last_backend()}")
print(f"an n x n score matrix alone would take {8 * n * n * 2 / 2**30:.0f} GiB in bf16")
EOF
}

stage_bench() {
    local common=(--shape fa --dtype ${BENCH_DTYPES:-bfloat16 float16} --seq-lens 512 1024 2048 4096 8192 16384
                  --baselines sdpa-cos sdpa-flash-cos --modes fwd bwd)
    for dim in 64 128; do
        for causal in "" "--causal"; do
            local tag="fa-d${dim}${causal:+-causal}"
            "$PY" -m fcsa.benchmark "${common[@]}" --dim "$dim" $causal \
                --json "$RESULTS/$tag.json" --plot "$RESULTS/$tag.png" 2>&1 | grep -v "^  note"
        done
    done
    # The original's shape (batch 4, heads 8, d 64) with the memory plot and every baseline.
    "$PY" -m fcsa.benchmark --shape seed --dtype bfloat16 float32 --memory \
        --seq-lens 512 1024 2048 4096 8192 \
        --json "$RESULTS/seed.json" --plot "$RESULTS/seed.png" 2>&1 | grep -v "^  note"
}

stage_decode() {
    # Issue #16's table: the four cases, d = 64 and 128, 1 / 4 / 16 query rows, paged too.
    "$PY" -m fcsa.benchmark --decode --dims 64 128 --nq 1 4 16 --paged 16 64 --dtype bfloat16 \
        --json "$RESULTS/decode.json" 2>&1
}

stage_varlen() {
    # Issue #17's table: 16 documents of 512 to 8192 tokens, d = 128, causal and not.
    for causal in "" "--causal"; do
        "$PY" -m fcsa.benchmark --varlen --dim 128 --heads 16 --docs 16 --min-len 512 --max-len 8192 \
            --dtype bfloat16 $causal --json "$RESULTS/varlen${causal:+-causal}.json" 2>&1
    done
}

stage_valuedim() {
    # Issue #21's bar: the portable forward at (192, 128) and (128, 128), per FLOP, in one
    # process (FCSA_DISABLE_SM90=1: (128, 128) would otherwise run on the Hopper kernel).
    for causal in "" "--causal"; do
        FCSA_DISABLE_SM90=1 "$PY" -m fcsa.benchmark --only-forwards --dtype bfloat16 float16 \
            --dim 192 128 --dim-v 128 --shape seed --batch 4 --heads 16 --seq-lens 2048 8192 16384 \
            $causal --baselines plain --json "$RESULTS/valuedim${causal:+-causal}.json" 2>&1
    done
}

stage_train() {
    local args=(--steps 500 --validate-every 250 --generate-every 500 --no-progress)
    "$PY" examples/train.py --seq-len 1024 --use-cuda-kernel "${args[@]}" \
        --checkpoint "$RESULTS/ckpt-fcsa.pt" 2>&1 | tail -12
    "$PY" examples/train.py --seq-len 1024 "${args[@]}" \
        --checkpoint "$RESULTS/ckpt-plain.pt" 2>&1 | tail -12
    "$PY" examples/train.py --seq-len 8192 --use-cuda-kernel --steps 30 --validate-every 30 \
        --generate-every 1000 --no-progress --checkpoint "$RESULTS/ckpt-8k.pt" 2>&1 | tail -8
    "$PY" examples/train.py --seq-len 8192 --steps 5 --validate-every 5 \
        --generate-every 1000 --no-progress --checkpoint "$RESULTS/ckpt-8k-plain.pt" 2>&1 | tail -8
    rm -f "$RESULTS"/ckpt-*.pt
}

status=0
for stage in "${@:-build test sanitize long bench train}"; do
    for s in $stage; do
        echo "==== $s  $(date -u +%H:%M:%S)"
        "stage_$s" 2>&1 | tee -a "$RESULTS/$s.out"
        [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    done
done
exit $status
