// api.cpp: the C ABI of libfcsa. Everything a caller passes is checked here, before
// any work, and turned into a fcsa::Problem (problem.h); then the backend for the
// tensors' device runs it. No C++ exception crosses this file's functions.
#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <initializer_list>
#include <limits>
#include <new>
#include <string>
#include <unordered_set>
#include <vector>

#include "backends.h"
#include "cpu/tile_kernels.h"
#include "fcsa.h"
#include "kvcache.h"
#include "problem.h"

#if defined(FCSA_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

#ifndef FCSA_VERSION_STRING
#define FCSA_VERSION_STRING "0.1.0"
#endif

namespace fcsa {

namespace {
// Fixed-size, so that recording an error can never fail.
thread_local char last_error_message[1024] = "";
thread_local int last_backend = FCSA_BACKEND_AUTO;
} // namespace

fcsa_status set_error(fcsa_status status, const char *format, ...) {
    va_list args;
    va_start(args, format);
    std::vsnprintf(last_error_message, sizeof last_error_message, format, args);
    va_end(args);
    return status;
}

namespace {

#define FCSA_RETURN_IF_ERROR(expression)                                                                            \
    do {                                                                                                           \
        const fcsa_status status_ = (expression);                                                                  \
        if (status_ != FCSA_STATUS_SUCCESS) return status_;                                                         \
    } while (0)

// Runs `body`, turning any C++ exception into a status and a message.
template <class Body>
fcsa_status guarded(Body &&body) {
    try {
        return body();
    } catch (const std::bad_alloc &) {
        return set_error(FCSA_STATUS_OUT_OF_MEMORY, "out of host memory");
    } catch (const std::exception &error) {
        return set_error(FCSA_STATUS_INTERNAL_ERROR, "internal error: %s", error.what());
    } catch (...) {
        return set_error(FCSA_STATUS_INTERNAL_ERROR, "internal error: unknown exception");
    }
}

// ------------------------------------------------------------------ descriptions

const char *dtype_name(int32_t dtype) {
    switch (dtype) {
    case FCSA_DTYPE_FLOAT32: return "float32";
    case FCSA_DTYPE_FLOAT16: return "float16";
    case FCSA_DTYPE_BFLOAT16: return "bfloat16";
    case FCSA_DTYPE_BOOL: return "bool";
    case FCSA_DTYPE_INT32: return "int32";
    default: return "unknown";
    }
}

bool is_floating(int32_t dtype) {
    return dtype == FCSA_DTYPE_FLOAT32 || dtype == FCSA_DTYPE_FLOAT16 || dtype == FCSA_DTYPE_BFLOAT16;
}

std::string dims_string(const int64_t *dims, int count) {
    std::string text = "(";
    for (int i = 0; i < count; ++i) {
        if (i) text += ", ";
        text += std::to_string(dims[i]);
    }
    if (count == 1) text += ",";
    return text + ")";
}

std::string shape_string(const fcsa_tensor &t) { return dims_string(t.shape, t.ndim); }

std::string device_string(int32_t type, int32_t index) {
    if (type == FCSA_DEVICE_CPU) return "cpu";
    if (type == FCSA_DEVICE_CUDA) return "cuda:" + std::to_string(index);
    return "unknown device type " + std::to_string(type);
}

// ------------------------------------------------------------------ validation

// The leading part of each struct that the first ABI version defined. Later versions
// may only append fields, so a larger struct_size is accepted and its tail ignored.
constexpr size_t kOptionsV1Size = sizeof(fcsa_options);
constexpr size_t kForwardTensorsV1Size = offsetof(fcsa_forward_tensors, cu_seqlens_q);
constexpr size_t kBackwardTensorsV1Size = offsetof(fcsa_backward_tensors, cu_seqlens_q);

fcsa_status read_options(const fcsa_options *given, fcsa_options *options) {
    fcsa_options_init(options);
    if (!given) return FCSA_STATUS_SUCCESS; // NULL: every default
    if (given->struct_size < kOptionsV1Size)
        return set_error(FCSA_STATUS_INVALID_ARGUMENT,
                         "options: struct_size is %zu, expected at least %zu (sizeof(fcsa_options))",
                         given->struct_size, kOptionsV1Size);
    std::memcpy(options, given, kOptionsV1Size);
    if (!std::isfinite(options->scale))
        return set_error(FCSA_STATUS_INVALID_ARGUMENT, "options.scale: expected a finite number, got %g",
                         double(options->scale));
    if (options->groups < 1)
        return set_error(FCSA_STATUS_INVALID_ARGUMENT, "options.groups: expected at least 1, got %d", options->groups);
    if (options->backend != FCSA_BACKEND_AUTO && options->backend != FCSA_BACKEND_CPU &&
        options->backend != FCSA_BACKEND_CUDA_SM80 && options->backend != FCSA_BACKEND_CUDA_SM90)
        return set_error(FCSA_STATUS_INVALID_ARGUMENT,
                         "options.backend: expected FCSA_BACKEND_AUTO (0), FCSA_BACKEND_CPU (1), "
                         "FCSA_BACKEND_CUDA_SM80 (2) or FCSA_BACKEND_CUDA_SM90 (3), got %d",
                         options->backend);
    if (options->num_threads < 0)
        return set_error(FCSA_STATUS_INVALID_ARGUMENT, "options.num_threads: expected 0 (all) or more, got %d",
                         options->num_threads);
    return FCSA_STATUS_SUCCESS;
}

// ------------------------------------------------------------------ sizes in 64 bits
//
// Every extent, stride and byte count a caller passes is checked for overflow before
// it is used: no size query may answer a wrapped number, and no backend may index past
// what the caller described.

constexpr int64_t kInt64Max = std::numeric_limits<int64_t>::max();

// *result = a * b for a, b >= 0; false when that exceeds INT64_MAX.
bool checked_mul(int64_t a, int64_t b, int64_t *result) {
    if (a != 0 && b > kInt64Max / a) return false;
    *result = a * b;
    return true;
}

// *result = a + b for a, b >= 0; false when that exceeds INT64_MAX.
bool checked_add(int64_t a, int64_t b, int64_t *result) {
    if (b > kInt64Max - a) return false;
    *result = a + b;
    return true;
}

int64_t element_bytes(int32_t dtype) {
    switch (dtype) {
    case FCSA_DTYPE_FLOAT32: return 4;
    case FCSA_DTYPE_INT32: return 4;
    case FCSA_DTYPE_BOOL: return 1;
    default: return 2;
    }
}

// The offset in elements of a tensor's last element from its first: the sum of
// (shape_i - 1) * stride_i over its dimensions of size > 1. Only for a non-empty
// tensor that passed check_descriptor, which made sure that this fits.
int64_t last_element_offset(const fcsa_tensor &t) {
    int64_t offset = 0;
    for (int i = 0; i < t.ndim; ++i)
        if (t.shape[i] > 1) offset += (t.shape[i] - 1) * t.strides[i];
    return offset;
}

// The checks every tensor gets, whatever its role: a known dtype and device, a
// non-negative shape, a contiguous last dimension, non-negative strides, data behind a
// non-empty tensor, and an element count and a byte extent that fit in int64 and in
// the address space.
fcsa_status check_descriptor(const char *name, const fcsa_tensor &t, int min_ndim, int max_ndim) {
    if (t.ndim < min_ndim || t.ndim > max_ndim) {
        if (min_ndim == max_ndim)
            return set_error(FCSA_STATUS_INVALID_ARGUMENT, "%s: expected a %d-D tensor, got ndim %d", name, min_ndim,
                             t.ndim);
        return set_error(FCSA_STATUS_INVALID_ARGUMENT, "%s: expected a %d-D or %d-D tensor, got ndim %d", name,
                         min_ndim, max_ndim, t.ndim);
    }
    if (!is_floating(t.dtype) && t.dtype != FCSA_DTYPE_BOOL && t.dtype != FCSA_DTYPE_INT32)
        return set_error(FCSA_STATUS_INVALID_DTYPE, "%s: unknown dtype value %d", name, t.dtype);
    if (t.device_type != FCSA_DEVICE_CPU && t.device_type != FCSA_DEVICE_CUDA)
        return set_error(FCSA_STATUS_INVALID_ARGUMENT, "%s: unknown device type %d", name, t.device_type);
    if (t.device_type == FCSA_DEVICE_CUDA && t.device_index < 0)
        return set_error(FCSA_STATUS_INVALID_ARGUMENT, "%s: CUDA device index %d is negative", name, t.device_index);
    bool empty = false;
    for (int i = 0; i < t.ndim; ++i) {
        if (t.shape[i] < 0)
            return set_error(FCSA_STATUS_INVALID_ARGUMENT, "%s: negative size in shape %s", name,
                             shape_string(t).c_str());
        empty |= t.shape[i] == 0;
    }
    if (t.ndim > 0 && t.shape[t.ndim - 1] > 1 && t.strides[t.ndim - 1] != 1)
        return set_error(FCSA_STATUS_INVALID_ARGUMENT,
                         "%s: the last dimension must be contiguous (stride 1), got strides %s", name,
                         dims_string(t.strides, t.ndim).c_str());
    if (empty) return FCSA_STATUS_SUCCESS; // no element: its data and strides are never read

    int64_t count = 1;
    for (int i = 0; i < t.ndim; ++i)
        if (!checked_mul(count, t.shape[i], &count))
            return set_error(FCSA_STATUS_INVALID_ARGUMENT, "%s: shape %s has more than 2^63 - 1 elements", name,
                             shape_string(t).c_str());
    // The byte extent, from the first element to the end of the last. A negative stride
    // would put elements before `data`: refused (size-1 dimensions are never stepped
    // along, so their strides are not looked at).
    int64_t last = 0;
    for (int i = 0; i < t.ndim; ++i) {
        if (t.shape[i] <= 1) continue;
        if (t.strides[i] < 0)
            return set_error(FCSA_STATUS_INVALID_ARGUMENT,
                             "%s: negative stride on dimension %d, got strides %s (strides must be 0 or more)", name,
                             i, dims_string(t.strides, t.ndim).c_str());
        int64_t step = 0;
        if (!checked_mul(t.shape[i] - 1, t.strides[i], &step) || !checked_add(last, step, &last))
            return set_error(FCSA_STATUS_INVALID_ARGUMENT,
                             "%s: shape %s with strides %s spans more than 2^63 - 1 elements", name,
                             shape_string(t).c_str(), dims_string(t.strides, t.ndim).c_str());
    }
    int64_t bytes = 0;
    if (!checked_add(last, 1, &bytes) || !checked_mul(bytes, element_bytes(t.dtype), &bytes))
        return set_error(FCSA_STATUS_INVALID_ARGUMENT, "%s: shape %s with strides %s spans more than 2^63 - 1 bytes",
                         name, shape_string(t).c_str(), dims_string(t.strides, t.ndim).c_str());
    if (!t.data)
        return set_error(FCSA_STATUS_INVALID_ARGUMENT, "%s: data is NULL for a tensor of shape %s", name,
                         shape_string(t).c_str());
    const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data);
    if (uint64_t(bytes - 1) > uint64_t(UINTPTR_MAX - begin))
        return set_error(FCSA_STATUS_INVALID_ARGUMENT,
                         "%s: the %lld bytes that shape %s with strides %s spans from address %p run past the end "
                         "of the address space",
                         name, (long long)bytes, shape_string(t).c_str(), dims_string(t.strides, t.ndim).c_str(),
                         t.data);
    return FCSA_STATUS_SUCCESS;
}

fcsa_status check_dtype(const char *name, const fcsa_tensor &t, int32_t expected, const char *why) {
    if (t.dtype != expected)
        return set_error(FCSA_STATUS_INVALID_DTYPE, "%s: expected dtype %s%s, got %s", name, dtype_name(expected), why,
                         dtype_name(t.dtype));
    return FCSA_STATUS_SUCCESS;
}

fcsa_status check_shape(const char *name, const fcsa_tensor &t, const int64_t *expected, int ndim, const char *why) {
    if (t.ndim != ndim || std::memcmp(t.shape, expected, sizeof(int64_t) * size_t(ndim)) != 0)
        return set_error(FCSA_STATUS_INVALID_ARGUMENT, "%s: expected shape %s%s, got %s", name,
                         dims_string(expected, ndim).c_str(), why, shape_string(t).c_str());
    return FCSA_STATUS_SUCCESS;
}

fcsa_status require(const char *name, const fcsa_tensor *t) {
    if (!t) return set_error(FCSA_STATUS_INVALID_ARGUMENT, "%s: required, got NULL", name);
    return FCSA_STATUS_SUCCESS;
}

// ------------------------------------------------------------------ problem sizes
//
// The backends size their workspaces and intermediates by products of the problem's
// lengths, rounded up to their tiles (b * hk * nk * d floats of packed keys, b * h * nq
// * d of dq accumulators, up to b * h * nq * nk of dbias partial sums, ...). These
// products are bounded here, so that none of those computations can overflow: each
// product below, with every length rounded up to a multiple of kLengthTile, is at most
// kMaxElements, and float32 arrays of that many elements take 2^60 bytes, so the sum of
// several still fits in int64_t and size_t. Without a bias the score grid is never
// stored, only statistics per query row or per key tile (b * h * nk / 64, ...), so its
// looser bound keeps those small as well.

constexpr int64_t kLengthTile = 256;                      // the widest tile of any backend
constexpr int64_t kMaxElements = int64_t(1) << 58;        // b*h*nq*d, b*hk*nk*d, with a bias b*h*nq*nk
constexpr int64_t kMaxScoreElements = int64_t(1) << 62;   // b*h*nq*nk without a bias

// Whether b * h * tile(x) * tile(y) <= limit, where tile(n) is n rounded up to a
// multiple of kLengthTile and a size of 0 counts as 1 (b, h, x, y >= 0).
bool product_fits(int64_t b, int64_t h, int64_t x, int64_t y, int64_t limit) {
    int64_t product = 1;
    for (const int64_t n : {b, h})
        if (!checked_mul(product, n > 1 ? n : 1, &product)) return false;
    for (const int64_t n : {x, y}) {
        if (n > limit) return false;
        const int64_t tiles = n > 1 ? (n + kLengthTile - 1) / kLengthTile : 1;
        if (!checked_mul(product, tiles * kLengthTile, &product)) return false;
    }
    return product <= limit;
}

fcsa_status too_large(const char *name, const fcsa_tensor &t, const char *product, int log2_limit) {
    return set_error(FCSA_STATUS_INVALID_ARGUMENT,
                     "%s: shape %s makes the call too large: %s, with each length rounded up to a multiple of "
                     "%lld, exceeds 2^%d",
                     name, shape_string(t).c_str(), product, (long long)kLengthTile, log2_limit);
}

// Maps a tensor onto a 4-D view: source_dim[i] is the tensor dimension that becomes
// view dimension i, or -1 for a dimension of size 1. Size-1 dimensions get stride 0.
View make_view(const fcsa_tensor &t, const int (&source_dim)[4]) {
    // An empty optional tensor may come without data; it still counts as given.
    static char empty_tensor_data;
    View view;
    view.data = t.data ? t.data : &empty_tensor_data;
    view.dtype = t.dtype;
    for (int i = 0; i < 4; ++i) {
        const int s = source_dim[i];
        view.shape[i] = s < 0 ? 1 : t.shape[s];
        view.stride[i] = view.shape[i] == 1 ? 0 : t.strides[s];
    }
    return view;
}

constexpr int kAllDims[4] = {0, 1, 2, 3};

// Everything the forward and the backward check alike: q, k, v, out, mask, bias,
// scale, lse (may be NULL in the forward) and the options.
struct CommonTensors {
    const fcsa_tensor *q, *k, *v, *mask, *bias, *scale, *out, *lse;
};

fcsa_status check_same_device(const char *name, const fcsa_tensor &t, const Problem &p) {
    const bool same = t.device_type == p.device_type &&
                      (t.device_type == FCSA_DEVICE_CPU || t.device_index == p.device_index);
    if (!same)
        return set_error(FCSA_STATUS_INVALID_ARGUMENT, "%s: expected a tensor on %s like q, got %s", name,
                         device_string(p.device_type, p.device_index).c_str(),
                         device_string(t.device_type, t.device_index).c_str());
    return FCSA_STATUS_SUCCESS;
}

// q (b, h, nq, d) fixes b, h, nq, d, the dtype and the device of every call.
fcsa_status read_queries(const fcsa_options &options, const fcsa_tensor &q, Problem &p) {
    FCSA_RETURN_IF_ERROR(check_descriptor("q", q, 4, 4));
    if (!is_floating(q.dtype))
        return set_error(FCSA_STATUS_INVALID_DTYPE, "q: expected dtype float32, float16 or bfloat16, got %s",
                         dtype_name(q.dtype));
    p.b = q.shape[0];
    p.h = q.shape[1];
    p.nq = q.shape[2];
    p.d = q.shape[3];
    p.dtype = q.dtype;
    p.device_type = q.device_type;
    p.device_index = q.device_type == FCSA_DEVICE_CUDA ? q.device_index : 0;
    if (p.d < 1) return set_error(FCSA_STATUS_INVALID_ARGUMENT, "q: the head dim (last) must be at least 1, got 0");
    if (!product_fits(p.b, p.h, p.nq, p.d, kMaxElements)) return too_large("q", q, "b * h * nq * d", 58);
    if (p.d % options.groups != 0)
        return set_error(FCSA_STATUS_INVALID_ARGUMENT,
                         "options.groups: the head dim %lld must be divisible by groups, got groups = %d",
                         (long long)p.d, options.groups);
    return FCSA_STATUS_SUCCESS;
}

fcsa_status check_common(const fcsa_options &options, const CommonTensors &in, Problem &p) {
    FCSA_RETURN_IF_ERROR(require("q", in.q));
    FCSA_RETURN_IF_ERROR(require("k", in.k));
    FCSA_RETURN_IF_ERROR(require("v", in.v));
    FCSA_RETURN_IF_ERROR(require("out", in.out));
    const fcsa_tensor &q = *in.q, &k = *in.k, &v = *in.v, &out = *in.out;

    // q fixes b, h, nq, d, the dtype and the device.
    FCSA_RETURN_IF_ERROR(read_queries(options, q, p));

    FCSA_RETURN_IF_ERROR(check_descriptor("k", k, 4, 4));
    FCSA_RETURN_IF_ERROR(check_dtype("k", k, p.dtype, " (like q)"));
    const int64_t hk = k.shape[1], nk = k.shape[2];
    if (k.shape[0] != p.b || k.shape[3] != p.d || hk < 1 || p.h % hk != 0) {
        const int64_t full[4] = {p.b, p.h, nk, p.d};
        return set_error(FCSA_STATUS_INVALID_ARGUMENT,
                         "k: expected shape %s or (%lld, hk, %lld, %lld) with %lld %% hk == 0, got %s",
                         dims_string(full, 4).c_str(), (long long)p.b, (long long)nk, (long long)p.d, (long long)p.h,
                         shape_string(k).c_str());
    }
    p.hk = hk;
    p.nk = nk;
    if (!product_fits(p.b, p.hk, p.nk, p.d, kMaxElements)) return too_large("k", k, "b * hk * nk * d", 58);
    if (!product_fits(p.b, p.h, p.nq, p.nk, kMaxScoreElements))
        return too_large("k", k, "b * h * nq * nk (with q's b, h and nq)", 62);
    // v is k's shape but for its last dim, the value head dim d_v, which may differ from d.
    FCSA_RETURN_IF_ERROR(check_descriptor("v", v, 4, 4));
    FCSA_RETURN_IF_ERROR(check_dtype("v", v, p.dtype, " (like q)"));
    if (v.shape[0] != k.shape[0] || v.shape[1] != k.shape[1] || v.shape[2] != k.shape[2] || v.shape[3] < 1) {
        return set_error(FCSA_STATUS_INVALID_ARGUMENT,
                         "v: expected shape (%lld, %lld, %lld, d_v) (k's but for the head dim, d_v >= 1), got %s",
                         (long long)k.shape[0], (long long)k.shape[1], (long long)k.shape[2],
                         shape_string(v).c_str());
    }
    p.d_v = v.shape[3];
    if (!product_fits(p.b, p.hk, p.nk, p.d_v, kMaxElements)) return too_large("v", v, "b * hk * nk * d_v", 58);
    if (!product_fits(p.b, p.h, p.nq, p.d_v, kMaxElements))
        return too_large("v", v, "b * h * nq * d_v (with q's b, h and nq)", 58);
    const int64_t out_shape[4] = {p.b, p.h, p.nq, p.d_v};
    FCSA_RETURN_IF_ERROR(check_descriptor("out", out, 4, 4));
    // out may be float32 for float16/bfloat16 q: the forward then keeps it unrounded, and
    // the backward's delta = <dO, O> is taken from it (see fcsa.h).
    if (out.dtype != p.dtype && out.dtype != FCSA_DTYPE_FLOAT32)
        return set_error(FCSA_STATUS_INVALID_DTYPE, "out: expected dtype %s (like q) or float32, got %s",
                         dtype_name(p.dtype), dtype_name(out.dtype));
    FCSA_RETURN_IF_ERROR(check_shape("out", out, out_shape, 4, " (q's but for v's head dim)"));
    FCSA_RETURN_IF_ERROR(check_same_device("k", k, p));
    FCSA_RETURN_IF_ERROR(check_same_device("v", v, p));
    FCSA_RETURN_IF_ERROR(check_same_device("out", out, p));
    p.q = make_view(q, kAllDims);
    p.k = make_view(k, kAllDims);
    p.v = make_view(v, kAllDims);
    p.out = make_view(out, kAllDims);

    if (in.mask) {
        const fcsa_tensor &mask = *in.mask;
        FCSA_RETURN_IF_ERROR(check_descriptor("mask", mask, 2, 2));
        FCSA_RETURN_IF_ERROR(check_dtype("mask", mask, FCSA_DTYPE_BOOL, ""));
        const int64_t expected[2] = {p.b, p.nk};
        FCSA_RETURN_IF_ERROR(check_shape("mask", mask, expected, 2, " (b, nk)"));
        FCSA_RETURN_IF_ERROR(check_same_device("mask", mask, p));
        p.mask = make_view(mask, {0, -1, -1, 1});
    }

    if (in.bias) {
        const fcsa_tensor &bias = *in.bias;
        FCSA_RETURN_IF_ERROR(check_descriptor("bias", bias, 4, 4));
        if (bias.dtype != p.dtype && bias.dtype != FCSA_DTYPE_FLOAT32)
            return set_error(FCSA_STATUS_INVALID_DTYPE, "bias: expected dtype %s (like q) or float32, got %s",
                             dtype_name(p.dtype), dtype_name(bias.dtype));
        const int64_t full[4] = {p.b, p.h, p.nq, p.nk};
        for (int i = 0; i < 4; ++i)
            if (bias.shape[i] != full[i] && bias.shape[i] != 1)
                return set_error(FCSA_STATUS_INVALID_ARGUMENT,
                                 "bias: expected a shape broadcastable to %s (each dim that size or 1), got %s",
                                 dims_string(full, 4).c_str(), shape_string(bias).c_str());
        if (!product_fits(p.b, p.h, p.nq, p.nk, kMaxElements))
            return too_large("bias", bias, "b * h * nq * nk (the scores it is added to)", 58);
        FCSA_RETURN_IF_ERROR(check_same_device("bias", bias, p));
        p.bias = make_view(bias, kAllDims);
    }

    if (in.scale) {
        const fcsa_tensor &scale = *in.scale;
        FCSA_RETURN_IF_ERROR(check_descriptor("scale", scale, 0, 1));
        FCSA_RETURN_IF_ERROR(check_dtype("scale", scale, FCSA_DTYPE_FLOAT32, ""));
        if (scale.ndim == 1 && scale.shape[0] != p.h)
            return set_error(FCSA_STATUS_INVALID_ARGUMENT, "scale: expected shape () or (%lld,), got %s",
                             (long long)p.h, shape_string(scale).c_str());
        FCSA_RETURN_IF_ERROR(check_same_device("scale", scale, p));
        if (scale.ndim == 1)
            p.scale_t = make_view(scale, {-1, 0, -1, -1});
        else
            p.scale_t = make_view(scale, {-1, -1, -1, -1});
    }

    if (in.lse) {
        const fcsa_tensor &lse = *in.lse;
        FCSA_RETURN_IF_ERROR(check_descriptor("lse", lse, 3, 3));
        FCSA_RETURN_IF_ERROR(check_dtype("lse", lse, FCSA_DTYPE_FLOAT32, ""));
        const int64_t expected[3] = {p.b, p.h, p.nq};
        FCSA_RETURN_IF_ERROR(check_shape("lse", lse, expected, 3, " (b, h, nq)"));
        FCSA_RETURN_IF_ERROR(check_same_device("lse", lse, p));
        p.lse = make_view(lse, {0, 1, 2, -1});
    }

    p.scale = options.scale;
    p.groups = options.groups;
    p.causal = options.causal != 0;
    p.l2norm = options.l2norm_qk != 0;
    p.deterministic = options.deterministic != 0;
    p.num_threads = options.num_threads;
    return FCSA_STATUS_SUCCESS;
}

// ------------------------------------------------------------------ memory overlap
//
// Outputs are written while the inputs are read, by many threads in any order: an
// output that shares memory with an input or with another output, or whose distinct
// elements share memory, would give wrong results or races. Such calls are refused.
// Inputs may share memory freely (the q, k and v slices of one packed tensor, say).
// These run after check_descriptor accepted every tensor: strides are >= 0 and every
// extent fits in int64_t and in the address space.

struct NamedTensor {
    const char *name;
    const fcsa_tensor *tensor; // NULL when absent
};

bool has_elements(const fcsa_tensor *t) {
    if (!t) return false;
    for (int i = 0; i < t->ndim; ++i)
        if (t->shape[i] == 0) return false;
    return true;
}

// Whether two distinct indices may reach the same element. Taken by increasing stride,
// each dimension of size > 1 must step past the farthest element the smaller ones
// reach: a sufficient test, and the one every layout torch creates passes.
bool overlaps_itself(const fcsa_tensor &t) {
    int dims[FCSA_MAX_DIMS];
    int count = 0;
    for (int i = 0; i < t.ndim; ++i)
        if (t.shape[i] > 1) dims[count++] = i;
    std::sort(dims, dims + count, [&t](int a, int b) { return t.strides[a] < t.strides[b]; });
    int64_t reach = 0;
    for (int k = 0; k < count; ++k) {
        const int i = dims[k];
        if (t.strides[i] <= reach) return true;
        reach += (t.shape[i] - 1) * t.strides[i];
    }
    return false;
}

// The bytes [first, last] from a tensor's first element to the end of its last.
struct ByteSpan {
    uintptr_t first, last;
};

ByteSpan byte_span(const fcsa_tensor &t) {
    const uintptr_t first = reinterpret_cast<uintptr_t>(t.data);
    const int64_t bytes = (last_element_offset(t) + 1) * element_bytes(t.dtype);
    return {first, first + uintptr_t(bytes - 1)};
}

// With a period of `period` bytes: when each dimension of size > 1 either steps by a
// multiple of the period or is one of the dimensions that together span less than a
// period, every byte of t lies at data + (a multiple of period) + [0, window). Returns
// that window, or 0 when t does not have this form.
int64_t window_in_period(const fcsa_tensor &t, int64_t period) {
    const int64_t size = element_bytes(t.dtype);
    int64_t window = size;
    for (int i = 0; i < t.ndim; ++i) {
        if (t.shape[i] <= 1) continue;
        const int64_t stride = t.strides[i] * size; // fits: no larger than t's extent
        if (stride >= period) {
            if (stride % period != 0) return 0;
        } else {
            window += (t.shape[i] - 1) * stride;
        }
    }
    return window <= period ? window : 0;
}

// True when a and b provably share no byte although their spans meet: for a period
// taken from their strides, both have the form above and their windows do not meet
// modulo the period. That is the case of slices of one packed tensor, for example
// dq, dk and dv written into one (b, n, 3, h, d) gradient.
bool interleaved_apart(const fcsa_tensor &a, const fcsa_tensor &b) {
    for (const fcsa_tensor *t : {&a, &b}) {
        for (int i = 0; i < t->ndim; ++i) {
            if (t->shape[i] <= 1 || t->strides[i] == 0) continue;
            const int64_t period = t->strides[i] * element_bytes(t->dtype);
            const int64_t window_a = window_in_period(a, period), window_b = window_in_period(b, period);
            if (window_a == 0 || window_b == 0) continue;
            const uint64_t p = uint64_t(period);
            const uint64_t start_a = reinterpret_cast<uintptr_t>(a.data) % p;
            const uint64_t start_b = reinterpret_cast<uintptr_t>(b.data) % p;
            const uint64_t distance = (start_b + p - start_a) % p; // from a's window to b's
            if (distance >= uint64_t(window_a) && distance + uint64_t(window_b) <= p) return true;
        }
    }
    return false;
}

bool share_memory(const fcsa_tensor &a, const fcsa_tensor &b) {
    const ByteSpan x = byte_span(a), y = byte_span(b);
    if (x.last < y.first || y.last < x.first) return false;
    return !interleaved_apart(a, b);
}

fcsa_status check_overlaps(std::initializer_list<NamedTensor> outputs, std::initializer_list<NamedTensor> inputs) {
    for (const NamedTensor *out = outputs.begin(); out != outputs.end(); ++out) {
        if (!has_elements(out->tensor)) continue;
        const fcsa_tensor &t = *out->tensor;
        if (overlaps_itself(t))
            return set_error(FCSA_STATUS_INVALID_ARGUMENT,
                             "%s: shape %s with strides %s puts distinct elements in the same memory (an output must "
                             "not overlap itself)",
                             out->name, shape_string(t).c_str(), dims_string(t.strides, t.ndim).c_str());
        auto shared = [&](const NamedTensor &other) {
            if (!has_elements(other.tensor) || !share_memory(t, *other.tensor)) return FCSA_STATUS_SUCCESS;
            return set_error(FCSA_STATUS_INVALID_ARGUMENT,
                             "%s: overlaps %s in memory (outputs must not share memory with any input or other "
                             "output)",
                             out->name, other.name);
        };
        for (const NamedTensor &in : inputs) FCSA_RETURN_IF_ERROR(shared(in));
        for (const NamedTensor *earlier = outputs.begin(); earlier != out; ++earlier)
            FCSA_RETURN_IF_ERROR(shared(*earlier));
    }
    return FCSA_STATUS_SUCCESS;
}

fcsa_status read_struct_size(const char *name, size_t given, size_t first_version) {
    if (given < first_version)
        return set_error(FCSA_STATUS_INVALID_ARGUMENT, "%s: struct_size is %zu, expected at least %zu", name, given,
                         first_version);
    return FCSA_STATUS_SUCCESS;
}

// ------------------------------------------------------------------ packed sequences

// The offsets of packed sequences (fcsa.h), given or not: both or neither; int32 (b + 1,)
// each, on q's device; q's batch dim 1; no mask or bias. Their values are checked
// here when the host can read them.
fcsa_status check_varlen(const fcsa_tensor *cu_q, const fcsa_tensor *cu_k, bool has_mask, bool has_bias,
                         Problem &p) {
    if (!cu_q && !cu_k) return FCSA_STATUS_SUCCESS;
    if (!cu_q || !cu_k)
        return set_error(FCSA_STATUS_INVALID_ARGUMENT, "%s: given without %s (packed sequences need both offsets)",
                         cu_q ? "cu_seqlens_q" : "cu_seqlens_k", cu_q ? "cu_seqlens_k" : "cu_seqlens_q");
    FCSA_RETURN_IF_ERROR(check_descriptor("cu_seqlens_q", *cu_q, 1, 1));
    FCSA_RETURN_IF_ERROR(check_dtype("cu_seqlens_q", *cu_q, FCSA_DTYPE_INT32, ""));
    if (cu_q->shape[0] < 1)
        return set_error(FCSA_STATUS_INVALID_ARGUMENT,
                         "cu_seqlens_q: expected shape (b + 1,) with b >= 0, got (0,) (it starts with a 0)");
    FCSA_RETURN_IF_ERROR(check_same_device("cu_seqlens_q", *cu_q, p));
    FCSA_RETURN_IF_ERROR(check_descriptor("cu_seqlens_k", *cu_k, 1, 1));
    FCSA_RETURN_IF_ERROR(check_dtype("cu_seqlens_k", *cu_k, FCSA_DTYPE_INT32, ""));
    FCSA_RETURN_IF_ERROR(check_shape("cu_seqlens_k", *cu_k, cu_q->shape, 1, " (b + 1,), like cu_seqlens_q"));
    FCSA_RETURN_IF_ERROR(check_same_device("cu_seqlens_k", *cu_k, p));
    if (p.b != 1)
        return set_error(FCSA_STATUS_INVALID_ARGUMENT,
                         "q: expected a batch dim of 1 with cu_seqlens_q (the sequences are packed along the length "
                         "dim), got %lld",
                         (long long)p.b);
    if (p.nq > INT32_MAX || p.nk > INT32_MAX)
        return set_error(FCSA_STATUS_INVALID_ARGUMENT,
                         "%s: %lld packed rows, more than int32 offsets can address", p.nq > INT32_MAX ? "q" : "k",
                         (long long)(p.nq > INT32_MAX ? p.nq : p.nk));
    if (has_mask)
        return set_error(FCSA_STATUS_NOT_SUPPORTED,
                         "mask: not supported with cu_seqlens_q (leave the keys out of the packed sequences instead)");
    if (has_bias) return set_error(FCSA_STATUS_NOT_SUPPORTED, "bias: not supported with cu_seqlens_q");
    p.cu_seqlens_q = static_cast<const int32_t *>(cu_q->data);
    p.cu_seqlens_k = static_cast<const int32_t *>(cu_k->data);
    p.sequences = cu_q->shape[0] - 1;
    if (p.device_type != FCSA_DEVICE_CPU) return FCSA_STATUS_SUCCESS; // the kernels clamp (fcsa.h)
    const struct {
        const char *name;
        const int32_t *offsets;
        int64_t total;
    } arrays[] = {{"cu_seqlens_q", p.cu_seqlens_q, p.nq}, {"cu_seqlens_k", p.cu_seqlens_k, p.nk}};
    for (const auto &a : arrays) {
        if (a.offsets[0] != 0)
            return set_error(FCSA_STATUS_INVALID_ARGUMENT, "%s: expected 0 first, got %d", a.name, a.offsets[0]);
        for (int64_t s = 0; s < p.sequences; ++s)
            if (a.offsets[s + 1] < a.offsets[s])
                return set_error(FCSA_STATUS_INVALID_ARGUMENT,
                                 "%s: expected non-decreasing offsets, got %d after %d (entry %lld)", a.name,
                                 a.offsets[s + 1], a.offsets[s], (long long)(s + 1));
        if (a.offsets[p.sequences] != a.total)
            return set_error(FCSA_STATUS_INVALID_ARGUMENT, "%s: expected %lld last (the packed rows), got %d", a.name,
                             (long long)a.total, a.offsets[p.sequences]);
    }
    return FCSA_STATUS_SUCCESS;
}

// The tensors a struct of this size has: those appended later are NULL in an older one.
template <class Tensors>
const fcsa_tensor *appended(const Tensors *tensors, const fcsa_tensor *const Tensors::*field) {
    const size_t end = size_t(reinterpret_cast<const char *>(&(tensors->*field)) -
                              reinterpret_cast<const char *>(tensors)) + sizeof(const fcsa_tensor *);
    return tensors->struct_size >= end ? tensors->*field : nullptr;
}

fcsa_status validate_forward(const fcsa_options *given_options, const fcsa_forward_tensors *tensors,
                             fcsa_options &options, Problem &p) {
    FCSA_RETURN_IF_ERROR(read_options(given_options, &options));
    if (!tensors) return set_error(FCSA_STATUS_INVALID_ARGUMENT, "tensors: required, got NULL");
    FCSA_RETURN_IF_ERROR(read_struct_size("tensors", tensors->struct_size, kForwardTensorsV1Size));
    const CommonTensors common = {tensors->q,    tensors->k,     tensors->v,   tensors->mask,
                                  tensors->bias, tensors->scale, tensors->out, tensors->lse};
    FCSA_RETURN_IF_ERROR(check_common(options, common, p));
    const fcsa_tensor *cu_q = appended(tensors, &fcsa_forward_tensors::cu_seqlens_q);
    const fcsa_tensor *cu_k = appended(tensors, &fcsa_forward_tensors::cu_seqlens_k);
    FCSA_RETURN_IF_ERROR(check_varlen(cu_q, cu_k, tensors->mask != nullptr, tensors->bias != nullptr, p));
    return check_overlaps({{"out", tensors->out}, {"lse", tensors->lse}},
                          {{"q", tensors->q},
                           {"k", tensors->k},
                           {"v", tensors->v},
                           {"mask", tensors->mask},
                           {"bias", tensors->bias},
                           {"scale", tensors->scale},
                           {"cu_seqlens_q", cu_q},
                           {"cu_seqlens_k", cu_k}});
}

fcsa_status validate_backward(const fcsa_options *given_options, const fcsa_backward_tensors *tensors,
                              fcsa_options &options, Problem &p) {
    FCSA_RETURN_IF_ERROR(read_options(given_options, &options));
    if (!tensors) return set_error(FCSA_STATUS_INVALID_ARGUMENT, "tensors: required, got NULL");
    FCSA_RETURN_IF_ERROR(read_struct_size("tensors", tensors->struct_size, kBackwardTensorsV1Size));
    FCSA_RETURN_IF_ERROR(require("lse", tensors->lse));
    const CommonTensors common = {tensors->q,    tensors->k,     tensors->v,   tensors->mask,
                                  tensors->bias, tensors->scale, tensors->out, tensors->lse};
    FCSA_RETURN_IF_ERROR(check_common(options, common, p));

    FCSA_RETURN_IF_ERROR(require("dout", tensors->dout));
    FCSA_RETURN_IF_ERROR(require("dq", tensors->dq));
    FCSA_RETURN_IF_ERROR(require("dk", tensors->dk));
    FCSA_RETURN_IF_ERROR(require("dv", tensors->dv));
    const fcsa_tensor &q = *tensors->q, &k = *tensors->k, &v = *tensors->v, &out = *tensors->out;
    struct Gradient {
        const char *name;
        const fcsa_tensor *tensor;
        const fcsa_tensor *like;
        const char *why;
        View *view;
    };
    const Gradient gradients[] = {{"dout", tensors->dout, &out, " (like out)", &p.dout},
                                  {"dq", tensors->dq, &q, " (like q)", &p.dq},
                                  {"dk", tensors->dk, &k, " (like k)", &p.dk},
                                  {"dv", tensors->dv, &v, " (like v)", &p.dv}};
    for (const Gradient &g : gradients) {
        FCSA_RETURN_IF_ERROR(check_descriptor(g.name, *g.tensor, 4, 4));
        FCSA_RETURN_IF_ERROR(check_dtype(g.name, *g.tensor, p.dtype, " (like q)"));
        FCSA_RETURN_IF_ERROR(check_shape(g.name, *g.tensor, g.like->shape, 4, g.why));
        FCSA_RETURN_IF_ERROR(check_same_device(g.name, *g.tensor, p));
        *g.view = make_view(*g.tensor, kAllDims);
    }

    if (tensors->dbias) {
        if (!tensors->bias)
            return set_error(FCSA_STATUS_INVALID_ARGUMENT, "dbias: given without bias (pass NULL when there is no bias)");
        const fcsa_tensor &dbias = *tensors->dbias, &bias = *tensors->bias;
        FCSA_RETURN_IF_ERROR(check_descriptor("dbias", dbias, 4, 4));
        FCSA_RETURN_IF_ERROR(check_dtype("dbias", dbias, bias.dtype, " (like bias)"));
        FCSA_RETURN_IF_ERROR(check_shape("dbias", dbias, bias.shape, 4, " (like bias)"));
        FCSA_RETURN_IF_ERROR(check_same_device("dbias", dbias, p));
        p.dbias = make_view(dbias, kAllDims);
    }
    if (tensors->dscale) {
        if (!tensors->scale)
            return set_error(FCSA_STATUS_INVALID_ARGUMENT,
                             "dscale: given without a scale tensor (pass NULL when the scale is a number)");
        const fcsa_tensor &dscale = *tensors->dscale, &scale = *tensors->scale;
        FCSA_RETURN_IF_ERROR(check_descriptor("dscale", dscale, 0, 1));
        FCSA_RETURN_IF_ERROR(check_dtype("dscale", dscale, FCSA_DTYPE_FLOAT32, ""));
        FCSA_RETURN_IF_ERROR(check_shape("dscale", dscale, scale.shape, scale.ndim, " (like scale)"));
        FCSA_RETURN_IF_ERROR(check_same_device("dscale", dscale, p));
        if (dscale.ndim == 1)
            p.dscale = make_view(dscale, {-1, 0, -1, -1});
        else
            p.dscale = make_view(dscale, {-1, -1, -1, -1});
    }
    const fcsa_tensor *cu_q = appended(tensors, &fcsa_backward_tensors::cu_seqlens_q);
    const fcsa_tensor *cu_k = appended(tensors, &fcsa_backward_tensors::cu_seqlens_k);
    FCSA_RETURN_IF_ERROR(check_varlen(cu_q, cu_k, tensors->mask != nullptr, tensors->bias != nullptr, p));
    return check_overlaps({{"dq", tensors->dq},
                           {"dk", tensors->dk},
                           {"dv", tensors->dv},
                           {"dbias", tensors->dbias},
                           {"dscale", tensors->dscale}},
                          {{"q", tensors->q},
                           {"k", tensors->k},
                           {"v", tensors->v},
                           {"mask", tensors->mask},
                           {"bias", tensors->bias},
                           {"scale", tensors->scale},
                           {"out", tensors->out},
                           {"dout", tensors->dout},
                           {"lse", tensors->lse},
                           {"cu_seqlens_q", cu_q},
                           {"cu_seqlens_k", cu_k}});
}

// ------------------------------------------------------------------ dispatch

int64_t numel(const View &view) {
    return view.present() ? view.shape[0] * view.shape[1] * view.shape[2] * view.shape[3] : 0;
}

// True when the call has no output element to write (then it succeeds at once).
bool nothing_to_write(const Problem &p, bool backward) {
    if (!backward) return p.b * p.h * p.nq == 0;
    return numel(p.dq) == 0 && numel(p.dk) == 0 && numel(p.dv) == 0 && numel(p.dbias) == 0 && numel(p.dscale) == 0;
}

fcsa_status choose_backend(const fcsa_options &options, const Problem &p, int *backend) {
    if (p.device_type == FCSA_DEVICE_CPU) {
        if (options.backend == FCSA_BACKEND_CUDA_SM80 || options.backend == FCSA_BACKEND_CUDA_SM90)
            return set_error(FCSA_STATUS_NOT_SUPPORTED, "options.backend: %s needs CUDA tensors, got tensors on cpu",
                             options.backend == FCSA_BACKEND_CUDA_SM80 ? "FCSA_BACKEND_CUDA_SM80"
                                                                       : "FCSA_BACKEND_CUDA_SM90");
        *backend = FCSA_BACKEND_CPU;
        return FCSA_STATUS_SUCCESS;
    }
    if (options.backend == FCSA_BACKEND_CPU)
        return set_error(FCSA_STATUS_NOT_SUPPORTED,
                         "options.backend: FCSA_BACKEND_CPU needs CPU tensors, got tensors on %s",
                         device_string(p.device_type, p.device_index).c_str());
#if defined(FCSA_WITH_CUDA)
    *backend = FCSA_BACKEND_CUDA_SM80;
    return FCSA_STATUS_SUCCESS;
#else
    return set_error(FCSA_STATUS_NOT_SUPPORTED,
                     "q: tensors on %s, but this build of libfcsa has no CUDA backend (CPU only)",
                     device_string(p.device_type, p.device_index).c_str());
#endif
}

#if defined(FCSA_WITH_CUDA)
// FCSA_DISABLE_SM90=1 keeps AUTO on the portable path (to compare the two, or to work
// around a problem in the Hopper one).
bool sm90_disabled() {
    const char *value = std::getenv("FCSA_DISABLE_SM90");
    return value != nullptr && value[0] != '\0' && std::strcmp(value, "0") != 0;
}

// Makes the tensors' device current for the call and restores the caller's after it.
class DeviceGuard {
  public:
    fcsa_status enter(int device) {
        cudaError_t error = cudaGetDevice(&previous_);
        if (error == cudaSuccess && previous_ != device) {
            error = cudaSetDevice(device);
            changed_ = error == cudaSuccess;
        }
        if (error != cudaSuccess) {
            cudaGetLastError(); // reset the runtime's error state for the caller's next call
            return set_error(FCSA_STATUS_CUDA_ERROR, "cannot make cuda:%d the current device: %s", device,
                             cudaGetErrorString(error));
        }
        return FCSA_STATUS_SUCCESS;
    }
    ~DeviceGuard() {
        if (changed_) cudaSetDevice(previous_);
    }

