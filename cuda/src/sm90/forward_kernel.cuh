// forward_kernel.cuh: the Hopper forward kernel: TMA, mbarriers, warp specialization
// and wgmma.
//
// One CTA per (query tile of 64 rows per consumer, head, batch), query tiles in reverse
// so that causal's long tiles start first; for packed sequences one per (entry of the
// tile table, head), heads fastest (sm80/varlen.cuh). Warpgroups (forward.cuh's
// ForwardConfig):
//   producer  one thread issues every copy: the Q tile once (a box per consumer's
//             rows), then per key tile K (its warp copying 1 / ||k_j|| from the
//             key-norm pass beside it) and V into a ring of kStages buffers, each
//             completing on its "full" mbarrier, each reused once the consumers have
//             arrived on its "empty" one. Under a key mask, in a batch with hidden keys
//             before its last visible one, a second warp zeros hidden keys' V rows (P is
//             0 there, but 0 * a NaN in v is not) and hands each V buffer on through its
//             "ready" barrier.
//   consumers two (three at d = 64) warpgroups of 64 query rows. The prologue
//             l2-normalizes their Q rows in shared memory with scale * log2(e) folded in
//             (the portable path's arithmetic), so a logit costs one FMA:
//             x = (q^ . k) / ||k_j||. Then per key tile: S = Q K^T on wgmma from shared
//             memory; p = 2^(x - offset) in place (0 where the key-norm pass marked the
//             key hidden: one select per score), with no running maximum (cosine-sim
//             logits are bounded by |scale|), so O is never rescaled; O += P V on wgmma
//             with P from registers. The next tile's S is issued before this tile's P V,
//             so the exponentials of one run while the tensor cores work on the other,
//             and the warpgroups take turns issuing in a fixed round (ping-pong).
//   epilogue  O / rowsum -> shared (the warpgroup's own Q rows) -> global (16-byte
//             stores), lse = ln(rowsum) + offset ln 2. Causal: a warpgroup with rows
//             whose accumulators are not finite (a NaN or inf value of a key past some
//             rows' reach met their p = 0 in P V) computes those rows again afterwards
//             (common/nonfinite_rows.cuh).
#pragma once

#include <cmath>

#include "../backends.h"
#include "../common/key_norm.cuh"
#include "../common/l2norm.cuh"
#include "../common/forward_tile.cuh"
#include "../common/nonfinite_rows.cuh"
#include "../common/numeric.cuh"
#include "../common/sm90/barrier.cuh"
#include "../common/sm90/tma.cuh"
#include "../common/sm90/wgmma.cuh"
#include "forward.cuh"
#include "launch.h"

