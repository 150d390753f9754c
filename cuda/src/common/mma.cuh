// mma.cuh: warp-level tensor-core products (mma.sync) and the fragments they use.
//
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16 / m16n8k8"). In a warp,
// lane = 4 * g + t with g = lane / 4 (0..7) and t = lane % 4 (0..3).
//
//   Accumulator C/D, 16 x 8 float (both shapes):
//     c[0], c[1] = (row g,     cols 2t, 2t+1)
//     c[2], c[3] = (row g + 8, cols 2t, 2t+1)
//   m16n8k16, 16-bit operands, each register holds 2 elements (low half = lower column):
//     A 16 x 16: a[0] = (row g, k 2t..2t+1)   a[1] = (row g+8, k 2t..2t+1)
//                a[2] = (row g, k 2t+8..+9)   a[3] = (row g+8, k 2t+8..+9)
//     B 16 x 8:  b[0] = (k 2t..2t+1, col g)   b[1] = (k 2t+8..+9, col g)
//   m16n8k8, tf32 operands, one element per register:
//     A 16 x 8:  a[0] = (g, t)  a[1] = (g+8, t)  a[2] = (g, t+4)  a[3] = (g+8, t+4)
//     B 8 x 8:   b[0] = (k t, col g)  b[1] = (k t+4, col g)
//
// Two facts the kernels rely on: an accumulator of m16n8k16 products covering 16
// columns is, register for register, the A operand of the next m16n8k16 product (the
// "P stays in registers" trick); and for tf32 the k order inside one m16n8k8 is free,
// so an accumulator's (2t, 2t+1) pair can serve as A's (t, t+4) when B is read with
// the same permutation.
//
// float32 accuracy from tf32 units (3xTF32): x = big + small with big = tf32(x) and
// small = tf32(x - big); a*b ~ big_a*big_b + big_a*small_b + small_a*big_b leaves an
// error near 2^-22 relative, i.e. float32's, at three tensor products per product.
#pragma once

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "layout.cuh"
#include "numeric.cuh"

namespace fcsa {
namespace common {

struct FragC {
    float x[4];
};
struct FragA16 {
    uint32_t x[4];
};
struct FragB16 {
    uint32_t x[2];
};
struct FragATf32 {
    uint32_t x[4];
};
struct FragBTf32 {
    uint32_t x[2];
};

__device__ __forceinline__ void clear(FragC &c) {
#pragma unroll
    for (int i = 0; i < 4; ++i) c.x[i] = 0.f;
}

// D = A * B + D, 16-bit operands, float accumulators.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(FragC &d, const FragA16 &a, const FragB16 &b);

template <>
__device__ __forceinline__ void mma_m16n8k16<__half>(FragC &d, const FragA16 &a, const FragB16 &b) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d.x[0]), "+f"(d.x[1]), "+f"(d.x[2]), "+f"(d.x[3])
                 : "r"(a.x[0]), "r"(a.x[1]), "r"(a.x[2]), "r"(a.x[3]), "r"(b.x[0]), "r"(b.x[1]));
}

template <>
__device__ __forceinline__ void mma_m16n8k16<__nv_bfloat16>(FragC &d, const FragA16 &a,
                                                            const FragB16 &b) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d.x[0]), "+f"(d.x[1]), "+f"(d.x[2]), "+f"(d.x[3])
                 : "r"(a.x[0]), "r"(a.x[1]), "r"(a.x[2]), "r"(a.x[3]), "r"(b.x[0]), "r"(b.x[1]));
}

// D = A * B + D with tf32 operands (each register a float whose low 13 mantissa bits
// the unit ignores).
__device__ __forceinline__ void mma_m16n8k8_tf32(FragC &d, const FragATf32 &a, const FragBTf32 &b) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d.x[0]), "+f"(d.x[1]), "+f"(d.x[2]), "+f"(d.x[3])
                 : "r"(a.x[0]), "r"(a.x[1]), "r"(a.x[2]), "r"(a.x[3]), "r"(b.x[0]), "r"(b.x[1]));
}

