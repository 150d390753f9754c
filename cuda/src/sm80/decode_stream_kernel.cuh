// decode_stream_kernel.cuh: the tensor-core decode kernel (float16 and bfloat16, l2norm
// with one group), built to run at memory bandwidth.
//
// A decoding step reads all of K and V once and computes little with them; what limits
// it is how much of K and V is in flight and how many instructions each byte costs. So:
//  - each warp of a CTA streams its own blocks of 16 keys (every kWarps-th block of the
//    CTA's key range) through its own cp.async ring of kStages blocks: the main loop has
//    no CTA-wide barrier, and a warp waiting on memory holds no other warp back;
//  - the products run on the tensor cores (mma.sync m16n8k16, float accumulators):
//    S = q^ K^T with the packed rows (the query heads that share a kv head times the
//    query rows) padded to m16 tiles, the key norms as the diagonal of K K^T (from the
//    same K fragments), and O += P V with P rounded to T, as in the forward;
//  - a running maximum per row, so the result is exact for any logits (any scale, scale
//    tensors included); the scale and 1 / ||k|| multiply the float scores, so q^ alone
//    is rounded to T, and the row sums add the weights as rounded for P V;
//  - the warps' partial (O, max, sum) meet once, at the end, in shared memory.
#pragma once

#include "../common/mma.cuh"
#include "decode_kernel.cuh"