  private:
    int previous_ = 0;
    bool changed_ = false;
};
#endif

fcsa_status check_workspace(const void *workspace, size_t workspace_bytes, size_t needed) {
    if (workspace_bytes < needed)
        return set_error(FCSA_STATUS_WORKSPACE_TOO_SMALL,
                         "workspace: %zu bytes given, this call needs %zu (ask the workspace size query)",
                         workspace_bytes, needed);
    if (needed > 0 && !workspace)
        return set_error(FCSA_STATUS_WORKSPACE_TOO_SMALL, "workspace: NULL, this call needs %zu bytes", needed);
    // The kernels copy it in 16-byte pieces (any allocator's memory is so aligned).
    if (needed > 0 && reinterpret_cast<uintptr_t>(workspace) % 16 != 0)
        return set_error(FCSA_STATUS_INVALID_ARGUMENT, "workspace: %p is not 16-byte aligned", workspace);
    return FCSA_STATUS_SUCCESS;
}

// Validates, then either answers the workspace size (run == false) or runs the call.
fcsa_status attention(bool backward, const fcsa_options &options, const Problem &p, bool run, void *workspace,
                      size_t workspace_bytes, void *stream, size_t *needed) {
    int backend = FCSA_BACKEND_AUTO;
    FCSA_RETURN_IF_ERROR(choose_backend(options, p, &backend));
    if (nothing_to_write(p, backward)) {
        if (needed) *needed = 0;
        if (run) last_backend = backend;
        return FCSA_STATUS_SUCCESS;
    }
    if (backend == FCSA_BACKEND_CPU) {
        const size_t bytes = p.varlen()  ? cpu_varlen_workspace(p, backward)
                             : backward ? cpu_backward_workspace(p)
                                        : cpu_forward_workspace(p);
        if (needed) *needed = bytes;
        if (!run) return FCSA_STATUS_SUCCESS;
        FCSA_RETURN_IF_ERROR(check_workspace(workspace, workspace_bytes, bytes));
        if (p.varlen())
            FCSA_RETURN_IF_ERROR(backward ? cpu_varlen_backward(p, workspace) : cpu_varlen_forward(p, workspace));
        else
            FCSA_RETURN_IF_ERROR(backward ? cpu_backward(p, workspace) : cpu_forward(p, workspace));
        last_backend = backend;
        return FCSA_STATUS_SUCCESS;
    }
#if defined(FCSA_WITH_CUDA)
    DeviceGuard guard;
    FCSA_RETURN_IF_ERROR(guard.enter(p.device_index));
    FCSA_RETURN_IF_ERROR(sm80_supports(p, backward));
    backend = FCSA_BACKEND_CUDA_SM80;
    if (options.backend == FCSA_BACKEND_CUDA_SM90 || (options.backend == FCSA_BACKEND_AUTO && !sm90_disabled())) {
        const fcsa_status status = backward ? sm90_backward_supports(p) : sm90_forward_supports(p);
        if (status == FCSA_STATUS_SUCCESS) backend = FCSA_BACKEND_CUDA_SM90;
        else if (options.backend == FCSA_BACKEND_CUDA_SM90) return status;
    }
    const bool hopper = backend == FCSA_BACKEND_CUDA_SM90;
    const size_t bytes = backward ? sm80_backward_workspace(p, hopper)
                         : hopper ? sm90_forward_workspace(p)
                                  : sm80_forward_workspace(p);
    if (needed) *needed = bytes;
    if (!run) return FCSA_STATUS_SUCCESS;
    FCSA_RETURN_IF_ERROR(check_workspace(workspace, workspace_bytes, bytes));
    FCSA_RETURN_IF_ERROR(backward ? sm80_backward(p, workspace, stream, hopper)
                         : hopper ? sm90_forward(p, workspace, stream)
                                  : sm80_forward(p, workspace, stream));
    last_backend = backend;
    return FCSA_STATUS_SUCCESS;
#else
    (void)stream;
    return set_error(FCSA_STATUS_INTERNAL_ERROR, "internal error: no backend for this device");
#endif
}

// ------------------------------------------------------------------ KV-cache attention
//
// fcsa_kvcache_forward (kvcache.h): q against the keys held in a contiguous or paged
// cache, after appending new keys to it. Checked like the forward, plus the cache's
// layout, its lengths and its block table; the caches are outputs when keys are
// appended.

constexpr size_t kKvCacheTensorsV1Size = sizeof(fcsa_kvcache_tensors);

// The values of cache_seqlens and of the block table entries in use, when they are in
// host memory: each length leaves room for the new keys, each block is in the cache.
fcsa_status check_cache_values(const KvCacheProblem &kv) {
    const Problem &p = kv.attention;
    for (int64_t batch = 0; batch < p.b; ++batch) {
        const int64_t cached = kv.cached_keys(batch);
        if (cached < 0 || cached > kv.capacity - kv.nq_new)
            return set_error(FCSA_STATUS_INVALID_ARGUMENT,
                             "cache_seqlens: entry %lld is %lld, expected 0 to %lld (a capacity of %lld keys, "
                             "%lld of them new)",
                             (long long)batch, (long long)cached, (long long)(kv.capacity - kv.nq_new),
                             (long long)kv.capacity, (long long)kv.nq_new);
        if (!kv.paged()) continue;
        const int64_t used = (cached + kv.nq_new + kv.page_size - 1) / kv.page_size;
        for (int64_t i = 0; i < used; ++i) {
            const int64_t block = kv.block_table[batch * kv.block_table_stride + i];
            if (block < 0 || block >= kv.num_blocks)
                return set_error(FCSA_STATUS_INVALID_ARGUMENT,
                                 "block_table: entry (%lld, %lld) is %lld, expected a block of the cache, 0 to %lld",
                                 (long long)batch, (long long)i, (long long)block, (long long)(kv.num_blocks - 1));
        }
    }
    // Appended keys must land in distinct slots (a block listed twice where keys are
    // appended would have two writes race, and a sequence read another's new key).
    if (kv.paged() && kv.nq_new > 0) {
        std::unordered_set<int64_t> written;
        for (int64_t batch = 0; batch < p.b; ++batch)
            for (int64_t t = 0; t < kv.nq_new; ++t) {
                const int64_t position = kv.cached_keys(batch) + t;
                const int64_t block = kv.block_table[batch * kv.block_table_stride + position / kv.page_size];
                if (!written.insert(block * kv.page_size + position % kv.page_size).second)
                    return set_error(FCSA_STATUS_INVALID_ARGUMENT,
                                     "block_table: sequence %lld appends key %lld into block %lld, row %lld, where "
                                     "another appended key goes too",
                                     (long long)batch, (long long)position, (long long)block,
                                     (long long)(position % kv.page_size));
            }
    }
    return FCSA_STATUS_SUCCESS;
}

fcsa_status validate_kvcache(const fcsa_options *given_options, const fcsa_kvcache_tensors *tensors,
                             fcsa_options &options, KvCacheProblem &kv) {
    FCSA_RETURN_IF_ERROR(read_options(given_options, &options));
    if (!tensors) return set_error(FCSA_STATUS_INVALID_ARGUMENT, "tensors: required, got NULL");
    FCSA_RETURN_IF_ERROR(read_struct_size("tensors", tensors->struct_size, kKvCacheTensorsV1Size));
    for (const NamedTensor &t : {NamedTensor{"q", tensors->q}, NamedTensor{"k_cache", tensors->k_cache},
                                 NamedTensor{"v_cache", tensors->v_cache}, NamedTensor{"out", tensors->out}})
        FCSA_RETURN_IF_ERROR(require(t.name, t.tensor));
    const fcsa_tensor &q = *tensors->q, &kc = *tensors->k_cache, &vc = *tensors->v_cache, &out = *tensors->out;
    Problem &p = kv.attention;

    // q fixes b, h, nq, d, the dtype and the device.
    FCSA_RETURN_IF_ERROR(read_queries(options, q, p));

    // The block table, when given, makes the caches paged.
    if (tensors->block_table) {
        const fcsa_tensor &table = *tensors->block_table;
        FCSA_RETURN_IF_ERROR(check_descriptor("block_table", table, 2, 2));
        FCSA_RETURN_IF_ERROR(check_dtype("block_table", table, FCSA_DTYPE_INT32, ""));
        if (table.shape[0] != p.b)
            return set_error(FCSA_STATUS_INVALID_ARGUMENT, "block_table: expected shape (%lld, max_blocks), got %s",
                             (long long)p.b, shape_string(table).c_str());
        FCSA_RETURN_IF_ERROR(check_same_device("block_table", table, p));
        // An empty table has no data pointer, yet it makes the cache paged (of capacity 0):
        // a sentinel that no entry is ever read from.
        static const int32_t kNoBlocks = 0;
        kv.block_table = table.data != nullptr ? static_cast<const int32_t *>(table.data) : &kNoBlocks;
        kv.max_blocks = table.shape[1];
        kv.block_table_stride = table.shape[0] > 1 ? table.strides[0] : 0;
    }

    FCSA_RETURN_IF_ERROR(check_descriptor("k_cache", kc, 4, 4));
    FCSA_RETURN_IF_ERROR(check_dtype("k_cache", kc, p.dtype, " (like q)"));
    const int64_t hk = kc.shape[1];
    if (kv.paged()) {
        if (kc.shape[3] != p.d || hk < 1 || p.h % hk != 0 || kc.shape[2] < 1)
            return set_error(FCSA_STATUS_INVALID_ARGUMENT,
                             "k_cache: expected a paged cache (num_blocks, hk, page_size, %lld) with %lld %% hk == 0 "
                             "and page_size >= 1 (a block_table is given), got %s",
                             (long long)p.d, (long long)p.h, shape_string(kc).c_str());
        kv.num_blocks = kc.shape[0];
        kv.page_size = kc.shape[2];
        if (!checked_mul(kv.max_blocks, kv.page_size, &kv.capacity))
            return set_error(FCSA_STATUS_INVALID_ARGUMENT,
                             "block_table: %lld blocks of %lld keys hold more than 2^63 - 1 keys",
                             (long long)kv.max_blocks, (long long)kv.page_size);
    } else {
        if (kc.shape[0] != p.b || kc.shape[3] != p.d || hk < 1 || p.h % hk != 0)
            return set_error(FCSA_STATUS_INVALID_ARGUMENT,
                             "k_cache: expected shape (%lld, hk, n_max, %lld) with %lld %% hk == 0, got %s",
                             (long long)p.b, (long long)p.d, (long long)p.h, shape_string(kc).c_str());
        kv.page_size = kc.shape[2];
        kv.capacity = kc.shape[2];
    }
    p.hk = hk;
    p.nk = kv.capacity;
    if (!product_fits(kc.shape[0], hk, kc.shape[2], p.d, kMaxElements))
        return too_large("k_cache", kc, "its first dims * head dim", 58);
    if (!product_fits(p.b, hk, kv.capacity, p.d, kMaxElements))
        return too_large("k_cache", kc, "b * hk * capacity * d", 58);
    if (!product_fits(p.b, p.h, p.nq, kv.capacity, kMaxScoreElements))
        return too_large("k_cache", kc, "b * h * nq * capacity (with q's b, h and nq)", 62);

    FCSA_RETURN_IF_ERROR(check_descriptor("v_cache", vc, 4, 4));
    FCSA_RETURN_IF_ERROR(check_dtype("v_cache", vc, p.dtype, " (like q)"));
    if (vc.shape[0] != kc.shape[0] || vc.shape[1] != kc.shape[1] || vc.shape[2] != kc.shape[2] || vc.shape[3] < 1)
        return set_error(FCSA_STATUS_INVALID_ARGUMENT,
                         "v_cache: expected shape (%lld, %lld, %lld, d_v) (k_cache's but for the head dim, d_v >= 1), "
                         "got %s",
                         (long long)kc.shape[0], (long long)kc.shape[1], (long long)kc.shape[2],
                         shape_string(vc).c_str());
    p.d_v = vc.shape[3];
    if (!product_fits(vc.shape[0], hk, vc.shape[2], p.d_v, kMaxElements) ||
        !product_fits(p.b, hk, kv.capacity, p.d_v, kMaxElements))
        return too_large("v_cache", vc, "its first dims (or b * hk * capacity) * d_v", 58);
    if (!product_fits(p.b, p.h, p.nq, p.d_v, kMaxElements))
        return too_large("v_cache", vc, "b * h * nq * d_v (with q's b, h and nq)", 58);
    FCSA_RETURN_IF_ERROR(check_same_device("k_cache", kc, p));
    FCSA_RETURN_IF_ERROR(check_same_device("v_cache", vc, p));
    kv.k_cache = make_view(kc, kAllDims);
    kv.v_cache = make_view(vc, kAllDims);

    if (tensors->cache_seqlens) {
        const fcsa_tensor &lengths = *tensors->cache_seqlens;
        FCSA_RETURN_IF_ERROR(check_descriptor("cache_seqlens", lengths, 1, 1));
        FCSA_RETURN_IF_ERROR(check_dtype("cache_seqlens", lengths, FCSA_DTYPE_INT32, ""));
        const int64_t expected[1] = {p.b};
        FCSA_RETURN_IF_ERROR(check_shape("cache_seqlens", lengths, expected, 1, " (b,)"));
        FCSA_RETURN_IF_ERROR(check_same_device("cache_seqlens", lengths, p));
        kv.cache_seqlens = static_cast<const int32_t *>(lengths.data);
    }

    if (!tensors->k_new != !tensors->v_new)
        return set_error(FCSA_STATUS_INVALID_ARGUMENT, "%s: given without %s (new keys need their values)",
                         tensors->k_new ? "k_new" : "v_new", tensors->k_new ? "v_new" : "k_new");
    if (tensors->k_new) {
        const fcsa_tensor &kn = *tensors->k_new, &vn = *tensors->v_new;
        if (!tensors->cache_seqlens)
            return set_error(FCSA_STATUS_INVALID_ARGUMENT,
                             "cache_seqlens: required when k_new is given (the new keys go at cache_seqlens)");
        FCSA_RETURN_IF_ERROR(check_descriptor("k_new", kn, 4, 4));
        FCSA_RETURN_IF_ERROR(check_dtype("k_new", kn, p.dtype, " (like q)"));
        const int64_t n_new = kn.shape[2];
        const int64_t expected_k[4] = {p.b, hk, n_new, p.d}, expected_v[4] = {p.b, hk, n_new, p.d_v};
        FCSA_RETURN_IF_ERROR(check_shape("k_new", kn, expected_k, 4, " (b, hk, nq_new, d)"));
        FCSA_RETURN_IF_ERROR(check_descriptor("v_new", vn, 4, 4));
        FCSA_RETURN_IF_ERROR(check_dtype("v_new", vn, p.dtype, " (like q)"));
        FCSA_RETURN_IF_ERROR(check_shape("v_new", vn, expected_v, 4, " (k_new's but for v_cache's head dim)"));
        if (n_new > kv.capacity)
            return set_error(FCSA_STATUS_INVALID_ARGUMENT,
                             "k_new: %lld new keys do not fit in a cache of capacity %lld keys per sequence",
                             (long long)n_new, (long long)kv.capacity);
        FCSA_RETURN_IF_ERROR(check_same_device("k_new", kn, p));
        FCSA_RETURN_IF_ERROR(check_same_device("v_new", vn, p));
        kv.nq_new = n_new;
        kv.k_new = make_view(kn, kAllDims);
        kv.v_new = make_view(vn, kAllDims);
    }

    if (tensors->scale) {
        const fcsa_tensor &scale = *tensors->scale;
        FCSA_RETURN_IF_ERROR(check_descriptor("scale", scale, 0, 1));
        FCSA_RETURN_IF_ERROR(check_dtype("scale", scale, FCSA_DTYPE_FLOAT32, ""));
        if (scale.ndim == 1 && scale.shape[0] != p.h)
            return set_error(FCSA_STATUS_INVALID_ARGUMENT, "scale: expected shape () or (%lld,), got %s",
                             (long long)p.h, shape_string(scale).c_str());
        FCSA_RETURN_IF_ERROR(check_same_device("scale", scale, p));
        p.scale_t = scale.ndim == 1 ? make_view(scale, {-1, 0, -1, -1}) : make_view(scale, {-1, -1, -1, -1});
    }

    FCSA_RETURN_IF_ERROR(check_descriptor("out", out, 4, 4));
    FCSA_RETURN_IF_ERROR(check_dtype("out", out, p.dtype, " (like q)"));
    const int64_t out_shape[4] = {p.b, p.h, p.nq, p.d_v};
    FCSA_RETURN_IF_ERROR(check_shape("out", out, out_shape, 4, " (q's but for v_cache's head dim)"));
    FCSA_RETURN_IF_ERROR(check_same_device("out", out, p));
    if (tensors->lse) {
        const fcsa_tensor &lse = *tensors->lse;
        FCSA_RETURN_IF_ERROR(check_descriptor("lse", lse, 3, 3));
        FCSA_RETURN_IF_ERROR(check_dtype("lse", lse, FCSA_DTYPE_FLOAT32, ""));
        const int64_t expected[3] = {p.b, p.h, p.nq};
        FCSA_RETURN_IF_ERROR(check_shape("lse", lse, expected, 3, " (b, h, nq)"));
        FCSA_RETURN_IF_ERROR(check_same_device("lse", lse, p));
        p.lse = make_view(lse, {0, 1, 2, -1});
    }
    p.q = make_view(q, kAllDims);
    p.out = make_view(out, kAllDims);
    p.scale = options.scale;
    p.groups = options.groups;
    p.causal = options.causal != 0;
    p.l2norm = options.l2norm_qk != 0;
    p.num_threads = options.num_threads;

    // Appending writes the caches: then they are outputs like out and lse.
    const bool appends = kv.appends();
    FCSA_RETURN_IF_ERROR(check_overlaps({{"out", tensors->out},
                                         {"lse", tensors->lse},
                                         {"k_cache", appends ? tensors->k_cache : nullptr},
                                         {"v_cache", appends ? tensors->v_cache : nullptr}},
                                        {{"q", tensors->q},
                                         {"k_new", tensors->k_new},
                                         {"v_new", tensors->v_new},
                                         {"cache_seqlens", tensors->cache_seqlens},
                                         {"block_table", tensors->block_table},
                                         {"scale", tensors->scale},
                                         {"k_cache", appends ? nullptr : tensors->k_cache},
                                         {"v_cache", appends ? nullptr : tensors->v_cache}}));
    // Lengths and block numbers are data: checked here when the host can read them.
    if (p.device_type == FCSA_DEVICE_CPU) FCSA_RETURN_IF_ERROR(check_cache_values(kv));
    return FCSA_STATUS_SUCCESS;
}

fcsa_status kvcache_attention(const fcsa_options &options, const KvCacheProblem &kv, bool run, void *workspace,
                              size_t workspace_bytes, void *stream, size_t *needed) {
    const Problem &p = kv.attention;
    int backend = FCSA_BACKEND_AUTO;
    FCSA_RETURN_IF_ERROR(choose_backend(options, p, &backend));
    if (p.b * p.h * p.nq == 0 && p.b * p.hk * kv.nq_new == 0) {
        if (needed) *needed = 0;
        if (run) last_backend = backend;
        return FCSA_STATUS_SUCCESS;
    }
    if (backend == FCSA_BACKEND_CPU) {
        const size_t bytes = cpu_kvcache_workspace(kv);
        if (needed) *needed = bytes;
        if (!run) return FCSA_STATUS_SUCCESS;
        FCSA_RETURN_IF_ERROR(check_workspace(workspace, workspace_bytes, bytes));
        FCSA_RETURN_IF_ERROR(cpu_kvcache_forward(kv, workspace));
        last_backend = backend;
        return FCSA_STATUS_SUCCESS;
    }
#if defined(FCSA_WITH_CUDA)
    // Decoding is bound by memory bandwidth: every CUDA device runs the portable path.
    DeviceGuard guard;
    FCSA_RETURN_IF_ERROR(guard.enter(p.device_index));
    FCSA_RETURN_IF_ERROR(sm80_kvcache_supports(kv));
    const size_t bytes = sm80_kvcache_workspace(kv);
    if (needed) *needed = bytes;
    if (!run) return FCSA_STATUS_SUCCESS;
    FCSA_RETURN_IF_ERROR(check_workspace(workspace, workspace_bytes, bytes));
    FCSA_RETURN_IF_ERROR(sm80_kvcache_forward(kv, workspace, stream));
    last_backend = FCSA_BACKEND_CUDA_SM80;
    return FCSA_STATUS_SUCCESS;
#else
    (void)stream;
    return set_error(FCSA_STATUS_INTERNAL_ERROR, "internal error: no backend for this device");
#endif
}

// ------------------------------------------------------------------ build information

std::vector<int> parse_sm_targets() {
    std::vector<int> targets;
#if defined(FCSA_WITH_CUDA) && defined(FCSA_SM_TARGETS)
    // "80-real;86-real;90a-real;120-virtual" -> 80, 86, 90, 120 (each once)
    const char *text = FCSA_SM_TARGETS;
    while (*text) {
        if (*text >= '0' && *text <= '9') {
            int value = 0;
            while (*text >= '0' && *text <= '9') value = value * 10 + (*text++ - '0');
            bool seen = false;
            for (int t : targets) seen |= t == value;
            if (!seen) targets.push_back(value);
        }
        while (*text && *text != ';' && *text != ',' && *text != ' ') ++text; // the rest of this entry
        while (*text == ';' || *text == ',' || *text == ' ') ++text;
    }
#endif
    return targets;
}

std::string describe_build() {
    std::string info = "fcsa " FCSA_VERSION_STRING " (ABI " + std::to_string(FCSA_ABI_VERSION) + "); ";
#if defined(FCSA_WITH_CUDA)
    info += "CUDA " + std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
#if defined(FCSA_SM_TARGETS)
    info += ", SM targets " FCSA_SM_TARGETS;
#endif
#else
    info += "CUDA not compiled";
#endif
    info += "; CPU kernels ";
    info += cpu::tile_kernels().isa;
    return info;
}

} // namespace
} // namespace fcsa

