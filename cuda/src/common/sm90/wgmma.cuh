// wgmma.cuh: warpgroup matrix products (wgmma, sm_90a) and the shared-memory tile layout
// they read.
//
// A warpgroup (4 consecutive warps, 128 threads) computes D(64 x N) (+)= A(64 x 16) B(16 x N)
// per instruction, asynchronously: issue after wgmma_fence, close a batch with
// wgmma_commit, and wgmma_wait<n> until at most n batches are still running. D lives in
// registers: thread t of warp w holds rows 16w + t/4 and 16w + t/4 + 8, columns
// 8j + 2(t%4) and +1 of every n8 block j (the mma.m16n8 accumulator layout), as
// d[4j + 0..3] = (row, col), (row, col + 1), (row + 8, col), (row + 8, col + 1).
// Four such values of two adjacent n8 blocks, as 16-bit pairs, are exactly the A
// fragment of one k16 step: P = softmax(S) feeds P V from registers with no shuffle.
//
// Tiles in shared memory: SwizzledTile128<T, kRows, kCols> stores a kRows x kCols tile
// as kCols / 64 column blocks of kRows rows of 128 bytes, 16-byte chunks XOR-swizzled by
// row % 8: the layout TMA's 128-byte swizzle writes and wgmma's 128-byte-swizzle
// descriptors read, with no bank conflicts for either.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "barrier.cuh"

// The Hopper kernels' bodies exist only in the sm_90a compilation (wgmma, setmaxnreg);
// other targets of a multi-target build get empty kernels that the host never launches
// (forward_compiled and backward_compiled say which).
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FCSA_SM90_DEVICE_CODE 1
#endif

