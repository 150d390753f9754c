// The AVX2 + FMA tile kernels (x86-64 only). CMake compiles this file with -mavx2 -mfma;
// it runs only after tile_kernels() has checked that the CPU has both.
#if defined(__x86_64__) || defined(_M_X64)
#if !defined(__AVX2__) || !defined(__FMA__)
#error "tile_kernels_avx2.cpp must be compiled with -mavx2 -mfma"
#endif
// 6 x 16 floats: 12 accumulators, 2 vectors of b and a broadcast fill the 16 registers.
#define FCSA_TILE_NAMESPACE avx2_isa
#define FCSA_TILE_ISA_NAME "avx2"
#define FCSA_TILE_WIDTH 8
#define FCSA_TILE_ROWS 6
#define FCSA_TILE_VECTORS 2
#define FCSA_TILE_TABLE avx2_tile_kernels
#include "cpu/tile_kernels_impl.inc"
#endif