// float -> tf32, rounded to nearest (the bit pattern stays a valid float).
__device__ __forceinline__ uint32_t to_tf32(float x) {
    uint32_t y;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(y) : "f"(x));
    return y;
}

// x = big + small, both tf32.
__device__ __forceinline__ void split_tf32(float x, uint32_t &big, uint32_t &small) {
    big = to_tf32(x);
    small = to_tf32(x - __uint_as_float(big));
}

template <int N>
__device__ __forceinline__ void split_tf32(const float (&x)[N], uint32_t (&big)[N], uint32_t (&small)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) split_tf32(x[i], big[i], small[i]);
}

// D += A * B in float32 accuracy from split operands (small terms first).
__device__ __forceinline__ void mma_m16n8k8_3xtf32(FragC &d, const FragATf32 &a_big,
                                                   const FragATf32 &a_small, const FragBTf32 &b_big,
                                                   const FragBTf32 &b_small) {
    mma_m16n8k8_tf32(d, a_small, b_big);
    mma_m16n8k8_tf32(d, a_big, b_small);
    mma_m16n8k8_tf32(d, a_big, b_big);
}

// ---------------------------------------------------------------- ldmatrix
// ldmatrix.x4 loads four 8x8 matrices of 16-bit elements: lanes 8i..8i+7 give the
// addresses of matrix i's 8 rows (16 contiguous bytes each); register i of lane 4g+t
// receives row g, elements 2t and 2t+1 of matrix i. With .trans it receives
// elements (2t, g) and (2t+1, g) instead: the transposed matrix.

__device__ __forceinline__ uint32_t smem_address(const void *p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t address) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t address) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
}

__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], uint32_t address) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(address));
}

__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], uint32_t address) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(address));
}

// ---------------------------------------------------------------- fragment loads
// From a row-major shared tile of 16-bit elements in a layout of layout.cuh (PaddedTile,
// SwizzledTile, or StridedRows with a padded stride), whose chunk_offset(row, col)
// gives each lane's 16-byte row of an 8x8 matrix; the stride overloads are for
// StridedRows.

// A operand (rows row0..row0+15, k col0..col0+15) of a row-major tile.
template <typename T, class Layout>
__device__ __forceinline__ void load_a16(FragA16 &a, const T *tile, const Layout &layout, int row0, int col0,
                                         int lane) {
    ldmatrix_x4(a.x, smem_address(tile + layout.chunk_offset(row0 + (lane & 15), col0 + (lane >> 4) * 8)));
}

// B operands of two neighbouring n8 blocks (n row0..row0+15, k col0..col0+15) from a
// tile stored [n][k] (for S = Q K^T: K as stored). b[0] covers n row0..+7, b[1] +8..+15.
template <typename T, class Layout>
__device__ __forceinline__ void load_b16_nk(FragB16 (&b)[2], const T *tile, const Layout &layout, int row0,
                                            int col0, int lane) {
    const int row = row0 + (lane & 7) + (lane >> 4) * 8;
    const int col = col0 + ((lane >> 3) & 1) * 8;
    uint32_t r[4];
    ldmatrix_x4(r, smem_address(tile + layout.chunk_offset(row, col)));
    b[0].x[0] = r[0];
    b[0].x[1] = r[1];
    b[1].x[0] = r[2];
    b[1].x[1] = r[3];
}

// B operands of two neighbouring n8 blocks (n col0..col0+15, k row0..row0+15) from a
// tile stored [k][n] (for O = P V: V as stored), through ldmatrix.trans.
template <typename T, class Layout>
__device__ __forceinline__ void load_b16_kn(FragB16 (&b)[2], const T *tile, const Layout &layout, int row0,
                                            int col0, int lane) {
    const int row = row0 + (lane & 7) + ((lane >> 3) & 1) * 8;
    const int col = col0 + (lane >> 4) * 8;
    uint32_t r[4];
    ldmatrix_x4_trans(r, smem_address(tile + layout.chunk_offset(row, col)));
    b[0].x[0] = r[0];
    b[0].x[1] = r[1];
    b[1].x[0] = r[2];
    b[1].x[1] = r[3];
}

