// backward_kernel.cuh: the Hopper backward's main kernel: TMA, mbarriers, warp
// specialization and wgmma.
//
// One CTA per (key tile of 128 keys, kv head, batch), looping over the query tiles of
// 64 rows of every query head that reads the kv head (causal: from the first tile that
// sees one of its keys); for packed sequences one per (entry of the key-tile table, kv
// head), kv heads fastest. Head dim 128. Three warpgroups:
//   producer  one thread issues the copies: K and V once, then each query tile's Q and
//             dO into a ring of kStages buffers, completing on the stage's "full"
//             mbarrier, reused once the consumers have arrived on its "empty" one. Its
//             warp lays out the tile's row factors (from lse, delta and 1 / ||q||) beside
//             them.
//   consumers two warpgroups of 64 keys each. First k^ = k / ||k|| in place (the
//             key-norm pass's norms). Then per query tile, S and dP transposed,
//             S^T = K^ Q^T and dP^T = V dO^T with q raw (its norm enters as a factor),
//             so that the accumulators' rows are keys: P^T, packed to 16 bits in
//             registers, is the A operand of dV += P^T dO as it stands (the forward's
//             accumulator-to-fragment identity); dS^T goes to shared memory once, the A
//             operand of dK^ += dS^T Q (read as it lies) and of dQ^ = dS K^ (read
//             transposed), added to the float32 accumulator by atomics. dQ^ of a tile
//             needs both consumers' dS^T: it is issued one tile later, behind an
//             mbarrier, so neither consumer waits for the other in the loop and one's
//             exponentials run under the other's products. Within a consumer, P^T is
//             formed while dP^T is still computed, and the previous tile's dQ^ goes
//             out by atomics while dV and dK^ are computed.
//   epilogue  dV in T and dK^ in float32 (the l2norm backward's row pass finishes dk),
//             each for the consumer's own keys, summed over the query heads in registers.
//
// The arithmetic is the portable shared-scores kernel's with q's norm folded
// (sm80/backward_shared_scores.cuh): with q raw and k^ rounded to T,
//   x    = (q . k^) scale log2(e) / ||q||             the log2 logit
//   P    = 2^(x - lse log2(e))                        (0 where the key is hidden)
//   dS'  = P (dP scale - delta scale) / ||q||          = scale dS / ||q||
//   dV  += P^T dO,   dK^ += dS'^T q,   dQ^ / ||q|| += dS' k^
// which is what the finishing passes of dq (dx_hat_scaled) and dk expect.
#pragma once

#include <cmath>
#include <type_traits>

#include "../backends.h"
#include "../common/copy.cuh"
#include "../common/numeric.cuh"
#include "../common/sm90/barrier.cuh"
#include "../common/sm90/tma.cuh"
#include "../common/sm90/wgmma.cuh"
#include "backward.cuh"
#include "launch.h"

