// check_common.h: what the device check programs (check_forward.cu, check_backward.cu)
// share. They link the backend sources alone, without api.cpp, so they define the
// library's error hook here and keep its message for their own reports.
#pragma once

#include <cstdarg>
#include <cstdio>
#include <cstdlib>

#include <cuda_runtime.h>

#include "backends.h"

namespace fcsa {
static char g_error_message[1024];
fcsa_status set_error(fcsa_status status, const char *format, ...) {
    va_list args;
    va_start(args, format);
    vsnprintf(g_error_message, sizeof g_error_message, format, args);
    va_end(args);
    return status;
}
} // namespace fcsa

#define CUDA_CHECK(call)                                                                                \
    do {                                                                                                \
        cudaError_t err_ = (call);                                                                      \
        if (err_ != cudaSuccess) {                                                                      \
            fprintf(stderr, "CUDA error %s at %s:%d: %s\n", cudaGetErrorName(err_), __FILE__, __LINE__, \
                    cudaGetErrorString(err_));                                                          \
            exit(2);                                                                                    \
        }                                                                                               \
    } while (0)

static size_t dtype_size(int dtype) { return dtype == FCSA_DTYPE_FLOAT32 ? 4 : dtype == FCSA_DTYPE_BOOL ? 1 : 2; }
static const char *dtype_name(int dtype) {
    return dtype == FCSA_DTYPE_FLOAT32 ? "f32" : dtype == FCSA_DTYPE_FLOAT16 ? "f16" : "bf16";
}
