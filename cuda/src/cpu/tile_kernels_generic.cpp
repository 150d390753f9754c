// The portable tile kernels: the baseline instruction set of the target (SSE2 on
// x86-64, NEON on aarch64), with the 4-float vectors both have.
#define FCSA_TILE_NAMESPACE generic_isa
#define FCSA_TILE_ISA_NAME "generic"
#define FCSA_TILE_WIDTH 4
#define FCSA_TILE_ROWS 4
#define FCSA_TILE_VECTORS 2
#define FCSA_TILE_TABLE generic_tile_kernels
#include "cpu/tile_kernels_impl.inc"
