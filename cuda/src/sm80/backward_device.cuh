// backward_device.cuh: small device functions shared by the backward's kernels and its
// pre/post-passes: warp sums, dtype-agnostic element access, and the per-row l2norm
// backward (in the dq/dk epilogues and the finishing pass).
#pragma once

#include <cstdint>

#include "../common/l2norm.cuh"
#include "../common/numeric.cuh"
#include "../common/row_lanes.cuh"

namespace fcsa {
namespace sm80_bwd {

using common::kNormEpsilon;
using common::lanes_sum;

__device__ __forceinline__ float warp_sum(float x) { return lanes_sum(x, 32); }

// E floats (E a multiple of 4) from 16-byte aligned memory.
template <int E> __device__ __forceinline__ void load_floats(const float *from, float (&f)[E]) {
#pragma unroll
    for (int e = 0; e < E; e += 4) {
        const float4 v = *reinterpret_cast<const float4 *>(from + e);
        f[e] = v.x;
        f[e + 1] = v.y;
        f[e + 2] = v.z;
        f[e + 3] = v.w;
    }
}

// Element `index` of an array of T, or of float when is_f32 (bias, dbias).
template <typename T> __device__ __forceinline__ float load_as_float(const void *base, int64_t index, bool is_f32) {
    return is_f32 ? static_cast<const float *>(base)[index]
                  : common::to_float(static_cast<const T *>(base)[index]);
}
template <typename T> __device__ __forceinline__ void store_from_float(void *base, int64_t index, float v, bool is_f32) {
    if (is_f32)
        static_cast<float *>(base)[index] = v;
    else
        static_cast<T *>(base)[index] = common::from_float<T>(v);
}

// One row of d <= kMaxD elements, spread over a warp: lane holds columns lane + 32 m.
template <int kMaxD> struct WarpRow {
    static constexpr int kPerLane = (kMaxD + 31) / 32;
};

// The group of each element of a row held as in WarpRow (-1 past d): computed once per
// row, the loops below compare instead of dividing.
template <int kMaxD>
__device__ __forceinline__ void element_groups(int d, int groups, int lane, int (&group)[WarpRow<kMaxD>::kPerLane]) {
    const int group_size = d / groups;
#pragma unroll
    for (int m = 0; m < WarpRow<kMaxD>::kPerLane; ++m) {
        const int c = lane + 32 * m;
        group[m] = c >= d ? -1 : groups == 1 ? 0 : c / group_size;
    }
}

// The inverse norm of each element's group, 1 / max(||x_group||, eps), for a row held
// as in WarpRow (x_row: the same row in memory, d elements, for the rescaled norm of
// l2norm.cuh). Every lane of the warp must call it.
template <typename T, int kMaxD>
__device__ __forceinline__ void group_inverse_norms(const float (&x)[WarpRow<kMaxD>::kPerLane],
                                                    const int (&group)[WarpRow<kMaxD>::kPerLane], int groups,
                                                    const T *x_row, int d,
                                                    float (&inv)[WarpRow<kMaxD>::kPerLane],
                                                    bool (&clamped)[WarpRow<kMaxD>::kPerLane]) {
    constexpr int kPer = WarpRow<kMaxD>::kPerLane;
    for (int g = 0; g < groups; ++g) {
        float sum_sq = 0.f;
#pragma unroll
        for (int m = 0; m < kPer; ++m)
            if (group[m] == g) sum_sq = fmaf(x[m], x[m], sum_sq);
        const int group_size = d / groups;
        sum_sq = warp_sum(sum_sq);
        const float norm = sqrtf(sum_sq); // inf where the sum overflowed: not clamped
        const float group_inv = common::safe_inverse_norm<T, float>(sum_sq, x_row, 0, g * group_size, group_size);
#pragma unroll
        for (int m = 0; m < kPer; ++m)
            if (group[m] == g) {
                inv[m] = group_inv;
                clamped[m] = !(norm >= kNormEpsilon);
            }
    }
}

// The l2norm backward of one row: dx = (dx^ - x^ <x^, dx^>) / max(||x||, eps) per group
// (dx^ / eps where the norm was clamped: x^ = x / eps passes no gradient through the
// norm). x is the caller's raw row (T), dx_hat float (global or shared), out T.
// scaled: dx_hat holds dx^ / max(||x||, eps) already (one group), so the final division
// is left out. Without l2norm, out = dx^. Every lane of the warp must call it.
template <typename T, int kMaxD>
__device__ __forceinline__ void l2norm_backward_row(const T *x_row, const float *dx_hat, T *out, int d,
                                                    int groups, bool l2norm, bool scaled, int lane) {
    constexpr int kPer = WarpRow<kMaxD>::kPerLane;
    float x[kPer], dy[kPer];
#pragma unroll
    for (int m = 0; m < kPer; ++m) {
        const int c = lane + 32 * m;
        x[m] = c < d ? common::to_float(x_row[c]) : 0.f;
        dy[m] = c < d ? dx_hat[c] : 0.f;
    }
    if (l2norm) {
        int group[kPer];
        element_groups<kMaxD>(d, groups, lane, group);
        float inv[kPer], xhat_dot[kPer];
        bool clamped[kPer], no_gradient[kPer];
        group_inverse_norms<T, kMaxD>(x, group, groups, x_row, d, inv, clamped);
        // <x^, dx^> per group = inv * <x, dx^>.
        for (int g = 0; g < groups; ++g) {
            float dot = 0.f;
#pragma unroll
            for (int m = 0; m < kPer; ++m)
                if (group[m] == g) dot = fmaf(x[m] * inv[m], dy[m], dot);
            dot = warp_sum(dot);
            // No gradient in, none out, whatever x holds (a hidden key's k may hold NaN or
            // inf, and its dK^ is 0): looked at only where the dot is not finite.
            bool none = false;
            if (!isfinite(dot)) {
                float size = 0.f;
#pragma unroll
                for (int m = 0; m < kPer; ++m)
                    if (group[m] == g) size += fabsf(dy[m]);
                none = warp_sum(size) == 0.f;
            }
#pragma unroll
            for (int m = 0; m < kPer; ++m)
                if (group[m] == g) xhat_dot[m] = dot, no_gradient[m] = none;
        }
#pragma unroll
        for (int m = 0; m < kPer; ++m) {
            const int c = lane + 32 * m;
            if (c < d) {
                const float xhat = x[m] * inv[m];
                float dx = (clamped[m] ? dy[m] : dy[m] - xhat * xhat_dot[m]) * (scaled ? 1.f : inv[m]);
                if (no_gradient[m]) dx = 0.f;
                out[c] = common::from_float<T>(dx);
            }
        }
    } else {
#pragma unroll
        for (int m = 0; m < kPer; ++m) {
            const int c = lane + 32 * m;
            if (c < d) out[c] = common::from_float<T>(dy[m]);
        }
    }
}

// l2norm_backward_row for one group, the row spread over `width` lanes (aligned groups of
// the warp), each holding kPer pieces of E elements of x (the raw row) and dy (dx^),
// zeros where the row has none. dy becomes dx (scaled as there). Every lane of the warp
// must call it. <x^, dx^> is formed as <x, dx^> / ||x||. x_row, d: the row in memory
// (d = 0 where the lane has none), for the rescaled norm of l2norm.cuh.
template <typename T, int kPer, int E>
__device__ __forceinline__ void l2norm_backward_lanes(const float (&x)[kPer][E], float (&dy)[kPer][E], int width,
                                                      bool scaled, const T *x_row, int d) {
    float sum_sq = 0.f, dot = 0.f;
#pragma unroll
    for (int m = 0; m < kPer; ++m)
#pragma unroll
        for (int e = 0; e < E; ++e) {
            sum_sq = fmaf(x[m][e], x[m][e], sum_sq);
            dot = fmaf(x[m][e], dy[m][e], dot);
        }
    sum_sq = lanes_sum(sum_sq, width);
    const float norm = sqrtf(sum_sq); // inf where the sum overflowed: not clamped
    const float inv = common::safe_inverse_norm<T, float>(sum_sq, x_row, 0, 0, d);
    const bool clamped = !(norm >= kNormEpsilon);
    const float xhat_dot = lanes_sum(dot, width) * inv, post = scaled ? 1.f : inv;
    // No gradient in, none out, whatever x holds (a hidden key's k may hold NaN or inf, and
    // its dK^ is 0): looked at only where some row's dot is not finite.
    bool no_gradient = false;
    if (__any_sync(0xffffffffu, !isfinite(xhat_dot))) {
        float size = 0.f;
#pragma unroll
        for (int m = 0; m < kPer; ++m)
#pragma unroll
            for (int e = 0; e < E; ++e) size += fabsf(dy[m][e]);
        no_gradient = lanes_sum(size, width) == 0.f;
    }
#pragma unroll
    for (int m = 0; m < kPer; ++m)
#pragma unroll
        for (int e = 0; e < E; ++e)
            dy[m][e] = no_gradient ? 0.f : (clamped ? dy[m][e] : dy[m][e] - x[m][e] * inv * xhat_dot) * post;
}

} // namespace sm80_bwd
} // namespace fcsa