namespace fcsa {
namespace sm90 {

// The key mask's warp (forward_kernel's producer warp 1): once a V tile has landed, it
// zeros the rows of its hidden keys, a row's 16-byte chunks in consecutive lanes (no
// bank conflicts; their order within a swizzled 128-byte line does not matter), walking
// the tile's hidden-key bitmaps a few rows per pass without ranking bits, fences
// them for the tensor cores and arrives on the tile's v_ready, which the consumers wait
// on in place of v_full. It visits every tile in order, so it never runs a phase ahead
// of v_full; the consumers' wait keeps the producer from refilling a buffer before it.
// Not inlined: its registers stay out of the kernel's allocation.
template <typename T, int D>
__device__ __noinline__ void zero_hidden_values(const float *key_inv_norms, int tiles, T *sV, uint64_t *v_full,
                                                uint64_t *v_ready, int lane) {
    using namespace common::sm90;
    using C = ForwardConfig<T, D>;
    constexpr int BN = C::kBlockN, kStages = C::kStages;
    constexpr int kLines = D / 8; // 16-byte chunks of a row
    constexpr int kRowsAtOnce = 32 / kLines;
    for (int t = 0; t < tiles; ++t) {
        const float4 f = __ldg(reinterpret_cast<const float4 *>(key_inv_norms + t * BN) + lane);
        const float flags[4] = {f.x, f.y, f.z, f.w};
        uint32_t hidden[4]; // bit l of hidden[c]: key 4 l + c of the tile
        int count = 0;
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            hidden[c] = __ballot_sync(0xffffffffu, flags[c] < 0.f);
            count += __popc(hidden[c]);
        }
        const int s = t % kStages;
        mbarrier_wait(&v_full[s], (t / kStages) & 1);
        if (count > 0) {
            // kRowsAtOnce rows per pass, the g-th lowest remaining bit for lane group g:
            // the bit arithmetic is the same in every lane, so the loop stays uniform.
            uint8_t *v_tile = reinterpret_cast<uint8_t *>(sV + s * (BN * D));
            const int group = lane / kLines, line = lane % kLines;
            uint8_t *chunk = v_tile + (line / 8) * BN * 128 + (line % 8) * 16;
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                for (uint32_t bits = hidden[c]; bits != 0u;) {
                    uint32_t mine = bits;
                    for (int g = 0; g < group; ++g) mine &= mine - 1u;
#pragma unroll
                    for (int g = 0; g < kRowsAtOnce; ++g) bits &= bits - 1u;
                    if (mine != 0u) {
                        const int r = 4 * (__ffs(int(mine)) - 1) + c;
                        *reinterpret_cast<uint4 *>(chunk + r * 128) = make_uint4(0u, 0u, 0u, 0u);
                    }
                }
            }
            fence_async_shared();
        }
        __syncwarp();
        if (lane == 0) mbarrier_arrive(&v_ready[s]);
    }
}

// The calling consumer warp's rows of its CTA's tile as common::recompute_nonfinite_rows
// reads them (see there), found from the parameters, blockIdx and threadIdx as the kernel
// finds them. The kernel's common case: l2norm with one group, no bias, a scale given as
// a number, d_v = d; under a key mask the key-norm pass's marks say which keys are hidden
// (kHiddenKey; a NaN inverse norm, a key holding NaN or inf, is a visible one).
template <typename T, int D, bool kKeyMask, bool kPacked>
struct ForwardRows : common::TileRows<T, ForwardParams, kPacked> {
    using Base = common::TileRows<T, ForwardParams, kPacked>;
    static constexpr int kValueColumns = D;
    using Base::bi, Base::kvh, Base::k_begin, Base::p;
    // a consumer's 64 rows, 16 per warp
    __device__ explicit ForwardRows(const ForwardParams &params)
        : Base(params, common::CtaTile<kPacked>(params, blockIdx.x), ForwardConfig<T, D>::kBlockM,
               16 * int(threadIdx.x / 32 - 4)) {}
    __device__ bool key_visible(int j) const {
        if constexpr (!kKeyMask) return true;
        const int64_t row = int64_t(bi) * (p.heads / p.heads_per_kv) + kvh;
        return p.k_inv_norm[row * p.k_inv_norm_stride + k_begin + j] != common::kHiddenKey;
    }
    __device__ double bias(int, int) const { return 0.0; }
    __device__ double scale() const { return p.scale; }
    __device__ int d() const { return p.d; }
    __device__ int d_v() const { return p.d; }
    __device__ int groups() const { return 1; }
    __device__ bool l2norm() const { return true; }
    __device__ void out(int i, int col, double x) const {
        static_cast<T *>(p.out)[this->out_index(i, col)] = common::from_float<T>(float(x));
    }
};