namespace fcsa {
namespace sm80 {
namespace decode {

// Shapes for one dtype, head-dim bound D, ring depth (kDeep: the larger ring, for GPUs
// with more than 99 KB of shared memory per block) and m16 tiles of packed rows (kMTiles:
// 2, or 1 for at most 16 rows, whose O takes half the registers and so leaves room for
// more CTAs per SM).
template <typename T, int D, bool kDeep, int kMTiles = 2> struct StreamTile {
    static_assert(sizeof(T) == 2, "16-bit operands");
    static constexpr int kWarps = D == 256 ? 2 : 4;
    static constexpr int kThreads = 32 * kWarps;
    static constexpr int kStages = D == 64 ? (kDeep ? 5 : 4) : (kDeep ? 3 : 2);
    static constexpr int kKeys = 16;      // keys per block
    static constexpr int kStride = D + 8; // T per shared row: + 16 bytes, conflict-free ldmatrix
    static constexpr int kChunks = D / 8; // 16-byte chunks per row
    static_assert(kMTiles == 1 || kMTiles == 2, "one or two m16 tiles");
    static constexpr int kMaxMTiles = D == 256 ? 1 : kMTiles; // O accumulators: 64 or 128 floats a lane
    static constexpr int kMaxRows = 16 * kMaxMTiles;
    static constexpr size_t kBlockBytes = 2 * kKeys * kStride * sizeof(T); // K, then V
    static constexpr size_t kRingBytes = size_t(kWarps) * kStages * kBlockBytes;
    static constexpr size_t kQueryBytes = size_t(kMaxRows) * kStride * sizeof(T);
    static constexpr size_t smem_bytes() { return kRingBytes + kQueryBytes; }
    // The epilogue's exchange, in the ring once it is drained: O [kWarps][kMaxRows][D],
    // then max and sum [kWarps][kMaxRows], float.
    static_assert(size_t(kWarps) * kMaxRows * (D + 2) * sizeof(float) <= kRingBytes, "exchange fits the ring");
};

// q's packed rows [0, padded_rows) into q16 (row stride `stride`): x / ||x|| in T; rows
// past w.rows and columns past d are 0. A warp per row.
template <typename T, int D>
__device__ __forceinline__ void load_query_rows(const Params &p, const CtaWork &w, int padded_rows, T *q16,
                                                int stride, int warps) {
    constexpr int kPerLane = D / 32 > 0 ? D / 32 : 1;
    const int lane = threadIdx.x % 32;
    const T *q = static_cast<const T *>(p.q);
    for (int r = threadIdx.x / 32; r < padded_rows; r += warps) {
        float x[kPerLane];
        float sum = 0.f;
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) {
            const int e = lane + 32 * i;
            x[i] = 0.f;
            if (r < w.rows && e < p.d)
                x[i] = common::to_float(
                    q[w.b * p.q_stride[0] + w.head(p, r) * p.q_stride[1] + w.query_row(p, r) * p.q_stride[2] + e]);
            sum = fmaf(x[i], x[i], sum);
        }
        sum = warp_sum(sum);
        // An overflowed sum (entries from ~1.8e19 on): each lane takes the rescaled norm of
        // the whole row itself (inverse_norm; a rare path).
        const float multiplier =
            !isinf(sum) ? 1.f / fmaxf(sqrtf(sum), 1e-12f) : inverse_norm(p.d, [&](int e) {
                return common::to_float(
                    q[w.b * p.q_stride[0] + w.head(p, r) * p.q_stride[1] + w.query_row(p, r) * p.q_stride[2] + e]);
            });
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) q16[r * stride + lane + 32 * i] = common::from_float<T>(x[i] * multiplier);
    }
}

template <typename T, int D, bool kDeep, int kMTiles>
__global__ void __launch_bounds__(StreamTile<T, D, kDeep, kMTiles>::kThreads) decode_stream_kernel(const Params p) {
    using S = StreamTile<T, D, kDeep, kMTiles>;
    constexpr int KB = S::kKeys, RS = S::kStride, W = S::kWarps, MT = S::kMaxMTiles;
    constexpr float kInf = __builtin_huge_valf();
    constexpr float kLog2e = 1.4426950408889634f;

    extern __shared__ __align__(16) unsigned char smem_raw[];
    T *const ring = reinterpret_cast<T *>(smem_raw);
    T *const q16 = reinterpret_cast<T *>(smem_raw + S::kRingBytes);

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
    const CtaWork w = CtaWork::make<KB * W>(p);
    const int m_tiles = (w.rows + 15) / 16, d = p.d;

    load_query_rows<T, D>(p, w, m_tiles * 16, q16, RS, W);
    __syncthreads();

    // Per packed row this lane holds (rows g and g + 8 of each m16 tile): the factor that
    // turns q^ . k into log2-scaled logits, and the end of its visible keys in this split.
    float factor[MT][2];
    int limit[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = mt * 16 + g + 8 * h;
            const bool real = r < w.rows;
            factor[mt][h] = real ? (p.scale_t ? p.scale_t[w.head(p, r) * p.scale_stride] : p.scale) * kLog2e : 0.f;
            limit[mt][h] = real ? min(w.visible_end(p, r), w.k1) : 0;
        }
    // Keys from here on are hidden from some row: their values are cleaned of inf and NaN
    // (a weight of 0 times those must leave O alone).
    const int first_hidden = p.causal ? w.first_hidden(p) : w.keys;

    // This warp's blocks: block i starts at key w.k0 + (i * W + warp) * 16.
    const int cta_blocks = (w.k1 - w.k0 + KB - 1) / KB;
    const int blocks = cta_blocks > warp ? (cta_blocks - warp + W - 1) / W : 0;
    T *const my_ring = ring + size_t(warp) * S::kStages * 2 * KB * RS;
    // A warp copies a block in passes of kRowsPerPass rows; this lane takes row
    // lane / kChunks of each pass and the 16 bytes at `column`.
    constexpr int kRowsPerPass = 32 / S::kChunks > 0 ? 32 / S::kChunks : 1;
    constexpr int kPasses = KB / kRowsPerPass;
    static_assert(S::kChunks * kRowsPerPass == 32 && KB % kRowsPerPass == 0, "whole rows per pass");
    const int lane_row = lane / S::kChunks, column = lane % S::kChunks * 8;
    const T *const k_cache = static_cast<const T *>(p.k_cache), *const v_cache = static_cast<const T *>(p.v_cache);
    const T *const k_head = k_cache + w.g * p.k_stride[1] + column;
    const T *const v_head = v_cache + w.g * p.v_stride[1] + column;
    // Blocks start at multiples of 16 keys: in a contiguous cache, or a paged one whose
    // page size is a multiple of 16, a block's keys are 16 consecutive rows of one slot
    // (sequence or cache block), located once; other page sizes locate every key.
    const bool key_by_key = p.block_table && p.page_size % KB != 0;
    const int64_t k_pass_step = kRowsPerPass * p.k_stride[2], v_pass_step = kRowsPerPass * p.v_stride[2];
    auto load_block = [&](int i) {
        T *const k_s = my_ring + (i % S::kStages) * 2 * KB * RS + column, *const v_s = k_s + KB * RS;
        const int key0 = w.k0 + (i * W + warp) * KB;
        if (key_by_key) {
#pragma unroll
            for (int pass = 0; pass < kPasses; ++pass) {
                const int j = lane_row + pass * kRowsPerPass, key = key0 + j;
                int64_t slot = 0, row = 0;
                const bool valid = column < d && key < w.k1 && locate(p, w.b, key, slot, row);
                const T *k_src = valid ? k_head + slot * p.k_stride[0] + row * p.k_stride[2] : k_cache;
                const T *v_src = valid ? v_head + slot * p.v_stride[0] + row * p.v_stride[2] : v_cache;
                common::cp_async_16(common::smem_address(k_s + j * RS), k_src, valid);
                common::cp_async_16(common::smem_address(v_s + j * RS), v_src, valid);
            }
            return;
        }
        int64_t slot = w.b, row0 = key0;
        bool slot_ok = column < d;
        if (p.block_table) {
            const int32_t block = p.block_table[int64_t(w.b) * p.block_table_stride + key0 / p.page_size];
            slot = block;
            row0 = key0 % p.page_size;
            slot_ok = slot_ok && block >= 0 && block < p.num_blocks;
        }
        if (!slot_ok) slot = row0 = 0; // nothing is read (rows past k1 neither: zero-filled)
        const T *k_src = k_head + slot * p.k_stride[0] + (row0 + lane_row) * p.k_stride[2];
        const T *v_src = v_head + slot * p.v_stride[0] + (row0 + lane_row) * p.v_stride[2];
        const int rows_left = w.k1 - key0 - lane_row; // this lane's rows j < rows_left exist
#pragma unroll
        for (int pass = 0; pass < kPasses; ++pass) {
            const bool valid = slot_ok && pass * kRowsPerPass < rows_left;
            const int j = lane_row + pass * kRowsPerPass;
            common::cp_async_16(common::smem_address(k_s + j * RS), k_src, valid);
            common::cp_async_16(common::smem_address(v_s + j * RS), v_src, valid);
            k_src += k_pass_step;
            v_src += v_pass_step;
        }
    };

    common::FragC acc[MT][D / 8];
    float row_max[MT][2], row_sum[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int nb = 0; nb < D / 8; ++nb) common::clear(acc[mt][nb]);
        row_max[mt][0] = row_max[mt][1] = -kInf;
        row_sum[mt][0] = row_sum[mt][1] = 0.f;
    }

#pragma unroll
    for (int s = 0; s < S::kStages - 1; ++s) {
        if (s < blocks) load_block(s);
        common::cp_async_commit();
    }
    for (int i = 0; i < blocks; ++i) {
        common::cp_async_wait<S::kStages - 2>();
        __syncwarp(); // block i visible to the warp; every lane is past block i - 1's stage
        if (i + S::kStages - 1 < blocks) load_block(i + S::kStages - 1);
        common::cp_async_commit();
        T *const k_s = my_ring + (i % S::kStages) * 2 * KB * RS, *const v_s = k_s + KB * RS;
        const int key0 = w.k0 + (i * W + warp) * KB;

        // 1. S = q^ K^T, and K K^T, whose diagonal holds the keys' squared norms.
        common::FragC s[MT][2], gram[2];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) common::clear(s[mt][0]), common::clear(s[mt][1]);
        common::clear(gram[0]), common::clear(gram[1]);
#pragma unroll
        for (int kk = 0; kk < D; kk += 16) {
            if (kk >= d) break; // columns past d are 0
            common::FragB16 b[2];
            common::load_b16_nk(b, k_s, RS, 0, kk, lane);
            {
                common::FragA16 a;
                common::load_a16(a, k_s, RS, 0, kk, lane);
                common::mma_m16n8k16<T>(gram[0], a, b[0]);
                common::mma_m16n8k16<T>(gram[1], a, b[1]);
            }
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                if (mt < m_tiles) {
                    common::FragA16 a;
                    common::load_a16(a, q16, RS, mt * 16, kk, lane);
                    common::mma_m16n8k16<T>(s[mt][0], a, b[0]);
                    common::mma_m16n8k16<T>(s[mt][1], a, b[1]);
                }
            }
        }
        // This lane's columns are keys 2 t4, 2 t4 + 1, 8 + 2 t4, 9 + 2 t4; the diagonal
        // entry (j, j) sits in lane 9 t4 (j even) or 9 t4 + 4 (j odd) of the same block.
        const float squares[4] = {__shfl_sync(0xffffffffu, gram[0].x[0], 9 * t4),
                                  __shfl_sync(0xffffffffu, gram[0].x[1], 9 * t4 + 4),
                                  __shfl_sync(0xffffffffu, gram[1].x[2], 9 * t4),
                                  __shfl_sync(0xffffffffu, gram[1].x[3], 9 * t4 + 4)};
        float inv_k[4];
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const int j = (c / 2) * 8 + 2 * t4 + c % 2;
            inv_k[c] = isinf(squares[c]) ? inverse_norm(d, [&](int e) { return common::to_float(k_s[j * RS + e]); })
                                         : 1.f / fmaxf(sqrtf(squares[c]), 1e-12f);
        }

        // 2. Log2-scaled logits of the keys each row sees (-inf for the others), the running
        // maximum, the weights in place of the logits, the sums, and O's rescaling.
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            if (mt >= m_tiles) continue;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float top = -kInf;
#pragma unroll
                for (int nb = 0; nb < 2; ++nb)