namespace fcsa {
namespace sm90 {

// kPacked: packed sequences (p.varlen), each CTA's key tile and sequence from the table.
// Whole tiles come in by TMA, so a sequence's last key tile and last query tile hold the
// next sequence's rows: those keys are hidden (selected out) and their K^ rows zeroed, and
// those query rows are hidden and their Q and dO rows zeroed before any product reads them
// (a NaN there must not meet a zero weight). A kernel of its own, so that the plain one is
// the same code as before.
template <typename T, int D, bool kPacked>
__global__ void __launch_bounds__(BackwardConfig<T, D>::kThreads, 1)
    backward_kernel(const __grid_constant__ BackwardParams p) {
#if defined(FCSA_SM90_DEVICE_CODE)
    using namespace common;
    using namespace common::sm90;
    using C = BackwardConfig<T, D>;
    using KTile = typename C::KTile;
    using QTile = typename C::QTile;
    using DsTile = typename C::DsTile;
    constexpr int BM = C::kBlockM, BN = C::kBlockN, kStages = C::kStages;

    extern __shared__ uint8_t smem_unaligned[];
    uint8_t *smem = align_to_swizzle_atoms(smem_unaligned);
    T *sK = reinterpret_cast<T *>(smem);
    T *sV = reinterpret_cast<T *>(smem + C::kOffsetV);
    T *sQ = reinterpret_cast<T *>(smem + C::kOffsetQ);
    T *sDout = reinterpret_cast<T *>(smem + C::kOffsetDout);
    T *sDs = reinterpret_cast<T *>(smem + C::kOffsetDs);
    float4 *sFactors = reinterpret_cast<float4 *>(smem + C::kOffsetFactors);
    uint64_t *kv_full = reinterpret_cast<uint64_t *>(smem + C::kOffsetBarriers);
    uint64_t *full = kv_full + 1, *empty = full + kStages, *ds_ready = empty + kStages;

    // ---- which keys: key tiles fastest, then kv heads, then batch; packed sequences: the
    // table's entry (a spare CTA of the launch's bound returns), kv heads fastest
    const int kv_heads = p.heads / p.heads_per_kv;
    const unsigned entry = blockIdx.x / unsigned(kv_heads);
    if constexpr (kPacked)
        if (entry >= unsigned(*p.varlen.count)) return;
    const int2 packed_tile = kPacked ? p.varlen.tiles[entry] : int2{};
    const int4 sequence = kPacked ? p.varlen.sequences[packed_tile.x] : int4{};
    const int key_tiles = (p.nk + BN - 1) / BN;
    const int n_tile = kPacked ? packed_tile.y : int(blockIdx.x % unsigned(key_tiles));
    const int bkv = kPacked ? 0 : int(blockIdx.x / unsigned(key_tiles));
    const int kvh = kPacked ? int(blockIdx.x % unsigned(kv_heads)) : bkv % kv_heads, bi = bkv / kv_heads;
    const int j0 = n_tile * BN;
    // This sequence's query rows and keys, and where they start in the tensors' rows.
    const int nq = kPacked ? sequence.y : p.nq, nk = kPacked ? sequence.w : p.nk;
    const int q_begin = kPacked ? sequence.x : 0, k_begin = kPacked ? sequence.z : 0;

    // ---- which query tiles, per head: causal skips those whose rows see none of the keys
    const int causal_offset = nk - nq; // row i sees keys j <= i + causal_offset
    const int q_tiles = (nq + BM - 1) / BM;
    int first_tile = 0;
    if (p.causal && j0 - causal_offset > 0) first_tile = min(q_tiles, (j0 - causal_offset) / BM);
    const int tiles_per_head = q_tiles - first_tile;
    const int items = tiles_per_head * p.heads_per_kv;

    const int warpgroup = threadIdx.x / 128;
    if (threadIdx.x == 0) {
        mbarrier_init(kv_full, 1);
        for (int s = 0; s < kStages; ++s) {
            mbarrier_init(&full[s], 1 + 32);           // the TMA's expect_tx, the factor-writing lanes
            mbarrier_init(&empty[s], 128 * C::kConsumers); // every consumer thread reads the factors
        }
        for (int b = 0; b < C::kDsBuffers; ++b) mbarrier_init(&ds_ready[b], 128 * C::kConsumers);
        mbarrier_init_fence();
    }
    __syncthreads();

    if (warpgroup == 0) {
        // ================================================================ producer
        warpgroup_registers_release<C::kProducerRegisters>();
        if (threadIdx.x >= 32) return;
        const int lane = threadIdx.x;
        if (lane == 0) {
            tma_prefetch_map(&p.q_map);
            tma_prefetch_map(&p.dout_map);
            mbarrier_arrive_expect_tx(kv_full, 2 * KTile::kBytes);
            tma_load_tile<BN, D>(sK, &p.k_map, kv_full, k_begin + j0, kvh, bi);
            tma_load_tile<BN, D>(sV, &p.v_map, kv_full, k_begin + j0, kvh, bi);
        }
        const float scale_log2 = p.scale * kLog2e;
        static_assert(BM == 64, "two rows of factors per lane");
        for (int it = 0; it < items; ++it) {
            const int s = it % kStages;
            const uint32_t round = it / kStages;
            const int hq = kvh * p.heads_per_kv + it / tiles_per_head;
            const int i0 = (first_tile + it % tiles_per_head) * BM;
            // The tile's row factors are loaded before the stage is free, so that their
            // latency is not added to the consumers' wait for the stage. Rows past nq:
            // lse = +inf makes their P (and so dS) 0.
            const int64_t row0 = (int64_t(bi) * p.heads + hq) * p.nq + q_begin;
            float inv_q[2], lse[2], delta[2];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int i = i0 + lane + 32 * h;
                const bool in = i < nq;
                inv_q[h] = in ? p.q_inv_norm[row0 + i] : 0.f;
                lse[h] = in ? p.lse[row0 + i] : INFINITY;
                delta[h] = in ? p.delta[row0 + i] : 0.f;
            }
            if (round > 0) mbarrier_wait(&empty[s], (round - 1) & 1);
            if (lane == 0) {
                mbarrier_arrive_expect_tx(&full[s], 2 * QTile::kBytes);
                tma_load_tile<BM, D>(sQ + s * (BM * D), &p.q_map, &full[s], q_begin + i0, hq, bi);
                tma_load_tile<BM, D>(sDout + s * (BM * D), &p.dout_map, &full[s], q_begin + i0, hq, bi);
            }
#pragma unroll
            for (int h = 0; h < 2; ++h)
                sFactors[s * BM + lane + 32 * h] = make_float4(scale_log2 * inv_q[h], lse[h] * kLog2e, p.scale * inv_q[h],
                                                               delta[h] * p.scale * inv_q[h]);
            mbarrier_arrive(&full[s]);
        }
        return;
    }

