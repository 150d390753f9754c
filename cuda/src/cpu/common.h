// common.h: what the CPU forward and backward share: tile sizes, scratch buffers,
// loading rows with the l2norm applied, the l2norm backward, and the packed float32
// copies of K and V that every query tile reads.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>

#include "cpu/tile_kernels.h"
#include "problem.h"

namespace fcsa {
namespace cpu {

constexpr int kQueryTile = 64; // query rows per tile
constexpr int kKeyTile = 64;   // keys per tile (a multiple of 8)
constexpr float kNormEpsilon = 1e-12f;
// The constant softmax offset |scale| * groups is used while exp(-2 * offset) stays a
// normal float32 (offset <= 40), so no visible key's weight can underflow; larger
// scales fall back to the running maximum, which is exact for any logits.
constexpr float kMaxConstantOffset = 40.f;

inline int64_t round_up(int64_t x, int64_t multiple) { return (x + multiple - 1) / multiple * multiple; }
inline int64_t ceil_div(int64_t x, int64_t y) { return (x + y - 1) / y; }

// A zero-initialized, 64-byte aligned float array owned by one thread or one call.
class FloatBuffer {
  public:
    FloatBuffer() = default;
    explicit FloatBuffer(size_t count);
    float *data() const { return data_.get(); }
    float &operator[](size_t i) const { return data_.get()[i]; }

  private:
    struct Free {
        void operator()(float *p) const;
    };
    std::unique_ptr<float, Free> data_;
};

// Carves 64-byte aligned float arrays out of the caller's workspace. The same code
// computes the size (with base == nullptr) and the pointers, so the two cannot differ.
class WorkspaceCarver {
  public:
    explicit WorkspaceCarver(void *base);
    float *take(int64_t floats);
    size_t bytes_needed() const { return used_ + 64; } // + 64: the base may be unaligned

  private:
    char *base_;
    size_t used_ = 0;
};

// The head's logit scale (the scale tensor's entry when there is one).
float head_scale(const Problem &p, int64_t head);

// The softmax offset for rows of this head: |scale| * groups when the logits are
// bounded (and that offset is safe), else a negative value meaning "running max".
float constant_offset(const Problem &p, float scale);

// Reads row `row` of the (b, head, row, :) slice of `view`, `width` values, as float32
// into dst[0, width), zero-filling dst[width, padded_width).
void load_padded_row(const View &view, int64_t batch, int64_t head, int64_t row, int64_t width,
                     int64_t padded_width, float *dst);

// Reads row `row` of the (b, head, row, :) slice of q or k as float32 into dst[0, d),
// zero-filling dst[d, padded_d). With l2norm, normalizes each group and writes its
// norm (before clamping) to norms[0, groups). Norms of any size are taken without
// overflow; a norm beyond float32's range is written as inf.
void load_normalized_row(const Problem &p, const View &view, int64_t batch, int64_t head, int64_t row,
                         bool l2norm, int64_t padded_d, float *dst, float *norms);

// The l2norm backward for one row, per group: dx = (dx^ - x^ <x^, dx^>) / norm, and
// dx = dx^ / epsilon where the norm was clamped to epsilon; dx = 0 where dx^ is all 0.
void l2norm_backward_row(const float *x_hat, const float *dx_hat, const float *norms, int64_t d, int32_t groups,
                         float *dx);

// True when the mask hides key `key` of batch `batch`.
inline bool masked_out(const Problem &p, int64_t batch, int64_t key) {
    return p.mask.present() && !static_cast<const uint8_t *>(p.mask.data)[p.mask.offset(batch, 0, 0, key)];
}

// key_bias[j] = 0 for a key the mask lets through, -inf for one it hides (and for the
// columns past `keys`, up to kKeyTile): the col_bias of the tile kernels.
void fill_key_bias(const Problem &p, int64_t batch, int64_t first_key, int keys, float *key_bias);

// biased = logits + bias[batch, head, rows, keys], tiles of rows of kKeyTile (biased
// may be logits); bias_row is scratch of kKeyTile floats. The forward and the backward
// form their logits alike: the backward's must equal the forward's bit for bit (see
// backward.cpp).
void add_bias_tile(const Problem &p, int64_t batch, int64_t head, int64_t first_row, int rows, int64_t first_key,
                   int keys, const float *logits, float *biased, float *bias_row);

// A product P B, with P a tile whose row r has weights for keys [0, limit[r]) only
// (limit non-decreasing, as causality makes it), normally runs over the keys the last
// row sees. True when it must run row by row instead, each row over its own keys: when
// a key that some rows see and others do not (a causal diagonal tile) has a row of B
// holding inf or NaN, which the rows that do not see it would meet with a weight of 0.
// B is read as the tile matmul reads it (tile_kernels.h), `cols` columns.
bool rows_need_own_depth(const int *limit, int rows, const float *b, int64_t ldb, int64_t b_panel, int64_t cols);

// The keys row `row` sees in the tile starting at first_key (of `keys` keys): causal
// hides those after row + (nk - nq). 0 when it sees none.
inline int visible_keys(const Problem &p, int64_t row, int64_t first_key, int keys) {
    int64_t visible = keys;
    if (p.causal) visible = std::min<int64_t>(visible, row + p.causal_offset() - first_key + 1);
    return int(std::max<int64_t>(visible, 0));
}

// The width of one packed operand, K (q/k's head dim d) or V (v's head dim d_v).
struct PackedWidth {
    int64_t width = 0;  // d or d_v
    int64_t padded = 0; // width rounded up to a multiple of 8
    int64_t panels = 0; // panels of a row tile: ceil(width / kPanelWidth)

