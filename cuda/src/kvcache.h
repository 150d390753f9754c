// kvcache.h: one KV-cache attention call (fcsa_kvcache_forward) after validation, and
// the backends that run it.
//
// api.cpp checks the caller's descriptors and fills a KvCacheProblem. `attention`
// holds what a plain forward would: q, out, lse, scale, the options and the sizes b,
// h, hk, nq, d, d_v, with nk the cache's capacity (the most keys any sequence can
// have); its k and v are left empty: keys are read from the caches through key_row.
#pragma once

#include <cstddef>
#include <cstdint>

#include "fcsa.h"
#include "problem.h"

namespace fcsa {

struct KvCacheProblem {
    Problem attention;
    View k_cache, v_cache; // (b or num_blocks, hk, n_max or page_size, d / d_v)
    View k_new, v_new;     // (b, hk, nq_new, d / d_v); absent when nothing is appended
    const int32_t *cache_seqlens = nullptr; // (b,), contiguous; nullptr: every sequence full
    const int32_t *block_table = nullptr;   // (b, max_blocks) with row stride block_table_stride
    int64_t block_table_stride = 0;
    int64_t max_blocks = 0;  // paged: block_table's width
    int64_t num_blocks = 0;  // paged: the cache's first dim
    int64_t page_size = 0;   // paged: keys per block; contiguous: n_max
    int64_t capacity = 0;    // keys one sequence can hold: n_max, or max_blocks * page_size
    int64_t nq_new = 0;      // keys appended per sequence (0 without k_new)

    bool paged() const { return block_table != nullptr; }
    bool appends() const { return k_new.present(); }
    // The cache's first dim and sequence index of key `key` of sequence `batch`
    // (host code only: the CUDA kernels have their own, memory-safe, copy).
    void locate(int64_t batch, int64_t key, int64_t *slot, int64_t *row) const {
        if (!paged()) {
            *slot = batch;
            *row = key;
            return;
        }
        *slot = block_table[batch * block_table_stride + key / page_size];
        *row = key % page_size;
    }
    int64_t cached_keys(int64_t batch) const { return cache_seqlens ? cache_seqlens[batch] : capacity - nq_new; }
};

// ---- CPU backend (cpu/kvcache.cpp): the reference. Workspace: none.
size_t cpu_kvcache_workspace(const KvCacheProblem &p);
fcsa_status cpu_kvcache_forward(const KvCacheProblem &p, void *workspace);

#if defined(FCSA_WITH_CUDA)
// ---- CUDA (sm80/decode.cu): split-KV decoding, any GPU from sm_80 on. `stream` is a
// cudaStream_t; the caller has made the tensors' device current. supports returns
// SUCCESS or NOT_SUPPORTED with the message set.
fcsa_status sm80_kvcache_supports(const KvCacheProblem &p);
size_t sm80_kvcache_workspace(const KvCacheProblem &p);
fcsa_status sm80_kvcache_forward(const KvCacheProblem &p, void *workspace, void *stream);
#endif

} // namespace fcsa
