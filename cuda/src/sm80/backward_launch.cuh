// backward_launch.cuh: the launchers of the sm80 backward's tile kernels (main,
// shared-scores, dq), instantiated per head-dim bucket by backward_d*.cu; backward.cu
// calls them through backward_params.cuh's declarations.
#pragma once

#include <cuda_runtime.h>

#include "backward_kernels.cuh"
#include "backward_shared_scores.cuh"

namespace fcsa {
namespace sm80_bwd {

// ---------------------------------------------------------------- launchers

// The shared-scores kernel exists for 16-bit operands at head dims 64 and 128 (the full
// shapes). The host (plan_workspace) runs it where its shared memory fits and there is no
// bias, dbias or dscale: at d = 64 with 128 query rows per tile (179 KB, H100 class) or
// 64 (108 KB, A100 class), at d = 128 with 64 (171 KB, H100 class). Measured on the H100
// (benchmarks/NOTES.md): 1.25-1.31x the main kernel at d = 128 and 1.10-1.11x at d = 64
// with 64 rows; 128 rows are another 2-5.5% faster at d = 64 (notes v8).
template <typename T, int kHeadDim, bool kCompact> constexpr bool has_shared_scores() {
    return common::ElementTraits<T>::kIs16Bit && (kHeadDim == 64 || kHeadDim == 128) && !kCompact;
}
template <typename T, int kHeadDim, bool kCompact> constexpr bool has_shared_scores_128() {
    return has_shared_scores<T, kHeadDim, kCompact>() && kHeadDim == 64;
}

template <typename T, int kHeadDim, bool kCompact> LaunchShape launch_shape() {
    using Main = typename Shapes<T, kHeadDim, kCompact>::Main;
    using Dq = typename Shapes<T, kHeadDim, kCompact>::Dq;
    LaunchShape shape;
    shape.main_keys = Main::kKeys;
    shape.dq_queries = Dq::BR;
    shape.column_splits = Main::kSplitCount;
    shape.main_smem = Main::kSmemBytes;
    shape.dq_smem = Dq::kSmemBytes;
    if constexpr (has_shared_scores<T, kHeadDim, kCompact>()) {
        using Scores = SharedScoresShape<T, kHeadDim, 64>;
        static_assert(Scores::kKeys == Main::kKeys, "both kernels share the host's key tiles");
        shape.shared_scores_smem = Scores::kSmemBytes;
    }
    if constexpr (has_shared_scores_128<T, kHeadDim, kCompact>())
        shape.shared_scores_128_smem = SharedScoresShape<T, kHeadDim, 128>::kSmemBytes;
    return shape;
}

inline unsigned grid_items(int64_t items) { return static_cast<unsigned>(items < 65535 ? items : 65535); }

// Whether the main kernel needs its general paths (else its plain variant runs).
inline bool needs_general_paths(const Params &p) {
    return p.mask != nullptr || p.bias != nullptr || p.dbias_mode != kDbiasNone || p.dscale_partial != nullptr;
}

template <typename T, class S> int launch_main_shape(const Params &p, void *stream) {
    // Packed sequences: the key tiles of the table's bound, each over the kv heads.
    const bool varlen = p.varlen_keys.tiles != nullptr;
    const int64_t key_tiles = varlen ? p.varlen_keys.max_tiles : (p.nk + S::kKeys - 1) / S::kKeys;
    const int64_t items = (p.b + p.main_batches_per_cta - 1) / p.main_batches_per_cta *
                          (p.hk / p.main_kv_heads_per_cta);
    const bool general = needs_general_paths(p);
    const auto kernel = varlen ? (general ? main_kernel<T, S, true, true> : main_kernel<T, S, false, true>)
                               : (general ? main_kernel<T, S, true, false> : main_kernel<T, S, false, false>);
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, S::kSmemBytes);
    if (err != cudaSuccess) return err;
    const dim3 grid(static_cast<unsigned>(key_tiles * S::kSplitCount), grid_items(items));
    kernel<<<grid, S::kThreads, S::kSmemBytes, static_cast<cudaStream_t>(stream)>>>(p);
    return cudaGetLastError();
}

template <typename T, class S> int launch_dq_shape(const Params &p, void *stream) {
    // Packed sequences: the query tiles of the table's bound, one per CTA.
    const bool varlen = p.varlen_queries.tiles != nullptr;
    const int64_t query_tiles = varlen ? p.varlen_queries.max_tiles : (p.nq + S::BR - 1) / S::BR;
    const int64_t items = p.b * p.h;
    const auto kernel = varlen ? dq_kernel<T, S, true> : dq_kernel<T, S, false>;
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, S::kSmemBytes);
    if (err != cudaSuccess) return err;
    const dim3 grid(static_cast<unsigned>(query_tiles), grid_items(items));
    kernel<<<grid, S::kThreads, S::kSmemBytes, static_cast<cudaStream_t>(stream)>>>(p);
    return cudaGetLastError();
}

template <typename T, class S> int launch_shared_scores(const Params &p, void *stream) {
    // Packed sequences: the key tiles of the table's bound (no mask).
    const bool varlen = p.varlen_keys.tiles != nullptr;
    const int64_t key_tiles = varlen ? p.varlen_keys.max_tiles : (p.nk + S::kKeys - 1) / S::kKeys;
    const auto kernel = varlen                ? shared_scores_kernel<T, S, false, true>
                        : p.mask != nullptr ? shared_scores_kernel<T, S, true, false>
                                            : shared_scores_kernel<T, S, false, false>;
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, S::kSmemBytes);
    if (err != cudaSuccess) return err;
    const dim3 grid(static_cast<unsigned>(key_tiles), grid_items(p.b * p.hk));
    kernel<<<grid, S::kThreads, S::kSmemBytes, static_cast<cudaStream_t>(stream)>>>(p);
    return cudaGetLastError();
}

template <typename T, int kHeadDim, bool kCompact> int launch_main(const Params &p, void *stream) {
    if constexpr (has_shared_scores_128<T, kHeadDim, kCompact>())
        if (p.shared_scores_rows == 128)
            return launch_shared_scores<T, SharedScoresShape<T, kHeadDim, 128>>(p, stream);
    if constexpr (has_shared_scores<T, kHeadDim, kCompact>())
        if (p.shared_scores_rows == 64) return launch_shared_scores<T, SharedScoresShape<T, kHeadDim, 64>>(p, stream);
    return launch_main_shape<T, typename Shapes<T, kHeadDim, kCompact>::Main>(p, stream);
}

template <typename T, int kHeadDim, bool kCompact> int launch_dq(const Params &p, void *stream) {
    return launch_dq_shape<T, typename Shapes<T, kHeadDim, kCompact>::Dq>(p, stream);
}

#define FCSA_BWD_INSTANTIATE_SIZE(T, D, COMPACT)                                                    \
    template LaunchShape launch_shape<T, D, COMPACT>();                                             \
    template int launch_main<T, D, COMPACT>(const Params &, void *);                                \
    template int launch_dq<T, D, COMPACT>(const Params &, void *);
#define FCSA_BWD_INSTANTIATE(T, D)                                                                  \
    FCSA_BWD_INSTANTIATE_SIZE(T, D, false)                                                          \
    FCSA_BWD_INSTANTIATE_SIZE(T, D, true)

} // namespace sm80_bwd
} // namespace fcsa
