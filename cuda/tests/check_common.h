// check_common.h: what the device check programs (check_forward.cu, check_backward.cu)
// share. They link the backend sources alone, without api.cpp, so they define the
// library's error hook here and keep its message for their own reports.
#pragma once

#include <algorithm>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

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

// A contiguous (b, h, n, d) view of `data` (stride 0 on dimensions of size 1).
static fcsa::View contiguous_view(void *data, int dtype, int64_t b, int64_t h, int64_t n, int64_t d) {
    fcsa::View v;
    v.data = data;
    v.dtype = dtype;
    const int64_t shape[4] = {b, h, n, d}, stride[4] = {h * n * d, n * d, d, 1};
    for (int i = 0; i < 4; ++i) v.shape[i] = shape[i], v.stride[i] = shape[i] == 1 ? 0 : stride[i];
    return v;
}

// The median, in ms by CUDA events on the default stream, of `reps` calls of launch()
// (which returns an fcsa_status) after 3 warm-up calls; exits if a call fails.
template <class Launch> static double median_launch_ms(Launch launch, int reps) {
    cudaEvent_t start, stop;
    CUDA_CHECK(cudaEventCreate(&start));
    CUDA_CHECK(cudaEventCreate(&stop));
    std::vector<float> ms;
    for (int r = 0; r < reps + 3; ++r) {
        CUDA_CHECK(cudaEventRecord(start));
        if (launch() != FCSA_STATUS_SUCCESS) {
            fprintf(stderr, "timing launch failed: %s\n", fcsa::g_error_message);
            exit(4);
        }
        CUDA_CHECK(cudaEventRecord(stop));
        CUDA_CHECK(cudaEventSynchronize(stop));
        float t;
        CUDA_CHECK(cudaEventElapsedTime(&t, start, stop));
        if (r >= 3) ms.push_back(t);
    }
    CUDA_CHECK(cudaEventDestroy(start));
    CUDA_CHECK(cudaEventDestroy(stop));
    std::sort(ms.begin(), ms.end());
    return ms[ms.size() / 2];
}
