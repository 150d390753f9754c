// backward.cpp: the CPU backward, fused and tiled like the forward, in one pass over
// the keys: with P = exp(s - lse) recomputed per tile, dS = P * (dP - delta) where
// delta_i = <dO_i, O_i>, and dq^ = scale dS k^, dk^ = scale dS^T q^, dv = P^T dO.
//
// The logits are formed exactly as the forward forms them, (scale q^) k^ + bias through
// the same tile kernel, so that against the forward's lse (log of the row sum plus the
// row's offset, at least the largest logit) P <= 1 holds by construction, for any
// scale: a logit formed another way differs by rounding at the logits' size, which
// exp turns into an error without bound (inf, then NaN) once the logits are large.
//
// A work item owns one kv head of one batch (and a range of its key tiles, when there
// are few kv heads): it visits every query head that shares that kv head, so dk and
// dv are summed inside the item, in a fixed order, with no atomics. The item walks its
// keys in chunks small enough that their dk and dv accumulators stay in the core's
// cache, and for each chunk every query tile and every head; dq^ is carried from chunk
// to chunk in a float32 buffer, and the key ranges' dq^ are summed by a last pass in a
// fixed order; likewise dscale. dbias is summed per item in a buffer of the thread's,
// a unit at a time, and the items that share dbias elements (a bias broadcast over
// batches, heads or split keys) add their units into one float32 accumulator in a
// fixed order, each waiting for its turn (DbiasLayout). Every sum has one order,
// whatever the thread count: bitwise reproducible.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <thread>
#include <vector>

#include "backends.h"
#include "cpu/common.h"
#include "cpu/numeric.h"
#include "cpu/parallel.h"
#include "cpu/tile_kernels.h"

namespace fcsa {
namespace {

using namespace cpu;

// Enough items to keep a many-core machine busy when there are few kv heads; the
// partial dq buffers this costs are kept below a fixed budget.
constexpr int64_t kTargetItems = 16;
constexpr int64_t kPartialBudgetBytes = int64_t(256) << 20;
// The dk and dv accumulators of one key chunk: about this many bytes, to stay in L2.
constexpr int64_t kChunkBytes = int64_t(256) << 10;

// dbias. An item's contributions to the dbias elements (summed over the heads, query
// rows and keys the bias broadcasts over) gather in a buffer of its thread, one unit
// at a time: a unit holds the elements the item is done with at one point of its walk
// (a query tile of a key chunk; a key chunk, when the bias broadcasts over the rows;
// the whole item, when it broadcasts over the keys). The unit is then written to dbias,
// or, when other items share its elements, added into `accumulator` in the order of
// the items' ranks: the item of rank r waits until rank r - 1 has added its unit (the
// units of a group come in the same order in every item). Items are handed out in
// increasing order, so the item a waiting one waits for is running or done: no
// deadlock, and no workspace that grows with the number of items sharing the bias.
struct DbiasLayout {
    bool present = false;
    // The dims the bias broadcasts over.
    bool over_batch = false, over_heads = false, over_rows = false, over_keys = false;
    // Which of the item's coordinates (batch, kv head, key split) vary inside a group
    // of items that add to the same elements, and the group's size.
    bool share_batch = false, share_heads = false, share_splits = false;
    int64_t group_size = 1;
    int64_t units = 1;      // units per item, each with its own turn
    int64_t query_tiles = 1;
    // The unit buffer: [unit_heads][unit_rows][unit_cols].
    int64_t unit_heads = 1, unit_rows = 1, unit_cols = 1;
    float *accumulator = nullptr; // float32, one per dbias element, when group_size > 1