#pragma unroll
                    for (int x = 0; x < 2; ++x) {
                        const int key = key0 + nb * 8 + 2 * t4 + x;
                        float &v = s[mt][nb].x[2 * h + x];
                        v = key < limit[mt][h] ? v * inv_k[2 * nb + x] * factor[mt][h] : -kInf;
                        top = fmaxf(top, v);
                    }
                const float new_max = fmaxf(row_max[mt][h], common::quad_max(top));
                const float alpha = new_max == -kInf ? 1.f : common::exp2_approx(row_max[mt][h] - new_max);
                float sum = 0.f;
#pragma unroll
                for (int nb = 0; nb < 2; ++nb)
#pragma unroll
                    for (int x = 0; x < 2; ++x) {
                        // rounded to T here, as P V will take it: out stays a convex
                        // combination of the values
                        float &v = s[mt][nb].x[2 * h + x];
                        v = new_max == -kInf ? 0.f
                                             : common::to_float(common::from_float<T>(common::exp2_approx(v - new_max)));
                        sum += v;
                    }
                row_max[mt][h] = new_max;
                row_sum[mt][h] = row_sum[mt][h] * alpha + sum;
                if (__any_sync(0xffffffffu, alpha != 1.f)) // the maxima settle after a few blocks
#pragma unroll
                    for (int nb = 0; nb < D / 8; ++nb)
                        acc[mt][nb].x[2 * h] *= alpha, acc[mt][nb].x[2 * h + 1] *= alpha;
            }
        }

        // 3. Keys hidden from some row (the causal diagonal only): 0 * (an inf or NaN in
        // their values) must not reach those rows, yet the rows that see such a key must
        // get it. So (a rare path) the rows that see one take its non-finite entries here,
        // p v added to O directly, and then the entries are zeroed for P V below.
        if (key0 + KB > first_hidden && key0 < w.k1) {
            const int from = max(0, first_hidden - key0), to = min(KB, w.k1 - key0);
            bool dirty = false;
            for (int idx = lane; idx < (to - from) * d; idx += 32)
                dirty |= !isfinite(common::to_float(v_s[(from + idx / d) * RS + idx % d]));
            if (__any_sync(0xffffffffu, dirty)) {
#pragma unroll 1
                for (int j = from; j < to; ++j) {
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        if (mt >= m_tiles) continue;
#pragma unroll
                        for (int h = 0; h < 2; ++h) {
                            // row g + 8 h's weight of key j sits in lane 4 g + (j % 8) / 2
                            const float low = j % 2 ? s[mt][0].x[2 * h + 1] : s[mt][0].x[2 * h];
                            const float high = j % 2 ? s[mt][1].x[2 * h + 1] : s[mt][1].x[2 * h];
                            const float mine = j < 8 ? low : high;
                            const float weight = __shfl_sync(0xffffffffu, mine, 4 * g + (j % 8) / 2);
                            if (key0 + j >= limit[mt][h]) continue;
#pragma unroll
                            for (int nb = 0; nb < D / 8; ++nb)
#pragma unroll
                                for (int x = 0; x < 2; ++x) {
                                    const int column = nb * 8 + 2 * t4 + x;
                                    const float value = column < d ? common::to_float(v_s[j * RS + column]) : 0.f;
                                    if (!isfinite(value)) acc[mt][nb].x[2 * h + x] += weight * value;
                                }
                        }
                    }
                }
                __syncwarp(); // every lane has read the values before they are zeroed
                for (int idx = lane; idx < (to - from) * d; idx += 32) {
                    T &x = v_s[(from + idx / d) * RS + idx % d];
                    if (!isfinite(common::to_float(x))) x = common::from_float<T>(0.f);
                }
                __syncwarp();
            }
        }

        // 4. O += P V.
        common::FragA16 weights[MT];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
            if (mt < m_tiles) common::accumulators_to_a16<T>(weights[mt], s[mt][0], s[mt][1]);