// ====================================================================== the C ABI

using namespace fcsa;

extern "C" {

FCSA_API const char *fcsa_version(void) { return FCSA_VERSION_STRING; }

FCSA_API int fcsa_abi_version(void) { return FCSA_ABI_VERSION; }

FCSA_API const char *fcsa_status_string(fcsa_status status) {
    switch (status) {
    case FCSA_STATUS_SUCCESS: return "FCSA_STATUS_SUCCESS";
    case FCSA_STATUS_INVALID_DTYPE: return "FCSA_STATUS_INVALID_DTYPE";
    case FCSA_STATUS_INVALID_ARGUMENT: return "FCSA_STATUS_INVALID_ARGUMENT";
    case FCSA_STATUS_NOT_SUPPORTED: return "FCSA_STATUS_NOT_SUPPORTED";
    case FCSA_STATUS_WORKSPACE_TOO_SMALL: return "FCSA_STATUS_WORKSPACE_TOO_SMALL";
    case FCSA_STATUS_CUDA_ERROR: return "FCSA_STATUS_CUDA_ERROR";
    case FCSA_STATUS_OUT_OF_MEMORY: return "FCSA_STATUS_OUT_OF_MEMORY";
    case FCSA_STATUS_INTERNAL_ERROR: return "FCSA_STATUS_INTERNAL_ERROR";
    }
    return "FCSA_STATUS_UNKNOWN";
}

FCSA_API const char *fcsa_last_error_message(void) { return last_error_message; }

FCSA_API const char *fcsa_build_info(void) {
    try {
        static const std::string info = describe_build();
        return info.c_str();
    } catch (...) {
        return "fcsa " FCSA_VERSION_STRING;
    }
}

FCSA_API int fcsa_cuda_compiled(void) {
#if defined(FCSA_WITH_CUDA)
    return 1;
#else
    return 0;
#endif
}

FCSA_API int fcsa_cuda_version(void) {
#if defined(FCSA_WITH_CUDA)
    return CUDART_VERSION;
#else
    return 0;
#endif
}

FCSA_API int fcsa_cuda_available(void) {
#if defined(FCSA_WITH_CUDA)
    // "Usable": the portable backend needs compute capability 8.0 or newer. No driver,
    // no device or any other failure simply means "not available".
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    for (int device = 0; device < count; ++device) {
        int major = 0;
        if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess && major >= 8)
            return 1;
    }
    cudaGetLastError();
    return 0;
#else
    return 0;
#endif
}