    int64_t unit_size() const { return unit_heads * unit_rows * unit_cols; }
};

struct BackwardLayout {
    PackedKeysValues packed;
    int64_t key_splits = 1;      // key ranges per kv head
    int64_t tiles_per_split = 0; // key tiles per range
    int64_t tiles_per_chunk = 1; // key tiles per chunk
    // dq^ (without the scale) summed over the key chunks seen so far, per key range:
    // [split][b][h][nq][padded d]; absent when every query row sees all its keys at once.
    float *dq_partial = nullptr;
    DbiasLayout dbias;
    float *dscale_partial = nullptr; // [b][hk][split][heads_per_kv]
    size_t bytes = 0;
};

BackwardLayout backward_layout(const Problem &p, void *workspace) {
    BackwardLayout layout;
    WorkspaceCarver carver(workspace);
    PackedKeysValues &packed = layout.packed;
    packed = packing_for(p);
    const int64_t tiles = p.b * p.hk * packed.key_tiles;
    packed.keys_transposed = carver.take(tiles * packed.keys.transposed_tile_size());
    packed.key_rows = carver.take(tiles * packed.keys.row_tile_size());
    packed.key_norms = carver.take(p.l2norm ? p.b * p.hk * p.nk * p.groups : 0);
    packed.values_transposed = carver.take(tiles * packed.values.transposed_tile_size());

    const int64_t dq_floats = p.b * p.h * p.nq * packed.keys.padded;
    int64_t splits = 1;
    if (p.b * p.hk < kTargetItems) splits = ceil_div(kTargetItems, std::max<int64_t>(p.b * p.hk, 1));
    splits = std::min(splits, std::max<int64_t>(packed.key_tiles, 1));
    if (dq_floats > 0) splits = std::min(splits, std::max<int64_t>(1, kPartialBudgetBytes / (dq_floats * 4)));
    layout.tiles_per_split = ceil_div(packed.key_tiles, splits);
    layout.key_splits = packed.key_tiles > 0 ? ceil_div(packed.key_tiles, layout.tiles_per_split) : 1;
    layout.tiles_per_chunk =
        std::max<int64_t>(1, kChunkBytes / (kKeyTile * (packed.keys.padded + packed.values.padded) * 4));
    if (layout.tiles_per_split > layout.tiles_per_chunk || layout.key_splits > 1)
        layout.dq_partial = carver.take(layout.key_splits * dq_floats);

    if (p.dbias.present()) {
        const int64_t *shape = p.bias.shape;
        DbiasLayout &db = layout.dbias;
        db.present = true;
        db.over_batch = shape[0] == 1;
        db.over_heads = shape[1] == 1;
        db.over_rows = shape[2] == 1;
        db.over_keys = shape[3] == 1;
        db.share_batch = db.over_batch && p.b > 1;
        db.share_heads = db.over_heads && p.hk > 1;
        db.share_splits = db.over_keys && layout.key_splits > 1;
        db.group_size = (db.share_batch ? p.b : 1) * (db.share_heads ? p.hk : 1) *
                        (db.share_splits ? layout.key_splits : 1);
        const int64_t chunks = std::max<int64_t>(1, ceil_div(layout.tiles_per_split, layout.tiles_per_chunk));
        db.query_tiles = std::max<int64_t>(1, ceil_div(p.nq, kQueryTile));
        db.units = db.over_keys ? 1 : chunks * (db.over_rows ? 1 : db.query_tiles);
        db.unit_heads = db.over_heads ? 1 : p.heads_per_kv();
        db.unit_rows = db.over_rows ? 1 : db.over_keys ? std::max<int64_t>(p.nq, 1) : kQueryTile;
        db.unit_cols = db.over_keys ? 1 : std::min(layout.tiles_per_chunk, layout.tiles_per_split) * kKeyTile;
        if (db.group_size > 1) db.accumulator = carver.take(shape[0] * shape[1] * shape[2] * shape[3]);
    }
    if (p.dscale.present())
        layout.dscale_partial = carver.take(p.b * p.hk * layout.key_splits * p.heads_per_kv());
    layout.bytes = carver.bytes_needed();
    return layout;
}

struct BackwardScratch {
    // row: a row of out (d_v) or of the l2norm backward (d).
    BackwardScratch(int64_t padded_d, int64_t padded_d_v, int64_t chunk_keys, int32_t groups,
                    int64_t dbias_unit_size)
        : queries(size_t(kQueryTile * padded_d)), scaled_queries(size_t(kQueryTile * padded_d)),
          dout(size_t(kQueryTile * padded_d_v)), dq(size_t(kQueryTile * padded_d)),
          cos(size_t(kQueryTile * kKeyTile)), probs(size_t(kQueryTile * kKeyTile)),
          dprobs(size_t(kQueryTile * kKeyTile)), dk(size_t(chunk_keys * padded_d)),
          dv(size_t(chunk_keys * padded_d_v)), row(size_t(std::max(padded_d, padded_d_v))),
          key_hat(size_t(padded_d)),
          query_norms(size_t(kQueryTile * groups)), lse(kQueryTile), delta(kQueryTile), ds_dot_cos(kQueryTile),
          key_bias(kKeyTile), bias_row(kKeyTile), limit(kQueryTile), dbias_unit(size_t(dbias_unit_size)) {}
    FloatBuffer queries, scaled_queries, dout, dq, cos, probs, dprobs, dk, dv, row, key_hat, query_norms;
    std::vector<float> lse, delta, ds_dot_cos, key_bias, bias_row;
    std::vector<int> limit;
    FloatBuffer dbias_unit;
};

// The dbias unit an item is filling: its buffer and the first row and key it covers.
struct DbiasUnit {
    float *data;
    int64_t first_row, first_key;
};

// Key tiles [first_tile, end_tile) and their keys [first_key, end_key).
struct KeyRange {
    int64_t first_tile, end_tile, first_key, end_key;
};

KeyRange tile_range(const Problem &p, int64_t first_tile, int64_t end_tile) {
    return {first_tile, end_tile, std::min(first_tile * kKeyTile, p.nk), std::min(end_tile * kKeyTile, p.nk)};
}

KeyRange split_range(const Problem &p, const BackwardLayout &layout, int64_t split) {
    const int64_t first = std::min(split * layout.tiles_per_split, layout.packed.key_tiles);
    return tile_range(p, first, std::min(first + layout.tiles_per_split, layout.packed.key_tiles));
}

float *dq_partial_row(const Problem &p, const BackwardLayout &layout, int64_t split, int64_t batch, int64_t head,
                      int64_t row) {
    return layout.dq_partial + (((split * p.b + batch) * p.h + head) * p.nq + row) * layout.packed.keys.padded;
}

// Writes dq of one row from dq^ (without the scale) and q^.
void store_dq_row(const Problem &p, int64_t batch, int64_t head, int64_t row, float scale, float *dq_hat,
                  const float *q_hat, const float *q_norms, float *scratch) {
    for (int64_t t = 0; t < p.d; ++t) dq_hat[t] *= scale;
    const float *result = dq_hat;
    if (p.l2norm) {
        l2norm_backward_row(q_hat, dq_hat, q_norms, p.d, p.groups, scratch);
        result = scratch;
    }
    store_row(p.dq.data, p.dq.offset(batch, head, row, 0), p.dq.dtype, p.d, result);
}

// Adds a dS tile (rows x keys of head `g` of the item's kv head) into the dbias unit,
// summed over the dims the bias broadcasts over, in the order of rows and keys.
void add_dbias_tile(const DbiasLayout &db, const DbiasUnit &unit, int64_t g, int64_t first_row, int rows,
                    int64_t first_key, int keys, const float *ds) {
    float *slice = unit.data + (db.over_heads ? 0 : g) * db.unit_rows * db.unit_cols;
    for (int r = 0; r < rows; ++r) {
        float *target = slice + (db.over_rows ? 0 : first_row + r - unit.first_row) * db.unit_cols;
        const float *ds_row = ds + r * kKeyTile;
        if (db.over_keys) {
            float sum = target[0];
            for (int j = 0; j < keys; ++j) sum += ds_row[j];
            target[0] = sum;
        } else {
            target += first_key - unit.first_key;
            for (int j = 0; j < keys; ++j) target[j] += ds_row[j];
        }
    }
}

// Writes (or adds, in its turn) an item's dbias unit: `rows` rows from unit.first_row
// and `keys` keys from unit.first_key (1 each along a broadcast dim); `turn_index` is
// the unit's place among the item's units.
void flush_dbias_unit(const Problem &p, const BackwardLayout &layout, std::atomic<int64_t> *turns, int64_t item,
                      int64_t turn_index, const DbiasUnit &unit, int64_t rows, int64_t keys) {
    const DbiasLayout &db = layout.dbias;
    const int64_t split = item % layout.key_splits, bh = item / layout.key_splits;
    const int64_t batch = bh / p.hk, kv_head = bh % p.hk;
    const int64_t *shape = p.bias.shape;
    // Rank inside the group: the shared coordinates in the order of the item index.
    const int64_t rank = ((db.share_batch ? batch : 0) * (db.share_heads ? p.hk : 1) + (db.share_heads ? kv_head : 0)) *
                             (db.share_splits ? layout.key_splits : 1) +
                         (db.share_splits ? split : 0);
    const int64_t group = ((db.share_batch ? 0 : batch) * (db.share_heads ? 1 : p.hk) + (db.share_heads ? 0 : kv_head)) *
                              (db.share_splits ? 1 : layout.key_splits) +
                          (db.share_splits ? 0 : split);
    std::atomic<int64_t> *turn = db.group_size > 1 ? &turns[group * db.units + turn_index] : nullptr;
    if (turn)
        while (turn->load(std::memory_order_acquire) != rank) std::this_thread::yield();
    const bool last = rank == db.group_size - 1;
    for (int64_t h = 0; h < db.unit_heads; ++h) {
        const int64_t i0 = db.over_batch ? 0 : batch, i1 = db.over_heads ? 0 : kv_head * p.heads_per_kv() + h;
        for (int64_t r = 0; r < rows; ++r) {
            const int64_t i2 = db.over_rows ? 0 : unit.first_row + r, i3 = db.over_keys ? 0 : unit.first_key;
            float *values = unit.data + (h * db.unit_rows + r) * db.unit_cols;
            float *sums = db.accumulator ? db.accumulator + ((i0 * shape[1] + i1) * shape[2] + i2) * shape[3] + i3
                                         : nullptr;
            if (rank > 0)
                for (int64_t j = 0; j < keys; ++j) values[j] = sums[j] + values[j];
            if (last) // the keys of a dbias row are contiguous (or there is one)
                store_row(p.dbias.data, p.dbias.offset(i0, i1, i2, i3), p.dbias.dtype, keys, values);
            else
                std::copy_n(values, keys, sums);
        }
    }
    if (turn) turn->store(rank + 1, std::memory_order_release);
}

// Where one query tile's visit to a key chunk stands among its visits.
struct Visit {
    int64_t split;
    bool first_chunk; // the first chunk of the split: dq^ starts at zero
    bool last_chunk;  // the last one: with a single split, dq is written
};

// One query tile of one head against one key chunk; dS goes into `unit` when dbias is
// wanted.
void backward_query_tile(const Problem &p, const BackwardLayout &layout, const TileKernels &kernels, int64_t batch,
                         int64_t head, const KeyRange &chunk, Visit visit, int64_t first_row, BackwardScratch &s,
                         float *dscale_sum, const DbiasUnit *unit) {
    const int64_t d = p.d, padded_d = layout.packed.keys.padded;
    const int64_t d_v = p.d_v, padded_d_v = layout.packed.values.padded;
    const int rows = int(std::min<int64_t>(kQueryTile, p.nq - first_row));
    const int64_t kv_head = head / p.heads_per_kv();
    const int64_t bh = batch * p.hk + kv_head;
    const float scale = head_scale(p, head);
    const float infinity = std::numeric_limits<float>::infinity();

    // Causal: skip key tiles no row of this tile sees.
    int64_t end_tile = chunk.end_tile;
    if (p.causal) {
        const int64_t key_end = std::max<int64_t>(0, first_row + rows + p.causal_offset());
        end_tile = std::min(end_tile, ceil_div(key_end, kKeyTile));
    }
    const bool compute = end_tile > chunk.first_tile;
    const bool write_dq = visit.last_chunk && layout.key_splits == 1;
    const bool carried = layout.dq_partial != nullptr;
    float *dq = s.dq.data();
    if (!compute && !write_dq) {
        if (visit.first_chunk && carried)
            for (int r = 0; r < rows; ++r) {
                float *partial = dq_partial_row(p, layout, visit.split, batch, head, first_row + r);
                std::fill(partial, partial + padded_d, 0.f);
            }
        return;
    }

    float *queries = s.queries.data(), *scaled_queries = s.scaled_queries.data(), *dout = s.dout.data();
    for (int r = 0; r < rows; ++r) {
        const int64_t row_index = first_row + r;
        float *q_row = queries + r * padded_d;
        load_normalized_row(p, p.q, batch, head, row_index, p.l2norm, padded_d, q_row,
                            s.query_norms.data() + r * p.groups);
        float *dq_row = dq + r * padded_d;
        if (carried && !visit.first_chunk)
            std::copy_n(dq_partial_row(p, layout, visit.split, batch, head, row_index), padded_d, dq_row);
        else
            std::fill(dq_row, dq_row + padded_d, 0.f);
        if (!compute) continue;
        for (int64_t t = 0; t < padded_d; ++t) scaled_queries[r * padded_d + t] = q_row[t] * scale;
        float *do_row = dout + r * padded_d_v;
        load_padded_row(p.dout, batch, head, row_index, d_v, padded_d_v, do_row);
        load_padded_row(p.out, batch, head, row_index, d_v, padded_d_v, s.row.data());
        float delta = 0.f;
        for (int64_t t = 0; t < d_v; ++t) delta += do_row[t] * s.row[size_t(t)];
        s.delta[size_t(r)] = delta;
        const float lse = static_cast<const float *>(p.lse.data)[p.lse.offset(batch, head, row_index, 0)];
        // A row that saw no key (lse = -inf) gets offset +inf: P = 0, no gradient.
        s.lse[size_t(r)] = lse == -infinity ? infinity : lse;
    }
    std::fill(s.ds_dot_cos.begin(), s.ds_dot_cos.end(), 0.f);

    // dscale sums dS against the cosines q^ k^. Where the scale allows, they are read off
    // the logits before the bias, (scale q^) k^ = scale cos, and the sum is divided by
    // the scale at the end; near 0 or float32's limits, scale q^ or dS * logit would
    // lose precision or overflow, and the cosines get a product of their own.
    const bool cos_from_logits = dscale_sum && std::fabs(scale) >= 0x1p-60f && std::fabs(scale) <= 0x1p60f;
    float *cos = s.cos.data(), *probs = s.probs.data(), *dprobs = s.dprobs.data();
    float *logits = cos_from_logits ? cos : probs;
    const PackedKeysValues &packed = layout.packed;
    for (int64_t tile = chunk.first_tile; tile < end_tile; ++tile) {
        const int64_t first_key = tile * kKeyTile;
        const int keys = int(std::min<int64_t>(kKeyTile, p.nk - first_key));
        const float *keys_transposed = packed.transposed_keys(bh, tile);
        // The logits as the forward forms them (see the file comment), then P.
        kernels.matmul(logits, kKeyTile, scaled_queries, padded_d, 1, keys_transposed, packed.ldb,
                       packed.keys.transposed_panel(), rows, kKeyTile, int(d), false);
        if (p.bias.present())
            add_bias_tile(p, batch, head, first_row, rows, first_key, keys, logits, probs, s.bias_row.data());
        const float *key_bias = nullptr;
        if (p.mask.present()) {
            fill_key_bias(p, batch, first_key, keys, s.key_bias.data());
            key_bias = s.key_bias.data();
        }
        for (int r = 0; r < rows; ++r) s.limit[size_t(r)] = visible_keys(p, first_row + r, first_key, keys);
        kernels.exp_rows(probs, p.bias.present() ? probs : logits, kKeyTile, rows, keys, 1.f, s.lse.data(),
                         s.limit.data(), key_bias, nullptr);
        if (dscale_sum && !cos_from_logits)
            kernels.matmul(cos, kKeyTile, queries, padded_d, 1, keys_transposed, packed.ldb,
                           packed.keys.transposed_panel(), rows, kKeyTile, int(d), false);
        // dP = dO V^T, then dS = P (dP - delta) in place.
        kernels.matmul(dprobs, kKeyTile, dout, padded_d_v, 1, packed.transposed_values(bh, tile), packed.ldb,
                       packed.values.transposed_panel(), rows, kKeyTile, int(d_v), false);
        kernels.softmax_grad_rows(dprobs, probs, dscale_sum ? cos : nullptr, kKeyTile, rows, keys, s.delta.data(),
                                  dscale_sum ? s.ds_dot_cos.data() : nullptr);
        if (unit) add_dbias_tile(layout.dbias, *unit, head % p.heads_per_kv(), first_row, rows, first_key, keys, dprobs);
        const int64_t chunk_key = first_key - chunk.first_key;
        // dv += P^T dO ; dq^ += dS k^ ; dk^ += dS^T (scale q^)
        kernels.matmul(s.dv.data() + chunk_key * padded_d_v, padded_d_v, probs, 1, kKeyTile, dout, padded_d_v,
                       kPanelWidth, keys, int(padded_d_v), rows, true);
        // dq^ over the keys the last row sees; row by row where a key hidden from some
        // rows holds a non-finite value (as the forward's P V).
        const float *key_rows = packed.key_row_tile(bh, tile);
        const int depth = s.limit[size_t(rows - 1)];
        if (rows_need_own_depth(s.limit.data(), rows, key_rows, packed.ldb, packed.row_panel, d)) {
            for (int r = 0; r < rows; ++r)
                if (s.limit[size_t(r)] > 0)
                    kernels.matmul(dq + r * padded_d, padded_d, dprobs + r * kKeyTile, kKeyTile, 1, key_rows,
                                   packed.ldb, packed.row_panel, 1, int(padded_d), s.limit[size_t(r)], true);
        } else if (depth > 0) {
            kernels.matmul(dq, padded_d, dprobs, kKeyTile, 1, key_rows, packed.ldb, packed.row_panel, rows,
                           int(padded_d), depth, true);
        }
        kernels.matmul(s.dk.data() + chunk_key * padded_d, padded_d, dprobs, 1, kKeyTile, scaled_queries, padded_d,
                       kPanelWidth, keys, int(padded_d), rows, true);
    }
    if (dscale_sum && compute)
        for (int r = 0; r < rows; ++r)
            *dscale_sum += cos_from_logits ? s.ds_dot_cos[size_t(r)] / scale : s.ds_dot_cos[size_t(r)];

    for (int r = 0; r < rows; ++r) {
        float *dq_row = dq + r * padded_d;
        if (write_dq)
            store_dq_row(p, batch, head, first_row + r, scale, dq_row, queries + r * padded_d,
                         s.query_norms.data() + r * p.groups, s.row.data());
        else
            std::copy_n(dq_row, padded_d, dq_partial_row(p, layout, visit.split, batch, head, first_row + r));
    }
}

// One kv head of one batch, one key range: chunk by chunk, every query tile, every
// query head sharing the kv head; then the chunk's dk and dv are complete and written.
void backward_item(const Problem &p, const BackwardLayout &layout, const TileKernels &kernels, int64_t item,
                   BackwardScratch &s, std::atomic<int64_t> *dbias_turns) {
    const int64_t split = item % layout.key_splits;
    const int64_t bh = item / layout.key_splits;
    const int64_t batch = bh / p.hk, kv_head = bh % p.hk;
    const KeyRange range = split_range(p, layout, split);
    const int64_t padded_d = layout.packed.keys.padded, padded_d_v = layout.packed.values.padded;
    const int64_t heads_per_kv = p.heads_per_kv();
    const int64_t query_tiles = ceil_div(p.nq, kQueryTile);

    float *dscale_sums = layout.dscale_partial ? layout.dscale_partial + (bh * layout.key_splits + split) * heads_per_kv
                                               : nullptr;
    if (dscale_sums) std::fill(dscale_sums, dscale_sums + heads_per_kv, 0.f);

    // The dbias unit: per query tile of a chunk, per chunk (bias broadcast over the rows)
    // or for the whole item (over the keys).
    const DbiasLayout &db = layout.dbias;
    DbiasUnit unit = {s.dbias_unit.data(), 0, 0};
    const DbiasUnit *dbias_unit = db.present ? &unit : nullptr;
    const bool unit_per_tile = db.present && !db.over_keys && !db.over_rows;
    const bool unit_per_chunk = db.present && !db.over_keys && db.over_rows;
    auto clear_unit = [&] { std::fill(unit.data, unit.data + db.unit_size(), 0.f); };
    if (db.present && db.over_keys) clear_unit();

    // An empty range still visits once, so that dq is written (zero) and nothing is missed.
    int64_t first_tile = range.first_tile;
    int64_t chunk_index = 0;
    do {
        const KeyRange chunk = tile_range(p, first_tile, std::min(first_tile + layout.tiles_per_chunk, range.end_tile));
        const Visit visit = {split, first_tile == range.first_tile, chunk.end_tile >= range.end_tile};
        const int64_t keys = chunk.end_key - chunk.first_key;
        std::fill(s.dk.data(), s.dk.data() + keys * padded_d, 0.f);
        std::fill(s.dv.data(), s.dv.data() + keys * padded_d_v, 0.f);
        unit.first_key = chunk.first_key;
        if (unit_per_chunk) clear_unit();
        for (int64_t tile = 0; tile < query_tiles; ++tile) {
            const int64_t first_row = tile * kQueryTile;
            if (unit_per_tile) {
                unit.first_row = first_row;
                clear_unit();
            }
            for (int64_t g = 0; g < heads_per_kv; ++g)
                backward_query_tile(p, layout, kernels, batch, kv_head * heads_per_kv + g, chunk, visit, first_row, s,
                                    dscale_sums ? dscale_sums + g : nullptr, dbias_unit);
            if (unit_per_tile)
                flush_dbias_unit(p, layout, dbias_turns, item, chunk_index * db.query_tiles + tile, unit,
                                 std::min<int64_t>(kQueryTile, p.nq - first_row), keys);
        }
        if (unit_per_chunk) flush_dbias_unit(p, layout, dbias_turns, item, chunk_index, unit, 1, keys);
        for (int64_t j = 0; j < keys; ++j) {
            const int64_t key = chunk.first_key + j;
            const float *dk_hat = s.dk.data() + j * padded_d;
            const float *result = dk_hat;
            if (p.l2norm) {
                layout.packed.read_key_row(bh, key, s.key_hat.data());
                l2norm_backward_row(s.key_hat.data(), dk_hat, layout.packed.key_norms + (bh * p.nk + key) * p.groups,
                                    p.d, p.groups, s.row.data());
                result = s.row.data();
            }
            store_row(p.dk.data, p.dk.offset(batch, kv_head, key, 0), p.dk.dtype, p.d, result);
            store_row(p.dv.data, p.dv.offset(batch, kv_head, key, 0), p.dv.dtype, p.d_v,
                      s.dv.data() + j * padded_d_v);
        }
        first_tile = chunk.end_tile;
        ++chunk_index;
    } while (first_tile < range.end_tile);
    if (db.present && db.over_keys) {
        unit.first_row = unit.first_key = 0;
        flush_dbias_unit(p, layout, dbias_turns, item, 0, unit, db.over_rows ? 1 : p.nq, 1);
    }
}

// dq when the keys were split: the ranges' dq^ in split order, then scale and l2norm.
void finish_dq_row(const Problem &p, const BackwardLayout &layout, int64_t item, std::vector<float> &sum,
                   std::vector<float> &q_hat, std::vector<float> &norms, std::vector<float> &dq) {
    const int64_t bh = item / p.nq, row = item % p.nq;
    const int64_t batch = bh / p.h, head = bh % p.h;
    std::fill(sum.begin(), sum.end(), 0.f);
    for (int64_t split = 0; split < layout.key_splits; ++split) {
        const float *partial = dq_partial_row(p, layout, split, batch, head, row);
        for (int64_t t = 0; t < p.d; ++t) sum[size_t(t)] += partial[t];
    }
    if (p.l2norm)
        load_normalized_row(p, p.q, batch, head, row, true, layout.packed.keys.padded, q_hat.data(), norms.data());
    store_dq_row(p, batch, head, row, head_scale(p, head), sum.data(), q_hat.data(), norms.data(), dq.data());
}

void finish_dscale(const Problem &p, const BackwardLayout &layout) {
    const int64_t heads_per_kv = p.heads_per_kv();
    float *dscale = static_cast<float *>(p.dscale.data);
    // dscale is (h,) or a single value (shape () or (1,) with one head).
    const bool single = p.dscale.shape[1] == 1;
    float total = 0.f;
    for (int64_t head = 0; head < p.h; ++head) {
        const int64_t kv_head = head / heads_per_kv, g = head % heads_per_kv;
        float head_total = 0.f;
        for (int64_t batch = 0; batch < p.b; ++batch)
            for (int64_t split = 0; split < layout.key_splits; ++split)
                head_total +=
                    layout.dscale_partial[((batch * p.hk + kv_head) * layout.key_splits + split) * heads_per_kv + g];
        if (!single) dscale[p.dscale.offset(0, head, 0, 0)] = head_total;
        total += head_total;
    }
    if (single) dscale[0] = total;
}

} // namespace

size_t cpu_backward_workspace(const Problem &p) { return backward_layout(p, nullptr).bytes; }

fcsa_status cpu_backward(const Problem &p, void *workspace) {
    const BackwardLayout layout = backward_layout(p, workspace);
    const TileKernels &kernels = tile_kernels();
    const int64_t items = p.b * p.hk * layout.key_splits;
    const int threads = resolve_thread_count(p.num_threads, std::max<int64_t>(items, 1));
    const int64_t padded_d = layout.packed.keys.padded;

    pack_keys_values(p, layout.packed, threads);

    const int64_t chunk_keys = std::min<int64_t>(layout.tiles_per_chunk * kKeyTile, std::max<int64_t>(p.nk, 1));
    const DbiasLayout &db = layout.dbias;
    std::vector<std::unique_ptr<BackwardScratch>> scratch(static_cast<size_t>(threads));
    for (auto &s : scratch)
        s.reset(new BackwardScratch(padded_d, layout.packed.values.padded, chunk_keys, p.groups,
                                    db.present ? db.unit_size() : 0));
    // One turn counter per unit of each group of items that share dbias elements.
    std::vector<std::atomic<int64_t>> dbias_turns(size_t(db.group_size > 1 ? items / db.group_size * db.units : 0));
    for (std::atomic<int64_t> &turn : dbias_turns) turn.store(0, std::memory_order_relaxed);
    // Nothing in an item throws (its memory is all allocated above), so no item waits
    // for a turn that an item stopped by an exception would never give.
    parallel_for(items, threads, [&](int64_t item, int worker) {
        backward_item(p, layout, kernels, item, *scratch[size_t(worker)], dbias_turns.data());
    });

    if (layout.key_splits > 1) {
        const int64_t rows = p.b * p.h * p.nq;
        const int row_threads = resolve_thread_count(p.num_threads, rows);
        std::vector<std::vector<float>> sums(static_cast<size_t>(row_threads)), q_hats(sums.size()),
            norms(sums.size()), dqs(sums.size());
        for (int w = 0; w < row_threads; ++w) {
            sums[size_t(w)].resize(size_t(padded_d));
            q_hats[size_t(w)].resize(size_t(padded_d));
            norms[size_t(w)].resize(size_t(p.groups));
            dqs[size_t(w)].resize(size_t(padded_d));
        }
        parallel_for(rows, row_threads, [&](int64_t row, int worker) {
            finish_dq_row(p, layout, row, sums[size_t(worker)], q_hats[size_t(worker)], norms[size_t(worker)],
                           dqs[size_t(worker)]);
        });
    }
    if (layout.dscale_partial) finish_dscale(p, layout);
    return FCSA_STATUS_SUCCESS;
}

} // namespace fcsa
