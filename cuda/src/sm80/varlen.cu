// varlen.cu: the tile table of packed variable-length sequences (varlen.cuh), built on
// the device by one block: clamp the sequences, order them longest first, place their
// tiles by a prefix sum, and fill the table in parallel.
#include <cub/block/block_scan.cuh>

#include "../backends.h"
#include "varlen.cuh"

namespace fcsa {
namespace sm80 {
namespace {

constexpr int kThreads = 512; // (1024 would cap registers at 64: it spilled)
// Ranking b sequences costs b^2 / kThreads comparisons (of lengths in shared memory):
// beyond this many, they keep their order (so many sequences fill the device whatever
// their order).
constexpr int kMostRanked = 2048;

// The workspace, in this order, each part 16-byte aligned.
struct Layout {
    size_t sequences, tiles, count, order, start, bytes;
};

size_t align16(size_t x) { return (x + 15) / 16 * 16; }

Layout layout_for(int64_t sequences, int64_t max_tiles) {
    Layout l;
    l.sequences = 0;
    l.tiles = align16(l.sequences + size_t(sequences) * sizeof(int4));
    l.count = align16(l.tiles + size_t(max_tiles) * sizeof(int2));
    l.order = align16(l.count + sizeof(int));
    l.start = align16(l.order + size_t(sequences) * sizeof(int));
    l.bytes = align16(l.start + size_t(sequences + 1) * sizeof(long long));
    return l;
}

__device__ int clamp_offset(int offset, int low, int high) {
    return offset < low ? low : offset > high ? high : offset;
}

__global__ void __launch_bounds__(kThreads)
    tiles_kernel(const int32_t *cu_q, const int32_t *cu_k, int sequences, int total_q, int total_k, int block,
                 bool by_keys, int max_tiles, int4 *seqs, int2 *tiles, int *count, int *order, long long *start) {
    const int tid = threadIdx.x;
    // 1. Each sequence clamped into the tensors: [begin, end) with 0 <= begin <= end <= total.
    for (int s = tid; s < sequences; s += kThreads) {
        const int qb = clamp_offset(cu_q[s], 0, total_q), qe = clamp_offset(cu_q[s + 1], qb, total_q);
        const int kb = clamp_offset(cu_k[s], 0, total_k), ke = clamp_offset(cu_k[s + 1], kb, total_k);
        seqs[s] = make_int4(qb, qe - qb, kb, ke - kb);
    }
    __syncthreads();
    // 2. Longest first: by the length each tile walks (keys for query tiles, queries for
    // key tiles), ties in sequence order.
    __shared__ int walk[kMostRanked];
    const bool ranked = sequences <= kMostRanked;
    if (ranked) {
        for (int s = tid; s < sequences; s += kThreads) walk[s] = by_keys ? seqs[s].y : seqs[s].w;
        __syncthreads();
    }
    for (int s = tid; s < sequences; s += kThreads) {
        int rank = s;
        if (ranked) {
            const int mine = walk[s];
            rank = 0;
            for (int t = 0; t < sequences; ++t) rank += walk[t] > mine || (walk[t] == mine && t < s);
        }
        order[rank] = s;
    }
    __syncthreads();
    // 3. start[r]: the first entry of the sequence of rank r (an exclusive prefix sum of
    // the tile counts, each thread summing a contiguous chunk of ranks).
    auto tiles_of = [&](int s) {
        const int n = by_keys ? seqs[s].w : seqs[s].y;
        return n / block + (n % block != 0); // (n + block - 1 could overflow)
    };
    // (In 64 bits: near 2^31 sequences these products would overflow an int.)
    const int64_t chunk = (int64_t(sequences) + kThreads - 1) / kThreads;
    const int r0 = int(min(tid * chunk, int64_t(sequences))), r1 = int(min(r0 + chunk, int64_t(sequences)));
    long long mine = 0;
    for (int r = r0; r < r1; ++r) mine += tiles_of(order[r]);
    using Scan = cub::BlockScan<long long, kThreads>;
    __shared__ typename Scan::TempStorage scan_storage;
    long long before = 0, total = 0;
    Scan(scan_storage).ExclusiveSum(mine, before, total);
    for (int r = r0; r < r1; ++r) {
        start[r] = before;
        before += tiles_of(order[r]);
    }
    if (tid == 0) {
        start[sequences] = total;
        *count = int(total < max_tiles ? total : max_tiles); // (clamped sequences may overlap)
    }
    __syncthreads();
    // 4. Entry e belongs to the last rank whose start is <= e; within a sequence the
    // tiles go last first.
    const int used = int(total < max_tiles ? total : max_tiles);
    for (int e = tid; e < used; e += kThreads) {
        int low = 0, high = sequences - 1; // start[low] <= e < start[high + 1]
        while (low < high) {
            const int mid = low + (high - low + 1) / 2;
            if (start[mid] <= e) low = mid;
            else high = mid - 1;
        }
        const int s = order[low];
        tiles[e] = make_int2(s, tiles_of(s) - 1 - int(e - start[low]));
    }
}

} // namespace

size_t varlen_tiles_bytes(const Problem &p, int min_block, bool by_keys) {
    return layout_for(p.sequences, varlen_max_tiles(p, min_block, by_keys)).bytes;
}

fcsa_status build_varlen_tiles(const Problem &p, int block, bool by_keys, void *workspace, cudaStream_t stream,
                               VarlenTiles *tiles) {
    const int64_t max_tiles = varlen_max_tiles(p, block, by_keys);
    if (p.sequences >= INT32_MAX || max_tiles > INT32_MAX)
        return set_error(FCSA_STATUS_NOT_SUPPORTED,
                         "cuda-sm80: %lld packed sequences, up to %lld tiles of %d rows: more than 2^31 - 2",
                         static_cast<long long>(p.sequences), static_cast<long long>(max_tiles), block);
    const Layout l = layout_for(p.sequences, max_tiles);
    char *base = static_cast<char *>(workspace);
    tiles->sequences = reinterpret_cast<const int4 *>(base + l.sequences);
    tiles->tiles = reinterpret_cast<const int2 *>(base + l.tiles);
    tiles->count = reinterpret_cast<const int *>(base + l.count);
    tiles->max_tiles = max_tiles;
    tiles_kernel<<<1, kThreads, 0, stream>>>(
        p.cu_seqlens_q, p.cu_seqlens_k, int(p.sequences), int(p.nq), int(p.nk), block, by_keys, int(max_tiles),
        reinterpret_cast<int4 *>(base + l.sequences), reinterpret_cast<int2 *>(base + l.tiles),
        reinterpret_cast<int *>(base + l.count), reinterpret_cast<int *>(base + l.order),
        reinterpret_cast<long long *>(base + l.start));
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess)
        return set_error(FCSA_STATUS_CUDA_ERROR, "cuda-sm80: the packed sequences' tile table: %s",
                         cudaGetErrorString(err));
    return FCSA_STATUS_SUCCESS;
}

} // namespace sm80
} // namespace fcsa