// kKeyMask: p.key_counts and the marks of hidden keys are read. kPacked: packed
// sequences (p.varlen), each CTA's query tile and sequence from the table; the tiles'
// rows past the sequence belong to the next one (TMA fills zeros only past the tensor),
// so those keys are dropped and their V rows zeroed as keys past the causal reach are.
// (Kernels of their own, so that the plain kernel is the same code as before either.)
template <typename T, int D, bool kKeyMask, bool kPacked>
__global__ void __launch_bounds__(ForwardConfig<T, D>::kThreads, 1)
    forward_kernel(const __grid_constant__ ForwardParams p) {
#if defined(FCSA_SM90_DEVICE_CODE)
    using namespace common;
    using namespace common::sm90;
    using C = ForwardConfig<T, D>;
    using QTile = typename C::QTile;
    using KTile = typename C::KTile;
    constexpr int BM = C::kBlockM, BN = C::kBlockN, kStages = C::kStages;

    extern __shared__ uint8_t smem_unaligned[];
    uint8_t *smem = align_to_swizzle_atoms(smem_unaligned);
    T *sQ = reinterpret_cast<T *>(smem);
    T *sK = reinterpret_cast<T *>(smem + C::kOffsetK);
    T *sV = reinterpret_cast<T *>(smem + C::kOffsetV);
    float *sKInv = reinterpret_cast<float *>(smem + C::kOffsetKInv);
    uint64_t *q_full = reinterpret_cast<uint64_t *>(smem + C::kOffsetBarriers);
    uint64_t *k_full = q_full + 1, *v_full = k_full + kStages;
    uint64_t *k_empty = v_full + kStages, *v_empty = k_empty + kStages, *v_ready = v_empty + kStages;

    // ---- which tile: query tiles fastest (in reverse), then heads, then batch; packed
    // sequences: the table's entry (a spare CTA of the launch's bound returns), then heads
    static_assert(!(kKeyMask && kPacked), "packed sequences take no mask");
    if constexpr (kPacked)
        if (blockIdx.x / unsigned(p.heads) >= unsigned(*p.varlen.count)) return;
    const common::CtaTile<kPacked> at(p, blockIdx.x);
    const int4 sequence = at.sequence;
    const int m_tile = at.m_tile, hq = at.hq, bi = at.bi;
    const int kvh = hq / p.heads_per_kv;
    const int m0 = m_tile * BM;
    // This sequence's query rows and keys, and where they start in the tensors' rows.
    const int nq = kPacked ? sequence.y : p.nq, nk = kPacked ? sequence.w : p.nk;
    const int q_begin = kPacked ? sequence.x : 0, k_begin = kPacked ? sequence.z : 0;

    // ---- key tiles [0, tiles): causal stops after the last row's diagonal, a key mask
    // after the batch's last visible key (keys past it are handled as keys past nk). A
    // batch with hidden keys before that ("sparse") needs the zeroing warp and the select.
    const int causal_offset = nk - nq; // row i sees keys j <= i + causal_offset
    const int keys = kKeyMask ? p.key_counts[2 * bi] : nk;
    const bool sparse = kKeyMask && p.key_counts[2 * bi + 1] < keys;
    int tiles = (keys + BN - 1) / BN;
    if (p.causal) {
        const int last_key = min(m0 + BM, nq) - 1 + causal_offset;
        tiles = last_key < 0 ? 0 : min(tiles, last_key / BN + 1);
    }

    const int warpgroup = threadIdx.x / 128;
    if (threadIdx.x == 0) {
        mbarrier_init(q_full, 1);
        for (int s = 0; s < kStages; ++s) {
            mbarrier_init(&k_full[s], 1 + 32); // the TMA's expect_tx, the 1 / ||k|| copy's lanes
            mbarrier_init(&v_full[s], 1);
            mbarrier_init(&k_empty[s], 128 * C::kConsumers); // every consumer thread reads 1 / ||k||
            mbarrier_init(&v_empty[s], 4 * C::kConsumers);   // one arrival per consumer warp
            mbarrier_init(&v_ready[s], 1);                    // the zeroing warp's lane 0
        }
        mbarrier_init_fence();
    }
    __syncthreads();

    if (warpgroup == 0) {
        // ================================================================ producer
        // Warp 0: lane 0 issues the TMA copies; all 32 lanes copy a key tile's 1 / ||k||
        // (512 bytes) with ordinary loads and stores, so that everything the consumers'
        // threads read (not their tensor cores) is written by the generic proxy too.
        warpgroup_registers_release<C::kProducerRegisters>();
        const int lane = threadIdx.x % 32;
        const float *key_inv_norms =
            p.k_inv_norm + (int64_t(bi) * (p.heads / p.heads_per_kv) + kvh) * p.k_inv_norm_stride;
        if (kKeyMask && threadIdx.x / 32 == 1) {
            if (sparse) zero_hidden_values<T, D>(key_inv_norms, tiles, sV, v_full, v_ready, lane);
            return;
        }
        if (threadIdx.x >= 32) return;
        if (lane == 0) {
            tma_prefetch_map(&p.q_map);
            tma_prefetch_map(&p.k_map);
            tma_prefetch_map(&p.v_map);
            mbarrier_arrive_expect_tx(q_full, QTile::kBytes);
            // one 64-row box per consumer's rows
            for (int c = 0; c < C::kConsumers; ++c)
                tma_load_tile<64, D, BM>(sQ + c * 64 * 64, &p.q_map, q_full, q_begin + m0 + 64 * c, hq, bi);
        }
        for (int t = 0; t < tiles; ++t) {
            const int s = t % kStages;
            const uint32_t round = t / kStages;
            const int j0 = t * BN;
            if (round > 0) mbarrier_wait(&k_empty[s], (round - 1) & 1);
            if (lane == 0) {
                mbarrier_arrive_expect_tx(&k_full[s], KTile::kBytes);
                tma_load_tile<BN, D>(sK + s * (BN * D), &p.k_map, &k_full[s], k_begin + j0, kvh, bi);
            }
            static_assert(BN == 32 * 4, "four of 1 / ||k|| per lane");
            if (kPacked) {
                // (a sequence starts anywhere: no float4; keys past it are never used)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int j = j0 + 32 * e + lane;
                    sKInv[s * BN + 32 * e + lane] = j < nk ? __ldg(key_inv_norms + k_begin + j) : 0.f;
                }
            } else {
                reinterpret_cast<float4 *>(sKInv + s * BN)[lane] =
                    __ldg(reinterpret_cast<const float4 *>(key_inv_norms + j0) + lane);
            }
            mbarrier_arrive(&k_full[s]);
            if (round > 0) mbarrier_wait(&v_empty[s], (round - 1) & 1);
            if (lane == 0) {
                mbarrier_arrive_expect_tx(&v_full[s], KTile::kBytes);
                tma_load_tile<BN, D>(sV + s * (BN * D), &p.v_map, &v_full[s], k_begin + j0, kvh, bi);
            }
        }
        return;
    }

    // ==================================================================== consumers
    warpgroup_registers_claim<C::kConsumerRegisters>();
    const int consumer = warpgroup - 1;
    const int tid = threadIdx.x % 128, warp = tid / 32, lane = tid % 32;
    const int g = lane / 4, t4 = lane % 4;
    const int r0 = 64 * consumer;               // this warpgroup's rows of the tile
    const int row_a = m0 + r0 + 16 * warp + g;  // the thread's two accumulator rows
    const int row_b = row_a + 8;
    const int barrier_id = 1 + consumer;        // named barrier of this warpgroup
    // Ping-pong: the consumers take turns issuing their products, 0, 1, .., 0, .. (a
    // named barrier per turn, which the consumer before arrives on), so that one's
    // exponentials run while the tensor cores work for the others.
    const int my_turn = C::kTurnBarrier + consumer;
    const int next_turn = C::kTurnBarrier + (consumer + 1) % C::kConsumers;
    auto take_turn = [&]() {
        if (p.ping_pong) named_barrier_sync(my_turn, 256);
    };
    auto pass_turn = [&]() {
        if (p.ping_pong) named_barrier_arrive(next_turn, 256);
    };
    if (consumer == C::kConsumers - 1) pass_turn(); // the first turn is consumer 0's

    const float scale = p.scale;
    const float scale_log2 = scale * kLog2e;
    const float offset = fabsf(scale) * kLog2e - C::kExpShift;

    // ---- prologue: q^ * scale * log2(e) in place, then visible to the tensor cores
    mbarrier_wait(q_full, 0);
    l2norm_rows<QTile, 128, T>(sQ + r0 * 64, 64, p.d, 1, nullptr, true, tid, scale_log2);
    fence_async_shared();
    named_barrier_sync(barrier_id, 128);

    const uint32_t q_base = shared_address(sQ);
    const uint32_t k_base = shared_address(sK), v_base = shared_address(sV);

    float o[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
    float s[BN / 2];
    uint32_t pf[BN / 16][4];
    float sum_a = 0.f, sum_b = 0.f;

    auto issue_scores = [&](int stage) {
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk)
            Wgmma<T, BN>::template ss<0, 0>(s, QTile::k_major(q_base, r0, kk * 16),
                                         KTile::k_major(k_base + stage * KTile::kBytes, 0, kk * 16), kk > 0);
        wgmma_commit();
    };
    auto issue_pv = [&](int stage) {
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk)
            Wgmma<T, D>::template rs<1>(o, pf[kk], KTile::mn_major(v_base + stage * KTile::kBytes, kk * 16), 1);
        wgmma_commit();
    };
    // p = 2^(x - offset) in place; keys past the batch's keys (nk, or a key mask's reach)
    // or past a row's causal reach give 0, and so do keys the mask hides (1 / ||k|| < 0:
    // a select, whatever x is).
    auto exponentials = [&](int t, int stage) {
        const int j0 = t * BN;
        const bool masked = j0 + BN > keys || (p.causal && j0 + BN - 1 > m0 + r0 + causal_offset);
        const float *inv = sKInv + stage * BN + 2 * t4;
        if (sparse && !masked) {
#pragma unroll
            for (int j = 0; j < BN / 8; ++j) {
                const float2 f = *reinterpret_cast<const float2 *>(inv + 8 * j);
                s[4 * j + 0] = f.x < 0.f ? 0.f : exp2_approx(fmaf(s[4 * j + 0], f.x, -offset));
                s[4 * j + 1] = f.y < 0.f ? 0.f : exp2_approx(fmaf(s[4 * j + 1], f.y, -offset));
                s[4 * j + 2] = f.x < 0.f ? 0.f : exp2_approx(fmaf(s[4 * j + 2], f.x, -offset));
                s[4 * j + 3] = f.y < 0.f ? 0.f : exp2_approx(fmaf(s[4 * j + 3], f.y, -offset));
                sum_a += s[4 * j + 0] + s[4 * j + 1];
                sum_b += s[4 * j + 2] + s[4 * j + 3];
            }
        } else if (!masked) {
#pragma unroll
            for (int j = 0; j < BN / 8; ++j) {
                const float2 f = *reinterpret_cast<const float2 *>(inv + 8 * j);
                s[4 * j + 0] = exp2_approx(fmaf(s[4 * j + 0], f.x, -offset));
                s[4 * j + 1] = exp2_approx(fmaf(s[4 * j + 1], f.y, -offset));
                s[4 * j + 2] = exp2_approx(fmaf(s[4 * j + 2], f.x, -offset));
                s[4 * j + 3] = exp2_approx(fmaf(s[4 * j + 3], f.y, -offset));
                sum_a += s[4 * j + 0] + s[4 * j + 1];
                sum_b += s[4 * j + 2] + s[4 * j + 3];
            }
        } else {
            const int reach_a = p.causal ? min(keys, row_a + causal_offset + 1) : keys; // keys j < reach
            const int reach_b = p.causal ? min(keys, row_b + causal_offset + 1) : keys;
#pragma unroll
            for (int j = 0; j < BN / 8; ++j) {
                const float2 f = *reinterpret_cast<const float2 *>(inv + 8 * j);
                const int key = j0 + 8 * j + 2 * t4;
                const bool x_seen = !kKeyMask || f.x >= 0.f, y_seen = !kKeyMask || f.y >= 0.f;
                s[4 * j + 0] = x_seen && key < reach_a ? exp2_approx(fmaf(s[4 * j + 0], f.x, -offset)) : 0.f;
                s[4 * j + 1] = y_seen && key + 1 < reach_a ? exp2_approx(fmaf(s[4 * j + 1], f.y, -offset)) : 0.f;
                s[4 * j + 2] = x_seen && key < reach_b ? exp2_approx(fmaf(s[4 * j + 2], f.x, -offset)) : 0.f;
                s[4 * j + 3] = y_seen && key + 1 < reach_b ? exp2_approx(fmaf(s[4 * j + 3], f.y, -offset)) : 0.f;
                sum_a += s[4 * j + 0] + s[4 * j + 1];
                sum_b += s[4 * j + 2] + s[4 * j + 3];
            }
        }
    };
    // The accumulator layout of S is the A fragment layout of P V (wgmma.cuh).
    auto pack_probabilities = [&]() {
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk)
#pragma unroll
            for (int r = 0; r < 4; ++r) pf[kk][r] = pack_float2<T>(s[8 * kk + 2 * r], s[8 * kk + 2 * r + 1]);
    };
    // After the reads of a buffer: one arrival per thread where threads read it (1 / ||k||),
    // one per warp where only the tensor cores did.
    auto release = [&](uint64_t *bar, bool thread_reads) {
        if (thread_reads) {
            mbarrier_arrive(bar);
        } else {
            __syncwarp();
            if (lane == 0) mbarrier_arrive(bar);
        }
    };

    // The consumers take a V buffer once it has landed, or in a sparse batch once its
    // hidden keys' rows are zero.
    uint64_t *v_usable = sparse ? v_ready : v_full;

    // ---- main loop: S(t) is issued before P(t - 1) V(t - 1)
    if (tiles > 0) {
        mbarrier_wait(&k_full[0], 0);
        take_turn();
        issue_scores(0);
        pass_turn();
        wgmma_wait<0>();
        wgmma_fence_operands(s);
        exponentials(0, 0);
        release(&k_empty[0], true);
        pack_probabilities();
    }
    for (int t = 1; t < tiles; ++t) {
        const int stage = t % kStages, previous = (t - 1) % kStages;
        mbarrier_wait(&k_full[stage], (t / kStages) & 1);
        mbarrier_wait(&v_usable[previous], ((t - 1) / kStages) & 1);
        take_turn();
        issue_scores(stage);
        issue_pv(previous);
        pass_turn();
        wgmma_wait<1>(); // S(t) is done; P(t - 1) V(t - 1) may still run
        wgmma_fence_operands(s);
        exponentials(t, stage);
        release(&k_empty[stage], true);
        wgmma_wait<0>();
        wgmma_fence_operands(o);
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk)
#pragma unroll
            for (int r = 0; r < 4; ++r) asm volatile("" : "+r"(pf[kk][r])); // P was read until here
        release(&v_empty[previous], false);
        pack_probabilities();
    }
    if (tiles > 0) {
        const int last = (tiles - 1) % kStages;
        mbarrier_wait(&v_usable[last], ((tiles - 1) / kStages) & 1);
        // V rows of keys past the last row's causal reach, or past a key mask's last visible
        // key, hold real values (only rows past nk come back as zeros): their P is 0, but
        // 0 * (a NaN or inf in v) must not reach
        // O. Both consumers zero them (ordinary stores, then a proxy fence for the tensor
        // cores) before either multiplies.
        const int j0 = (tiles - 1) * BN;
        const int reach = p.causal ? min(keys, min(m0 + BM, nq) + causal_offset) : keys; // keys j < reach
        // rows past the tensor came in as zeros; a packed sequence's next one's did not
        const int loaded = kPacked ? j0 + BN : min(nk, j0 + BN);
        if (reach < loaded) {
            constexpr int kLines = D / 64 * 8; // 16-byte chunks of a row
            uint8_t *v_tile = reinterpret_cast<uint8_t *>(sV + last * (BN * D));
            const int first = reach - j0, rows = loaded - reach;
            for (int c = threadIdx.x - 128; c < rows * kLines; c += 128 * C::kConsumers) {
                const int r = first + c / kLines, cb = (c % kLines) / 8, chunk = c % 8;
                // (a whole row: its chunks' order within the 128-byte line does not matter)
                *reinterpret_cast<uint4 *>(v_tile + (cb * BN + r) * 128 + chunk * 16) = make_uint4(0u, 0u, 0u, 0u);
            }
            fence_async_shared();
            named_barrier_sync(C::kZeroBarrier, 128 * C::kConsumers);
        }
        take_turn();
        issue_pv(last);
        pass_turn();
        wgmma_wait<0>();
        wgmma_fence_operands(o);
        release(&v_empty[last], false);
    }
    // The last consumer's last pass_turn is never taken: consumer 0 takes it, so that no
    // named barrier is left half-arrived.
    if (consumer == 0) take_turn();

    // ---- causal: this warp's rows whose accumulators are not finite. Keys past a row's
    // reach but within the tile's last row's met that row's p = 0 in P V, and 0 * (a NaN
    // or inf in v) is NaN. Such rows (rare) are computed again once out is stored
    // (common::recompute_nonfinite_rows); looked at here, after the loop, on registers
    // live anyway. A word per warp (bit g: row_a, bit 8 + g: row_b), which the barriers
    // below publish to the warpgroup, so that all of it takes the rare branch or none.
    uint32_t *nonfinite_rows = reinterpret_cast<uint32_t *>(smem + C::kOffsetRecompute) + 4 * consumer;
    if (p.causal) {
        // NaN or inf where any term is (or, harmlessly, where the sum overflows)
        float total_a = 0.f, total_b = 0.f;
#pragma unroll
        for (int j = 0; j < D / 8; ++j) {
            total_a += o[4 * j] + o[4 * j + 1];
            total_b += o[4 * j + 2] + o[4 * j + 3];
        }
        const uint32_t rows = quad_rows(__ballot_sync(0xffffffffu, !isfinite(total_a))) |
                              quad_rows(__ballot_sync(0xffffffffu, !isfinite(total_b))) << 8;
        if (lane == 0) nonfinite_rows[warp] = rows;
    }

    // ---- epilogue: lse, O / rowsum staged in this warpgroup's rows of sQ, then global
    sum_a = quad_sum(sum_a);
    sum_b = quad_sum(sum_b);
    const float inv_a = sum_a > 0.f ? reciprocal_approx(sum_a) : 0.f; // no visible key: out = 0
    const float inv_b = sum_b > 0.f ? reciprocal_approx(sum_b) : 0.f;
    if (p.lse != nullptr && t4 == 0) {
        float *lse = p.lse + bi * p.lse_stride[0] + hq * p.lse_stride[1] + int64_t(q_begin) * p.lse_stride[2];
        // -inf for a row that saw no key; a NaN sum (a NaN logit) gives NaN, as log-sum-exp does
        if (row_a < nq) lse[int64_t(row_a) * p.lse_stride[2]] = !(sum_a <= 0.f) ? (offset + log2_approx(sum_a)) * kLn2 : -INFINITY;
        if (row_b < nq) lse[int64_t(row_b) * p.lse_stride[2]] = !(sum_b <= 0.f) ? (offset + log2_approx(sum_b)) * kLn2 : -INFINITY;
    }
    named_barrier_sync(barrier_id, 128); // every product that read these Q rows is done
    const int srow_a = r0 + 16 * warp + g;
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
        const int col = 8 * j + 2 * t4;
        *reinterpret_cast<uint32_t *>(sQ + QTile::offset(srow_a, col)) = pack_float2<T>(o[4 * j] * inv_a, o[4 * j + 1] * inv_a);
        *reinterpret_cast<uint32_t *>(sQ + QTile::offset(srow_a + 8, col)) =
            pack_float2<T>(o[4 * j + 2] * inv_b, o[4 * j + 3] * inv_b);
    }
    named_barrier_sync(barrier_id, 128);
    T *out = static_cast<T *>(p.out) + bi * p.out_stride[0] + hq * p.out_stride[1] + int64_t(q_begin) * p.out_stride[2];
    constexpr int kChunks = D / 8;
    for (int c = tid; c < 64 * kChunks; c += 128) {
        const int r = c / kChunks, col = (c % kChunks) * 8;
        const int i = m0 + r0 + r;
        if (i >= nq || col >= p.d) continue;
        const uint4 chunk = *reinterpret_cast<const uint4 *>(sQ + QTile::offset(r0 + r, col));
        T *dst = out + int64_t(i) * p.out_stride[2] + col;
        if (p.vec_out) {
            *reinterpret_cast<uint4 *>(dst) = chunk;
        } else {
            const T *e = reinterpret_cast<const T *>(&chunk);
#pragma unroll
            for (int k = 0; k < 8; ++k) dst[k] = e[k];
        }
    }
    if (p.causal) {
        const uint4 words = *reinterpret_cast<const uint4 *>(nonfinite_rows);
        if ((words.x | words.y | words.z | words.w) != 0u) {
            // every warp's stores of out before any row is written again
            named_barrier_sync(barrier_id, 128);
            if (nonfinite_rows[warp] != 0u)
                recompute_nonfinite_rows<ForwardRows<T, D, kKeyMask, kPacked>>(p, nonfinite_rows[warp]);
        }
    }
