// backward_gemm.cuh: the three warp-level products the backward kernels are made of,
// with one interface for 16-bit operands (mma.m16n8k16) and for float32 (3xTF32 on
// mma.m16n8k8, float32 accuracy). Accumulators are common::FragC in both cases, so the
// code that works on scores (P, dS) is the same for every dtype.
//
//   rows_nk   acc[m][n] += A[16 rows] . B[8 rows]^T over the head dim, both tiles
//             stored row by row (S = Q K^T, dP = dO V^T and their transposes);
//   acc_kn    acc[m][n] += X . B with X an accumulator already in registers (P or dS,
//             turned into A operands by to_operand) and B stored [k][n] (dV += P^T dO,
//             dK += dS^T Q, dQ += dS K);
//   tileT_kn  acc[n] += A^T . B with A stored [k][m] in shared memory (dQ = dS K when
//             the CTA holds dS^T);
//   rows_kn, cols_kn (16-bit only): acc[m][n] += A . B and A^T . B with A in shared
//             memory, for the kernel that keeps P and dS there.
//
// Shared tiles are common::PaddedTile layouts: 16-bit rows padded to an odd number of
// 16-byte units (ldmatrix without bank conflicts), float rows to 4 mod 32 words (the
// scalar fragment loads below hit 32 different banks).
#pragma once

#include "../common/mma.cuh"
#include "../common/numeric.cuh"

