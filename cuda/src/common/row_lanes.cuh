// row_lanes.cuh: the layout of the row-wise passes over q-, k- or o-shaped arrays (the
// backward's prepass and finishing pass, the forward's key norms). A row of 16-byte
// aligned chunks is spread over `width` lanes (a power of two up to 16, so that a warp
// holds 2 or more rows), each lane holding some of its chunks; the rows' sums are then
// a few shuffles within each lane group. One warp per row, reading 2 bytes per lane,
// reached only 1.1-1.6 TB/s on the H100 (notes v6); this layout 2.3-2.5 TB/s.
#pragma once

#include <cstdint>

#include "copy.cuh"

namespace fcsa {
namespace common {

// The sum over aligned groups of `width` lanes (a power of two), in every lane of each.
__device__ __forceinline__ float lanes_sum(float x, int width) {
#pragma unroll
    for (int offset = width / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
    return x;
}

struct RowLanes {
    int width;      // lanes per row
    int chunks;     // 16-byte chunks per row
    int sub;        // this lane's place in its row
    int64_t first;  // the row of the warp's lane 0, before striding
    int offset;     // this lane's row - first
    int64_t stride; // rows per grid-wide step
};

// Rows of up to 256 elements, the largest head dim.
constexpr int kRowLanesMaxElements = 256;
// The 16-byte chunks a lane holds at most: 256 elements over 16 lanes.
template <typename T> constexpr int chunks_per_lane() { return kRowLanesMaxElements / Chunk<T>::N / 16; }

// Lanes per row of `chunks` 16-byte chunks: the power of two that covers them, at most 16
// (the host sizes the grid by it too).
__host__ __device__ inline int row_lane_width(int chunks) {
    int width = 1;
    while (width < chunks && width < 16) width *= 2;
    return width;
}

template <typename T> __device__ __forceinline__ RowLanes row_lanes(int d) {
    RowLanes r;
    r.chunks = d / Chunk<T>::N;
    r.width = row_lane_width(r.chunks);
    const int lane = threadIdx.x & 31;
    r.first = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x - lane) / r.width;
    r.offset = lane / r.width;
    r.sub = lane % r.width;
    r.stride = int64_t(gridDim.x) * blockDim.x / r.width;
    return r;
}

// f(row, here, batch, head, i) for each row of a [b][heads][rows] index space that this
// lane's group takes. Past the last row `here` is false (and the indices those of a row
// that exists): a warp's lanes run every iteration together, for the shuffles.
template <class F>
__device__ __forceinline__ void for_lane_rows(const RowLanes &lanes, int64_t heads, int64_t rows, int64_t total,
                                              F f) {
    for (int64_t base = lanes.first; base < total; base += lanes.stride) {
        const bool here = base + lanes.offset < total;
        const int64_t row = here ? base + lanes.offset : base;
        f(row, here, row / (rows * heads), (row / rows) % heads, row % rows);
    }
}

// Chunk `c` of a row of T, as floats.
template <typename T> __device__ __forceinline__ void load_chunk(const T *row, int c, float (&f)[Chunk<T>::N]) {
    chunk_to_float<T>(*reinterpret_cast<const uint4 *>(row + c * Chunk<T>::N), f);
}

} // namespace common
} // namespace fcsa
