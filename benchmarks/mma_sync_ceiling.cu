// mma_sync_ceiling.cu: the throughput of mma.sync on this GPU, the ceiling of the portable
// (sm80) kernels: bf16 m16n8k16 products with float32 accumulators, each warp running 16
// independent accumulators, alone or with ldmatrix.x4 loads from shared memory feeding
// them at the kernels' rates. Prints one table.
//
//   nvcc -O3 -gencode=arch=compute_90a,code=sm_90a benchmarks/mma_sync_ceiling.cu -o mma_sync_ceiling
#include <cstdint>
#include <cstdio>
#include <cuda_runtime.h>

#define CHECK(call)                                                                          \
    do {                                                                                     \
        const cudaError_t e = (call);                                                        \
        if (e != cudaSuccess) {                                                              \
            fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, cudaGetErrorString(e));       \
            return 1;                                                                        \
        }                                                                                    \
    } while (0)

__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t *b) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                 "{%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void *p) {
    const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
}

// kMmaPerLoad: products per ldmatrix.x4 (0: none). The forward's S = Q K^T reads one x4
// per 4 products (two m16 blocks share each B fragment); a warp of one m16 block, 2.
template <int kMmaPerLoad> __global__ void products(float *sink, int iterations) {
    constexpr int kStride = 72; // a padded 16-bit row: conflict-free ldmatrix
    __shared__ __align__(16) uint16_t tile[64 * kStride];
    for (int i = threadIdx.x; i < 64 * kStride; i += blockDim.x) tile[i] = uint16_t(0x3c00 + (i & 7));
    __syncthreads();
    const int lane = threadIdx.x % 32;
    const uint16_t *row = tile + (lane % 16) * kStride + (lane / 16) * 8;
    float acc[16][4] = {};
    uint32_t a[2][4], b[4];
    for (int i = 0; i < 4; ++i) a[0][i] = a[1][i] = b[i] = 0x3f803f80u + threadIdx.x;
    for (int it = 0; it < iterations; ++it) {
#pragma unroll
        for (int n = 0; n < 8; ++n) {
            if (kMmaPerLoad != 0 && (2 * n) % kMmaPerLoad == 0) ldmatrix_x4(b, row + (n % 4) * 16 * kStride + (it % 2) * 16);
            mma(acc[2 * n], a[0], b);
            mma(acc[2 * n + 1], a[1], b + (kMmaPerLoad == 0 ? 0 : 2));
        }
    }
    float total = 0.f;
    for (int i = 0; i < 16; ++i) total += acc[i][0] + acc[i][1] + acc[i][2] + acc[i][3];
    if (total == 1234.5f) sink[threadIdx.x] = total; // keeps the products alive
}

template <int kMmaPerLoad> int run(float *sink, int sms, int warps_per_sm) {
    const int iterations = 4096, threads = 128, blocks = sms * warps_per_sm / 4;
    products<kMmaPerLoad><<<blocks, threads>>>(sink, 16); // warm-up
    CHECK(cudaGetLastError());
    cudaEvent_t start, stop;
    CHECK(cudaEventCreate(&start));
    CHECK(cudaEventCreate(&stop));
    float best = 1e30f;
    for (int rep = 0; rep < 5; ++rep) {
        CHECK(cudaEventRecord(start));
        products<kMmaPerLoad><<<blocks, threads>>>(sink, iterations);
        CHECK(cudaEventRecord(stop));
        CHECK(cudaEventSynchronize(stop));
        float ms;
        CHECK(cudaEventElapsedTime(&ms, start, stop));
        best = ms < best ? ms : best;
    }
    const double flops = double(blocks) * (threads / 32) * iterations * 16 * (2.0 * 16 * 8 * 16);
    printf("%-24s %8d %10.0f\n", kMmaPerLoad == 0 ? "products alone" : kMmaPerLoad == 4 ? "1 ldmatrix.x4 / 4 mma" : "1 ldmatrix.x4 / 2 mma",
           warps_per_sm, flops / (best * 1e-3) / 1e12);
    CHECK(cudaEventDestroy(start));
    CHECK(cudaEventDestroy(stop));
    return 0;
}

int main() {
    cudaDeviceProp prop;
    CHECK(cudaGetDeviceProperties(&prop, 0));
    float *sink;
    CHECK(cudaMalloc(&sink, 4096));
    printf("%s, %d SMs: mma.sync m16n8k16 bf16 -> f32, best of 5\n", prop.name, prop.multiProcessorCount);
    printf("%-24s %8s %10s\n", "variant", "warps/SM", "TFLOP/s");
    int failed = 0;
    for (int warps : {4, 8, 16}) failed |= run<0>(sink, prop.multiProcessorCount, warps);
    for (int warps : {4, 8, 16}) failed |= run<4>(sink, prop.multiProcessorCount, warps);
    for (int warps : {4, 8, 16}) failed |= run<2>(sink, prop.multiProcessorCount, warps);
    CHECK(cudaFree(sink));
    return failed;
}