    // ==================================================================== consumers
    warpgroup_registers_claim<C::kConsumerRegisters>();
    const int consumer = warpgroup - 1;
    const int tid = threadIdx.x % 128, warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, t4 = lane % 4;
    // The thread's two accumulator rows of S^T (and of dV, dK^): tile-local keys.
    const int key_a = 64 * consumer + 16 * warp + g, key_b = key_a + 8;
    const uint32_t k_base = shared_address(sK), v_base = shared_address(sV);
    const uint32_t q_base = shared_address(sQ), dout_base = shared_address(sDout), ds_base = shared_address(sDs);
    // dQ^ = dS K^: this consumer's columns of it, over all the CTA's keys.
    static_assert(C::kDqColumns == KTile::kBlockCols, "a consumer's columns of K^ are one swizzled block");
    const int dq_col0 = C::kDqColumns * consumer;
    const uint32_t k_columns = k_base + consumer * KTile::kBlockBytes;

    // ---- prologue: k^ = k / ||k|| in place, this consumer's rows (rows past nk: 0 / 0
    // norms, zeros either way); both consumers' before any product reads K. An entry
    // that is not finite (a NaN or inf in k) becomes 0: a row that sees the key has a NaN
    // lse from the forward, so its P and dS are NaN whatever S is; a row that does not
    // has dS = 0 by selection, and dQ^ = dS K^ must not meet 0 * NaN.
    mbarrier_wait(kv_full, 0);
    {
        const float *key_inv_norms = p.k_inv_norm + (int64_t(bi) * kv_heads + kvh) * p.k_inv_norm_stride + k_begin + j0;
        constexpr int kChunks = D / 8; // 16-byte chunks per row
        uint8_t *k_bytes = reinterpret_cast<uint8_t *>(sK);
        for (int c = tid; c < 64 * kChunks; c += 128) {
            const int r = 64 * consumer + c / kChunks, cb = (c % kChunks) / 8, chunk = c % 8;
            // (a whole row: its chunks' order within the 128-byte line does not matter)
            uint4 *at = reinterpret_cast<uint4 *>(k_bytes + (cb * BN + r) * 128 + chunk * 16);
            // (a packed sequence's next one's keys: zeros, so dQ^ = dS K^ never meets them)
            const float inv = !kPacked || j0 + r < nk ? key_inv_norms[r] : 0.f;
            float f[8];
            chunk_to_float<T>(*at, f);
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const float x = f[e] * inv;
                f[e] = isfinite(x) ? x : 0.f;
            }
            *at = float_to_chunk<T>(f);
        }
        fence_async_shared();
        named_barrier_sync(3, 128 * C::kConsumers);
    }

    float dv[D / 2], dk[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) dv[i] = dk[i] = 0.f;
    float s[BM / 2], dp[BM / 2], dq[C::kDqColumns / 2];
    uint32_t pf[BM / 16][4];

