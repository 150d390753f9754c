// decode_kernel.cuh: KV-cache attention for short queries (decoding), split over the keys.
//
// Decoding reads every key and value of the cache once per step and computes little
// with them, so the kernels are built for memory bandwidth:
//  - split-KV: each (sequence, kv head, block of query rows) is cut into `splits`
//    ranges of keys, one CTA each, so that even one sequence fills the GPU. Each CTA
//    writes a partial (out, lse); combine_kernel merges them exactly by their lse
//    (SPEC.md). With one split the CTA writes out and lse itself.
//  - grouped-query packing: the query heads that share a kv head, and the rows of a
//    short query, are the rows of one CTA ("packed rows", head-major), so K and V are
//    read once per kv head, not once per query head.
//  - K and V tiles stream into shared memory with 16-byte cp.async, kStages deep,
//    rows located through the block table when the cache is paged.
//  - per tile: key norms, scores, an online softmax with a running maximum (exact for
//    any logits, l2norm or not), then out += P V, accumulated in float32, on float FMAs:
//    decode_kernel, for float32, several l2norm groups and l2norm_qk=False. The 16-bit
//    types with l2norm and one group take the tensor cores in decode_stream_kernel.cuh,
//    which shares this file's parameters, work split, appends and combination.
// append_kernel writes the new keys into the cache first, on the same stream.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "../common/copy.cuh"
#include "../common/numeric.cuh"

namespace fcsa {
namespace sm80 {
namespace decode {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kBlockRows = 32;  // packed query rows per CTA of the FMA kernel, at most
constexpr int kMaxSplits = 128;
constexpr int kStages = 2; // K/V tiles in flight per CTA; two CTAs per SM keep ~64 KB loading

// The tile shapes of one dtype and head-dim bound D (d <= D, d % 8 == 0).
template <typename T, int D> struct Tile {
    static constexpr int kChunk = 16 / int(sizeof(T));          // elements per 16-byte load
    static constexpr int kKeys = 16384 / (D * int(sizeof(T)));  // keys per tile: 16 KB of K
    static constexpr int kRowStride = D + kChunk;               // + 16 bytes: rows start on distinct banks
    static constexpr int kColumnChunks = D / 4;                 // P V: a thread owns 4 columns ...
    static constexpr int kSlots = kThreads / kColumnChunks;     // ... of every kSlots-th row
    static constexpr int kRowsPerThread = kBlockRows / kSlots;
    static constexpr int kLoadColumns = D / kChunk;             // 16-byte chunks of a row
    static constexpr int kLoadRowStep = kThreads / kLoadColumns;
    static_assert(kKeys >= 16 && kKeys % 16 == 0, "tile keys");
    static_assert(kThreads % kColumnChunks == 0 && kThreads % kLoadColumns == 0, "thread layout");
    static_assert(kThreads % kKeys == 0 && kThreads / kKeys <= 32, "key norms: whole lanes per key");

    // Shared memory: [kStages][K, V][kKeys][kRowStride] of T, then float: q [rows][D],
    // scores [rows][kKeys], inverse key norms [kKeys][groups], max, sum, rescale [rows].
    static constexpr size_t kv_bytes() { return size_t(kStages) * 2 * kKeys * kRowStride * sizeof(T); }
    static size_t smem_bytes(int rows, int groups) {
        return kv_bytes() + sizeof(float) * (size_t(rows) * D + size_t(rows) * kKeys + size_t(kKeys) * groups +
                                             3 * size_t(rows));
    }
};

struct Params {
    const void *q;
    int64_t q_stride[3]; // b, head, row (elements; the head dim is contiguous)
    void *out;
    int64_t out_stride[3];
    float *lse; // nullptr: not wanted
    int64_t lse_stride[3];
    const float *scale_t; // nullptr: `scale` for every head
    int64_t scale_stride;
    float scale;

    const void *k_cache, *v_cache;
    int64_t k_stride[3], v_stride[3]; // slot (batch or block), kv head, row
    const void *k_new, *v_new;        // nullptr: nothing appended
    int64_t k_new_stride[3], v_new_stride[3];
    const int32_t *cache_seqlens; // nullptr: every sequence full
    const int32_t *block_table;   // nullptr: contiguous cache
    int64_t block_table_stride;
    int page_size;  // paged: keys per block; contiguous: n_max
    int capacity;   // keys a sequence can hold
    int num_blocks; // paged: blocks in the cache
    int nq_new;