FCSA_API int fcsa_compiled_sm_targets(int *targets, int capacity) {
    try {
        static const std::vector<int> compiled = parse_sm_targets();
        for (int i = 0; i < int(compiled.size()) && i < capacity && targets; ++i) targets[i] = compiled[size_t(i)];
        return int(compiled.size());
    } catch (...) {
        return 0;
    }
}

FCSA_API void fcsa_options_init(fcsa_options *options) {
    if (!options) return;
    std::memset(options, 0, sizeof *options);
    options->struct_size = sizeof *options;
    options->scale = 8.f;
    options->groups = 1;
    options->l2norm_qk = 1;
}

FCSA_API fcsa_status fcsa_forward_workspace_size(const fcsa_options *options, const fcsa_forward_tensors *tensors,
                                                 size_t *workspace_bytes) {
    return guarded([&] {
        if (!workspace_bytes) return set_error(FCSA_STATUS_INVALID_ARGUMENT, "workspace_bytes: required, got NULL");
        fcsa_options checked;
        Problem p;
        FCSA_RETURN_IF_ERROR(validate_forward(options, tensors, checked, p));
        size_t bytes = 0;
        FCSA_RETURN_IF_ERROR(attention(false, checked, p, false, nullptr, 0, nullptr, &bytes));
        *workspace_bytes = bytes;
        return FCSA_STATUS_SUCCESS;
    });
}

