// varlen.cuh: the tiles of packed variable-length sequences (Problem::varlen) on the
// portable CUDA path.
//
// The offsets live in device memory and the host never reads them (no call
// synchronizes), so the host cannot know how many tiles there are. It launches a bound
// instead: sum over s of ceil(n_s / block) <= floor(total / block) + b. A one-block
// kernel (build_varlen_tiles) reads the offsets, clamps every sequence into the packed
// tensors (so that wrong offsets can never send a kernel outside them), and writes the
// table the attention kernels read: entry t = (sequence, tile), the sequences ordered
// longest first (their tiles are the slowest: started first they do not trail at the
// end), and the number of entries in use. A CTA past that number returns at once.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "../problem.h"

namespace fcsa {
namespace sm80 {

// What a kernel reads; built on the device by build_varlen_tiles.
struct VarlenTiles {
    const int4 *sequences = nullptr; // [b]: first query row, query rows, first key, keys (clamped)
    const int2 *tiles = nullptr;     // [max_tiles]: (sequence, tile), the first *count in use
    const int *count = nullptr;
    int64_t max_tiles = 0; // the bound the grid is launched for
};

// The bound on tiles of `block` rows (queries, or keys with by_keys) for p's sequences.
inline int64_t varlen_max_tiles(const Problem &p, int block, bool by_keys) {
    return (by_keys ? p.nk : p.nq) / block + p.sequences;
}

// Workspace bytes of one table for tiles of at least `min_block` rows (a multiple of 16).
size_t varlen_tiles_bytes(const Problem &p, int min_block, bool by_keys);

// Builds the table for tiles of `block` rows of queries (or keys) in `workspace` (at
// least varlen_tiles_bytes(p, m, by_keys) bytes for some m <= block) on `stream`.
// Within a sequence the tiles go last first (causal's longest first).
fcsa_status build_varlen_tiles(const Problem &p, int block, bool by_keys, void *workspace, cudaStream_t stream,
                               VarlenTiles *tiles);

} // namespace sm80
} // namespace fcsa