    int b, h, hk, nq, d, groups;
    int group;      // h / hk: query heads per kv head
    int rows;       // group * nq: packed rows per kv head
    int block_rows; // packed rows per CTA: min(rows, kBlockRows)
    int row_blocks; // ceil(rows / block_rows)
    int splits;
    bool causal, l2norm;

    float *partial_out; // [splits][b * h * nq][d], when splits > 1
    float *partial_lse; // [splits][b * h * nq]
};

// ---------------------------------------------------------------- small helpers

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
    return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
    return x;
}

// The keys sequence b attends to: its cached keys and the new ones. Clamped into
// [0, capacity], so that lengths the caller got wrong cannot make a kernel read or
// write outside the cache (the library checks them only when they are host memory).
__device__ __forceinline__ int sequence_keys(const Params &p, int b) {
    if (!p.cache_seqlens) return p.capacity;
    const int64_t keys = int64_t(p.cache_seqlens[b]) + p.nq_new;
    return int(keys < 0 ? 0 : keys > p.capacity ? p.capacity : keys);
}

// Where key `key` of sequence b lies: the cache's slot (batch or block) and row. False
// for a block number outside the cache (the key is then treated as zeros).
__device__ __forceinline__ bool locate(const Params &p, int b, int key, int64_t &slot, int64_t &row) {
    if (!p.block_table) {
        slot = b;
        row = key;
        return true;
    }
    const int32_t block = p.block_table[int64_t(b) * p.block_table_stride + key / p.page_size];
    slot = block;
    row = key % p.page_size;
    return block >= 0 && block < p.num_blocks;
}

// 1 / max(||x||, 1e-12) over x = get(0 .. n-1), in float32. A sum of squares that
// overflows (entries from ~1.8e19 on) is taken again with x scaled by 2^-e, 2^e above
// its largest magnitude: an exact scaling, so rows of any finite norm keep their
// direction, as the CPU backend's.
template <class Get> __device__ __forceinline__ float inverse_norm(int n, Get get) {
    float sum = 0.f;
    for (int i = 0; i < n; ++i) {
        const float x = get(i);
        sum = fmaf(x, x, sum);
    }
    if (!isinf(sum)) return 1.f / fmaxf(sqrtf(sum), 1e-12f);
    float top = 0.f;
    for (int i = 0; i < n; ++i) top = fmaxf(top, fabsf(get(i)));
    int e;
    frexpf(top, &e);
    float scaled = 0.f;
    for (int i = 0; i < n; ++i) {
        const float y = ldexpf(get(i), -e);
        scaled = fmaf(y, y, scaled);
    }
    return ldexpf(1.f / sqrtf(scaled), -e);
}

// inverse_norm of n elements of a shared-memory row, read 16 bytes at a time (x 16-byte
// aligned, n a multiple of the chunk); an overflowed sum takes the rescaled path.
template <typename T> __device__ __forceinline__ float chunked_inverse_norm(const T *x, int n) {
    constexpr int kChunk = 16 / int(sizeof(T));
    float sum = 0.f;
    for (int c = 0; c < n; c += kChunk) {
        float f[kChunk];
        common::chunk_to_float<T>(*reinterpret_cast<const uint4 *>(x + c), f);
#pragma unroll
        for (int e = 0; e < kChunk; ++e) sum = fmaf(f[e], f[e], sum);
    }
    if (!isinf(sum)) return 1.f / fmaxf(sqrtf(sum), 1e-12f);
    return inverse_norm(n, [&](int i) { return common::to_float(x[i]); });
}

// Four consecutive elements of a shared-memory row as float.
template <typename T> __device__ __forceinline__ void load4(const T *src, float (&v)[4]) {
    if constexpr (sizeof(T) == 4) {
        const float4 x = *reinterpret_cast<const float4 *>(src);
        v[0] = x.x, v[1] = x.y, v[2] = x.z, v[3] = x.w;
    } else {
        const uint2 x = *reinterpret_cast<const uint2 *>(src);
        const float2 lo = common::unpack_float2<T>(x.x), hi = common::unpack_float2<T>(x.y);
        v[0] = lo.x, v[1] = lo.y, v[2] = hi.x, v[3] = hi.y;
    }
}

// ---------------------------------------------------------------- append

// One CTA per new key (b, kv head, t): copies it and its value to key cache_seqlens[b]
// + t of the sequence. Element by element: a few rows, any alignment.
template <typename T> __global__ void __launch_bounds__(kThreads) append_kernel(const Params p) {
    const int64_t item = blockIdx.x;
    const int t = int(item % p.nq_new);
    const int g = int(item / p.nq_new % p.hk);
    const int b = int(item / (int64_t(p.nq_new) * p.hk));
    const int64_t key = int64_t(p.cache_seqlens[b]) + t;
    if (key < 0 || key >= p.capacity) return;
    int64_t slot, row;
    if (!locate(p, b, int(key), slot, row)) return;
    const T *k_src = static_cast<const T *>(p.k_new) + b * p.k_new_stride[0] + g * p.k_new_stride[1] +
                     t * p.k_new_stride[2];
    const T *v_src = static_cast<const T *>(p.v_new) + b * p.v_new_stride[0] + g * p.v_new_stride[1] +
                     t * p.v_new_stride[2];
    T *k_dst = const_cast<T *>(static_cast<const T *>(p.k_cache)) + slot * p.k_stride[0] + g * p.k_stride[1] +
               row * p.k_stride[2];
    T *v_dst = const_cast<T *>(static_cast<const T *>(p.v_cache)) + slot * p.v_stride[0] + g * p.v_stride[1] +
               row * p.v_stride[2];
    for (int e = threadIdx.x; e < p.d; e += kThreads) {
        k_dst[e] = k_src[e];
        v_dst[e] = v_src[e];
    }
}

// ---------------------------------------------------------------- one CTA's work

// A CTA of either kernel: grid x = (b, kv head, row block), y = split. It computes the
// packed rows [first_row, first_row + rows) of kv head g of sequence b (packed row R is
// query head g * group + R / nq, row R % nq) over the keys [k0, k1): this split's equal
// part, in whole tiles, of the keys its rows see.
struct CtaWork {
    int b, g, first_row, rows, keys, k0, k1, tiles;

