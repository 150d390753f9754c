// forward.cpp: the CPU forward. Fused and tiled: one work item is a tile of query rows
// of one head; it streams over the key tiles, keeping only a (rows x keys) logit tile
// and a (rows x d_v) output accumulator. K (normalized) and V are converted to float32
// once per call into the workspace, in the layouts the tile kernels read (V only when
// it is not float32 already: packing is a fixed cost that shows at short sequences).
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "backends.h"
#include "cpu/common.h"
#include "cpu/numeric.h"
#include "cpu/parallel.h"
#include "cpu/tile_kernels.h"

namespace fcsa {
namespace {

using namespace cpu;

// Query rows per forward tile, at most: large tiles read each packed K tile fewer times.
// The tiles of a call are made equal (query_tile_rows), so none is a thin remainder.
constexpr int kForwardQueryTile = 192;

// Equal tiles of at most kForwardQueryTile rows, rounded up to a multiple of 6 (the
// AVX2 matmul's register block) so no band of a tile runs a partly empty block.
int64_t query_tile_rows(int64_t nq) {
    const int64_t tiles = ceil_div(nq, kForwardQueryTile);
    return std::min<int64_t>(kForwardQueryTile, round_up(ceil_div(nq, tiles), 6));
}

struct ForwardLayout {
    PackedKeysValues packed;
    // V is read in place (no packed copy) when it already is what P V reads: float32
    // rows of whole vectors (d_v % 8 == 0, so no column past d_v is touched), and no mask
    // (packing zeroes the values of hidden keys, which may hold NaN or inf).
    bool values_in_place = false;
    size_t bytes = 0;
};

ForwardLayout forward_layout(const Problem &p, void *workspace) {
    ForwardLayout layout;
    WorkspaceCarver carver(workspace);
    PackedKeysValues &packed = layout.packed;
    packed = packing_for(p);
    const int64_t tiles = p.b * p.hk * packed.key_tiles;
    packed.keys_transposed = carver.take(tiles * packed.keys.transposed_tile_size());
    layout.values_in_place = p.v.dtype == FCSA_DTYPE_FLOAT32 && p.d_v % 8 == 0 && !p.mask.present();
    if (!layout.values_in_place) packed.value_rows = carver.take(tiles * packed.values.row_tile_size());
    layout.bytes = carver.bytes_needed();
    return layout;
}

// Scratch of one worker thread, reused across its work items.
struct ForwardScratch {
    ForwardScratch(int64_t padded_d, int64_t padded_d_v)
        : queries(size_t(kForwardQueryTile * padded_d)), logits(size_t(kForwardQueryTile * kKeyTile)),
          output(size_t(kForwardQueryTile * padded_d_v)), row_sum(kForwardQueryTile), row_max(kForwardQueryTile),
          tile_max(kForwardQueryTile), offset(kForwardQueryTile), rescale(kForwardQueryTile), key_bias(kKeyTile),
          bias_row(kKeyTile), limit(kForwardQueryTile) {}
    FloatBuffer queries, logits, output;
    std::vector<float> row_sum, row_max, tile_max, offset, rescale, key_bias, bias_row;
    std::vector<int> limit;
};

void forward_tile(const Problem &p, const ForwardLayout &layout, const TileKernels &kernels, int64_t batch,
                  int64_t head, int64_t first_row, int64_t tile_rows, ForwardScratch &scratch) {
    const int64_t d = p.d, padded_d = layout.packed.keys.padded;
    const int64_t d_v = p.d_v, padded_d_v = layout.packed.values.padded;
    const int rows = int(std::min<int64_t>(tile_rows, p.nq - first_row));
    const int64_t kv_head = head / p.heads_per_kv();
    const int64_t bh = batch * p.hk + kv_head;
    const float scale = head_scale(p, head);
    const float fixed_offset = constant_offset(p, scale);
    const bool running_max = fixed_offset < 0.f;
    const float infinity = std::numeric_limits<float>::infinity();

    // Queries: normalized, then scaled so that q . k is the logit.
    float *queries = scratch.queries.data();
    for (int r = 0; r < rows; ++r) {
        float *row = queries + r * padded_d;
        load_normalized_row(p, p.q, batch, head, first_row + r, p.l2norm, padded_d, row, nullptr);
        for (int64_t t = 0; t < d; ++t) row[t] *= scale;
    }

    float *output = scratch.output.data();
    std::fill(output, output + rows * padded_d_v, 0.f);
    std::fill(scratch.row_sum.begin(), scratch.row_sum.end(), 0.f);
    std::fill(scratch.row_max.begin(), scratch.row_max.end(), -infinity);
    std::fill(scratch.offset.begin(), scratch.offset.end(), fixed_offset);

    // Causal: the last row sees keys up to last_row + (nk - nq); later tiles are skipped.
    int64_t key_end = p.nk;
    if (p.causal) key_end = std::min(key_end, std::max<int64_t>(0, first_row + rows + p.causal_offset()));
    const int64_t tiles = ceil_div(key_end, kKeyTile);

    float *logits = scratch.logits.data();
    for (int64_t tile = 0; tile < tiles; ++tile) {
        const int64_t first_key = tile * kKeyTile;
        const int keys = int(std::min<int64_t>(kKeyTile, p.nk - first_key));
        const PackedKeysValues &packed = layout.packed;
        kernels.matmul(logits, kKeyTile, queries, padded_d, 1, packed.transposed_keys(bh, tile), packed.ldb,
                       packed.keys.transposed_panel(), rows, kKeyTile, int(d), false);
        if (p.bias.present())
            add_bias_tile(p, batch, head, first_row, rows, first_key, keys, logits, logits, scratch.bias_row.data());
        const float *key_bias = nullptr;
        if (p.mask.present()) {
            fill_key_bias(p, batch, first_key, keys, scratch.key_bias.data());
            key_bias = scratch.key_bias.data();
        }
        for (int r = 0; r < rows; ++r)
            scratch.limit[size_t(r)] = visible_keys(p, first_row + r, first_key, keys);

        if (running_max) {
            kernels.max_rows(logits, kKeyTile, rows, keys, scratch.limit.data(), key_bias, scratch.tile_max.data());
            bool any_rescale = false;
            for (int r = 0; r < rows; ++r) {
                const float old_max = scratch.row_max[size_t(r)];
                const float new_max = std::max(old_max, scratch.tile_max[size_t(r)]);
                scratch.row_max[size_t(r)] = new_max;
                // A row that has seen nothing yet keeps offset +inf: all its weights are 0.
                scratch.offset[size_t(r)] = new_max == -infinity ? infinity : new_max;
                float factor = 1.f;
                if (new_max != old_max && old_max != -infinity) factor = std::exp(old_max - new_max);
                scratch.rescale[size_t(r)] = factor;
                scratch.row_sum[size_t(r)] *= factor;
                any_rescale |= factor != 1.f;
            }
            if (any_rescale) kernels.scale_rows(output, padded_d_v, rows, int(padded_d_v), scratch.rescale.data());
        }
        kernels.exp_rows(logits, logits, kKeyTile, rows, keys, 1.f, scratch.offset.data(), scratch.limit.data(),
                          key_bias, scratch.row_sum.data());
        // out += P V over the keys the last row sees: no key hidden from every row of the
        // tile enters the product, so none of its values (NaN or inf included) can meet
        // a weight of 0. Keys hidden from some rows only: see rows_need_own_depth.
        const float *values;
        int64_t ldv, v_panel;
        if (layout.values_in_place) {
            values = static_cast<const float *>(p.v.data) + p.v.offset(batch, kv_head, first_key, 0);
            ldv = p.v.stride[2];
            v_panel = kPanelWidth;
        } else {
            values = packed.value_row_tile(bh, tile);
            ldv = packed.ldb;
            v_panel = packed.row_panel;
        }
        const int depth = scratch.limit[size_t(rows - 1)];
        if (rows_need_own_depth(scratch.limit.data(), rows, values, ldv, v_panel, d_v)) {
            for (int r = 0; r < rows; ++r)
                if (scratch.limit[size_t(r)] > 0)
                    kernels.matmul(output + r * padded_d_v, padded_d_v, logits + r * kKeyTile, kKeyTile, 1, values,
                                   ldv, v_panel, 1, int(padded_d_v), scratch.limit[size_t(r)], true);
        } else if (depth > 0) {
            kernels.matmul(output, padded_d_v, logits, kKeyTile, 1, values, ldv, v_panel, rows, int(padded_d_v),
                           depth, true);
        }
    }

    // out = acc / sum; lse = log(sum) + offset. A row that saw no key: out 0, lse -inf.
    for (int r = 0; r < rows; ++r) {
        const float sum = scratch.row_sum[size_t(r)];
        float *row = output + r * padded_d_v;
        const float inverse = sum > 0.f ? 1.f / sum : 0.f;
        for (int64_t t = 0; t < d_v; ++t) row[t] *= inverse;
        store_row(p.out.data, p.out.offset(batch, head, first_row + r, 0), p.out.dtype, d_v, row);
        if (p.lse.present()) {
            // (a NaN sum, from a NaN logit, gives a NaN lse, as log-sum-exp does)
            const float lse = !(sum <= 0.f) ? std::log(sum) + scratch.offset[size_t(r)] : -infinity;
            static_cast<float *>(p.lse.data)[p.lse.offset(batch, head, first_row + r, 0)] = lse;
        }
    }
}

} // namespace

size_t cpu_forward_workspace(const Problem &p) { return forward_layout(p, nullptr).bytes; }

fcsa_status cpu_forward(const Problem &p, void *workspace) {
    const ForwardLayout layout = forward_layout(p, workspace);
    const TileKernels &kernels = tile_kernels();
    const int64_t tile_rows = query_tile_rows(p.nq);
    const int64_t query_tiles = ceil_div(p.nq, tile_rows);
    const int64_t items = p.b * p.h * query_tiles;
    if (items == 0) return FCSA_STATUS_SUCCESS;
    const int threads = resolve_thread_count(p.num_threads, items);

    pack_keys_values(p, layout.packed, threads);

    std::vector<std::unique_ptr<ForwardScratch>> scratch(static_cast<size_t>(threads));
    for (auto &s : scratch) s.reset(new ForwardScratch(layout.packed.keys.padded, layout.packed.values.padded));
    // Causal tiles near the end of the sequence cost the most: hand those out first.
    parallel_for(items, threads, [&](int64_t item, int worker) {
        const int64_t tile = query_tiles - 1 - item / (p.b * p.h);
        const int64_t bh = item % (p.b * p.h);
        forward_tile(p, layout, kernels, bh / p.h, bh % p.h, tile * tile_rows, tile_rows,
                     *scratch[size_t(worker)]);
    });
    return FCSA_STATUS_SUCCESS;
}

} // namespace fcsa
