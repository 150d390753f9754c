// decode_launch.cuh: planning and launching the decode kernels for one dtype; included
// by decode_<dtype>.cu, which instantiate it.
//
// The split count: with units = b * hk * row_blocks CTAs before any split and `slots`
// CTAs resident on the whole device at once (SMs x occupancy), each unit's keys are
// split into as few parts as make the CTAs fill whole waves (choose_splits), so that a
// single sequence still fills the GPU; never into parts of fewer than two tiles of the
// cache's capacity (the partial results and their combination would cost more than the
// split gains), and never more than kMaxSplits ways.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "../backends.h"
#include "decode.cuh"
#include "decode_kernel.cuh"
#include "decode_stream_kernel.cuh"

namespace fcsa {
namespace sm80 {
namespace decode {

// The fewest splits (up to `most`) whose CTAs fill their waves to 95% (CTAs of one call
// do about equal work, so a last wave a fifth full costs the time of a full one), or
// failing that the best-filled.
inline int64_t choose_splits(int64_t units, int64_t slots, int64_t most) {
    int64_t best = 1;
    double best_fill = 0.;
    for (int64_t s = 1; s <= most; ++s) {
        const int64_t ctas = units * s, waves = (ctas + slots - 1) / slots;
        const double fill = double(ctas) / double(waves * slots);
        if (fill >= 0.95) return s;
        if (fill > best_fill) best = s, best_fill = fill;
    }
    return best;
}

// The split-attention kernel of a plan: FMA, or tensor cores (16-bit types only) with
// the deep or the shallow ring.
template <typename T, int D> void (*kernel_for(const Plan &plan))(Params) {
    if constexpr (sizeof(T) == 2) {
        if constexpr (D != 256) { // (D = 256 has one m tile either way)
            if (plan.tensor_cores && plan.m_tiles == 1)
                return plan.deep ? decode_stream_kernel<T, D, true, 1> : decode_stream_kernel<T, D, false, 1>;
        }
        if (plan.tensor_cores)
            return plan.deep ? decode_stream_kernel<T, D, true, 2> : decode_stream_kernel<T, D, false, 2>;
    }
    return decode_kernel<T, D>;
}

// Sets a kernel's dynamic shared memory limit to attribute_smem and asks how many of its
// CTAs (threads, smem each) an SM holds. Fails when this build has no code for the
// device: NOT_SUPPORTED, with the message set.
inline fcsa_status occupancy(void (*kernel)(Params), int threads, size_t attribute_smem, size_t smem, int device,
                             int *blocks) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(attribute_smem));
    if (err == cudaSuccess) err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, kernel, threads, smem);
    if (err == cudaSuccess) return FCSA_STATUS_SUCCESS;
    cudaGetLastError();
    return set_error(FCSA_STATUS_NOT_SUPPORTED, "cuda-sm80 kvcache: cannot run the decode kernel on CUDA device %d: %s",
                     device, cudaGetErrorString(err));
}

