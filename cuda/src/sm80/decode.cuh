// decode.cuh: the host side of the split-KV decode path (decode_kernel.cuh), as the
// dispatcher (decode.cu) sees it: a plan per call, and a launch per dtype, each
// compiled in its own file (decode_bf16.cu, decode_f16.cu, decode_f32.cu).
#pragma once

#include <cstddef>

#include <cuda_runtime.h>

#include "../kvcache.h"

namespace fcsa {
namespace sm80 {
namespace decode {

// How one call runs: identical for the workspace query and the launch (both derive it
// from the problem and the current device alone).
struct Plan {
    int head_dim_bound = 0; // D: the kernel's head-dim bound (64, 128, 256)
    int block_rows = 0;     // packed query rows per CTA
    int row_blocks = 0;     // CTAs per (sequence, kv head) over the rows
    int splits = 1;         // CTAs per (sequence, kv head, row block) over the keys
    bool tensor_cores = false; // decode_stream_kernel rather than decode_kernel
    bool deep = false;         // decode_stream_kernel's deep ring
    int m_tiles = 2;           // decode_stream_kernel's m16 tiles of packed rows (1: at most 16 rows)
    int threads = 0;           // per CTA
    size_t smem = 0;        // dynamic shared memory per CTA
    size_t workspace = 0;   // partial results when splits > 1
};

// SUCCESS, NOT_SUPPORTED (shared memory, no kernel image for the device) or
// CUDA_ERROR, with the message set. Defined for float, __half and __nv_bfloat16.
template <typename T> fcsa_status make_plan(const KvCacheProblem &kv, Plan *plan);
template <typename T>
fcsa_status launch(const KvCacheProblem &kv, const Plan &plan, void *workspace, cudaStream_t stream);

} // namespace decode
} // namespace sm80
} // namespace fcsa
