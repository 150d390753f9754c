// varlen.cpp: the CPU backend's packed sequences (cu_seqlens, fcsa.h). Each sequence
// is a problem of its own, b = 1, whose views start at its first row: the reference
// is then exactly the plain forward and backward, sequence by sequence. Each of those
// calls runs its tiles on all threads. dscale is summed over the sequences in their
// order (bitwise reproducible); empty sequences write their zeros here.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "backends.h"
#include "cpu/common.h"
#include "cpu/numeric.h"

namespace fcsa {
namespace {

using namespace cpu;

int64_t bytes_of(int32_t dtype) {
    switch (dtype) {
    case FCSA_DTYPE_FLOAT32:
    case FCSA_DTYPE_INT32: return 4;
    case FCSA_DTYPE_BOOL: return 1;
    default: return 2;
    }
}

// Rows [first, first + count) of a (1, heads, rows, width) view, as a view of its own.
View rows_of(const View &view, int64_t first, int64_t count) {
    View part = view;
    if (!view.present()) return part;
    part.data = static_cast<char *>(view.data) + first * view.stride[2] * bytes_of(view.dtype);
    part.shape[2] = count;
    if (count == 1) part.stride[2] = 0; // problem.h: stride 0 on every dim of size 1
    return part;
}

struct Range {
    int64_t first, count;
};
Range query_rows(const Problem &p, int64_t s) { return {p.cu_seqlens_q[s], p.cu_seqlens_q[s + 1] - p.cu_seqlens_q[s]}; }
Range key_rows(const Problem &p, int64_t s) { return {p.cu_seqlens_k[s], p.cu_seqlens_k[s + 1] - p.cu_seqlens_k[s]}; }

// Sequence s as a problem of its own (offsets checked by api.cpp).
Problem sequence_problem(const Problem &p, int64_t s) {
    const Range q = query_rows(p, s), k = key_rows(p, s);
    Problem one = p;
    one.cu_seqlens_q = one.cu_seqlens_k = nullptr;
    one.sequences = 0;
    one.nq = q.count;
    one.nk = k.count;
    for (View *view : {&one.q, &one.dq, &one.out, &one.dout, &one.lse}) *view = rows_of(*view, q.first, q.count);
    for (View *view : {&one.k, &one.dk, &one.v, &one.dv}) *view = rows_of(*view, k.first, k.count);
    return one;
}

// Writes zeros to rows [first, first + count) of every head of a (1, heads, rows, width) view.
void zero_rows(const View &view, Range rows) {
    if (!view.present()) return;
    const std::vector<float> zeros(size_t(view.shape[3]), 0.f);
    for (int64_t head = 0; head < view.shape[1]; ++head)
        for (int64_t row = rows.first; row < rows.first + rows.count; ++row)
            store_row(view.data, view.offset(0, head, row, 0), view.dtype, view.shape[3], zeros.data());
}

// The dscale partial of one sequence lands here, behind the sequences' shared workspace.
int64_t dscale_floats(const Problem &p) { return p.dscale.present() ? p.dscale.shape[1] : 0; }

size_t sequences_workspace(const Problem &p, bool backward) {
    size_t most = 0;
    for (int64_t s = 0; s < p.sequences; ++s) {
        const Problem one = sequence_problem(p, s);
        if (one.nq == 0 || one.nk == 0) continue; // written here, no backend call
        most = std::max(most, backward ? cpu_backward_workspace(one) : cpu_forward_workspace(one));
    }
    return most;
}

} // namespace

size_t cpu_varlen_workspace(const Problem &p, bool backward) {
    // The dscale partial after the rest, 64-byte aligned (+ 64: the base may not be).
    return size_t(round_up(int64_t(sequences_workspace(p, backward)), 64)) + size_t(dscale_floats(p)) * sizeof(float) +
           64;
}

fcsa_status cpu_varlen_forward(const Problem &p, void *workspace) {
    const float minus_infinity = -std::numeric_limits<float>::infinity();
    for (int64_t s = 0; s < p.sequences; ++s) {
        const Problem one = sequence_problem(p, s);
        if (one.nq == 0) continue;
        if (one.nk > 0) {
            if (const fcsa_status status = cpu_forward(one, workspace)) return status;
            continue;
        }
        // No key: out 0 and lse -inf on every row (SPEC: a row with no visible key).
        zero_rows(p.out, query_rows(p, s));
        if (p.lse.present())
            for (int64_t head = 0; head < p.h; ++head)
                for (int64_t row = 0; row < one.nq; ++row)
                    static_cast<float *>(one.lse.data)[one.lse.offset(0, head, row, 0)] = minus_infinity;
    }
    return FCSA_STATUS_SUCCESS;
}

fcsa_status cpu_varlen_backward(const Problem &p, void *workspace) {
    const int64_t scales = dscale_floats(p);
    const uintptr_t base = reinterpret_cast<uintptr_t>(workspace);
    const uintptr_t after = (base + 63) / 64 * 64 + uintptr_t(round_up(int64_t(sequences_workspace(p, true)), 64));
    float *partial = reinterpret_cast<float *>(after);
    std::vector<double> dscale(size_t(scales), 0.0);
    for (int64_t s = 0; s < p.sequences; ++s) {
        Problem one = sequence_problem(p, s);
        if (one.nq == 0 || one.nk == 0) {
            // Nothing attends: no gradient reaches any row of this sequence.
            zero_rows(p.dq, query_rows(p, s));
            zero_rows(p.dk, key_rows(p, s));
            zero_rows(p.dv, key_rows(p, s));
            continue;
        }
        if (scales) {
            one.dscale.data = partial;
            one.dscale.stride[1] = scales > 1 ? 1 : 0;
        }
        if (const fcsa_status status = cpu_backward(one, workspace)) return status;
        for (int64_t i = 0; i < scales; ++i) dscale[size_t(i)] += partial[i];
    }
    for (int64_t i = 0; i < scales; ++i)
        static_cast<float *>(p.dscale.data)[p.dscale.offset(0, i, 0, 0)] = float(dscale[size_t(i)]);
    return FCSA_STATUS_SUCCESS;
}

} // namespace fcsa
