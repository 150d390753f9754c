// nonfinite_rows.cuh: the causal forward's rows that a hidden value made NaN, computed
// again from SPEC's definition.
//
// A causal query tile loads the keys its last row sees; its earlier rows give the keys
// past their own reach p = 0, and inside P V that is 0 * v: NaN where v holds NaN or
// inf, although SPEC says a hidden key contributes nothing. Zeroing such values in the
// main loop cost the portable general kernel 5-9% (any code there doubled its spills;
// benchmarks/NOTES.md, v1). So the kernels keep their loops as they are and, after the
// last key tile, look at their O accumulators (registers already live): only a causal
// tile with a row that is not finite calls the function below, out of line, after it has
// stored out and lse as usual. Such rows are rare (a NaN or inf in v, or in a key a row
// sees), so the function is written to be small and right, not fast: one warp per row,
// float64, a running maximum, only the keys the row sees.
#pragma once

#include <cmath>
#include <cstdint>

#include "forward_tile.cuh"
#include "numeric.cuh"

namespace fcsa {
namespace common {

// The rows (fragment row groups g = lane / 4, bit g) of a warp's ballot over an mma
// accumulator, in which the four lanes of row g hold lanes 4 g .. 4 g + 3: a row is set
// where any of its lanes is.
__device__ __forceinline__ uint32_t quad_rows(uint32_t lanes) {
    lanes |= lanes >> 1;
    lanes |= lanes >> 2;
    lanes &= 0x11111111u;                      // bit 4 g: row g
    lanes = (lanes | lanes >> 3) & 0x03030303u; // rows 2 m, 2 m + 1 at bits 8 m, 8 m + 1
    lanes = (lanes | lanes >> 6) & 0x000F000Fu; // rows 4 m .. 4 m + 3 at bits 16 m ..
    return (lanes | lanes >> 12) & 0xFFu;
}

// The larger of a and b where a NaN, in either, wins and stays: a row with a NaN logit
// is NaN whatever else it sees (a plain a < b test would let the next finite logit
// replace it, and a row whose every logit is NaN would look like one that sees no key).
__device__ __forceinline__ double max_keeping_nan(double a, double b) { return a != a || b <= a ? a : b; }

// What every backend's Rows (below) shares: the calling warp's rows of its CTA's tile
// and where a row of q, k, v and lse lies, from the backend's parameters P (q, k, v,
// lse and their strides, heads_per_kv, nq, nk) and the CTA's tile (forward_tile.cuh).
// Rows i and keys j count from the sequence's first ones.
template <typename T, class P, bool kPacked> struct TileRows {
    using Params = P;
    using Element = T;
    const P &p;
    int bi, hq, kvh, q_begin, k_begin, nq, nk, first_row, rows_end;
    __device__ TileRows(const P &params, const CtaTile<kPacked> &at, int block_m, int warp_row0) : p(params) {
        bi = at.bi;
        hq = at.hq;
        kvh = hq / p.heads_per_kv;
        q_begin = kPacked ? at.sequence.x : 0;
        k_begin = kPacked ? at.sequence.z : 0;
        nq = kPacked ? at.sequence.y : p.nq;
        nk = kPacked ? at.sequence.w : p.nk;
        const int m0 = at.m_tile * block_m;
        first_row = m0 + warp_row0;
        rows_end = min(m0 + block_m, nq);
    }
    __device__ const T *q(int i) const {
        return static_cast<const T *>(p.q) + bi * p.q_stride[0] + hq * p.q_stride[1] +
               int64_t(q_begin + i) * p.q_stride[2];
    }
    __device__ const T *k(int j) const {
        return static_cast<const T *>(p.k) + bi * p.k_stride[0] + kvh * p.k_stride[1] +
               int64_t(k_begin + j) * p.k_stride[2];
    }
    __device__ const T *v(int j) const {
        return static_cast<const T *>(p.v) + bi * p.v_stride[0] + kvh * p.v_stride[1] +
               int64_t(k_begin + j) * p.v_stride[2];
    }
    // out's element (i, col), for the backend's out()
    __device__ int64_t out_index(int i, int col) const {
        return bi * p.out_stride[0] + hq * p.out_stride[1] + int64_t(q_begin + i) * p.out_stride[2] + col;
    }
    __device__ void lse(int i, double x) const {
        if (p.lse != nullptr)
            p.lse[bi * p.lse_stride[0] + hq * p.lse_stride[1] + int64_t(q_begin + i) * p.lse_stride[2]] = float(x);
    }
};

// <q^, k^> summed over the l2norm groups of `width` columns (<q, k> without l2norm), by one
// lane over the whole row: x / max(||x||, 1e-12) per group, the norms in float64, which
// no float input overflows. (A NaN in q or k makes the dot product NaN whatever the
// norms give; an infinite entry makes it inf or NaN, and its factor 0: NaN.) rsqrt and
// __drcp_rn below, not sqrt and /: their slow paths are calls, and calls inside this
// function moved ptxas's register allocation of the kernels that call it (f32 d = 192:
// 179 registers without spills became 168 with 84 bytes of spill).
template <typename T>
__device__ __forceinline__ double row_logit(const T *q, const T *k, int d, int width, bool l2norm) {
    double total = 0.0, dot = 0.0, qq = 0.0, kk = 0.0;
#pragma unroll 1
    for (int c = 0, in_group = 1; c < d; ++c, ++in_group) {
        const double x = to_float(q[c]), y = to_float(k[c]);
        dot = fma(x, y, dot);
        qq = fma(x, x, qq);
        kk = fma(y, y, kk);
        if (in_group == width) {
            total += l2norm ? dot * fmin(rsqrt(qq), 1e12) * fmin(rsqrt(kk), 1e12) : dot;
            dot = qq = kk = 0.0;
            in_group = 0;
        }
    }
    return total;
}

// The rows `rows` (bit r: query row src.first_row + r of the sequence) of the calling
// warp in a causal forward's tile: out and lse of each written again, by the warp (all 32
// lanes call), after the kernel's own stores of those rows (the caller orders them).
//
// Rows: a backend's view of the calling CTA's tile, built from its parameters alone
// (Rows(params): the CTA's tile and the warp's rows from blockIdx and threadIdx, as the
// kernel finds them), so that the call passes nothing the kernel would keep live for it
// through its epilogue, and is the same in every kernel. It holds nq,
// nk (the sequence's rows and keys), first_row (the warp's first row) and rows_end (one
// past the tile's last row), and gives q(i), k(j), v(j) (a row's first element),
// key_visible(j) (the key mask), bias(i, j) (0 without one), scale(), d(), d_v(),
// groups(), l2norm(), and stores out(i, column, x) and lse(i, x); Element, the inputs'
// type, and kValueColumns, the value head-dim bucket (d_v <= kValueColumns). Rows i and
// keys j count from the sequence's first ones (packed sequences).
//
// A row is recomputed only where the keys the tile loaded past its reach hold a value
// that is not finite; otherwise its NaN or inf came from a key it sees, and the kernel's
// result stands (this also bounds the work when a visible NaN makes whole tiles NaN).
// The result, SPEC's function in float64 over the row's visible keys: a row that sees a
// NaN or inf value gets NaN or that infinity (p v), a row that sees no key out = 0 and
// lse = -inf (as the kernels write it), a logit of -inf (p = 0) is skipped, a NaN logit
// makes the row NaN. Blind rows then equal the result with the hidden values zeroed up
// to the dtype's rounding (float64, then rounded once), not bit for bit.
//
// Out of line: its registers and code stay out of the kernels, which only pay for the
// call's set-up in a branch after their loops.
template <class Rows>
__device__ __noinline__ void recompute_nonfinite_rows(const typename Rows::Params &params, uint32_t rows) {
    constexpr uint32_t kAll = 0xffffffffu;
    constexpr int kColumns = (Rows::kValueColumns + 31) / 32; // of out per lane
    const Rows src(params);
    const int lane = threadIdx.x % 32;
    const int nq = src.nq, nk = src.nk;
    const int causal_offset = nk - nq; // row i sees keys j <= i + causal_offset
    // The tile loaded (or zeroed) V rows up to its last row's reach: keys j < loaded.
    const int loaded = min(nk, src.rows_end + causal_offset);
    const int d = src.d(), d_v = src.d_v(), width = d / src.groups();
    const bool l2norm = src.l2norm();
    const double scale = src.scale();
    for (; rows != 0u; rows &= rows - 1u) {
        const int i = src.first_row + __ffs(int(rows)) - 1;
        if (i >= nq) continue; // a row past the sequence: never stored
        const int reach = max(0, min(nk, i + causal_offset + 1)); // keys j < reach are seen
        // Any value the row was multiplied by 0 with that is not finite?
        bool poisoned = false;
        for (int e = lane; e < (loaded - reach) * d_v; e += 32)
            poisoned |= !isfinite(to_float(src.v(reach + e / d_v)[e % d_v]));
        if (!__any_sync(kAll, poisoned)) continue;

        // Online softmax over blocks of 32 keys, a key per lane for the logits, then the
        // values column by column (lane + 32 t) with each key's p from its lane.
        const auto *q = src.q(i);
        double row_max = -INFINITY, sum = 0.0, acc[kColumns];
#pragma unroll
        for (int t = 0; t < kColumns; ++t) acc[t] = 0.0;
        for (int base = 0; base < reach; base += 32) {
            const int j = base + lane;
            double s = -INFINITY;
            if (j < reach && src.key_visible(j))
                s = scale * row_logit(q, src.k(j), d, width, l2norm) + src.bias(i, j);
            // p = 0 exactly: skipped, so that no (-inf) - (-inf) makes a NaN (NaN counts)
            const bool counts = s != -INFINITY;
            const uint32_t counting = __ballot_sync(kAll, counts);
            if (counting == 0u) continue;
            double block_max = s;
#pragma unroll
            for (int offset = 16; offset > 0; offset /= 2)
                block_max = max_keeping_nan(block_max, __shfl_xor_sync(kAll, block_max, offset));
            const double new_max = max_keeping_nan(row_max, block_max);
            // Nothing summed yet at -inf; a NaN maximum makes rescale, and so sum and acc, NaN.
            const double rescale = row_max == -INFINITY ? 0.0 : exp(row_max - new_max);
            const double p = counts ? exp(s - new_max) : 0.0;
            double block_sum = p;
#pragma unroll
            for (int offset = 16; offset > 0; offset /= 2) block_sum += __shfl_xor_sync(kAll, block_sum, offset);
            sum = fma(sum, rescale, block_sum);
#pragma unroll
            for (int t = 0; t < kColumns; ++t) acc[t] *= rescale;
            for (uint32_t left = counting; left != 0u; left &= left - 1u) {
                const int from = __ffs(int(left)) - 1;
                const double pj = __shfl_sync(kAll, p, from);
                const auto *v = src.v(base + from);
#pragma unroll
                for (int t = 0; t < kColumns; ++t)
                    if (lane + 32 * t < d_v) acc[t] = fma(pj, double(to_float(v[lane + 32 * t])), acc[t]);
            }
            row_max = new_max;
        }
        // sum >= 1 once a key counted (its own p is 1 at the maximum), NaN after a NaN.
        const bool seen = !(sum <= 0.0);
        const double inv_sum = __drcp_rn(sum);
#pragma unroll
        for (int t = 0; t < kColumns; ++t)
            if (lane + 32 * t < d_v) src.out(i, lane + 32 * t, seen ? acc[t] * inv_sum : 0.0);
        if (lane == 0) src.lse(i, seen ? row_max + log(sum) : -INFINITY);
    }
}

} // namespace common
} // namespace fcsa