template <typename T, int D> fcsa_status plan_for(const KvCacheProblem &kv, Plan *plan) {
    using Shape = Tile<T, D>;
    const Problem &p = kv.attention;
    *plan = Plan();
    plan->head_dim_bound = D;
    const int64_t rows = p.heads_per_kv() * p.nq;
    if (rows == 0 || p.b == 0) return FCSA_STATUS_SUCCESS; // appends only
    // 16-bit types with l2norm and one group go to the tensor cores, which keep the
    // step memory-bound at any number of packed rows; float32, several groups (norms per
    // group of columns) and l2norm_qk=False to the FMA kernel. (The tensor cores form
    // q . k before the scale: without l2norm that can overflow float32 where scale * q . k
    // does not; the FMA kernel scales q first, as the CPU backend does.)
    // FCSA_DECODE_KERNEL=fma in the environment forces the FMA kernel where the tensor
    // cores would run: to test it on those shapes, and to time the two.
    const bool mma_possible = sizeof(T) == 2 && p.groups == 1 && p.l2norm;
    const char *forced = std::getenv("FCSA_DECODE_KERNEL");
    plan->tensor_cores = mma_possible && !(forced && std::strcmp(forced, "fma") == 0);

    int device = 0, sms = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    const int smem_limit = sm80_shared_memory_limit(device);
    if (err != cudaSuccess || smem_limit < 0) {
        cudaGetLastError();
        return set_error(FCSA_STATUS_CUDA_ERROR, "cuda-sm80 kvcache: cannot query the current CUDA device: %s",
                         cudaGetErrorString(err));
    }
    int per_sm = 0;
    int64_t keys_per_step = Shape::kKeys;
    if constexpr (sizeof(T) == 2) {
        if (plan->tensor_cores) {
            // Packed rows per CTA: up to the kernel's most. Up to 16 rows take the one-m-tile
            // kernels (about half the registers of the two-m-tile ones) on the shallow ring:
            // on an H200 that read K and V at 89-95% of copy bandwidth at d = 128 and 68-80%
            // at d = 64, against 82-85% and 54-59% for two m-tiles (benchmarks/NOTES.md).
            // Otherwise the ring is whichever of the deep and the shallow one keeps more bytes
            // in flight per SM on this device (the shallow one fits the 99 KB of every GPU;
            // the deep one, at d <= 64 too). FCSA_DECODE_MTILES=2 and FCSA_DECODE_RING=deep or
            // shallow in the environment force the others, so that tests reach every kernel.
            const char *m_tiles = std::getenv("FCSA_DECODE_MTILES");
            const char *forced_ring = std::getenv("FCSA_DECODE_RING");
            plan->m_tiles = D != 256 && rows <= 16 && !(m_tiles && std::strcmp(m_tiles, "2") == 0) ? 1 : 2;
            const char *ring = forced_ring && *forced_ring ? forced_ring : plan->m_tiles == 1 ? "shallow" : nullptr;
            using Deep = StreamTile<T, D, true>;
            using Shallow = StreamTile<T, D, false>;
            using Deep1 = StreamTile<T, D, true, 1>;
            using Shallow1 = StreamTile<T, D, false, 1>;
            const bool one = plan->m_tiles == 1;
            plan->block_rows = int(std::min<int64_t>((rows + 15) / 16 * 16, one ? Deep1::kMaxRows : Deep::kMaxRows));
            plan->row_blocks = int((rows + plan->block_rows - 1) / plan->block_rows);
            keys_per_step = Deep::kKeys * Deep::kWarps;
            int64_t best = -1;
            for (const bool deep : {false, true}) {
                const size_t smem = one ? (deep ? Deep1::smem_bytes() : Shallow1::smem_bytes())
                                        : (deep ? Deep::smem_bytes() : Shallow::smem_bytes());
                const int threads = deep ? Deep::kThreads : Shallow::kThreads;
                const int stages = deep ? Deep::kStages : Shallow::kStages;
                if (smem > size_t(smem_limit)) continue;
                if (ring && std::strcmp(ring, deep ? "shallow" : "deep") == 0) continue;
                Plan trial = *plan;
                trial.deep = deep;
                int blocks = 0;
                if (const fcsa_status st = occupancy(kernel_for<T, D>(trial), threads, smem, smem, device, &blocks))
                    return st;
                const int64_t in_flight = int64_t(blocks) * (stages - 1) * threads;
                if (in_flight > best) {
                    best = in_flight;
                    plan->deep = deep;
                    plan->threads = threads;
                    plan->smem = smem;
                    per_sm = blocks;
                }
            }
            if (best < 0) { // no ring fits: the FMA kernel
                plan->tensor_cores = false;
                keys_per_step = Shape::kKeys;
            }
        }
    }
    if (!plan->tensor_cores) {
        // Packed rows per CTA: all of them up to the kernel's most, fewer where the
        // device's shared memory per block (99 KB on sm_86/89/120) holds fewer. The
        // kernel's attribute is set to the most it may ever use here (its most rows, and
        // as many groups as columns), the same value on every call: threads planning
        // different sizes do not race on it.
        int block = int(std::min<int64_t>(rows, kBlockRows));
        while (block > 1 && Shape::smem_bytes(block, p.groups) > size_t(smem_limit)) --block;
        plan->block_rows = block;
        plan->row_blocks = int((rows + block - 1) / block);
        plan->smem = Shape::smem_bytes(block, p.groups);
        plan->threads = kThreads;
        const size_t most_smem = std::min(Shape::smem_bytes(kBlockRows, D), size_t(smem_limit));
        if (plan->smem > size_t(smem_limit))
            return set_error(FCSA_STATUS_NOT_SUPPORTED,
                             "cuda-sm80 kvcache: head dim %lld with groups = %d needs %zu bytes of shared memory per "
                             "block; CUDA device %d offers %d",
                             (long long)p.d, int(p.groups), plan->smem, device, smem_limit);
        if (const fcsa_status st = occupancy(kernel_for<T, D>(*plan), kThreads, most_smem, plan->smem, device, &per_sm))
            return st;
    }

    const int64_t units = p.b * p.hk * plan->row_blocks;
    const int64_t slots = int64_t(sms) * std::max(per_sm, 1);
    const int64_t most = std::min<int64_t>(kMaxSplits, std::max<int64_t>(1, kv.capacity / (2 * keys_per_step)));
    plan->splits = int(choose_splits(units, slots, most));
    if (plan->splits > 1) {
        const int64_t total_rows = p.b * p.h * p.nq;
        // + 16: the base is aligned up to 16 bytes for the float4 stores.
        plan->workspace = size_t(plan->splits) * size_t(total_rows) * size_t(p.d + 1) * sizeof(float) + 16;
    }
    return FCSA_STATUS_SUCCESS;
}

