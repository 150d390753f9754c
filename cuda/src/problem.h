// problem.h: one attention call after validation, in the form every backend reads.
//
// api.cpp checks the caller's fcsa_tensor descriptors and turns them into a Problem:
// every tensor becomes a 4-D View whose broadcast dimensions have stride 0, so a
// backend indexes all of them the same way, with 64-bit arithmetic, and never has to
// re-check anything. Absent optional tensors have data == nullptr.
//
// What else a backend may rely on: strides are >= 0; no output shares memory with an
// input, another output or itself; and b*h*nq*d, b*hk*nk*d (each also with d_v) and,
// with a bias, b*h*nq*nk are at most 2^58 (b*h*nq*nk at most 2^62 without one), each
// with nq, nk, d and d_v rounded up to a multiple of 256 and a 0 counted as 1. Float32 arrays of such
// products take at most 2^60 bytes, so workspace sizes summed from a few of them in
// int64_t or size_t cannot overflow.
#pragma once

#include <cstddef>
#include <cstdint>

#include "fcsa.h"

namespace fcsa {

struct View {
    void *data = nullptr;
    int32_t dtype = FCSA_DTYPE_FLOAT32;
    int64_t shape[4] = {1, 1, 1, 1};
    int64_t stride[4] = {0, 0, 0, 0}; // elements; 0 on every dimension of size 1

    bool present() const { return data != nullptr; }
    // Rows may be read and written with 16-byte vectors (cp.async, uint4): the base and
    // every stride but the contiguous last one are multiples of 16 bytes.
    bool rows_16byte_aligned(int64_t element_bytes) const {
        if (reinterpret_cast<uintptr_t>(data) % 16 != 0) return false;
        for (int i = 0; i < 3; ++i)
            if ((stride[i] * element_bytes) % 16 != 0) return false;
        return true;
    }
    int64_t offset(int64_t i0, int64_t i1, int64_t i2, int64_t i3) const {
        return i0 * stride[0] + i1 * stride[1] + i2 * stride[2] + i3 * stride[3];
    }
};

struct Problem {
    // Sizes. h % hk == 0; query head hq reads kv head hq / (h / hk). d is the head dim
    // of q and k, d_v that of v (and so of out, dout and dv); they may differ.
    int64_t b = 0, h = 0, hk = 0, nq = 0, nk = 0, d = 0, d_v = 0;
    int32_t dtype = FCSA_DTYPE_FLOAT32; // q, k, v, out, dout, dq, dk, dv
    int32_t device_type = FCSA_DEVICE_CPU;
    int32_t device_index = 0;

    // Options.
    float scale = 8.f; // used when scale_t is absent
    int32_t groups = 1;
    bool causal = false;
    bool l2norm = true;
    bool deterministic = false;
    int32_t num_threads = 0;

    // Forward inputs and outputs; the views' shapes:
    View q, dq;               // (b, h, nq, d)
    View out, dout;           // (b, h, nq, d_v)
    View k, dk;               // (b, hk, nk, d)
    View v, dv;               // (b, hk, nk, d_v)
    View lse;                 // (b, h, nq, 1), float32
    View mask;                // (b, 1, 1, nk), bool; stride 0 on the middle dims
    View bias, dbias;         // each dim full or 1 (stride 0 there); dbias has bias' shape
    View scale_t, dscale;     // (1, h or 1, 1, 1), float32

    // Variable-length packed sequences (fcsa.h): b == 1 in every view above, and
    // sequence s holds query rows [cu_seqlens_q[s], cu_seqlens_q[s + 1]) and keys
    // [cu_seqlens_k[s], cu_seqlens_k[s + 1]) of it. No mask, no bias. Contiguous int32
    // arrays of sequences + 1 entries, on the problem's device; their values were checked
    // when that is the host (a CUDA kernel must clamp them to nq and nk).
    const int32_t *cu_seqlens_q = nullptr, *cu_seqlens_k = nullptr;
    int64_t sequences = 0;

    int64_t heads_per_kv() const { return h / hk; }
    bool varlen() const { return cu_seqlens_q != nullptr; }
    // With l2norm and no bias every logit lies in [-|scale| * groups, |scale| * groups],
    // so exp(s - |scale| * groups) cannot overflow and replaces the running maximum.
    bool logits_bounded() const { return l2norm && !bias.present(); }
    // Causal, aligned to the end: row i sees keys j <= i + causal_offset().
    int64_t causal_offset() const { return nk - nq; }
};

} // namespace fcsa