#pragma unroll
        for (int nb = 0; nb < D / 8; nb += 2) {
            if (nb * 8 >= d) break;
            common::FragB16 b[2];
            common::load_b16_kn(b, v_s, RS, 0, nb * 8, lane);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                if (mt < m_tiles) {
                    common::mma_m16n8k16<T>(acc[mt][nb], weights[mt], b[0]);
                    common::mma_m16n8k16<T>(acc[mt][nb + 1], weights[mt], b[1]);
                }
            }
        }
    }
    common::cp_async_wait<0>(); // the last groups are empty; nothing may outlive the CTA
    __syncthreads();            // every warp is done with the ring: it holds the exchange now

    // Epilogue: the warps' (O, max, sum) through shared memory, combined by their maxima.
    float *const o_x = reinterpret_cast<float *>(smem_raw);
    float *const max_x = o_x + W * S::kMaxRows * D;
    float *const sum_x = max_x + W * S::kMaxRows;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        if (mt >= m_tiles) continue;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = mt * 16 + g + 8 * h, at = warp * S::kMaxRows + r;
            const float sum = common::quad_sum(row_sum[mt][h]);
            if (t4 == 0) max_x[at] = row_max[mt][h], sum_x[at] = sum;
#pragma unroll
            for (int nb = 0; nb < D / 8; ++nb)
                *reinterpret_cast<float2 *>(o_x + at * D + nb * 8 + 2 * t4) =
                    make_float2(acc[mt][nb].x[2 * h], acc[mt][nb].x[2 * h + 1]);
        }
    }
    __syncthreads();

    const int64_t total_rows = int64_t(p.b) * p.h * p.nq;
    for (int idx = threadIdx.x; idx < w.rows * (D / 4); idx += S::kThreads) {
        const int r = idx / (D / 4), column = idx % (D / 4) * 4;
        if (column >= d) continue;
        float top = -kInf;
#pragma unroll
        for (int v = 0; v < W; ++v) top = fmaxf(top, max_x[v * S::kMaxRows + r]);
        float sum = 0.f, o[4] = {0.f, 0.f, 0.f, 0.f};
        if (top != -kInf) {
#pragma unroll
            for (int v = 0; v < W; ++v) {
                const int at = v * S::kMaxRows + r;
                const float weight = common::exp2_approx(max_x[at] - top);
                sum = fmaf(sum_x[at], weight, sum);
                const float4 x = *reinterpret_cast<const float4 *>(o_x + at * D + column);
                o[0] = fmaf(x.x, weight, o[0]), o[1] = fmaf(x.y, weight, o[1]);
                o[2] = fmaf(x.z, weight, o[2]), o[3] = fmaf(x.w, weight, o[3]);
            }
        }
        const float inverse = sum > 0.f ? 1.f / sum : 0.f;
        const float lse = !(sum <= 0.f) ? (top + log2f(sum)) * 0.6931471805599453f : -kInf; // NaN sum: NaN
        if (p.splits == 1) {
            T *out = static_cast<T *>(p.out) + w.b * p.out_stride[0] + w.head(p, r) * p.out_stride[1] +
                     w.query_row(p, r) * p.out_stride[2] + column;
#pragma unroll
            for (int x = 0; x < 4; ++x) out[x] = common::from_float<T>(o[x] * inverse);
            if (column == 0 && p.lse)
                p.lse[w.b * p.lse_stride[0] + w.head(p, r) * p.lse_stride[1] + w.query_row(p, r) * p.lse_stride[2]] =
                    lse;
        } else {
            const int64_t partial = blockIdx.y * total_rows + w.output_row(p, r);
            *reinterpret_cast<float4 *>(p.partial_out + partial * d + column) =
                make_float4(o[0] * inverse, o[1] * inverse, o[2] * inverse, o[3] * inverse);
            if (column == 0) p.partial_lse[partial] = lse;
        }
    }
}

} // namespace decode
} // namespace sm80
} // namespace fcsa