FCSA_API fcsa_status fcsa_backward_workspace_size(const fcsa_options *options, const fcsa_backward_tensors *tensors,
                                                  size_t *workspace_bytes) {
    return guarded([&] {
        if (!workspace_bytes) return set_error(FCSA_STATUS_INVALID_ARGUMENT, "workspace_bytes: required, got NULL");
        fcsa_options checked;
        Problem p;
        FCSA_RETURN_IF_ERROR(validate_backward(options, tensors, checked, p));
        size_t bytes = 0;
        FCSA_RETURN_IF_ERROR(attention(true, checked, p, false, nullptr, 0, nullptr, &bytes));
        *workspace_bytes = bytes;
        return FCSA_STATUS_SUCCESS;
    });
}

FCSA_API fcsa_status fcsa_forward(const fcsa_options *options, const fcsa_forward_tensors *tensors, void *workspace,
                                  size_t workspace_bytes, void *stream) {
    return guarded([&] {
        fcsa_options checked;
        Problem p;
        FCSA_RETURN_IF_ERROR(validate_forward(options, tensors, checked, p));
        return attention(false, checked, p, true, workspace, workspace_bytes, stream, nullptr);
    });
}

FCSA_API fcsa_status fcsa_backward(const fcsa_options *options, const fcsa_backward_tensors *tensors, void *workspace,
                                   size_t workspace_bytes, void *stream) {
    return guarded([&] {
        fcsa_options checked;
        Problem p;
        FCSA_RETURN_IF_ERROR(validate_backward(options, tensors, checked, p));
        return attention(true, checked, p, true, workspace, workspace_bytes, stream, nullptr);
    });
}

