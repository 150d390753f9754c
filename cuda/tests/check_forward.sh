#!/bin/bash
# check_forward.sh: build check_forward.cu with the forward kernels for one GPU target,
# run the correctness sweep and the timings, then a small subset under
# compute-sanitizer (memcheck, racecheck); for 90a the Hopper forward's (--sm90) too.
# Run from the repository root:
#   cuda/tests/check_forward.sh [target, default 90a] [log dir, default /tmp]
set -u
target=${1:-90a}
logs=${2:-/tmp}
build=/tmp/check_forward_build
mkdir -p "$build" "$logs"
flags="-O3 -std=c++17 --expt-relaxed-constexpr -lineinfo -DFCSA_WITH_CUDA -Icuda/include -Icuda/src
       -gencode=arch=compute_$target,code=sm_$target"
[ "$target" = 90a ] && flags="$flags -DFCSA_SM90A_TARGET"
sources="cuda/tests/check_forward.cu cuda/src/sm80/dispatch.cu cuda/src/sm80/shared_memory.cu cuda/src/sm80/varlen.cu $(ls cuda/src/sm80/forward*.cu)
         $(ls cuda/src/sm90/forward*.cu) cuda/src/sm90/tensor_map.cu"

start=$(date +%s)
jobs=$(nproc)
for src in $sources; do
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do sleep 0.2; done
    name=$(basename "$(dirname "$src")")_$(basename "$src" .cu)
    nvcc $flags -Xptxas -v -c "$src" -o "$build/$name.o" >"$build/$name.log" 2>&1 || echo "BUILD FAILED: $src" &
done
wait
grep -l "BUILD FAILED\|error" "$build"/*.log && { cat "$build"/*.log | grep -B2 -A5 error; exit 1; }
for f in "$build"/sm*_forward_*.log; do
    echo "$(basename "$f" .log): $(grep -oE 'Used [0-9]+ registers|[0-9]+ bytes spill stores' "$f" | tr '\n' ' ')"
done | tee "$logs/registers.txt"
nvcc $flags "$build"/*.o -o "$build/check_forward" || exit 1
echo "build: $(($(date +%s) - start)) s"

"$build/check_forward" 2>&1 | tee "$logs/check_forward.txt"
status=${PIPESTATUS[0]}
for tool in memcheck racecheck; do
    compute-sanitizer --tool $tool --error-exitcode 3 "$build/check_forward" --quick >"$logs/sanitizer_$tool.txt" 2>&1
    echo "compute-sanitizer $tool: exit $? ($(tail -n 1 "$logs/sanitizer_$tool.txt"))"
done
if [ "$target" = 90a ]; then
    "$build/check_forward" --sm90 2>&1 | tee "$logs/check_forward_sm90.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    for tool in memcheck racecheck synccheck; do
        compute-sanitizer --tool $tool --error-exitcode 3 "$build/check_forward" --sm90 --quick \
            >"$logs/sanitizer_sm90_$tool.txt" 2>&1
        echo "compute-sanitizer $tool (sm90): exit $? ($(tail -n 1 "$logs/sanitizer_sm90_$tool.txt"))"
    done
fi
exit $status