namespace fcsa {
namespace sm80_bwd {

using common::FragC;

template <typename T, bool kIs16Bit = common::ElementTraits<T>::kIs16Bit> struct WarpGemm;

// ---------------------------------------------------------------- 16-bit operands
template <typename T> struct WarpGemm<T, true> {
    // An A operand covering 16 k (two accumulator blocks of 8 columns).
    struct Operand {
        common::FragA16 a;
    };

    template <int M, int N, int K>
    __device__ __forceinline__ static void rows_nk(FragC (&acc)[M][N], const T *a, int a_stride,
                                                   int a_row0, const T *b, int b_stride, int b_row0,
                                                   int lane) {
        static_assert(N % 2 == 0 && K % 16 == 0, "rows_nk: N even, K a multiple of 16");
#pragma unroll
        for (int k = 0; k < K; k += 16) {
            common::FragA16 fa[M];
#pragma unroll
            for (int m = 0; m < M; ++m) common::load_a16(fa[m], a, a_stride, a_row0 + 16 * m, k, lane);
#pragma unroll
            for (int n = 0; n < N; n += 2) {
                common::FragB16 fb[2];
                common::load_b16_nk(fb, b, b_stride, b_row0 + 8 * n, k, lane);
#pragma unroll
                for (int m = 0; m < M; ++m) {
                    common::mma_m16n8k16<T>(acc[m][n], fa[m], fb[0]);
                    common::mma_m16n8k16<T>(acc[m][n + 1], fa[m], fb[1]);
                }
            }
        }
    }

    // (left | right) * factor, rounded to T: the A operand over those 16 columns.
    __device__ __forceinline__ static void to_operand(Operand &op, const FragC &left, const FragC &right,
                                                      float factor) {
        op.a.x[0] = common::pack_float2<T>(left.x[0] * factor, left.x[1] * factor);
        op.a.x[1] = common::pack_float2<T>(left.x[2] * factor, left.x[3] * factor);
        op.a.x[2] = common::pack_float2<T>(right.x[0] * factor, right.x[1] * factor);
        op.a.x[3] = common::pack_float2<T>(right.x[2] * factor, right.x[3] * factor);
    }

    // acc[m][n] += X[m] . B[k rows 16*kq..][cols col0 + 8n..], summed over kq < KQ.
    template <int M, int KQ, int N>
    __device__ __forceinline__ static void acc_kn(FragC (&acc)[M][N], const Operand (&x)[M][KQ],
                                                  const T *b, int b_stride, int col0, int lane) {
        static_assert(N % 2 == 0, "acc_kn: N even");
#pragma unroll
        for (int kq = 0; kq < KQ; ++kq) {
            common::FragA16 fa[M];
#pragma unroll
            for (int m = 0; m < M; ++m) fa[m] = x[m][kq].a;
            mma_kn<M, N>(acc, fa, b, b_stride, 16 * kq, col0, lane);
        }
    }

    // acc[n] += A^T . B: A stored [k][m] (m0..m0+15), B stored [k][n], k over [0, K):
    // cols_kn for one m16 block.
    template <int N, int K>
    __device__ __forceinline__ static void tileT_kn(FragC (&acc)[N], const T *a, int a_stride, int m0,
                                                    const T *b, int b_stride, int col0, int lane) {
        cols_kn<1, N, K>(reinterpret_cast<FragC (&)[1][N]>(acc), a, a_stride, m0, b, b_stride, col0, lane);
    }

    // acc[m][n] += A . B with A stored [m][k] (rows a_row0 + 16m, k over [0, K)) and B
    // stored [k][n] (columns col0 + 8n): dQ = dS K when dS sits in shared memory.
    template <int M, int N, int K>
    __device__ __forceinline__ static void rows_kn(FragC (&acc)[M][N], const T *a, int a_stride, int a_row0,
                                                   const T *b, int b_stride, int col0, int lane) {
        static_assert(N % 2 == 0 && K % 16 == 0, "rows_kn: N even, K a multiple of 16");
#pragma unroll
        for (int k = 0; k < K; k += 16) {
            common::FragA16 fa[M];
#pragma unroll
            for (int m = 0; m < M; ++m) common::load_a16(fa[m], a, a_stride, a_row0 + 16 * m, k, lane);
            mma_kn<M, N>(acc, fa, b, b_stride, k, col0, lane);
        }
    }

    // acc[m][n] += A^T . B with A stored [k][m] (columns m0 + 16m, k rows over [0, K)) and
    // B stored [k][n]: dV += P^T dO and dK += dS^T Q when P and dS sit in shared memory.
    template <int M, int N, int K>
    __device__ __forceinline__ static void cols_kn(FragC (&acc)[M][N], const T *a, int a_stride, int m0,
                                                   const T *b, int b_stride, int col0, int lane) {
        static_assert(N % 2 == 0 && K % 16 == 0, "cols_kn: N even, K a multiple of 16");
#pragma unroll
        for (int k = 0; k < K; k += 16) {
            // Matrices (k.., m..), (k.., m+8..), (k+8.., m..), (k+8.., m+8..), transposed:
            // exactly a[0..3] of the A operand (rows m, columns k).
            const int row = k + (lane & 7) + (lane >> 4) * 8;
            const int col = m0 + ((lane >> 3) & 1) * 8;
            common::FragA16 fa[M];
#pragma unroll
            for (int m = 0; m < M; ++m)
                common::ldmatrix_x4_trans(fa[m].x, common::smem_address(a + row * a_stride + col + 16 * m));
            mma_kn<M, N>(acc, fa, b, b_stride, k, col0, lane);
        }
    }

  private:
    // acc[m][n] += fa[m] . B[k rows k0..k0+15][columns col0 + 8n], B stored [k][n].
    template <int M, int N>
    __device__ __forceinline__ static void mma_kn(FragC (&acc)[M][N], const common::FragA16 (&fa)[M], const T *b,
                                                  int b_stride, int k0, int col0, int lane) {
#pragma unroll
        for (int n = 0; n < N; n += 2) {
            common::FragB16 fb[2];
            common::load_b16_kn(fb, b, b_stride, k0, col0 + 8 * n, lane);
#pragma unroll
            for (int m = 0; m < M; ++m) {
                common::mma_m16n8k16<T>(acc[m][n], fa[m], fb[0]);
                common::mma_m16n8k16<T>(acc[m][n + 1], fa[m], fb[1]);
            }
        }
    }
};

// ---------------------------------------------------------------- float32 (3xTF32)
template <typename T> struct WarpGemm<T, false> {
    static_assert(sizeof(T) == 4, "the 3xTF32 path is for float");

    // Two k8 halves of a 16-wide A operand, each split into tf32 big + small parts, in
    // the permuted k order of common::accumulator_to_a_tf32.
    struct Operand {
        common::FragATf32 big[2], small[2];
    };

    // Over K > 64 the products are summed in pieces of 64, each added with float32
    // rounding (the truncating additions, as in acc_kn): at d = 256 with 4 l2norm groups,
    // deterministic, dq, dk and dv were off by 1.1-1.3e-5 relative, now 2.7e-6.
    template <int M, int N, int K>
    __device__ __forceinline__ static void rows_nk(FragC (&acc)[M][N], const float *a, int a_stride,
                                                   int a_row0, const float *b, int b_stride, int b_row0,
                                                   int lane) {
        static_assert(K % 8 == 0, "rows_nk: K a multiple of 8");
        if constexpr (K > kPiece) {
#pragma unroll
            for (int k0 = 0; k0 < K; k0 += kPiece) {
                FragC part[M][N];
#pragma unroll
                for (int m = 0; m < M; ++m)
#pragma unroll
                    for (int n = 0; n < N; ++n) common::clear(part[m][n]);
                rows_nk_range<M, N>(part, a, a_stride, a_row0, b, b_stride, b_row0, k0, k0 + kPiece, lane);
                add(acc, part);
            }
        } else {
            rows_nk_range<M, N>(acc, a, a_stride, a_row0, b, b_stride, b_row0, 0, K, lane);
        }
    }

    static constexpr int kPiece = 64;

    template <int M, int N>
    __device__ __forceinline__ static void add(FragC (&acc)[M][N], const FragC (&part)[M][N]) {
#pragma unroll
        for (int m = 0; m < M; ++m)
#pragma unroll
            for (int n = 0; n < N; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[m][n].x[e] += part[m][n].x[e];
    }

    template <int M, int N>
    __device__ __forceinline__ static void rows_nk_range(FragC (&acc)[M][N], const float *a, int a_stride,
                                                         int a_row0, const float *b, int b_stride, int b_row0,
                                                         int k_begin, int k_end, int lane) {
#pragma unroll
        for (int k = k_begin; k < k_end; k += 8) {
            common::FragATf32 a_big[M], a_small[M];
#pragma unroll
            for (int m = 0; m < M; ++m)
                common::load_a_tf32(a_big[m], a_small[m], a, a_stride, a_row0 + 16 * m, k, lane);
#pragma unroll
            for (int n = 0; n < N; ++n) {
                common::FragBTf32 b_big, b_small;
                common::load_b_tf32_nk(b_big, b_small, b, b_stride, b_row0 + 8 * n, k, lane);
#pragma unroll
                for (int m = 0; m < M; ++m)
                    common::mma_m16n8k8_3xtf32(acc[m][n], a_big[m], a_small[m], b_big, b_small);
            }
        }
    }

    __device__ __forceinline__ static void to_operand(Operand &op, const FragC &left, const FragC &right,
                                                      float factor) {
        FragC l, r;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            l.x[e] = left.x[e] * factor;
            r.x[e] = right.x[e] * factor;
        }
        common::accumulator_to_a_tf32(op.big[0], op.small[0], l);
        common::accumulator_to_a_tf32(op.big[1], op.small[1], r);
    }

    // acc += this tile's products, summed apart and then added with float32 rounding: the
    // tensor cores' additions truncate (round toward zero), and dK^ and dV accumulate over
    // every query tile, so added straight into acc that bias grew with the sequence
    // (dV 2.7e-5 of its largest entry at n = 1k with causal; the CPU backend 1.6e-6).
    template <int M, int KQ, int N>
    __device__ __forceinline__ static void acc_kn(FragC (&acc)[M][N], const Operand (&x)[M][KQ],
                                                  const float *b, int b_stride, int col0, int lane) {
        FragC part[M][N];
#pragma unroll
        for (int m = 0; m < M; ++m)
#pragma unroll
            for (int n = 0; n < N; ++n) common::clear(part[m][n]);
#pragma unroll
        for (int kq = 0; kq < KQ; ++kq) {
#pragma unroll
            for (int half = 0; half < 2; ++half) {
#pragma unroll
                for (int n = 0; n < N; ++n) {
                    common::FragBTf32 b_big, b_small;
                    common::load_b_tf32_kn_permuted(b_big, b_small, b, b_stride, 16 * kq + 8 * half,
                                                    col0 + 8 * n, lane);
#pragma unroll
                    for (int m = 0; m < M; ++m)
                        common::mma_m16n8k8_3xtf32(part[m][n], x[m][kq].big[half], x[m][kq].small[half],
                                                   b_big, b_small);
                }
            }
        }
        add(acc, part);
    }

    template <int N, int K>
    __device__ __forceinline__ static void tileT_kn(FragC (&acc)[N], const float *a, int a_stride, int m0,
                                                    const float *b, int b_stride, int col0, int lane) {
        static_assert(K % 8 == 0, "tileT_kn: K a multiple of 8");
        const int g = lane >> 2, t = lane & 3;
#pragma unroll
        for (int k = 0; k < K; k += 8) {
            // A (rows m, columns k) read from [k][m] in the permuted k order that
            // load_b_tf32_kn_permuted uses: logical k t <- row 2t, t + 4 <- row 2t + 1.
            const float *p = a + (k + 2 * t) * a_stride + m0 + g;
            common::FragATf32 a_big, a_small;
            common::split_tf32(p[0], a_big.x[0], a_small.x[0]);
            common::split_tf32(p[8], a_big.x[1], a_small.x[1]);
            common::split_tf32(p[a_stride], a_big.x[2], a_small.x[2]);
            common::split_tf32(p[a_stride + 8], a_big.x[3], a_small.x[3]);
#pragma unroll
            for (int n = 0; n < N; ++n) {
                common::FragBTf32 b_big, b_small;
                common::load_b_tf32_kn_permuted(b_big, b_small, b, b_stride, k, col0 + 8 * n, lane);
                common::mma_m16n8k8_3xtf32(acc[n], a_big, a_small, b_big, b_small);
            }
        }
    }
};

} // namespace sm80_bwd
} // namespace fcsa
