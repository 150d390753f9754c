// bench_tile_kernels.cpp: throughput of the CPU tile kernels on one 64 x 64 tile (in L1),
// for every instruction set this machine runs: the matmul of the attention tiles
// (64 x 64 x d) and the softmax exponentials. From the repository root (x86-64):
//
//   I="-O3 -std=gnu++17 -Icuda/src -Icuda/include"
//   g++ $I -mavx2 -mfma -c cuda/src/cpu/tile_kernels_avx2.cpp -o /tmp/avx2.o
//   g++ $I -mavx512f -mavx2 -mfma -c cuda/src/cpu/tile_kernels_avx512.cpp -o /tmp/avx512.o
//   g++ $I cuda/tests/cpu/bench_tile_kernels.cpp cuda/src/cpu/tile_kernels_generic.cpp \
//       /tmp/avx2.o /tmp/avx512.o -o /tmp/bench_tile_kernels && /tmp/bench_tile_kernels
#include <cstdio>
#include <ctime>
#include <vector>

#include "cpu/tile_kernels.h"

namespace fcsa {
namespace cpu {
extern const TileKernels generic_tile_kernels;
#if defined(__x86_64__)
extern const TileKernels avx2_tile_kernels;
extern const TileKernels avx512_tile_kernels;
#endif
} // namespace cpu
} // namespace fcsa

static double thread_ms() {
    timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static void run(const fcsa::cpu::TileKernels &k, int d) {
    const int tile = 64, reps = 20000;
    std::vector<float> a(tile * d, 0.5f), b(d * tile, 0.25f), c(tile * tile), s(tile * tile, -1.f),
        offset(tile, 0.f), sum(tile);
    double start = thread_ms();
    for (int r = 0; r < reps; ++r) k.matmul(c.data(), tile, a.data(), d, 1, b.data(), fcsa::cpu::kPanelWidth, d * fcsa::cpu::kPanelWidth, tile, tile,
                 d, false);
    double ms = thread_ms() - start;
    const double matmul_gflops = 2.0 * tile * tile * d * reps / ms / 1e6;
    start = thread_ms();
    for (int r = 0; r < reps; ++r)
        k.exp_rows(c.data(), s.data(), tile, tile, tile, 1.f, offset.data(), nullptr, nullptr, sum.data());
    ms = thread_ms() - start;
    std::printf("%-8s d=%3d  matmul %6.1f GFLOP/s   exp %5.2f G/s\n", k.isa, d, matmul_gflops,
                double(tile) * tile * reps / ms / 1e6);
}

int main() {
    using namespace fcsa::cpu;
    std::vector<const TileKernels *> tables = {&generic_tile_kernels};
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) tables.push_back(&avx2_tile_kernels);
    if (__builtin_cpu_supports("avx512f")) tables.push_back(&avx512_tile_kernels);
#endif
    for (const TileKernels *k : tables)
        for (int d : {64, 128}) run(*k, d);
}
