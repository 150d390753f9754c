// numeric.cuh: element types and the scalar arithmetic the kernels share.
//
// The kernels read and write float, __half or __nv_bfloat16 and compute in float.
// ElementTraits<T> gives each type's conversions; pack_float2<T> turns two floats into
// one 32-bit register of two 16-bit values (the operand format of mma.m16n8k16).
// exp2_approx is the MUFU ex2 instruction (the softmax works in base 2 with log2(e)
// folded into its scale); quad_* reduce over the four lanes that share an accumulator
// row of an mma fragment.
#pragma once

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fcsa {
namespace common {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <typename T> struct ElementTraits;

// kSquaresOverflow: the type holds values whose float32 squares overflow (beyond ~1.8e19;
// float16's largest is 65504), so a row's norm needs the rescaled path (l2norm.cuh).
template <> struct ElementTraits<float> {
    static constexpr bool kIs16Bit = false;
    static constexpr bool kSquaresOverflow = true;
    __device__ __forceinline__ static float to_float(float x) { return x; }
    __device__ __forceinline__ static float from_float(float x) { return x; }
};

template <> struct ElementTraits<__half> {
    static constexpr bool kIs16Bit = true;
    static constexpr bool kSquaresOverflow = false;
    __device__ __forceinline__ static float to_float(__half x) { return __half2float(x); }
    __device__ __forceinline__ static __half from_float(float x) { return __float2half_rn(x); }
};

template <> struct ElementTraits<__nv_bfloat16> {
    static constexpr bool kIs16Bit = true;
    static constexpr bool kSquaresOverflow = true;
    __device__ __forceinline__ static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
    __device__ __forceinline__ static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

template <typename T> __device__ __forceinline__ float to_float(T x) {
    return ElementTraits<T>::to_float(x);
}
template <typename T> __device__ __forceinline__ T from_float(float x) {
    return ElementTraits<T>::from_float(x);
}

// Two floats -> one register holding two 16-bit values; `lo` goes to the low half,
// which is the element with the smaller column index in every mma fragment.
template <typename T> __device__ __forceinline__ uint32_t pack_float2(float lo, float hi);

template <> __device__ __forceinline__ uint32_t pack_float2<__half>(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&h);
}
template <> __device__ __forceinline__ uint32_t pack_float2<__nv_bfloat16>(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&h);
}

// Inverse of pack_float2.
template <typename T> __device__ __forceinline__ float2 unpack_float2(uint32_t v);

template <> __device__ __forceinline__ float2 unpack_float2<__half>(uint32_t v) {
    return __half22float2(*reinterpret_cast<__half2 *>(&v));
}
template <> __device__ __forceinline__ float2 unpack_float2<__nv_bfloat16>(uint32_t v) {
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162 *>(&v));
}

// 2^x on the special-function unit (relative error about 2^-22; -inf gives 0).
__device__ __forceinline__ float exp2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// Approximate reciprocal, reciprocal square root and log2 (relative error near
// 2^-22): single instructions, unlike the IEEE versions, whose slow paths are calls
// that force live registers to the stack.
__device__ __forceinline__ float reciprocal_approx(float x) {
    float y;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
__device__ __forceinline__ float rsqrt_approx(float x) {
    float y;
    asm("rsqrt.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
__device__ __forceinline__ float log2_approx(float x) {
    float y;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// Reductions over the 4 lanes (lane % 4 = 0..3) that hold one accumulator row.
__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    x += __shfl_xor_sync(0xffffffffu, x, 2);
    return x;
}
__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
    return x;
}

} // namespace common
} // namespace fcsa