    // dQ^ = dS'' K^ of tile `item` (both read transposed), issued once both consumers'
    // dS^T of it are in; add_dq, once it has landed, adds dQ^ / ||q|| to the float32
    // accumulator (d == D).
    auto issue_dq = [&](int item) {
        const int buffer = item % C::kDsBuffers;
        mbarrier_wait(&ds_ready[buffer], (item / C::kDsBuffers) & 1);
        wgmma_discard(dq); // (no product in flight: the wait<0> for dP, or the loop's last, retired them)
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk)
            Wgmma<T, C::kDqColumns>::template ss<1, 1>(dq, DsTile::mn_major(ds_base + buffer * DsTile::kBytes, 16 * kk),
                                                       KTile::mn_major(k_columns, 16 * kk), kk > 0);
        wgmma_commit();
    };
    auto add_dq = [&](int item) {
        wgmma_fence_operands(dq);
        const int hq = kvh * p.heads_per_kv + item / tiles_per_head;
        const int tile_row0 = (first_tile + item % tiles_per_head) * BM;
        const int row_a = tile_row0 + 16 * warp + g, row_b = row_a + 8;
        float *at_a = p.dq_acc + ((int64_t(bi) * p.heads + hq) * int64_t(p.nq) + q_begin + row_a) * D + dq_col0 + 2 * t4;
        float *at_b = at_a + 8 * D;
        auto add_rows = [&](bool in_a, bool in_b) {
#pragma unroll
            for (int j = 0; j < C::kDqColumns / 8; ++j) {
                if (in_a) atomicAdd(reinterpret_cast<float2 *>(at_a + 8 * j), make_float2(dq[4 * j], dq[4 * j + 1]));
                if (in_b) atomicAdd(reinterpret_cast<float2 *>(at_b + 8 * j), make_float2(dq[4 * j + 2], dq[4 * j + 3]));
            }
        };
        // (rows past nq only in the last query tile)
        if (tile_row0 + BM <= nq) add_rows(true, true);
        else add_rows(row_a < nq, row_b < nq);
    };

    for (int it = 0; it < items; ++it) {
        const int stage = it % kStages, buffer = it % C::kDsBuffers;
        const int i0 = (first_tile + it % tiles_per_head) * BM;
        const uint32_t q_tile = q_base + stage * QTile::kBytes, dout_tile = dout_base + stage * QTile::kBytes;
        mbarrier_wait(&full[stage], (it / kStages) & 1);
        if constexpr (kPacked) {
            // A sequence's last query tile: the next sequence's rows follow its own. Both
            // consumers zero them in Q and dO (whole rows; ordinary stores, then a proxy
            // fence for the tensor cores), so that they act as rows past the tensor do
            // (their lse of +inf gives P = 0, and every product with them is 0).
            if (i0 + BM > nq) {
                constexpr int kChunks = D / 8; // 16-byte chunks per row
                const int first = nq - i0, rows = BM - first;
                uint8_t *q_bytes = reinterpret_cast<uint8_t *>(sQ + stage * (BM * D));
                uint8_t *dout_bytes = reinterpret_cast<uint8_t *>(sDout + stage * (BM * D));
                for (int c = threadIdx.x - 128; c < rows * kChunks; c += 128 * C::kConsumers) {
                    const int r = first + c / kChunks, cb = (c % kChunks) / 8, chunk = c % 8;
                    const int at = (cb * BM + r) * 128 + chunk * 16;
                    *reinterpret_cast<uint4 *>(q_bytes + at) = make_uint4(0u, 0u, 0u, 0u);
                    *reinterpret_cast<uint4 *>(dout_bytes + at) = make_uint4(0u, 0u, 0u, 0u);
                }
                fence_async_shared();
                named_barrier_sync(4, 128 * C::kConsumers);
            }
        }

        // 1. S^T = K^ Q^T and dP^T = V dO^T for this consumer's 64 keys.
        // (no product in flight: the previous tile ended in wait<0>; a discard with one in
        // flight would let the compiler reuse registers a product still writes)
        wgmma_discard(s);
        wgmma_discard(dp);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk)
            Wgmma<T, BM>::template ss<0, 0>(s, KTile::k_major(k_base, 64 * consumer, 16 * kk),
                                            QTile::k_major(q_tile, 0, 16 * kk), kk > 0);
        wgmma_commit();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk)
            Wgmma<T, BM>::template ss<0, 0>(dp, KTile::k_major(v_base, 64 * consumer, 16 * kk),
                                            QTile::k_major(dout_tile, 0, 16 * kk), kk > 0);
        wgmma_commit();
        wgmma_wait<1>();
        wgmma_fence_operands(s);

        // 2. P^T (while dP^T is computed), then dS'^T into shared memory. A hidden key's
        // P and dS are 0 by selection (its dP may hold a NaN of its value); rows past nq
        // have P = 0 by their lse.
        const float4 *factors = sFactors + stage * BM;
        const bool every_key_seen = j0 + BN <= nk && (!p.causal || j0 + BN - 1 <= i0 + causal_offset);
