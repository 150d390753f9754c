#include "cpu/common.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <new>
#include <vector>

#include "cpu/numeric.h"
#include "cpu/parallel.h"

namespace fcsa {
namespace cpu {

FloatBuffer::FloatBuffer(size_t count) {
    const size_t bytes = std::max<size_t>(count, 1) * sizeof(float);
    float *memory = static_cast<float *>(::operator new[](bytes, std::align_val_t(64)));
    std::memset(memory, 0, bytes);
    data_.reset(memory);
}

void FloatBuffer::Free::operator()(float *p) const { ::operator delete[](p, std::align_val_t(64)); }

WorkspaceCarver::WorkspaceCarver(void *base) : base_(static_cast<char *>(base)) {
    if (base_) {
        const uintptr_t address = reinterpret_cast<uintptr_t>(base_);
        base_ += (64 - address % 64) % 64;
    }
}

float *WorkspaceCarver::take(int64_t floats) {
    float *result = base_ ? reinterpret_cast<float *>(base_ + used_) : nullptr;
    used_ += size_t(round_up(floats * int64_t(sizeof(float)), 64));
    return result;
}

float head_scale(const Problem &p, int64_t head) {
    if (!p.scale_t.present()) return p.scale;
    const int64_t index = p.scale_t.offset(0, p.scale_t.shape[1] == 1 ? 0 : head, 0, 0);
    return static_cast<const float *>(p.scale_t.data)[index];
}

float constant_offset(const Problem &p, float scale) {
    const float offset = std::fabs(scale) * float(p.groups);
    if (!p.logits_bounded() || !(offset <= kMaxConstantOffset)) return -1.f;
    return offset;
}

namespace {

float sum_of_squares(const float *x, int64_t count) {
    // Eight interleaved partial sums: a single running sum is one long chain of
    // dependent adds, which made normalizing K and Q a visible share of short calls.
    float partial[8] = {};
    int64_t t = 0;
    for (; t + 8 <= count; t += 8)
        for (int lane = 0; lane < 8; ++lane) partial[lane] += x[t + lane] * x[t + lane];
    for (; t < count; ++t) partial[t % 8] += x[t] * x[t];
    return ((partial[0] + partial[4]) + (partial[1] + partial[5])) +
           ((partial[2] + partial[6]) + (partial[3] + partial[7]));
}

// Divides x[0, count) by max(||x||, epsilon) and returns ||x||, without overflow: when
// the float32 sum of squares overflows (from |x| of about 1.8e19 on), x is first scaled
// by the power of two that brings its largest magnitude into [1/2, 1), exactly. The
// returned norm is then inf where it exceeds float32's range (the l2norm backward
// divides by it: the gradient it gives is below float32's range too). Underflow needs
// no care: squares that underflow make a norm far below epsilon, which is clamped
// whatever its value.
float normalize_group(float *x, int64_t count) {
    const float squares = sum_of_squares(x, count);
    if (squares <= std::numeric_limits<float>::max()) {
        const float norm = std::sqrt(squares);
        const float denominator = std::max(norm, kNormEpsilon);
        for (int64_t t = 0; t < count; ++t) x[t] /= denominator;
        return norm;
    }
    float largest = 0.f;
    for (int64_t t = 0; t < count; ++t) largest = std::max(largest, std::fabs(x[t])); // NaN passed over
    int exponent = 0;
    float unit = 1.f;
    if (largest <= std::numeric_limits<float>::max()) { // else an inf in x: NaN follows, as it should
        std::frexp(largest, &exponent);
        unit = std::ldexp(1.f, -exponent);
    }
    for (int64_t t = 0; t < count; ++t) x[t] *= unit;
    const float scaled_norm = std::sqrt(sum_of_squares(x, count));
    for (int64_t t = 0; t < count; ++t) x[t] /= scaled_norm;
    return std::ldexp(scaled_norm, exponent);
}

} // namespace

void load_padded_row(const View &view, int64_t batch, int64_t head, int64_t row, int64_t width,
                     int64_t padded_width, float *dst) {
    load_row(view.data, view.offset(batch, head, row, 0), view.dtype, width, dst);
    std::fill(dst + width, dst + padded_width, 0.f);
}

void load_normalized_row(const Problem &p, const View &view, int64_t batch, int64_t head, int64_t row,
                         bool l2norm, int64_t padded_d, float *dst, float *norms) {
    const int64_t d = p.d;
    load_padded_row(view, batch, head, row, d, padded_d, dst);
    if (!l2norm) return;
    const int64_t group_size = d / p.groups;
    for (int32_t g = 0; g < p.groups; ++g) {
        const float norm = normalize_group(dst + g * group_size, group_size);
        if (norms) norms[g] = norm;
    }
}

void l2norm_backward_row(const float *x_hat, const float *dx_hat, const float *norms, int64_t d, int32_t groups,
                         float *dx) {
    const int64_t group_size = d / groups;
    for (int32_t g = 0; g < groups; ++g) {
        const int64_t begin = g * group_size, end = begin + group_size;
        if (!(norms[g] >= kNormEpsilon)) {
            // x^ = x / epsilon is linear here: the clamped norm passes no gradient.
            for (int64_t t = begin; t < end; ++t) dx[t] = dx_hat[t] / kNormEpsilon;
            continue;
        }
        float dot = 0.f;
        for (int64_t t = begin; t < end; ++t) dot += x_hat[t] * dx_hat[t];
        if (!std::isfinite(dot) && std::all_of(dx_hat + begin, dx_hat + end, [](float v) { return v == 0.f; })) {
            // No gradient in, none out, whatever x^ holds (a hidden key's may be NaN).
            std::fill(dx + begin, dx + end, 0.f);
            continue;
        }
        for (int64_t t = begin; t < end; ++t) dx[t] = (dx_hat[t] - x_hat[t] * dot) / norms[g];
    }
}

void fill_key_bias(const Problem &p, int64_t batch, int64_t first_key, int keys, float *key_bias) {
    const float hidden = -std::numeric_limits<float>::infinity();
    for (int j = 0; j < keys; ++j) key_bias[j] = masked_out(p, batch, first_key + j) ? hidden : 0.f;
    for (int j = keys; j < kKeyTile; ++j) key_bias[j] = hidden;
}

void add_bias_tile(const Problem &p, int64_t batch, int64_t head, int64_t first_row, int rows, int64_t first_key,
                   int keys, const float *logits, float *biased, float *bias_row) {
    const View &bias = p.bias;
    for (int r = 0; r < rows; ++r) {
        const int64_t index = bias.offset(batch, head, first_row + r, first_key);
        const float *row = logits + int64_t(r) * kKeyTile;
        float *out = biased + int64_t(r) * kKeyTile;
        if (bias.stride[3] == 0) {
            const float value = load_element(bias.data, index, bias.dtype);
            for (int j = 0; j < keys; ++j) out[j] = row[j] + value;
        } else {
            load_row(bias.data, index, bias.dtype, keys, bias_row);
            for (int j = 0; j < keys; ++j) out[j] = row[j] + bias_row[j];
        }
    }
}

namespace {

bool all_finite(const float *x, int64_t count) {
    uint32_t finite = 1; // no early exit: the loop vectorizes
    for (int64_t t = 0; t < count; ++t) finite &= (float_bits(x[t]) & 0x7f800000u) != 0x7f800000u;
    return finite != 0;
}

} // namespace

bool rows_need_own_depth(const int *limit, int rows, const float *b, int64_t ldb, int64_t b_panel, int64_t cols) {
    const int first = limit[0], last = limit[rows - 1];
    if (first >= last) return false;
    if (b_panel == kPanelWidth) { // row-major B: rows of `cols` values, ldb apart
        for (int k = first; k < last; ++k)
            if (!all_finite(b + k * ldb, cols)) return true;
        return false;
    }
    // Packed panels (ldb = kPanelWidth): the rows [first, last) of a panel are contiguous.
    for (int64_t n = 0; n < cols; n += kPanelWidth)
        if (!all_finite(b + (n / kPanelWidth) * b_panel + first * ldb, (last - first) * ldb)) return true;
    return false;
}

namespace {

PackedWidth packed_width(int64_t width) {
    PackedWidth packed;
    packed.width = width;
    packed.padded = round_up(width, 8);
    packed.panels = ceil_div(width, kPanelWidth);
    return packed;
}

} // namespace

PackedKeysValues packing_for(const Problem &p) {
    PackedKeysValues packed;
    packed.keys = packed_width(p.d);
    packed.values = packed_width(p.d_v);
    packed.key_tiles = ceil_div(p.nk, kKeyTile);
    return packed;
}

void PackedKeysValues::read_key_row(int64_t bh, int64_t key, float *dst) const {
    const float *tile = key_row_tile(bh, key / kKeyTile);
    const int64_t j = key % kKeyTile;
    for (int64_t t = 0; t < keys.width; ++t)
        dst[t] = tile[(t / kPanelWidth) * row_panel + j * kPanelWidth + t % kPanelWidth];
}

void pack_keys_values(const Problem &p, const PackedKeysValues &packed, int threads) {
    const int64_t key_tiles = packed.key_tiles;
    const int64_t tiles = p.b * p.hk * key_tiles;
    const bool keys_wanted = packed.keys_transposed || packed.key_rows || packed.key_norms;
    const bool values_wanted = packed.values_transposed || packed.value_rows;
    parallel_for(tiles, threads, [&](int64_t item, int) {
        const int64_t bh = item / key_tiles, tile = item % key_tiles;
        const int64_t batch = bh / p.hk, kv_head = bh % p.hk;
        const int64_t first = tile * kKeyTile, count = std::min<int64_t>(kKeyTile, p.nk - first);
        // One row of K and one of V, zero-padded to whole panels; rows past nk stay all zero.
        std::vector<float> key_row(static_cast<size_t>(packed.keys.panels * kPanelWidth));
        std::vector<float> value_row(static_cast<size_t>(packed.values.panels * kPanelWidth));
        std::vector<float> norms(static_cast<size_t>(p.groups));
        // Scatters a row of `shape` into a transposed and a row tile. Plain copies without
        // per-element tests: the packing runs on every call and counted at short sequences.
        auto scatter = [&](const PackedWidth &shape, const std::vector<float> &row, int64_t j, float *transposed,
                           float *rows) {
            if (transposed) {
                float *column = transposed + (j / kPanelWidth) * shape.transposed_panel() + j % kPanelWidth;
                for (int64_t t = 0; t < shape.width; ++t) column[t * kPanelWidth] = row[size_t(t)];
            }
            if (rows) {
                for (int64_t panel = 0; panel < shape.panels; ++panel)
                    std::memcpy(rows + panel * PackedWidth::row_panel + j * kPanelWidth,
                                row.data() + panel * kPanelWidth, kPanelWidth * sizeof(float));
            }
        };
        auto offset = [](float *base, int64_t size, int64_t index) { return base ? base + index * size : nullptr; };
        float *keys_t = offset(packed.keys_transposed, packed.keys.transposed_tile_size(), item);
        float *values_t = offset(packed.values_transposed, packed.values.transposed_tile_size(), item);
        float *key_rows = offset(packed.key_rows, packed.keys.row_tile_size(), item);
        float *value_rows = offset(packed.value_rows, packed.values.row_tile_size(), item);
        for (int64_t j = 0; j < kKeyTile; ++j) {
            const int64_t key = first + j;
            // A key the mask hides is packed as zeros (and a norm of 0): whatever it holds,
            // NaN and inf included, it then adds nothing to any product.
            const bool zero = j >= count || masked_out(p, batch, key);
            if (keys_wanted) {
                if (zero) {
                    std::fill(key_row.begin(), key_row.end(), 0.f);
                    std::fill(norms.begin(), norms.end(), 0.f);
                } else {
                    load_normalized_row(p, p.k, batch, kv_head, key, p.l2norm, packed.keys.padded, key_row.data(),
                                        norms.data());
                }
                if (packed.key_norms && p.l2norm && j < count)
                    std::copy(norms.begin(), norms.end(), packed.key_norms + (bh * p.nk + key) * p.groups);
                scatter(packed.keys, key_row, j, keys_t, key_rows);
            }
            if (values_wanted) {
                if (zero)
                    std::fill(value_row.begin(), value_row.end(), 0.f);
                else
                    load_padded_row(p.v, batch, kv_head, key, p.d_v, packed.values.padded, value_row.data());
                scatter(packed.values, value_row, j, values_t, value_rows);
            }
        }
    });
}

} // namespace cpu
} // namespace fcsa
