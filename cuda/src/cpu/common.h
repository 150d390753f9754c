// common.h: what the CPU forward and backward share: tile sizes, scratch buffers,
// loading rows with the l2norm applied, the l2norm backward, and the packed float32
// copies of K and V that every query tile reads.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

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

// Reads row `row` of the (b, head, row, :) slice of `view` as float32 into dst[0, d),
// zero-filling dst[d, padded_d). With l2norm, normalizes each group and writes its
// norm (before clamping) to norms[0, groups).
void load_normalized_row(const Problem &p, const View &view, int64_t batch, int64_t head, int64_t row,
                         bool l2norm, int64_t padded_d, float *dst, float *norms);

// The l2norm backward for one row, per group: dx = (dx^ - x^ <x^, dx^>) / norm, and
// dx = dx^ / epsilon where the norm was clamped to epsilon.
void l2norm_backward_row(const float *x_hat, const float *dx_hat, const float *norms, int64_t d, int32_t groups,
                         float *dx);

// K (normalized) and V in float32, in the layouts the tile loops read, for all batches
// and kv heads. Each buffer is optional (nullptr: not built).
struct PackedKeysValues {
    int64_t key_tiles = 0; // ceil(nk / kKeyTile)
    int64_t padded_d = 0;  // d rounded up to a multiple of 8
    // [b][hk][key tile][d][kKeyTile]: K^ transposed per tile, zero past nk.
    float *keys_transposed = nullptr;
    // [b][hk][nk][padded_d]: K^ rows.
    float *key_rows = nullptr;
    // [b][hk][nk][groups]: the key norms, for the l2norm backward.
    float *key_norms = nullptr;
    // [b][hk][key tile][d][kKeyTile]: V transposed per tile.
    float *values_transposed = nullptr;
    // [b][hk][nk][padded_d]: V rows.
    float *value_rows = nullptr;

    int64_t head_index(int64_t batch, int64_t kv_head, int64_t hk) const { return batch * hk + kv_head; }
    const float *key_tile(int64_t bh, int64_t tile, int64_t d) const {
        return keys_transposed + (bh * key_tiles + tile) * d * kKeyTile;
    }
    const float *value_tile(int64_t bh, int64_t tile, int64_t d) const {
        return values_transposed + (bh * key_tiles + tile) * d * kKeyTile;
    }
};

// Fills the requested buffers of `packed` from p.k and p.v, on `threads` threads.
void pack_keys_values(const Problem &p, const PackedKeysValues &packed, int threads);

} // namespace cpu
} // namespace fcsa