#pragma unroll
        for (int j = 0; j < BM / 8; ++j) {
            const int col = 8 * j + 2 * t4;
            const float2 f[2] = {*reinterpret_cast<const float2 *>(&factors[col]),
                                 *reinterpret_cast<const float2 *>(&factors[col + 1])};
#pragma unroll
            for (int e = 4 * j; e < 4 * j + 4; ++e) s[e] = exp2_approx(fmaf(s[e], f[e % 2].x, -f[e % 2].y));
        }
        wgmma_wait<0>();
        wgmma_fence_operands(dp);
        // Only a tile on an edge (past nk, or the causal diagonal) hides keys from some
        // rows: every other one takes the loop without selects. The thread's dS^T rows
        // key_a and key_a + 8 share their swizzle (key_a % 8 == g): chunk j of both lies
        // at (j ^ g) * 16 bytes in its row.
        const uint32_t ds_row_a = ds_base + buffer * DsTile::kBytes + key_a * 128 + 4 * t4;
        auto form_ds = [&](auto edge) {
#pragma unroll
            for (int j = 0; j < BM / 8; ++j) {
                const int col = 8 * j + 2 * t4;
                const float4 f[2] = {factors[col], factors[col + 1]};
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int key = j0 + (h ? key_b : key_a);
#pragma unroll
                    for (int x = 0; x < 2; ++x) {
                        const int e = 4 * j + 2 * h + x;
                        if constexpr (decltype(edge)::value) {
                            const bool seen = key < nk && (!p.causal || key <= i0 + col + x + causal_offset);
                            const float prob = seen ? s[e] : 0.f;
                            dp[e] = seen ? prob * fmaf(dp[e], f[x].z, -f[x].w) : 0.f;
                            s[e] = prob;
                        } else {
                            dp[e] = s[e] * fmaf(dp[e], f[x].z, -f[x].w);
                        }
                    }
                    store_shared_u32(ds_row_a + h * (8 * 128) + ((j ^ g) << 4),
                                     pack_float2<T>(dp[4 * j + 2 * h], dp[4 * j + 2 * h + 1]));
                }
            }
        };
        if (every_key_seen) form_ds(std::false_type{});
        else form_ds(std::true_type{});
#pragma unroll
        for (int kk = 0; kk < BM / 16; ++kk)
#pragma unroll
            for (int r = 0; r < 4; ++r) pf[kk][r] = pack_float2<T>(s[8 * kk + 2 * r], s[8 * kk + 2 * r + 1]);
        fence_async_shared();
        mbarrier_arrive(&ds_ready[buffer]);    // for dQ^, the other consumer's too
        named_barrier_sync(1 + consumer, 128); // this consumer's rows, for dK^

        // 3. The previous tile's dQ^ (its dS'^T from both consumers is in by now: neither
        // consumer waits for the other's of this tile), then dV += P^T dO (A from
        // registers) and dK^ += dS'^T Q (A as it lies in shared memory), B read
        // transposed; the previous dQ^ goes out by atomics while dV and dK^ are computed.
        // (Each batch is waited for in the block that issues it: a wait in another block
        // makes the compiler serialize the products.)
        auto issue_dv_dk = [&]() {
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < BM / 16; ++kk)
                Wgmma<T, D>::template rs<1>(dv, pf[kk], QTile::mn_major(dout_tile, 16 * kk), 1);
