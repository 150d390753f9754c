#include "cpu/tile_kernels.h"

#include <cstdlib>
#include <cstring>

namespace fcsa {
namespace cpu {

extern const TileKernels generic_tile_kernels;
#if defined(__x86_64__) || defined(_M_X64)
extern const TileKernels avx2_tile_kernels;
extern const TileKernels avx512_tile_kernels;
#endif

namespace {

const TileKernels &choose_tile_kernels() {
    // FCSA_CPU_ISA=generic or =avx2 caps the instruction set (to test every path on
    // one machine); it never selects one the CPU lacks.
    const char *forced = std::getenv("FCSA_CPU_ISA");
    const bool only_generic = forced && std::strcmp(forced, "generic") == 0;
    const bool at_most_avx2 = only_generic || (forced && std::strcmp(forced, "avx2") == 0);
    if (only_generic) return generic_tile_kernels;
#if defined(__x86_64__) || defined(_M_X64)
    __builtin_cpu_init();
    const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (has_avx2 && !at_most_avx2 && __builtin_cpu_supports("avx512f")) return avx512_tile_kernels;
    if (has_avx2) return avx2_tile_kernels;
#else
    (void)at_most_avx2;
#endif
    return generic_tile_kernels;
}

} // namespace

const TileKernels &tile_kernels() {
    static const TileKernels &chosen = choose_tile_kernels();
    return chosen;
}

} // namespace cpu
} // namespace fcsa
