// tile_kernels.h: the inner loops of the CPU backend, on float32 tiles in per-thread
// scratch memory. One source (tile_kernels_impl.inc) is compiled once per instruction
// set (portable, AVX2+FMA, AVX-512) and the best one the running CPU supports is picked
// once.
//
// Conventions: tiles are row-major with a leading dimension `ld` (elements) that is a
// multiple of 8, and rows are readable up to the next multiple of 16 past `cols`.
// Logits are in natural units; the row offset is subtracted before anything else so
// that large logits (a large bias, no l2norm) lose no precision to it.
#pragma once

#include <cstdint>

namespace fcsa {
namespace cpu {

constexpr int kPanelWidth = 16; // columns of one panel of a packed matmul operand

struct TileKernels {
    const char *isa; // "avx512", "avx2", "generic"

    // c[m][n] = (accumulate ? c[m][n] : 0) + sum_k a[m * a_row + k * a_col] * B[k][n]
    // for m < rows, n < cols, k < depth; cols % 8 == 0. `a` may be read transposed.
    // B is stored in panels of kPanelWidth columns: B[k][n] = b[(n / kPanelWidth) *
    // b_panel + k * ldb + n % kPanelWidth]. A row-major B is ldb = its row length and
    // b_panel = kPanelWidth; packed panels (ldb = kPanelWidth) are read sequentially.
    void (*matmul)(float *c, int64_t ldc, const float *a, int64_t a_row, int64_t a_col,
                   const float *b, int64_t ldb, int64_t b_panel, int rows, int cols, int depth,
                   bool accumulate);

    // p[r][j] = exp(s[r][j] * s_scale - offset[r]) for j < cols. Hidden entries become
    // exactly 0 whatever s holds (NaN and inf included): the columns whose col_bias
    // (optional) is -inf rather than 0, and j >= limit[r] (limit optional). Entries below
    // exp(-87) become 0 too. `p` may be `s`. When row_sum is given, row_sum[r] += sum_j
    // p[r][j].
    void (*exp_rows)(float *p, const float *s, int64_t ld, int rows, int cols, float s_scale,
                     const float *offset, const int *limit, const float *col_bias, float *row_sum);

    // row_max[r] = max of s[r][j] over the visible entries (as in exp_rows); -inf when the
    // row sees nothing. NaN entries are passed over.
    void (*max_rows)(const float *s, int64_t ld, int rows, int cols, const int *limit,
                     const float *col_bias, float *row_max);

    // The softmax backward: dp[r][j] <- p[r][j] * (dp[r][j] - delta[r]) (then dS), and,
    // when ds_dot_cos is given, ds_dot_cos[r] += sum_j dS[r][j] * cos[r][j]. Where p is 0,
    // dS is 0 and adds nothing, whatever dp and cos hold there.
    void (*softmax_grad_rows)(float *dp, const float *p, const float *cos, int64_t ld, int rows,
                              int cols, const float *delta, float *ds_dot_cos);

    // x[r][j] *= factor[r] for j < cols.
    void (*scale_rows)(float *x, int64_t ld, int rows, int cols, const float *factor);
};

// The kernels for the running CPU (decided once, thread-safe).
const TileKernels &tile_kernels();

} // namespace cpu
} // namespace fcsa