namespace fcsa {
namespace common {
namespace sm90 {

template <typename T, int kRows, int kCols> struct SwizzledTile128 {
    static_assert(sizeof(T) == 2, "16-bit elements: 64 per 128-byte row");
    static_assert(kCols % 64 == 0 && kRows % 8 == 0, "whole 64-column blocks of whole 8-row atoms");
    static constexpr int kBlockCols = 64;
    static constexpr int kChunk = 8; // elements per 16-byte chunk
    static constexpr int kBlockBytes = kRows * 128;
    static constexpr int kBytes = kRows * kCols * 2;

    __host__ __device__ static constexpr int offset(int row, int col) {
        return (col / 64) * (kRows * 64) + row * 64 + ((((col % 64) / 8) ^ (row % 8)) * 8) + col % 8;
    }
    __host__ __device__ static constexpr int chunk_offset(int row, int col) { return offset(row, col); }

    // Operand descriptor, 128-byte swizzle: start address, leading and stride byte
    // offsets (16-byte units). 8-row atoms lie 1024 bytes apart (the stride offset).
    __device__ __forceinline__ static uint64_t descriptor(uint32_t address, uint32_t leading_bytes) {
        return uint64_t((address & 0x3FFFF) >> 4) | uint64_t(leading_bytes >> 4) << 16 | uint64_t(1024 >> 4) << 32 |
               uint64_t(1) << 62;
    }
    // K-major operand (rows are M or N, columns are K): rows row0 .., the 16 columns from
    // k0 (a multiple of 16). K steps within a 128-byte row move the start address.
    __device__ __forceinline__ static uint64_t k_major(uint32_t base, int row0, int k0) {
        return descriptor(base + (k0 / 64) * kBlockBytes + row0 * 128 + (k0 % 64) * 2, 16);
    }
    // MN-major operand (rows are K, columns are M or N; read transposed): the 16 rows from k0,
    // every column; column blocks lie kBlockBytes apart (the leading offset).
    __device__ __forceinline__ static uint64_t mn_major(uint32_t base, int k0) {
        return descriptor(base + k0 * 128, kBlockBytes);
    }
};

// The dynamic shared memory's start, rounded up to the 1024 bytes of an 8-row swizzle
// atom (the kernels ask for 1024 bytes more than their tiles). An offset from p, not an
// integer round trip: the compiler keeps knowing the pointer is shared (STS and LDS
// rather than generic stores and loads).
__device__ __forceinline__ uint8_t *align_to_swizzle_atoms(uint8_t *p) {
    return p + ((1024u - (shared_address(p) & 1023u)) & 1023u);
}

// A 32-bit store into a swizzled tile by its shared-memory address (the caller does the
// swizzle's arithmetic once, where the tile's offset() would repeat it per store).
__device__ __forceinline__ void store_shared_u32(uint32_t address, uint32_t value) {
    asm volatile("st.shared.b32 [%0], %1;" ::"r"(address), "r"(value) : "memory");
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int kPending> __device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(kPending) : "memory");
}
// Keeps the compiler from moving accumulator registers' uses across an asynchronous
// product that writes them.
template <int N> __device__ __forceinline__ void wgmma_fence_operands(float (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
// Accumulators about to be overwritten (a chain whose first product does not
// accumulate): their old values die here. Without it the products' read-write operands
// keep the last values alive around a loop, and the copies the compiler then makes of
// them between products serialize the wgmma pipeline.
template <int N> __device__ __forceinline__ void wgmma_discard(float (&d)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "=f"(d[i]));
}

// The operand lists of m64nNk16 per N (accumulators, then A, B, scale-d, transposes).
#define FCSA_WGMMA_ACC_64 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
#define FCSA_WGMMA_OUT_64 "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define FCSA_WGMMA_SS_64 "%32, %33, p, 1, 1, %35, %36;\n}\n"
#define FCSA_WGMMA_SS_PRED_64 "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
#define FCSA_WGMMA_RS_64 "{%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
#define FCSA_WGMMA_RS_PRED_64 "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
#define FCSA_WGMMA_ACC_128 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
#define FCSA_WGMMA_OUT_128 "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
#define FCSA_WGMMA_SS_128 "%64, %65, p, 1, 1, %67, %68;\n}\n"
#define FCSA_WGMMA_SS_PRED_128 "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
#define FCSA_WGMMA_RS_128 "{%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"
#define FCSA_WGMMA_RS_PRED_128 "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
#define FCSA_WGMMA_ACC_256 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
#define FCSA_WGMMA_OUT_256 "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
#define FCSA_WGMMA_SS_256 "%128, %129, p, 1, 1, %131, %132;\n}\n"
#define FCSA_WGMMA_SS_PRED_256 "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
#define FCSA_WGMMA_RS_256 "{%128, %129, %130, %131}, %132, p, 1, 1, %134;\n}\n"
#define FCSA_WGMMA_RS_PRED_256 "{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"

template <typename T, int N> struct Wgmma;

// D (+)= A B for one (element type, N): ss with A and B from shared memory (each
// K-major, or MN-major where kTransA / kTransB), rs with A from registers. accumulate =
// 0 overwrites D.
#define FCSA_DEFINE_WGMMA(T, PTX_TYPE, N)                                                                        \
    template <> struct Wgmma<T, N> {                                                                             \
        template <int kTransA, int kTransB>                                                                      \
        __device__ __forceinline__ static void ss(float (&d)[N / 2], uint64_t a, uint64_t b, int accumulate) { \
            asm volatile(FCSA_WGMMA_SS_PRED_##N "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PTX_TYPE         \
                                                "." PTX_TYPE " " FCSA_WGMMA_ACC_##N FCSA_WGMMA_SS_##N              \
                         : FCSA_WGMMA_OUT_##N                                                                    \
                         : "l"(a), "l"(b), "r"(accumulate), "n"(kTransA), "n"(kTransB));                         \
        }                                                                                                        \
        template <int kTransB>                                                                                   \
        __device__ __forceinline__ static void rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t b,        \
                                                  int accumulate) {                                              \
            asm volatile(FCSA_WGMMA_RS_PRED_##N "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PTX_TYPE         \
                                                "." PTX_TYPE " " FCSA_WGMMA_ACC_##N FCSA_WGMMA_RS_##N              \
                         : FCSA_WGMMA_OUT_##N                                                                    \
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate), "n"(kTransB));  \
        }                                                                                                        \
    };

FCSA_DEFINE_WGMMA(__nv_bfloat16, "bf16", 64)
FCSA_DEFINE_WGMMA(__nv_bfloat16, "bf16", 128)
FCSA_DEFINE_WGMMA(__nv_bfloat16, "bf16", 256)
FCSA_DEFINE_WGMMA(__half, "f16", 64)
FCSA_DEFINE_WGMMA(__half, "f16", 128)
FCSA_DEFINE_WGMMA(__half, "f16", 256)

} // namespace sm90
} // namespace common
} // namespace fcsa
