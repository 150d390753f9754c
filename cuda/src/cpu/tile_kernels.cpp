#include "cpu/tile_kernels.h"

#include <cstdlib>
#include <cstring>

namespace fcsa {
namespace cpu {

extern const TileKernels generic_tile_kernels;
#if defined(__x86_64__) || defined(_M_X64)
extern const TileKernels avx2_tile_kernels;
#endif

namespace {

const TileKernels &choose_tile_kernels() {
    // FCSA_CPU_ISA=generic forces the portable kernels (to test them on any machine).
    const char *forced = std::getenv("FCSA_CPU_ISA");
    if (forced && std::strcmp(forced, "generic") == 0) return generic_tile_kernels;
#if defined(__x86_64__) || defined(_M_X64)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return avx2_tile_kernels;
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
