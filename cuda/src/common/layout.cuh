// layout.cuh: where the elements of a shared-memory tile live.
//
// Shared tiles are row-major in one of two layouts; both give the element offset of
// (row, col) as offset(row, col), and as chunk_offset(row, col) when col is a multiple
// of the 16-byte chunk (cheaper: the fragment loads and copies).
// - PaddedTile: each row padded by 16 bytes. For 16-bit elements a row is then an odd
//   number of 16-byte units, so the 8 rows an ldmatrix phase reads fall in 8 different
//   bank groups; for float32 rows the stride is 4 mod 32 words, which keeps the tf32
//   fragment loads of mma.cuh conflict-free. Both need the tile width to be a multiple
//   of 32 floats / 16 halves, which every head-dim bucket is.
// - SwizzledTile: no padding; within each 128-byte segment of a row the 16-byte chunks
//   are permuted, chunk c of row r stored at c ^ (r % 8). An ldmatrix phase (8 rows,
//   one chunk column) still meets 8 bank groups, and a 128-byte line that cp.async
//   brings from global memory lands in one aligned 128-byte segment: in a padded tile
//   7 rows of 8 straddle two, and the copies cost the shared memory 2.4x the
//   wavefronts (ncu, forward d = 128 on the H100). Rows must be whole segments, and
//   the tile's start 128-byte aligned.
#pragma once

namespace fcsa {
namespace common {

template <typename T, int kRows, int kCols> struct PaddedTile {
    static constexpr int kChunk = 16 / int(sizeof(T)); // elements per 16-byte copy
    static constexpr int kStride = kCols + kChunk;     // elements per row
    static constexpr int kChunksPerRow = kCols / kChunk;
    static constexpr int kElements = kRows * kStride;
    static constexpr int kBytes = kElements * int(sizeof(T));
    static constexpr int kRowPeriod = 1; // rows r and r + kRowPeriod are laid out alike
    static_assert(kCols % kChunk == 0, "tile width must be whole 16-byte chunks");
    __device__ __forceinline__ static int offset(int row, int col) { return row * kStride + col; }
    __device__ __forceinline__ static int chunk_offset(int row, int col) { return offset(row, col); }
};

template <typename T, int kRows, int kCols> struct SwizzledTile {
    static constexpr int kChunk = 16 / int(sizeof(T));
    static constexpr int kStride = kCols;
    static constexpr int kChunksPerRow = kCols / kChunk;
    static constexpr int kElements = kRows * kStride;
    static constexpr int kBytes = kElements * int(sizeof(T));
    static constexpr int kRowPeriod = 8;
    static_assert(kChunksPerRow % 8 == 0, "rows must be whole 128-byte segments");
    __device__ __forceinline__ static int chunk_offset(int row, int col) {
        return row * kStride + ((col / kChunk) ^ (row & 7)) * kChunk;
    }
    __device__ __forceinline__ static int offset(int row, int col) { return chunk_offset(row, col) + col % kChunk; }
};

// One row in memory (a row pointer): column col at offset col.
struct ContiguousRow {
    __device__ __forceinline__ static int offset(int, int col) { return col; }
};

// A row-major tile whose row stride is known at run time only.
struct StridedRows {
    int stride;
    __device__ __forceinline__ int offset(int row, int col) const { return row * stride + col; }
    __device__ __forceinline__ int chunk_offset(int row, int col) const { return offset(row, col); }
};

} // namespace common
} // namespace fcsa
