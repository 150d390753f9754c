// kvcache.cpp: the CPU KV-cache attention, the reference for the CUDA decode path.
//
// First the new keys and values are copied into the cache (byte for byte: cache and new
// keys share a dtype). Then one work item per (batch, kv head) streams over that
// sequence's valid keys in tiles, for all the query rows of the query heads that share
// the kv head, with a running maximum (exact for any logits), and writes out and lse.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/common.h"
#include "cpu/numeric.h"
#include "cpu/parallel.h"
#include "kvcache.h"

namespace fcsa {
namespace {

using namespace cpu;

int64_t dtype_bytes(int32_t dtype) { return dtype == FCSA_DTYPE_FLOAT32 ? 4 : 2; }

// Row `row` of a 4-D view's (i0, i1) slice: `width` elements copied from src to dst.
void copy_row(const View &src, int64_t s0, int64_t s1, int64_t s2, const View &dst, int64_t d0, int64_t d1,
              int64_t d2, int64_t width) {
    const int64_t size = dtype_bytes(src.dtype);
    std::memcpy(static_cast<char *>(dst.data) + dst.offset(d0, d1, d2, 0) * size,
                static_cast<const char *>(src.data) + src.offset(s0, s1, s2, 0) * size, size_t(width * size));
}

void append_new_keys(const KvCacheProblem &kv, int64_t batch, int64_t kv_head) {
    const Problem &p = kv.attention;
    for (int64_t t = 0; t < kv.nq_new; ++t) {
        int64_t slot, row;
        kv.locate(batch, kv.cached_keys(batch) + t, &slot, &row);
        copy_row(kv.k_new, batch, kv_head, t, kv.k_cache, slot, kv_head, row, p.d);
        copy_row(kv.v_new, batch, kv_head, t, kv.v_cache, slot, kv_head, row, p.d_v);
    }
}

// All query rows of the heads that share kv head `kv_head` of sequence `batch`.
void attend(const KvCacheProblem &kv, int64_t batch, int64_t kv_head) {
    const Problem &p = kv.attention;
    const int64_t d = p.d, d_v = p.d_v, group = p.heads_per_kv(), rows = group * p.nq;
    const int64_t keys = kv.cached_keys(batch) + kv.nq_new;
    const float infinity = std::numeric_limits<float>::infinity();

    // Queries, normalized and scaled: row r is head kv_head * group + r / nq, row r % nq.
    std::vector<float> queries(size_t(rows * d));
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t head = kv_head * group + r / p.nq;
        float *row = queries.data() + r * d;
        load_normalized_row(p, p.q, batch, head, r % p.nq, p.l2norm, d, row, nullptr);
        const float scale = head_scale(p, head);
        for (int64_t t = 0; t < d; ++t) row[t] *= scale;
    }

    std::vector<float> key_tile(size_t(kKeyTile * d)), value_tile(size_t(kKeyTile * d_v));
    std::vector<float> output(size_t(rows * d_v), 0.f), logits(kKeyTile);
    std::vector<float> row_max(size_t(rows), -infinity), row_sum(size_t(rows), 0.f);
    for (int64_t first = 0; first < keys; first += kKeyTile) {
        const int count = int(std::min<int64_t>(kKeyTile, keys - first));
        for (int j = 0; j < count; ++j) {
            int64_t slot, row;
            kv.locate(batch, first + j, &slot, &row);
            load_normalized_row(p, kv.k_cache, slot, kv_head, row, p.l2norm, d, key_tile.data() + j * d, nullptr);
            load_padded_row(kv.v_cache, slot, kv_head, row, d_v, d_v, value_tile.data() + j * d_v);
        }
        for (int64_t r = 0; r < rows; ++r) {
            // Causal, aligned to the end of this sequence's keys.
            int64_t visible = count;
            if (p.causal) visible = std::min<int64_t>(visible, r % p.nq + keys - p.nq - first + 1);
            if (visible <= 0) continue;
            const float *query = queries.data() + r * d;
            float tile_max = -infinity;
            for (int64_t j = 0; j < visible; ++j) {
                const float *key = key_tile.data() + j * d;
                float s = 0.f;
                for (int64_t t = 0; t < d; ++t) s += query[t] * key[t];
                logits[size_t(j)] = s;
                tile_max = std::max(tile_max, s);
            }
            const float new_max = std::max(row_max[size_t(r)], tile_max);
            const float factor = row_max[size_t(r)] == -infinity ? 0.f : std::exp(row_max[size_t(r)] - new_max);
            row_max[size_t(r)] = new_max;
            float *acc = output.data() + r * d_v;
            float sum = row_sum[size_t(r)] * factor;
            for (int64_t t = 0; t < d_v; ++t) acc[t] *= factor;
            for (int64_t j = 0; j < visible; ++j) {
                const float weight = std::exp(logits[size_t(j)] - new_max);
                sum += weight;
                const float *value = value_tile.data() + j * d_v;
                for (int64_t t = 0; t < d_v; ++t) acc[t] += weight * value[t];
            }
            row_sum[size_t(r)] = sum;
        }
    }

    // out = acc / sum, lse = max + log(sum); a row that saw no key: 0 and -inf.
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t head = kv_head * group + r / p.nq, row = r % p.nq;
        const float sum = row_sum[size_t(r)];
        float *acc = output.data() + r * d_v;
        const float inverse = sum > 0.f ? 1.f / sum : 0.f;
        for (int64_t t = 0; t < d_v; ++t) acc[t] *= inverse;
        store_row(p.out.data, p.out.offset(batch, head, row, 0), p.out.dtype, d_v, acc);
        if (p.lse.present())
            static_cast<float *>(p.lse.data)[p.lse.offset(batch, head, row, 0)] =
                !(sum <= 0.f) ? row_max[size_t(r)] + std::log(sum) : -infinity; // NaN sum: NaN
    }
}

} // namespace

size_t cpu_kvcache_workspace(const KvCacheProblem &) { return 0; }

fcsa_status cpu_kvcache_forward(const KvCacheProblem &kv, void *) {
    const Problem &p = kv.attention;
    const int64_t items = p.b * p.hk;
    if (items == 0) return FCSA_STATUS_SUCCESS;
    const int threads = resolve_thread_count(p.num_threads, items);
    // Every append lands before any attention reads the cache.
    if (kv.appends())
        parallel_for(items, threads, [&](int64_t item, int) { append_new_keys(kv, item / p.hk, item % p.hk); });
    if (p.nq > 0)
        parallel_for(items, threads, [&](int64_t item, int) { attend(kv, item / p.hk, item % p.hk); });
    return FCSA_STATUS_SUCCESS;
}

} // namespace fcsa