#endif
}

template <typename T, int D> bool forward_compiled() {
    static const bool compiled = has_sm90a_image(forward_kernel<T, D, false, false>);
    return compiled;
}

template <typename T, int D, bool kKeyMask, bool kPacked>
fcsa_status launch_forward(const ForwardParams &params, cudaStream_t stream) {
    using C = ForwardConfig<T, D>;
    if constexpr (kPacked)
        return launch(forward_kernel<T, D, false, true>, params.varlen.max_tiles * params.heads, C::kThreads,
                      C::kSmemBytes, stream, params, "cuda-sm90 forward", "heads * packed query tiles");
    else
        return launch(forward_kernel<T, D, kKeyMask, false>, int64_t(params.num_m_tiles) * params.heads * params.batch,
                      C::kThreads, C::kSmemBytes, stream, params, "cuda-sm90 forward", "batch * heads * query tiles");
}

} // namespace sm90
} // namespace fcsa

// Instantiates the forward for one (T, D) without a key mask, and whether the build holds
// its code; used once per forward_<dtype>_d<D>.cu.
#define FCSA_INSTANTIATE_SM90_FORWARD(T, D)                                                    \
    template fcsa_status fcsa::sm90::launch_forward<T, D, false, false>(const fcsa::sm90::ForwardParams &, \
                                                                        cudaStream_t);                     \
    template bool fcsa::sm90::forward_compiled<T, D>();

// Instantiates the forward for one (T, D) under a key mask; used once per
// forward_<dtype>_d<D>_key_mask.cu.
#define FCSA_INSTANTIATE_SM90_FORWARD_KEY_MASK(T, D) \
    template fcsa_status fcsa::sm90::launch_forward<T, D, true, false>(const fcsa::sm90::ForwardParams &, cudaStream_t);

// Instantiates the forward for one (T, D) over packed sequences; used once per
// forward_<dtype>_d<D>_packed.cu.
#define FCSA_INSTANTIATE_SM90_FORWARD_PACKED(T, D) \
    template fcsa_status fcsa::sm90::launch_forward<T, D, false, true>(const fcsa::sm90::ForwardParams &, cudaStream_t);
