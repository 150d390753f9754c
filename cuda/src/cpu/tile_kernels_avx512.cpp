// The AVX-512 tile kernels (x86-64 only). CMake compiles this file with -mavx512f; it
// runs only after tile_kernels() has checked that the CPU and the OS support AVX-512F.
#if defined(__x86_64__) || defined(_M_X64)
#if !defined(__AVX512F__) || !defined(__FMA__)
#error "tile_kernels_avx512.cpp must be compiled with -mavx512f -mfma"
#endif
// 8 x 32 floats: 16 accumulators of the 32 registers, and 8 rows share each b vector.
#define FCSA_TILE_NAMESPACE avx512_isa
#define FCSA_TILE_ISA_NAME "avx512"
#define FCSA_TILE_WIDTH 16
#define FCSA_TILE_ROWS 8
#define FCSA_TILE_VECTORS 2
#define FCSA_TILE_TABLE avx512_tile_kernels
#include "cpu/tile_kernels_impl.inc"
#endif