#pragma unroll
            for (int kk = 0; kk < BM / 16; ++kk)
                Wgmma<T, D>::template ss<0, 1>(dk, DsTile::k_major(ds_base + buffer * DsTile::kBytes, 64 * consumer, 16 * kk),
                                               QTile::mn_major(q_tile, 16 * kk), 1);
            wgmma_commit();
        };
        if (it > 0) {
            issue_dq(it - 1);
            issue_dv_dk();
            wgmma_wait<1>();
            add_dq(it - 1);
            wgmma_wait<0>();
        } else {
            issue_dv_dk();
            wgmma_wait<0>();
        }
        wgmma_fence_operands(dv);
        wgmma_fence_operands(dk);
#pragma unroll
        for (int kk = 0; kk < BM / 16; ++kk)
#pragma unroll
            for (int r = 0; r < 4; ++r) asm volatile("" : "+r"(pf[kk][r])); // read until here
        mbarrier_arrive(&empty[stage]); // Q, dO and the factors of this stage are free
    }
    if (items > 0) {
        issue_dq(items - 1);
        wgmma_wait<0>();
        add_dq(items - 1);
    }

    // ---- epilogue: dV in T, dK^ in float32, this consumer's keys below nk
    T *dv_rows = static_cast<T *>(p.dv) + bi * p.dv_stride[0] + kvh * p.dv_stride[1] + int64_t(k_begin) * p.dv_stride[2];
    float *dk_rows = p.dk_acc + ((int64_t(bi) * kv_heads + kvh) * int64_t(p.nk) + k_begin) * D;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int key = j0 + (h ? key_b : key_a);
        if (key >= nk) continue;
#pragma unroll
        for (int j = 0; j < D / 8; ++j) {
            const int col = 8 * j + 2 * t4, e = 4 * j + 2 * h;
            *reinterpret_cast<uint32_t *>(dv_rows + int64_t(key) * p.dv_stride[2] + col) =
                pack_float2<T>(dv[e], dv[e + 1]);
            *reinterpret_cast<float2 *>(dk_rows + int64_t(key) * D + col) = make_float2(dk[e], dk[e + 1]);
        }
    }
#endif
}

template <typename T, int D> bool backward_compiled() {
    static const bool compiled = has_sm90a_image(backward_kernel<T, D, false>);
    return compiled;
}

template <typename T, int D, bool kPacked>
fcsa_status launch_backward(const BackwardParams &params, cudaStream_t stream) {
    using C = BackwardConfig<T, D>;
    const int64_t kv_heads = params.heads / params.heads_per_kv;
    if constexpr (kPacked) {
        return launch(backward_kernel<T, D, true>, params.varlen.max_tiles * kv_heads, C::kThreads, C::kSmemBytes,
                      stream, params, "cuda-sm90 backward", "kv heads * packed key tiles");
    } else {
        const int64_t key_tiles = (params.nk + C::kBlockN - 1) / C::kBlockN;
        return launch(backward_kernel<T, D, false>, key_tiles * kv_heads * params.batch, C::kThreads, C::kSmemBytes,
                      stream, params, "cuda-sm90 backward", "batch * kv heads * key tiles");
    }
}

} // namespace sm90
} // namespace fcsa

// Instantiates the backward for one (T, D), and whether the build holds its code; used
// once per backward_<dtype>_d<D>.cu.
#define FCSA_INSTANTIATE_SM90_BACKWARD(T, D)                                                                         \
    template fcsa_status fcsa::sm90::launch_backward<T, D, false>(const fcsa::sm90::BackwardParams &, cudaStream_t); \
    template bool fcsa::sm90::backward_compiled<T, D>();

// Instantiates the backward for one (T, D) over packed sequences; used once per
// backward_<dtype>_d<D>_packed.cu.
#define FCSA_INSTANTIATE_SM90_BACKWARD_PACKED(T, D) \
    template fcsa_status fcsa::sm90::launch_backward<T, D, true>(const fcsa::sm90::BackwardParams &, cudaStream_t);