    template <int kKeys> __device__ __forceinline__ static CtaWork make(const Params &p) {
        CtaWork w;
        const int unit = blockIdx.x;
        const int row_block = unit % p.row_blocks;
        w.g = unit / p.row_blocks % p.hk;
        w.b = unit / (p.row_blocks * p.hk);
        w.first_row = row_block * p.block_rows;
        w.rows = min(p.block_rows, p.rows - w.first_row);
        w.keys = sequence_keys(p, w.b);
        int end = 0;
        for (int r = 0; r < w.rows; ++r) end = max(end, w.visible_end(p, r));
        // Unsigned: near 2^31 keys, end + splits and k0 + part overflow an int (both
        // terms are below 2^31, so their sums fit 32 unsigned bits).
        const unsigned part =
            ((unsigned(end) + unsigned(p.splits) - 1u) / unsigned(p.splits) + unsigned(kKeys) - 1u) /
            unsigned(kKeys) * unsigned(kKeys);
        w.k0 = int(min(unsigned(end), blockIdx.y * part));
        w.k1 = int(min(unsigned(end), unsigned(w.k0) + part));
        w.tiles = (w.k1 - w.k0 + kKeys - 1) / kKeys;
        return w;
    }
    // The smallest visible_end of the CTA's rows: keys from there on are hidden from some.
    __device__ __forceinline__ int first_hidden(const Params &p) const {
        int first = keys;
        for (int r = 0; r < rows; ++r) first = min(first, visible_end(p, r));
        return first;
    }
    __device__ __forceinline__ int head(const Params &p, int r) const { return g * p.group + (first_row + r) / p.nq; }
    __device__ __forceinline__ int query_row(const Params &p, int r) const { return (first_row + r) % p.nq; }
    // Causal, aligned to the end of the sequence: row i sees keys [0, i + keys - nq + 1).
    __device__ __forceinline__ int visible_end(const Params &p, int r) const {
        return p.causal ? max(0, min(keys, query_row(p, r) + keys - p.nq + 1)) : keys;
    }
    // out's and lse's row of packed row r, over all (b, h, nq).
    __device__ __forceinline__ int64_t output_row(const Params &p, int r) const {
        return (int64_t(b) * p.h + head(p, r)) * p.nq + query_row(p, r);
    }
};

// The CTA's query rows, normalized per group and times their head's scale, as float
// into q_s (row stride D); rows past w.rows (up to padded_rows) and columns past d are
// 0. Ends with a barrier.
template <typename T, int D>
__device__ __forceinline__ void load_queries(const Params &p, const CtaWork &w, int padded_rows, float *q_s) {
    const int tid = threadIdx.x, d = p.d, group_size = d / p.groups;
    const T *q = static_cast<const T *>(p.q);
    for (int idx = tid; idx < padded_rows * D; idx += kThreads) {
        const int r = idx / D, e = idx % D;
        float x = 0.f;
        if (r < w.rows && e < d)
            x = common::to_float(q[w.b * p.q_stride[0] + w.head(p, r) * p.q_stride[1] +
                                   w.query_row(p, r) * p.q_stride[2] + e]);
        q_s[idx] = x;
    }
    __syncthreads();
    for (int idx = tid; idx < w.rows * p.groups; idx += kThreads) {
        const int r = idx / p.groups, gi = idx % p.groups;
        float *x = q_s + r * D + gi * group_size;
        float multiplier = p.scale_t ? p.scale_t[w.head(p, r) * p.scale_stride] : p.scale;
        if (p.l2norm) multiplier *= inverse_norm(group_size, [&](int i) { return x[i]; });
        for (int i = 0; i < group_size; ++i) x[i] *= multiplier;
    }
    __syncthreads();
}

// Tile t of the CTA's keys into k_tile and v_tile (rows of kRowStride elements): rows
// past k1, in a block outside the cache, and columns past d are zero-filled.
template <typename T, int D>
__device__ __forceinline__ void load_kv_tile(const Params &p, const CtaWork &w, int t, T *k_tile, T *v_tile) {
    using Shape = Tile<T, D>;
    const T *k_cache = static_cast<const T *>(p.k_cache), *v_cache = static_cast<const T *>(p.v_cache);
    const int column = threadIdx.x % Shape::kLoadColumns * Shape::kChunk;
    for (int j = threadIdx.x / Shape::kLoadColumns; j < Shape::kKeys; j += Shape::kLoadRowStep) {
        const int key = w.k0 + t * Shape::kKeys + j;
        int64_t slot = 0, row = 0;
        const bool valid = column < p.d && key < w.k1 && locate(p, w.b, key, slot, row);
        const T *k_src = k_cache, *v_src = v_cache;
        if (valid) {
            k_src += slot * p.k_stride[0] + w.g * p.k_stride[1] + row * p.k_stride[2] + column;
            v_src += slot * p.v_stride[0] + w.g * p.v_stride[1] + row * p.v_stride[2] + column;
        }
        common::cp_async_16(common::smem_address(k_tile + j * Shape::kRowStride + column), k_src, valid);
        common::cp_async_16(common::smem_address(v_tile + j * Shape::kRowStride + column), v_src, valid);
    }
}

// The K/V ring both decode kernels read: tile t of the CTA's keys in stage t % kStages,
// [K, V][kKeys][kRowStride] each, kStages - 1 tiles loading ahead of the one in use.
template <typename T, int D> struct KvRing {
    using Shape = Tile<T, D>;
    T *base;
    __device__ __forceinline__ T *k(int t) const { return base + (t % kStages) * 2 * Shape::kKeys * Shape::kRowStride; }
    __device__ __forceinline__ T *v(int t) const { return k(t) + Shape::kKeys * Shape::kRowStride; }
    // Tiles 0 .. kStages - 2 in flight (one cp.async group each, empty past the last tile).
    __device__ __forceinline__ void start(const Params &p, const CtaWork &w) const {
#pragma unroll
        for (int s = 0; s < kStages - 1; ++s) {
            if (s < w.tiles) load_kv_tile<T, D>(p, w, s, k(s), v(s));
            common::cp_async_commit();
        }
    }
    // Refills the stage the previous tile used (every thread is past it: the barrier at
    // the end of the last iteration), then waits for tile t, visible to every thread.
    __device__ __forceinline__ void wait(const Params &p, const CtaWork &w, int t) const {
        const int next = t + kStages - 1;
        if (next < w.tiles) load_kv_tile<T, D>(p, w, next, k(next), v(next));
        common::cp_async_commit();
        common::cp_async_wait<kStages - 1>();
        __syncthreads();
    }
};

// Inverse norms of the tile's first `count` keys, per group, into inv_s[key * groups + group].
// Called by every thread of the CTA (the one-group case shuffles within warps).
template <typename T, int D>
__device__ __forceinline__ void key_inverse_norms(const Params &p, const T *k_tile, int count, float *inv_s) {
    constexpr int CH = Tile<T, D>::kChunk;
    if (p.groups == 1) {
        // kLanes adjacent threads per key, each summing every kLanes-th chunk of the row.
        constexpr int kLanes = kThreads / Tile<T, D>::kKeys;
        const int j = threadIdx.x / kLanes, sub = threadIdx.x % kLanes;
        const T *x = k_tile + j * Tile<T, D>::kRowStride;
        float sum = 0.f;
        for (int c = sub * CH; c < p.d; c += kLanes * CH) {
            float f[CH];
            common::chunk_to_float<T>(*reinterpret_cast<const uint4 *>(x + c), f);
#pragma unroll
            for (int e = 0; e < CH; ++e) sum = fmaf(f[e], f[e], sum);
        }
#pragma unroll
        for (int offset = kLanes / 2; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
        if (sub == 0 && j < count)
            inv_s[j] = isinf(sum) ? inverse_norm(p.d, [&](int i) { return common::to_float(x[i]); })
                                  : 1.f / fmaxf(sqrtf(sum), 1e-12f);
        return;
    }
    const int group_size = p.d / p.groups;
    for (int idx = threadIdx.x; idx < count * p.groups; idx += kThreads) {
        const int j = idx / p.groups, gi = idx % p.groups;
        const T *x = k_tile + j * Tile<T, D>::kRowStride + gi * group_size;
        inv_s[idx] = group_size % CH == 0 ? chunked_inverse_norm(x, group_size)
                                          : inverse_norm(group_size, [&](int i) { return common::to_float(x[i]); });
    }
}

// The online softmax of one tile, a warp per row, rows [0, rows): the new running
// maximum, the weights exp(s - max) in place of the scores, the row sums, and
// alpha_s[r], the factor that rescales what row r has accumulated so far.
template <int kKeys>
__device__ __forceinline__ void online_softmax(int rows, float *score_s, float *max_s, float *sum_s, float *alpha_s) {
    constexpr float kInf = __builtin_huge_valf();
    constexpr int kPerLane = (kKeys + 31) / 32;
    const int lane = threadIdx.x % 32;
    for (int r = threadIdx.x / 32; r < rows; r += kWarps) {
        // Lane 0 alone reads and writes max_s[r]: the other lanes' reads would be ordered
        // before its write only by the shuffles, which order no memory.
        const float old_max = lane == 0 ? max_s[r] : -kInf;
        float s[kPerLane], tile_max = -kInf;
#pragma unroll
        for (int k = 0; k < kPerLane; ++k) {
            const int j = lane + 32 * k;
            s[k] = j < kKeys ? score_s[r * kKeys + j] : -kInf;
            tile_max = fmaxf(tile_max, s[k]);
        }
        const float new_max = warp_max(fmaxf(old_max, tile_max));
        float sum = 0.f;
#pragma unroll
        for (int k = 0; k < kPerLane; ++k) {
            const int j = lane + 32 * k;
            const float weight = new_max == -kInf ? 0.f : expf(s[k] - new_max);
            if (j < kKeys) score_s[r * kKeys + j] = weight;
            sum += weight;
        }
        sum = warp_sum(sum);
        if (lane == 0) {
            const float alpha = new_max == -kInf ? 1.f : expf(old_max - new_max);
            max_s[r] = new_max;
            sum_s[r] = sum_s[r] * alpha + sum;
            alpha_s[r] = alpha;
        }
    }
}

// A row's lse from its running maximum and sum: -inf for a row that saw no key, NaN for
// a NaN sum (a NaN logit), as log-sum-exp gives.
__device__ __forceinline__ float row_lse(float max, float sum) {
    return !(sum <= 0.f) ? max + logf(sum) : -__builtin_huge_valf();
}

// ---------------------------------------------------------------- split attention, FMA

// Scores and P V with float FMAs: the kernel for float32 and for several l2norm groups.
template <typename T, int D> __global__ void __launch_bounds__(kThreads) decode_kernel(const Params p) {
    using Shape = Tile<T, D>;
    constexpr int KT = Shape::kKeys, RS = Shape::kRowStride, CH = Shape::kChunk;
    constexpr float kInf = __builtin_huge_valf();

    extern __shared__ __align__(16) unsigned char smem_raw[];
    T *kv_s = reinterpret_cast<T *>(smem_raw);
    float *q_s = reinterpret_cast<float *>(smem_raw + Shape::kv_bytes());
    float *score_s = q_s + p.block_rows * D;
    float *inv_s = score_s + p.block_rows * KT;
    float *max_s = inv_s + KT * p.groups;
    float *sum_s = max_s + p.block_rows;
    float *alpha_s = sum_s + p.block_rows;

    const int tid = threadIdx.x;
    const CtaWork w = CtaWork::make<KT>(p);
    const int rows = w.rows, d = p.d, groups = p.groups, group_size = d / groups;
    if (tid < rows) {
        max_s[tid] = -kInf;
        sum_s[tid] = 0.f;
    }
    load_queries<T, D>(p, w, rows, q_s);

    // P V: this thread's 4 columns of rows slot, slot + kSlots, ...
    const int column = tid % Shape::kColumnChunks * 4, slot = tid / Shape::kColumnChunks;
    float acc[Shape::kRowsPerThread][4];
#pragma unroll
    for (int k = 0; k < Shape::kRowsPerThread; ++k)
#pragma unroll
        for (int x = 0; x < 4; ++x) acc[k][x] = 0.f;

    const KvRing<T, D> ring{kv_s};
    ring.start(p, w);
    for (int t = 0; t < w.tiles; ++t) {
        ring.wait(p, w, t);
        const T *k_tile = ring.k(t), *v_tile = ring.v(t);
        const int key0 = w.k0 + t * KT, count = min(KT, w.k1 - key0);

        // 1. Inverse norms of the keys, per group.
        if (p.l2norm) {
            key_inverse_norms<T, D>(p, k_tile, count, inv_s);
            __syncthreads();
        }

        // 2. Scores of the keys each row sees; -inf for the others.
        for (int idx = tid; idx < rows * KT; idx += kThreads) {
            const int r = idx / KT, j = idx % KT;
            float s = -kInf;
            if (j < count && key0 + j < w.visible_end(p, r)) {
                const float *qr = q_s + r * D;
                const T *kr = k_tile + j * RS;
                if (!p.l2norm || groups == 1) {
                    float dot = 0.f;
                    for (int c = 0; c < d; c += CH) {
                        float kf[CH];
                        common::chunk_to_float<T>(*reinterpret_cast<const uint4 *>(kr + c), kf);
#pragma unroll
                        for (int e = 0; e < CH; e += 4) {
                            const float4 qv = *reinterpret_cast<const float4 *>(qr + c + e);
                            dot = fmaf(qv.x, kf[e], dot);
                            dot = fmaf(qv.y, kf[e + 1], dot);
                            dot = fmaf(qv.z, kf[e + 2], dot);
                            dot = fmaf(qv.w, kf[e + 3], dot);
                        }
                    }
                    s = p.l2norm ? dot * inv_s[j] : dot;
                } else {
                    s = 0.f;
                    for (int gi = 0; gi < groups; ++gi) {
                        float dot = 0.f;
                        for (int e = gi * group_size; e < (gi + 1) * group_size; ++e)
                            dot = fmaf(qr[e], common::to_float(kr[e]), dot);
                        s = fmaf(dot, inv_s[j * groups + gi], s);
                    }
                }
            }
            score_s[idx] = s;
        }
        __syncthreads();

        // 3. The online softmax.
        online_softmax<KT>(rows, score_s, max_s, sum_s, alpha_s);
        __syncthreads();

        // 4. out += P V. A weight of 0 is skipped, not multiplied: a key hidden from
        // this row may hold inf or NaN, which must not reach its output.
        if (column < d) {
            const float *weights = score_s + slot * KT;
#pragma unroll
            for (int k = 0; k < Shape::kRowsPerThread; ++k) {
                if (slot + k * Shape::kSlots < rows) {
                    const float alpha = alpha_s[slot + k * Shape::kSlots];
#pragma unroll
                    for (int x = 0; x < 4; ++x) acc[k][x] *= alpha;
                }
            }
            for (int j = 0; j < count; ++j) {
                float v[4];
                load4(v_tile + j * RS + column, v);
#pragma unroll
                for (int k = 0; k < Shape::kRowsPerThread; ++k) {
                    if (slot + k * Shape::kSlots < rows) {
                        const float weight = weights[k * Shape::kSlots * KT + j];
                        if (weight != 0.f) {
#pragma unroll
                            for (int x = 0; x < 4; ++x) acc[k][x] = fmaf(weight, v[x], acc[k][x]);
                        }
                    }
                }
            }
        }
        __syncthreads();
    }
    common::cp_async_wait<0>(); // no copy may outlive the CTA (the last groups are empty)

    // Epilogue: into out and lse directly, or into this split's partial result.
    if (column >= d) return;
    const int64_t total_rows = int64_t(p.b) * p.h * p.nq;
#pragma unroll
    for (int k = 0; k < Shape::kRowsPerThread; ++k) {
        const int r = slot + k * Shape::kSlots;
        if (r >= rows) continue;
        const float sum = sum_s[r], inverse = sum > 0.f ? 1.f / sum : 0.f;
        const int64_t index = w.output_row(p, r);
        if (p.splits == 1) {
            T *out = static_cast<T *>(p.out) + w.b * p.out_stride[0] + w.head(p, r) * p.out_stride[1] +
                     w.query_row(p, r) * p.out_stride[2] + column;
#pragma unroll
            for (int x = 0; x < 4; ++x) out[x] = common::from_float<T>(acc[k][x] * inverse);
            if (column == 0 && p.lse)
                p.lse[w.b * p.lse_stride[0] + w.head(p, r) * p.lse_stride[1] + w.query_row(p, r) * p.lse_stride[2]] =
                    row_lse(max_s[r], sum);
        } else {
            const int64_t partial = blockIdx.y * total_rows + index;
            *reinterpret_cast<float4 *>(p.partial_out + partial * d + column) =
                make_float4(acc[k][0] * inverse, acc[k][1] * inverse, acc[k][2] * inverse, acc[k][3] * inverse);
            if (column == 0) p.partial_lse[partial] = row_lse(max_s[r], sum);
        }
    }
}

// ---------------------------------------------------------------- combine

// A warp per output row: out = sum_s e^(lse_s - lse) out_s, lse = log sum_s e^lse_s.
template <typename T> __global__ void __launch_bounds__(kThreads) combine_kernel(const Params p) {
    constexpr float kInf = __builtin_huge_valf();
    __shared__ float weights[kWarps][kMaxSplits];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int64_t total_rows = int64_t(p.b) * p.h * p.nq;
    const int64_t index = int64_t(blockIdx.x) * kWarps + warp;
    if (index >= total_rows) return; // the whole warp: only warp-level syncs follow

    float top = -kInf;
    for (int s = lane; s < p.splits; s += 32) top = fmaxf(top, p.partial_lse[s * total_rows + index]);
    top = warp_max(top);
    float sum = 0.f;
    for (int s = lane; s < p.splits; s += 32) {
        const float w = top == -kInf ? 0.f : expf(p.partial_lse[s * total_rows + index] - top);
        weights[warp][s] = w;
        sum += w;
    }
    sum = warp_sum(sum);
    __syncwarp();
    const float inverse = sum > 0.f ? 1.f / sum : 0.f;

    const int b = int(index / (int64_t(p.h) * p.nq)), head = int(index / p.nq % p.h), i = int(index % p.nq);
    T *out = static_cast<T *>(p.out) + b * p.out_stride[0] + head * p.out_stride[1] + i * p.out_stride[2];
    for (int c = lane; c < p.d; c += 32) {
        float o = 0.f;
        for (int s = 0; s < p.splits; ++s) {
            const float w = weights[warp][s];
            if (w != 0.f) o = fmaf(w, p.partial_out[(s * total_rows + index) * p.d + c], o);
        }
        out[c] = common::from_float<T>(o * inverse);
    }
    if (lane == 0 && p.lse)
        p.lse[b * p.lse_stride[0] + head * p.lse_stride[1] + i * p.lse_stride[2]] = row_lse(top, sum);
}

} // namespace decode
} // namespace sm80
} // namespace fcsa