template <typename T>
__device__ __forceinline__ void load_a16(FragA16 &a, const T *tile, int stride, int row0, int col0, int lane) {
    load_a16(a, tile, StridedRows{stride}, row0, col0, lane);
}
template <typename T>
__device__ __forceinline__ void load_b16_nk(FragB16 (&b)[2], const T *tile, int stride, int row0, int col0,
                                            int lane) {
    load_b16_nk(b, tile, StridedRows{stride}, row0, col0, lane);
}
template <typename T>
__device__ __forceinline__ void load_b16_kn(FragB16 (&b)[2], const T *tile, int stride, int row0, int col0,
                                            int lane) {
    load_b16_kn(b, tile, StridedRows{stride}, row0, col0, lane);
}

// Accumulators of two neighbouring n8 blocks (16 columns) -> the A operand of an
// m16n8k16 product over those 16 columns, rounded to T.
template <typename T>
__device__ __forceinline__ void accumulators_to_a16(FragA16 &a, const FragC &left, const FragC &right) {
    a.x[0] = pack_float2<T>(left.x[0], left.x[1]);
    a.x[1] = pack_float2<T>(left.x[2], left.x[3]);
    a.x[2] = pack_float2<T>(right.x[0], right.x[1]);
    a.x[3] = pack_float2<T>(right.x[2], right.x[3]);
}

// ---- float32 tiles (row stride = 4 mod 32 words: the patterns below are conflict-free)

// A operand (rows row0..+15, k col0..+7) of a row-major float tile, split for 3xTF32.
__device__ __forceinline__ void load_a_tf32(FragATf32 &big, FragATf32 &small, const float *tile,
                                            int stride, int row0, int col0, int lane) {
    const int g = lane >> 2, t = lane & 3;
    const float *p = tile + (row0 + g) * stride + col0 + t;
    split_tf32(p[0], big.x[0], small.x[0]);
    split_tf32(p[8 * stride], big.x[1], small.x[1]);
    split_tf32(p[4], big.x[2], small.x[2]);
    split_tf32(p[8 * stride + 4], big.x[3], small.x[3]);
}

// B operand (n row0..+7, k col0..+7) of a float tile stored [n][k], split for 3xTF32.
__device__ __forceinline__ void load_b_tf32_nk(FragBTf32 &big, FragBTf32 &small, const float *tile,
                                               int stride, int row0, int col0, int lane) {
    const int g = lane >> 2, t = lane & 3;
    const float *p = tile + (row0 + g) * stride + col0 + t;
    split_tf32(p[0], big.x[0], small.x[0]);
    split_tf32(p[4], big.x[1], small.x[1]);
}

// B operand (k row0..+7, n col0..+7) of a float tile stored [k][n], with the k order
// permuted to match accumulator_to_a_tf32: b[0] = k 2t, b[1] = k 2t+1.
__device__ __forceinline__ void load_b_tf32_kn_permuted(FragBTf32 &big, FragBTf32 &small,
                                                        const float *tile, int stride, int row0,
                                                        int col0, int lane) {
    const int g = lane >> 2, t = lane & 3;
    const float *p = tile + (row0 + 2 * t) * stride + col0 + g;
    split_tf32(p[0], big.x[0], small.x[0]);
    split_tf32(p[stride], big.x[1], small.x[1]);
}

// One accumulator block (16 x 8) -> the A operand of an m16n8k8 product over its 8
// columns, in the permuted k order (a[0]/a[2] = cols 2t/2t+1), split for 3xTF32.
__device__ __forceinline__ void accumulator_to_a_tf32(FragATf32 &big, FragATf32 &small,
                                                      const FragC &c) {
    split_tf32(c.x[0], big.x[0], small.x[0]);
    split_tf32(c.x[2], big.x[1], small.x[1]);
    split_tf32(c.x[1], big.x[2], small.x[2]);
    split_tf32(c.x[3], big.x[3], small.x[3]);
}

} // namespace common
} // namespace fcsa