    static constexpr int64_t row_panel = int64_t(kKeyTile) * kPanelWidth;
    int64_t transposed_panel() const { return width * kPanelWidth; }
    int64_t transposed_tile_size() const { return width * kKeyTile; }
    int64_t row_tile_size() const { return panels * row_panel; }
};

// K (normalized) and V in float32 for all batches and kv heads, cut into tiles of
// kKeyTile keys and laid out as the tile matmuls read them: in panels of kPanelWidth
// columns (tile_kernels.h), each read front to back. Padding is zero, and so are the
// keys and values of keys the mask hides. K is d wide, V d_v.
struct PackedKeysValues {
    PackedWidth keys, values;
    int64_t key_tiles = 0; // ceil(nk / kKeyTile)
    // Transposed tiles, [b][hk][key tile][key panel][width][kPanelWidth]: B of Q K^T
    // (keys) and of dO V^T (values).
    float *keys_transposed = nullptr;
    float *values_transposed = nullptr;
    // Row tiles, [b][hk][key tile][width panel][kKeyTile][kPanelWidth]: B of P V
    // (values) and of dS K (keys).
    float *key_rows = nullptr;
    float *value_rows = nullptr;
    // [b][hk][nk][groups]: the key norms, for the l2norm backward.
    float *key_norms = nullptr;

    static constexpr int64_t ldb = kPanelWidth;
    static constexpr int64_t row_panel = PackedWidth::row_panel;

    // bh = batch * hk + kv head
    const float *transposed_keys(int64_t bh, int64_t tile) const {
        return keys_transposed + (bh * key_tiles + tile) * keys.transposed_tile_size();
    }
    const float *transposed_values(int64_t bh, int64_t tile) const {
        return values_transposed + (bh * key_tiles + tile) * values.transposed_tile_size();
    }
    const float *key_row_tile(int64_t bh, int64_t tile) const {
        return key_rows + (bh * key_tiles + tile) * keys.row_tile_size();
    }
    const float *value_row_tile(int64_t bh, int64_t tile) const {
        return value_rows + (bh * key_tiles + tile) * values.row_tile_size();
    }
    // Copies key `key` of key_rows (d values) to dst.
    void read_key_row(int64_t bh, int64_t key, float *dst) const;
};

// The sizes of the packed layouts for this problem (no buffers yet).
PackedKeysValues packing_for(const Problem &p);

// Fills the requested buffers of `packed` from p.k and p.v, on `threads` threads.
void pack_keys_values(const Problem &p, const PackedKeysValues &packed, int threads);

} // namespace cpu
} // namespace fcsa