FCSA_API fcsa_status fcsa_kvcache_forward_workspace_size(const fcsa_options *options,
                                                         const fcsa_kvcache_tensors *tensors,
                                                         size_t *workspace_bytes) {
    return guarded([&] {
        if (!workspace_bytes) return set_error(FCSA_STATUS_INVALID_ARGUMENT, "workspace_bytes: required, got NULL");
        fcsa_options checked;
        KvCacheProblem kv;
        FCSA_RETURN_IF_ERROR(validate_kvcache(options, tensors, checked, kv));
        size_t bytes = 0;
        FCSA_RETURN_IF_ERROR(kvcache_attention(checked, kv, false, nullptr, 0, nullptr, &bytes));
        *workspace_bytes = bytes;
        return FCSA_STATUS_SUCCESS;
    });
}

FCSA_API fcsa_status fcsa_kvcache_forward(const fcsa_options *options, const fcsa_kvcache_tensors *tensors,
                                          void *workspace, size_t workspace_bytes, void *stream) {
    return guarded([&] {
        fcsa_options checked;
        KvCacheProblem kv;
        FCSA_RETURN_IF_ERROR(validate_kvcache(options, tensors, checked, kv));
        return kvcache_attention(checked, kv, true, workspace, workspace_bytes, stream, nullptr);
    });
}

FCSA_API int fcsa_last_backend(void) { return last_backend; }

FCSA_API const char *fcsa_backend_name(int backend) {
    switch (backend) {
    case FCSA_BACKEND_AUTO: return "auto";
    case FCSA_BACKEND_CPU: return "cpu";
    case FCSA_BACKEND_CUDA_SM80: return "cuda-sm80";
    case FCSA_BACKEND_CUDA_SM90: return "cuda-sm90";
    default: return "unknown";
    }
}

} // extern "C"
