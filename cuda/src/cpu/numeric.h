// numeric.h: scalar conversions between float32 and the 16-bit storage types, and the
// row loads/stores every CPU pass uses. All arithmetic in the CPU backend is float32;
// these helpers are the only places where float16/bfloat16 bits are touched.
#pragma once

#include <cstdint>
#include <cstring>

#include "fcsa.h"

namespace fcsa {
namespace cpu {

inline uint32_t float_bits(float value) {
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof bits);
    return bits;
}

inline float bits_float(uint32_t bits) {
    float value;
    std::memcpy(&value, &bits, sizeof value);
    return value;
}

inline float half_to_float(uint16_t half) {
    const uint32_t sign = uint32_t(half & 0x8000u) << 16;
    const uint32_t exponent = (half >> 10) & 0x1fu;
    const uint32_t mantissa = half & 0x3ffu;
    if (exponent == 0x1fu) return bits_float(sign | 0x7f800000u | (mantissa << 13)); // inf, nan
    if (exponent != 0) return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
    // Zero or subnormal: mantissa * 2^-24, exact in float32.
    const float magnitude = float(mantissa) * 5.9604644775390625e-08f;
    return bits_float(sign | float_bits(magnitude));
}

// Round to nearest, ties to even; overflow gives inf, NaN stays a (quiet) NaN.
inline uint16_t float_to_half(float value) {
    const uint32_t bits = float_bits(value);
    const uint16_t sign = uint16_t((bits >> 16) & 0x8000u);
    const uint32_t magnitude = bits & 0x7fffffffu;
    if (magnitude > 0x7f800000u) return uint16_t(sign | 0x7e00u);
    if (magnitude >= 0x477ff000u) return uint16_t(sign | 0x7c00u); // >= 65520 rounds to inf
    if (magnitude >= 0x38800000u) {                                // a normal half
        const uint32_t rounded = magnitude + 0xfffu + ((magnitude >> 13) & 1u);
        return uint16_t(sign | ((rounded - 0x38000000u) >> 13));
    }
    // A subnormal half (or zero): round magnitude / 2^-24 to an integer.
    const uint32_t exponent = magnitude >> 23;
    if (exponent < 102) return sign; // below 2^-25: rounds to zero
    const uint32_t mantissa = (magnitude & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - exponent; // 14 .. 24
    uint32_t result = mantissa >> shift;
    const uint32_t remainder = mantissa & ((1u << shift) - 1u);
    const uint32_t halfway = 1u << (shift - 1u);
    if (remainder > halfway || (remainder == halfway && (result & 1u))) ++result;
    return uint16_t(sign | result);
}

inline float bfloat16_to_float(uint16_t value) { return bits_float(uint32_t(value) << 16); }

inline uint16_t float_to_bfloat16(float value) {
    const uint32_t bits = float_bits(value);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x40u); // quiet NaN
    return uint16_t((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

inline float load_element(const void *base, int64_t index, int32_t dtype) {
    switch (dtype) {
    case FCSA_DTYPE_FLOAT16: return half_to_float(static_cast<const uint16_t *>(base)[index]);
    case FCSA_DTYPE_BFLOAT16: return bfloat16_to_float(static_cast<const uint16_t *>(base)[index]);
    default: return static_cast<const float *>(base)[index];
    }
}

inline void store_element(void *base, int64_t index, int32_t dtype, float value) {
    switch (dtype) {
    case FCSA_DTYPE_FLOAT16: static_cast<uint16_t *>(base)[index] = float_to_half(value); break;
    case FCSA_DTYPE_BFLOAT16: static_cast<uint16_t *>(base)[index] = float_to_bfloat16(value); break;
    default: static_cast<float *>(base)[index] = value; break;
    }
}

// Reads `count` consecutive elements (the contiguous last dimension) starting at
// element `index` of `base`, converting to float32.
inline void load_row(const void *base, int64_t index, int32_t dtype, int64_t count, float *dst) {
    switch (dtype) {
    case FCSA_DTYPE_FLOAT16: {
        const uint16_t *src = static_cast<const uint16_t *>(base) + index;
        for (int64_t t = 0; t < count; ++t) dst[t] = half_to_float(src[t]);
        break;
    }
    case FCSA_DTYPE_BFLOAT16: {
        const uint16_t *src = static_cast<const uint16_t *>(base) + index;
        for (int64_t t = 0; t < count; ++t) dst[t] = bfloat16_to_float(src[t]);
        break;
    }
    default: std::memcpy(dst, static_cast<const float *>(base) + index, size_t(count) * 4); break;
    }
}

inline void store_row(void *base, int64_t index, int32_t dtype, int64_t count, const float *src) {
    switch (dtype) {
    case FCSA_DTYPE_FLOAT16: {
        uint16_t *dst = static_cast<uint16_t *>(base) + index;
        for (int64_t t = 0; t < count; ++t) dst[t] = float_to_half(src[t]);
        break;
    }
    case FCSA_DTYPE_BFLOAT16: {
        uint16_t *dst = static_cast<uint16_t *>(base) + index;
        for (int64_t t = 0; t < count; ++t) dst[t] = float_to_bfloat16(src[t]);
        break;
    }
    default: std::memcpy(static_cast<float *>(base) + index, src, size_t(count) * 4); break;
    }
}

} // namespace cpu
} // namespace fcsa