inline void copy_strides(const View &view, int64_t (&stride)[3]) {
    for (int i = 0; i < 3; ++i) stride[i] = view.stride[i];
}

template <typename T, int D>
fcsa_status launch_for(const KvCacheProblem &kv, const Plan &plan, void *workspace, cudaStream_t stream) {
    const Problem &p = kv.attention;
    Params params = {};
    params.q = p.q.data;
    copy_strides(p.q, params.q_stride);
    params.out = p.out.data;
    copy_strides(p.out, params.out_stride);
    params.lse = p.lse.present() ? static_cast<float *>(p.lse.data) : nullptr;
    copy_strides(p.lse, params.lse_stride);
    params.scale_t = p.scale_t.present() ? static_cast<const float *>(p.scale_t.data) : nullptr;
    params.scale_stride = p.scale_t.stride[1];
    params.scale = p.scale;
    params.k_cache = kv.k_cache.data;
    params.v_cache = kv.v_cache.data;
    copy_strides(kv.k_cache, params.k_stride);
    copy_strides(kv.v_cache, params.v_stride);
    params.k_new = kv.appends() ? kv.k_new.data : nullptr;
    params.v_new = kv.appends() ? kv.v_new.data : nullptr;
    copy_strides(kv.k_new, params.k_new_stride);
    copy_strides(kv.v_new, params.v_new_stride);
    params.cache_seqlens = kv.cache_seqlens;
    params.block_table = kv.block_table;
    params.block_table_stride = kv.block_table_stride;
    params.page_size = int(kv.page_size);
    params.capacity = int(kv.capacity);
    params.num_blocks = int(kv.num_blocks);
    params.nq_new = int(kv.nq_new);
    params.b = int(p.b);
    params.h = int(p.h);
    params.hk = int(p.hk);
    params.nq = int(p.nq);
    params.d = int(p.d);
    params.groups = p.groups;
    params.group = int(p.heads_per_kv());
    params.rows = int(p.heads_per_kv() * p.nq);
    params.block_rows = plan.block_rows;
    params.row_blocks = plan.row_blocks;
    params.splits = plan.splits;
    params.causal = p.causal;
    params.l2norm = p.l2norm;
    const int64_t total_rows = p.b * p.h * p.nq;
    if (plan.splits > 1) {
        const uintptr_t base = (reinterpret_cast<uintptr_t>(workspace) + 15) & ~uintptr_t(15);
        params.partial_out = reinterpret_cast<float *>(base);
        params.partial_lse = params.partial_out + size_t(plan.splits) * size_t(total_rows) * size_t(p.d);
    }

    // The appends first: the attention reads them, on the same stream.
    const int64_t new_rows = p.b * p.hk * kv.nq_new;
    if (kv.appends() && new_rows > 0) append_kernel<T><<<unsigned(new_rows), kThreads, 0, stream>>>(params);
    if (plan.row_blocks > 0) {
        const dim3 grid(unsigned(p.b * p.hk * plan.row_blocks), unsigned(plan.splits));
        kernel_for<T, D>(plan)<<<grid, unsigned(plan.threads), plan.smem, stream>>>(params);
        if (plan.splits > 1)
            combine_kernel<T><<<unsigned((total_rows + kWarps - 1) / kWarps), kThreads, 0, stream>>>(params);
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess)
        return set_error(FCSA_STATUS_CUDA_ERROR, "cuda-sm80 kvcache: kernel launch failed: %s", cudaGetErrorString(err));
    return FCSA_STATUS_SUCCESS;
}

// D, the head-dim bound, from d (a multiple of 8 up to 256, checked by the caller).
template <typename T> fcsa_status make_plan(const KvCacheProblem &kv, Plan *plan) {
    const int64_t d = kv.attention.d;
    if (d <= 64) return plan_for<T, 64>(kv, plan);
    if (d <= 128) return plan_for<T, 128>(kv, plan);
    return plan_for<T, 256>(kv, plan);
}

template <typename T>
fcsa_status launch(const KvCacheProblem &kv, const Plan &plan, void *workspace, cudaStream_t stream) {
    switch (plan.head_dim_bound) {
    case 64: return launch_for<T, 64>(kv, plan, workspace, stream);
    case 128: return launch_for<T, 128>(kv, plan, workspace, stream);
    case 256: return launch_for<T, 256>(kv, plan, workspace, stream);
    default: return set_error(FCSA_STATUS_INTERNAL_ERROR, "internal error: decode plan without a head-dim bound");
    }
}

#define FCSA_INSTANTIATE_DECODE(T)                                                                                 \
    template fcsa_status make_plan<T>(const KvCacheProblem &, Plan *);                                            \
    template fcsa_status launch<T>(const KvCacheProblem &, const Plan &, void *, cudaStream_t);

} // namespace decode
} // namespace sm80
} // namespace fcsa
