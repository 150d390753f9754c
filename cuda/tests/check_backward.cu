// check_backward.cu: device check and timing of the sm80 backward (cuda/src/sm80/backward*)
// and, with --sm90, of the same with the Hopper main kernel (cuda/src/sm90/backward*;
// cases it does not cover are skipped and counted).
//
// For every case of a sweep over the SPEC's features it draws fresh random inputs
// (seed printed; --seed N repeats one), computes out, lse and every gradient with a
// float64 host reference, rounds out / lse to what the forward would hand over, poisons
// every output and the workspace with 0xFF bytes (NaN in every dtype), runs
// fcsa::sm80_backward on a Problem filled here, and checks that
//   - every gradient element was written and is within tolerance of float64:
//     ||x - ref|| <= tol * ||ref||  (dbias, dscale: tol * the same sum over |terms|,
//     since their sums cancel), tol = 1e-5 float32, 5e-3 float16, 2e-2 bfloat16;
//   - no byte outside the outputs' logical elements changed (strided outputs);
//   - deterministic=1 runs twice with bitwise identical results.
// Then it times the backward on the FlashAttention shapes (batch = 16384 / n,
// heads = 2048 / d) and prints TFLOP/s = 2.5 * 4 * b * h * n^2 * d / t (half when causal).
//
// Build (from the repository root; -gencode per GPU, add more for more targets):
//   nvcc -std=c++17 -O3 --expt-relaxed-constexpr -DFCSA_WITH_CUDA -gencode=arch=compute_90a,code=sm_90a \
//        -DFCSA_SM90A_TARGET -Icuda/include -Icuda/src cuda/tests/check_backward.cu cuda/src/sm80/backward*.cu \
//        cuda/src/sm80/shared_memory.cu cuda/src/sm80/varlen.cu cuda/src/sm90/backward*.cu cuda/src/sm90/tensor_map.cu \
//        -o check_backward
//   (or link the .o files of a library build of the same sources; without 90a code,
//   --sm90 skips every case)
// Run: ./check_backward [--quick] [--no-timing] [--timing-only] [--timing-l2norm-off]
//      [--timing-mask] [--seed N] [--sm90]
//   (--quick: a few small cases, for compute-sanitizer memcheck / racecheck).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <random>
#include <string>
#include <thread>
#include <vector>

#ifndef FCSA_WITH_CUDA
#define FCSA_WITH_CUDA // the sm80 entry points of backends.h
#endif
#include "check_common.h"

using fcsa::Problem;
using fcsa::View;

// ---------------------------------------------------------------- host dtype helpers

static void store_value(void *base, int64_t index, int dtype, double x) {
    switch (dtype) {
    case FCSA_DTYPE_FLOAT32: static_cast<float *>(base)[index] = float(x); break;
    case FCSA_DTYPE_FLOAT16: static_cast<__half *>(base)[index] = __float2half_rn(float(x)); break;
    case FCSA_DTYPE_BFLOAT16: static_cast<__nv_bfloat16 *>(base)[index] = __float2bfloat16_rn(float(x)); break;
    default: static_cast<uint8_t *>(base)[index] = x != 0.0; break;
    }
}
static double load_value(const void *base, int64_t index, int dtype) {
    switch (dtype) {
    case FCSA_DTYPE_FLOAT32: return static_cast<const float *>(base)[index];
    case FCSA_DTYPE_FLOAT16: return __half2float(static_cast<const __half *>(base)[index]);
    case FCSA_DTYPE_BFLOAT16: return __bfloat162float(static_cast<const __nv_bfloat16 *>(base)[index]);
    default: return static_cast<const uint8_t *>(base)[index];
    }
}
static double round_to(double x, int dtype) {
    unsigned char buf[4];
    store_value(buf, 0, dtype, x);
    return load_value(buf, 0, dtype);
}
// ---------------------------------------------------------------- strided device tensors

enum Layout { kContiguous, kSequenceMajor, kPaddedRows };

// A logical 4-D tensor in device memory with some layout; the host mirror holds the whole
// allocation so that bytes outside the logical elements can be checked too.
struct DeviceTensor {
    int dtype = FCSA_DTYPE_FLOAT32;
    int64_t shape[4] = {1, 1, 1, 1}, stride[4] = {0, 0, 0, 0};
    int64_t offset = 0, alloc_elems = 0;
    void *device = nullptr;
    std::vector<unsigned char> host;

    DeviceTensor() = default;
    DeviceTensor(const DeviceTensor &) = delete;
    DeviceTensor &operator=(const DeviceTensor &) = delete;
    ~DeviceTensor() {
        if (device) cudaFree(device);
    }

    void create(int dtype_, const int64_t (&shape_)[4], Layout layout) {
        dtype = dtype_;
        for (int i = 0; i < 4; ++i) shape[i] = shape_[i];
        const int64_t d = shape[3];
        int64_t s[4];
        if (layout == kSequenceMajor) { // memory (b, n, h, d)
            s[3] = 1;
            s[1] = d;
            s[2] = shape[1] * d;
            s[0] = shape[2] * shape[1] * d;
            offset = 0;
        } else {
            const int64_t row = layout == kPaddedRows ? d + 3 : d; // odd pad: rows not 16-byte aligned
            s[3] = 1;
            s[2] = row;
            s[1] = shape[2] * row;
            s[0] = shape[1] * shape[2] * row;
            offset = layout == kPaddedRows ? 1 : 0;
        }
        alloc_elems = offset + 1;
        for (int i = 0; i < 4; ++i) {
            stride[i] = shape[i] == 1 ? 0 : s[i];
            alloc_elems += (shape[i] - 1) * s[i];
        }
        if (shape[0] * shape[1] * shape[2] * shape[3] == 0) alloc_elems = offset + 1;
        host.assign(size_t(alloc_elems) * dtype_size(dtype), 0xFF);
        CUDA_CHECK(cudaMalloc(&device, host.size()));
    }
    int64_t count() const { return shape[0] * shape[1] * shape[2] * shape[3]; }
    int64_t index(int64_t i0, int64_t i1, int64_t i2, int64_t i3) const {
        return offset + i0 * stride[0] + i1 * stride[1] + i2 * stride[2] + i3 * stride[3];
    }
    int64_t index_of(int64_t e) const { // e: row-major logical index
        const int64_t i3 = e % shape[3], i2 = (e / shape[3]) % shape[2], i1 = (e / (shape[3] * shape[2])) % shape[1],
                      i0 = e / (shape[3] * shape[2] * shape[1]);
        return index(i0, i1, i2, i3);
    }
    // Writes the logical values (rounded to dtype); returns what was stored.
    std::vector<double> upload(const std::vector<double> &values) {
        std::fill(host.begin(), host.end(), 0x00);
        std::vector<double> stored(values.size());
        for (int64_t e = 0; e < count(); ++e) {
            store_value(host.data(), index_of(e), dtype, values[e]);
            stored[e] = load_value(host.data(), index_of(e), dtype);
        }
        CUDA_CHECK(cudaMemcpy(device, host.data(), host.size(), cudaMemcpyHostToDevice));
        return stored;
    }
    void poison() {
        std::fill(host.begin(), host.end(), 0xFF);
        CUDA_CHECK(cudaMemcpy(device, host.data(), host.size(), cudaMemcpyHostToDevice));
    }
    std::vector<double> download() {
        CUDA_CHECK(cudaMemcpy(host.data(), device, host.size(), cudaMemcpyDeviceToHost));
        std::vector<double> values(static_cast<size_t>(count()));
        for (int64_t e = 0; e < count(); ++e) values[e] = load_value(host.data(), index_of(e), dtype);
        return values;
    }
    // After download(): true if every byte outside the logical elements is still 0xFF.
    bool gaps_untouched() const {
        std::vector<char> logical(host.size() / dtype_size(dtype), 0);
        for (int64_t e = 0; e < count(); ++e) logical[index_of(e)] = 1;
        for (size_t i = 0; i < logical.size(); ++i)
            if (!logical[i])
                for (size_t b = 0; b < dtype_size(dtype); ++b)
                    if (host[i * dtype_size(dtype) + b] != 0xFF) return false;
        return true;
    }
    View view() const {
        View v;
        v.data = count() == 0 ? device : static_cast<unsigned char *>(device) + offset * dtype_size(dtype);
        v.dtype = dtype;
        for (int i = 0; i < 4; ++i) {
            v.shape[i] = shape[i];
            v.stride[i] = stride[i];
        }
        return v;
    }
};

// ---------------------------------------------------------------- cases

enum ScaleKind { kScaleFloat, kScalePerHead, kScaleScalar };

struct Case {
    std::string name;
    int dtype = FCSA_DTYPE_BFLOAT16;
    int64_t b = 2, h = 4, hk = 4, nq = 100, nk = 150, d = 64;
    int64_t d_v = 0;                   // v's (out's, dout's, dv's) head dim; 0: d
    int groups = 1;
    bool causal = false, l2norm = true, deterministic = false;
    float scale = 8.f;
    ScaleKind scale_kind = kScaleFloat;
    int mask = 0;                      // 0 none, 1 random, 2 random + a hidden block + an empty batch
    int64_t bias_shape[4] = {0, 0, 0, 0}; // all zero: no bias
    bool bias_f32 = false;
    Layout layout = kContiguous;
    double input_scale = 1.0;          // spread of q and k (large with l2norm off)
};

static double tolerance(int dtype) {
    return dtype == FCSA_DTYPE_FLOAT32 ? 1e-5 : dtype == FCSA_DTYPE_FLOAT16 ? 5e-3 : 2e-2;
}

// ---------------------------------------------------------------- float64 reference
// Float64 arithmetic on the operands the kernels necessarily see: q^ and k^ rounded to
// the dtype (as the forward's products do) and delta from out rounded to the dtype.

struct Reference {
    std::vector<double> out, lse, dq, dk, dv, dbias, dscale;
    std::vector<double> dq_abs, dk_abs, dv_abs, dbias_abs, dscale_abs; // sums of |terms|
};

static void l2norm_rows(const double *x, int64_t d, int groups, double *y, double *norms) {
    const int64_t gs = d / groups;
    for (int g = 0; g < groups; ++g) {
        double s = 0;
        for (int64_t c = g * gs; c < (g + 1) * gs; ++c) s += x[c] * x[c];
        const double n = std::sqrt(s);
        norms[g] = n;
        for (int64_t c = g * gs; c < (g + 1) * gs; ++c) y[c] = x[c] / std::max(n, 1e-12);
    }
}
static void l2norm_backward(const double *x, const double *dxhat, const double *norms, int64_t d, int groups,
                            double *dx) {
    const int64_t gs = d / groups;
    for (int g = 0; g < groups; ++g) {
        const double n = norms[g];
        if (n < 1e-12) {
            for (int64_t c = g * gs; c < (g + 1) * gs; ++c) dx[c] = dxhat[c] / 1e-12;
            continue;
        }
        double dot = 0;
        for (int64_t c = g * gs; c < (g + 1) * gs; ++c) dot += x[c] / n * dxhat[c];
        for (int64_t c = g * gs; c < (g + 1) * gs; ++c) dx[c] = (dxhat[c] - x[c] / n * dot) / n;
    }
}

// |terms| bound of the l2norm backward: (|dx^| + |x^| sum |x^| |dx^|) / norm, per group.
static void l2norm_backward_abs(const double *x, const double *dxhat_abs, const double *norms, int64_t d,
                                int groups, double *dx) {
    const int64_t gs = d / groups;
    for (int g = 0; g < groups; ++g) {
        const double n = std::max(norms[g], 1e-12);
        double dot = 0;
        for (int64_t c = g * gs; c < (g + 1) * gs; ++c) dot += std::fabs(x[c] / n) * dxhat_abs[c];
        for (int64_t c = g * gs; c < (g + 1) * gs; ++c) dx[c] = (dxhat_abs[c] + std::fabs(x[c] / n) * dot) / n;
    }
}

static Reference reference(const Case &cs, const std::vector<double> &q, const std::vector<double> &k,
                           const std::vector<double> &v, const std::vector<double> &dout,
                           const std::vector<double> &mask, const std::vector<double> &bias,
                           const std::vector<double> &scales) {
    const int64_t b = cs.b, h = cs.h, hk = cs.hk, nq = cs.nq, nk = cs.nk, d = cs.d, hpk = h / hk;
    const int64_t dv = cs.d_v > 0 ? cs.d_v : d;
    const int groups = cs.groups;
    const bool has_bias = cs.bias_shape[0] != 0;
    const int64_t *bs = cs.bias_shape;
    auto bias_index = [&](int64_t ib, int64_t ih, int64_t i, int64_t j) {
        return (((bs[0] == 1 ? 0 : ib) * bs[1] + (bs[1] == 1 ? 0 : ih)) * bs[2] + (bs[2] == 1 ? 0 : i)) * bs[3] +
               (bs[3] == 1 ? 0 : j);
    };
    Reference r;
    r.out.assign(size_t(b * h * nq * dv), 0);
    r.lse.assign(size_t(b * h * nq), 0);
    r.dq.assign(size_t(b * h * nq * d), 0);
    r.dk.assign(size_t(b * hk * nk * d), 0);
    r.dv.assign(size_t(b * hk * nk * dv), 0);
    r.dq_abs.assign(r.dq.size(), 0);
    r.dk_abs.assign(r.dk.size(), 0);
    r.dv_abs.assign(r.dv.size(), 0);
    const int64_t bias_count = has_bias ? bs[0] * bs[1] * bs[2] * bs[3] : 0;
    std::vector<double> ds_all(size_t(b * h * nq * nk), 0.0);       // dS, for dbias
    std::vector<double> dscale_bh(size_t(b * h), 0), dscale_abs_bh(size_t(b * h), 0);

    auto task = [&](int64_t bg) {
        const int64_t ib = bg / hk, g = bg % hk;
        std::vector<double> khat(static_cast<size_t>(nk * d)), knorm(static_cast<size_t>(nk * groups)),
            dkhat(static_cast<size_t>(nk * d), 0.0), dkhat_abs(static_cast<size_t>(nk * d), 0.0);
        for (int64_t j = 0; j < nk; ++j) {
            const double *kr = &k[size_t(((ib * hk + g) * nk + j) * d)];
            if (cs.l2norm) {
                l2norm_rows(kr, d, groups, &khat[j * d], &knorm[j * groups]);
                for (int64_t c = 0; c < d; ++c) khat[j * d + c] = round_to(khat[j * d + c], cs.dtype);
            } else {
                std::copy(kr, kr + d, &khat[j * d]);
            }
        }
        std::vector<double> qhat(static_cast<size_t>(d)), qnorm(static_cast<size_t>(groups)), s(static_cast<size_t>(nk)),
            p(static_cast<size_t>(nk)), dqhat(static_cast<size_t>(d)), dqhat_abs(static_cast<size_t>(d));
        std::vector<char> vis(static_cast<size_t>(nk));
        for (int64_t hq = g * hpk; hq < (g + 1) * hpk; ++hq) {
            const double scale = scales[size_t(hq)];
            double dscale = 0, dscale_abs = 0;
            for (int64_t i = 0; i < nq; ++i) {
                const double *qr = &q[size_t(((ib * h + hq) * nq + i) * d)];
                if (cs.l2norm) {
                    l2norm_rows(qr, d, groups, qhat.data(), qnorm.data());
                    for (auto &e : qhat) e = round_to(e, cs.dtype);
                } else {
                    std::copy(qr, qr + d, qhat.begin());
                }
                double mx = -INFINITY;
                for (int64_t j = 0; j < nk; ++j) {
                    vis[j] = (mask.empty() || mask[size_t(ib * nk + j)] != 0) && (!cs.causal || j <= i + nk - nq);
                    double dot = 0;
                    for (int64_t c = 0; c < d; ++c) dot += qhat[c] * khat[j * d + c];
                    s[j] = dot;
                    if (vis[j]) mx = std::max(mx, scale * dot + (has_bias ? bias[size_t(bias_index(ib, hq, i, j))] : 0));
                }
                double sum = 0;
                for (int64_t j = 0; j < nk; ++j) {
                    p[j] = vis[j] ? std::exp(scale * s[j] + (has_bias ? bias[size_t(bias_index(ib, hq, i, j))] : 0) - mx) : 0;
                    sum += p[j];
                }
                const int64_t row = (ib * h + hq) * nq + i;
                r.lse[size_t(row)] = sum > 0 ? mx + std::log(sum) : -INFINITY;
                for (int64_t j = 0; j < nk; ++j) p[j] = sum > 0 ? p[j] / sum : 0;
                double *o = &r.out[size_t(row * dv)];
                for (int64_t j = 0; j < nk; ++j)
                    if (p[j] != 0)
                        for (int64_t c = 0; c < dv; ++c) o[c] += p[j] * v[size_t(((ib * hk + g) * nk + j) * dv + c)];
                const double *dor = &dout[size_t(row * dv)];
                double delta = 0; // from out as the forward stores it
                for (int64_t c = 0; c < dv; ++c) delta += dor[c] * round_to(o[c], cs.dtype);
                std::fill(dqhat.begin(), dqhat.end(), 0.0);
                std::fill(dqhat_abs.begin(), dqhat_abs.end(), 0.0);
                for (int64_t j = 0; j < nk; ++j) {
                    if (p[j] == 0) continue;
                    const double *vr = &v[size_t(((ib * hk + g) * nk + j) * dv)];
                    double dp = 0;
                    for (int64_t c = 0; c < dv; ++c) dp += dor[c] * vr[c];
                    const double ds = p[j] * (dp - delta), ds_abs = p[j] * (std::fabs(dp) + std::fabs(delta));
                    double *dvr = &r.dv[size_t(((ib * hk + g) * nk + j) * dv)];
                    double *dvr_abs = &r.dv_abs[size_t(((ib * hk + g) * nk + j) * dv)];
                    for (int64_t c = 0; c < dv; ++c) {
                        dvr[c] += p[j] * dor[c];
                        dvr_abs[c] += p[j] * std::fabs(dor[c]);
                    }
                    for (int64_t c = 0; c < d; ++c) {
                        dqhat[c] += scale * ds * khat[j * d + c];
                        dqhat_abs[c] += std::fabs(scale) * ds_abs * std::fabs(khat[j * d + c]);
                        dkhat[j * d + c] += scale * ds * qhat[c];
                        dkhat_abs[j * d + c] += std::fabs(scale) * ds_abs * std::fabs(qhat[c]);
                    }
                    dscale += ds * s[j];
                    dscale_abs += std::fabs(ds * s[j]);
                    ds_all[size_t(row * nk + j)] = ds;
                }
                double *dqr = &r.dq[size_t(row * d)], *dqr_abs = &r.dq_abs[size_t(row * d)];
                if (cs.l2norm) {
                    l2norm_backward(qr, dqhat.data(), qnorm.data(), d, groups, dqr);
                    l2norm_backward_abs(qr, dqhat_abs.data(), qnorm.data(), d, groups, dqr_abs);
                } else {
                    std::copy(dqhat.begin(), dqhat.end(), dqr);
                    std::copy(dqhat_abs.begin(), dqhat_abs.end(), dqr_abs);
                }
            }
            dscale_bh[size_t(ib * h + hq)] = dscale;
            dscale_abs_bh[size_t(ib * h + hq)] = dscale_abs;
        }
        for (int64_t j = 0; j < nk; ++j) {
            double *dkr = &r.dk[size_t(((ib * hk + g) * nk + j) * d)];
            double *dkr_abs = &r.dk_abs[size_t(((ib * hk + g) * nk + j) * d)];
            const double *kr = &k[size_t(((ib * hk + g) * nk + j) * d)];
            if (cs.l2norm) {
                l2norm_backward(kr, &dkhat[j * d], &knorm[j * groups], d, groups, dkr);
                l2norm_backward_abs(kr, &dkhat_abs[j * d], &knorm[j * groups], d, groups, dkr_abs);
            } else {
                std::copy(&dkhat[j * d], &dkhat[j * d] + d, dkr);
                std::copy(&dkhat_abs[j * d], &dkhat_abs[j * d] + d, dkr_abs);
            }
        }
    };
    std::vector<std::thread> threads;
    const int64_t tasks = b * hk;
    const int workers = std::max(1u, std::min(16u, std::thread::hardware_concurrency()));
    for (int w = 0; w < workers; ++w)
        threads.emplace_back([&, w] {
            for (int64_t t = w; t < tasks; t += workers) task(t);
        });
    for (auto &t : threads) t.join();

    if (has_bias) {
        r.dbias.assign(size_t(bias_count), 0);
        r.dbias_abs.assign(size_t(bias_count), 0);
        for (int64_t ib = 0; ib < b; ++ib)
            for (int64_t hq = 0; hq < h; ++hq)
                for (int64_t i = 0; i < nq; ++i)
                    for (int64_t j = 0; j < nk; ++j) {
                        const double ds = ds_all[size_t(((ib * h + hq) * nq + i) * nk + j)];
                        r.dbias[size_t(bias_index(ib, hq, i, j))] += ds;
                        r.dbias_abs[size_t(bias_index(ib, hq, i, j))] += std::fabs(ds);
                    }
    }
    const int64_t nscale = cs.scale_kind == kScalePerHead ? h : 1;
    r.dscale.assign(size_t(nscale), 0);
    r.dscale_abs.assign(size_t(nscale), 0);
    for (int64_t ib = 0; ib < b; ++ib)
        for (int64_t hq = 0; hq < h; ++hq) {
            r.dscale[size_t(nscale == 1 ? 0 : hq)] += dscale_bh[size_t(ib * h + hq)];
            r.dscale_abs[size_t(nscale == 1 ? 0 : hq)] += dscale_abs_bh[size_t(ib * h + hq)];
        }
    return r;
}

// ---------------------------------------------------------------- one case

static uint64_t g_seed = 0;
// --sm90: the Hopper main kernel where it covers the case; the others are skipped.
static bool g_sm90 = false;
static int g_skipped = 0;

struct Comparison {
    double error = 0, bound = 0;
    bool written = true;
    bool ok() const { return written && error <= bound; }
};

// ||x - ref|| <= tol * max(||ref||, floor * ||abs_ref||), and no NaN (unwritten) anywhere.
// abs_ref is the same sum over the magnitudes of its terms: where the terms cancel
// (one key per row: dS = 0) float32 rounding of the terms is the scale that counts.
static Comparison compare(const std::vector<double> &x, const std::vector<double> &ref,
                          const std::vector<double> &abs_ref, double tol, double floor) {
    Comparison c;
    double err = 0, norm = 0, abs_norm = 0;
    for (size_t i = 0; i < x.size(); ++i) {
        if (!std::isfinite(x[i])) c.written = false;
        err += (x[i] - ref[i]) * (x[i] - ref[i]);
        norm += ref[i] * ref[i];
        abs_norm += abs_ref[i] * abs_ref[i];
    }
    c.error = std::sqrt(err);
    c.bound = tol * std::max(std::sqrt(norm), floor * std::sqrt(abs_norm));
    if (c.bound == 0) c.bound = 1e-6; // all-zero gradients must come out (near) zero
    return c;
}

static bool run_case(const Case &cs, uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<double> normal(0.0, 1.0);
    const int64_t b = cs.b, h = cs.h, hk = cs.hk, nq = cs.nq, nk = cs.nk, d = cs.d;
    const int64_t dv = cs.d_v > 0 ? cs.d_v : d;
    const bool has_bias = cs.bias_shape[0] != 0;
    auto randn = [&](int64_t n, double sd) {
        std::vector<double> x(static_cast<size_t>(n));
        for (auto &e : x) e = normal(rng) * sd;
        return x;
    };

    DeviceTensor tq, tk, tv, tout, tdout, tdq, tdk, tdv, tlse, tmask, tbias, tdbias, tscale, tdscale;
    const int64_t qshape[4] = {b, h, nq, d}, kshape[4] = {b, hk, nk, d};
    const int64_t oshape[4] = {b, h, nq, dv}, vshape[4] = {b, hk, nk, dv};
    tq.create(cs.dtype, qshape, cs.layout);
    tk.create(cs.dtype, kshape, cs.layout);
    tv.create(cs.dtype, vshape, cs.layout);
    tout.create(cs.dtype, oshape, cs.layout);
    tdout.create(cs.dtype, oshape, cs.layout);
    tdq.create(cs.dtype, qshape, cs.layout);
    tdk.create(cs.dtype, kshape, cs.layout);
    tdv.create(cs.dtype, vshape, cs.layout);
    const int64_t lshape[4] = {b, h, nq, 1};
    tlse.create(FCSA_DTYPE_FLOAT32, lshape, kContiguous);

    const std::vector<double> q = tq.upload(randn(b * h * nq * d, cs.input_scale));
    const std::vector<double> k = tk.upload(randn(b * hk * nk * d, cs.input_scale));
    const std::vector<double> v = tv.upload(randn(b * hk * nk * dv, 1.0));
    const std::vector<double> dout = tdout.upload(randn(b * h * nq * dv, 1.0));

    std::vector<double> mask;
    if (cs.mask) {
        const int64_t mshape[4] = {b, 1, 1, nk};
        tmask.create(FCSA_DTYPE_BOOL, mshape, kContiguous);
        std::vector<double> m(static_cast<size_t>(b * nk));
        std::uniform_real_distribution<double> uni(0, 1);
        for (auto &e : m) e = uni(rng) < 0.8 ? 1 : 0;
        if (cs.mask == 2) {
            for (int64_t j = 0; j < std::min<int64_t>(nk, 140); ++j) m[size_t(j)] = 0; // a fully hidden key tile
            for (int64_t j = 0; j < nk; ++j) m[size_t((b - 1) * nk + j)] = 0;           // a batch that sees nothing
        }
        mask = tmask.upload(m);
    }
    std::vector<double> bias;
    if (has_bias) {
        int64_t shape[4];
        for (int i = 0; i < 4; ++i) shape[i] = cs.bias_shape[i];
        const int bias_dtype = cs.bias_f32 ? FCSA_DTYPE_FLOAT32 : cs.dtype;
        tbias.create(bias_dtype, shape, kContiguous);
        tdbias.create(bias_dtype, shape, kContiguous);
        bias = tbias.upload(randn(shape[0] * shape[1] * shape[2] * shape[3], 1.0));
    }
    std::vector<double> scales(size_t(h), cs.scale);
    if (cs.scale_kind != kScaleFloat) {
        const int64_t n = cs.scale_kind == kScalePerHead ? h : 1;
        const int64_t sshape[4] = {1, n, 1, 1};
        tscale.create(FCSA_DTYPE_FLOAT32, sshape, kContiguous);
        tdscale.create(FCSA_DTYPE_FLOAT32, sshape, kContiguous);
        std::vector<double> s(static_cast<size_t>(n));
        std::uniform_real_distribution<double> uni(4, 12);
        for (auto &e : s) e = uni(rng);
        s = tscale.upload(s);
        for (int64_t hh = 0; hh < h; ++hh) scales[size_t(hh)] = s[size_t(n == 1 ? 0 : hh)];
    }

    const Reference ref = reference(cs, q, k, v, dout, mask, bias, scales);
    tout.upload(ref.out); // what the forward hands over: out rounded to the dtype
    std::vector<double> lse_f32(ref.lse.size());
    for (size_t i = 0; i < lse_f32.size(); ++i) lse_f32[i] = ref.lse[i];
    tlse.upload(lse_f32);

    Problem p;
    p.b = b;
    p.h = h;
    p.hk = hk;
    p.nq = nq;
    p.nk = nk;
    p.d = d;
    p.d_v = dv;
    p.dtype = cs.dtype;
    p.device_type = FCSA_DEVICE_CUDA;
    p.scale = cs.scale;
    p.groups = cs.groups;
    p.causal = cs.causal;
    p.l2norm = cs.l2norm;
    p.deterministic = cs.deterministic;
    p.q = tq.view();
    p.k = tk.view();
    p.v = tv.view();
    p.out = tout.view();
    p.dout = tdout.view();
    p.lse = tlse.view();
    p.dq = tdq.view();
    p.dk = tdk.view();
    p.dv = tdv.view();
    if (cs.mask) {
        p.mask = tmask.view();
        p.mask.stride[1] = p.mask.stride[2] = 0;
    }
    if (has_bias) {
        p.bias = tbias.view();
        p.dbias = tdbias.view();
    }
    if (cs.scale_kind != kScaleFloat) {
        p.scale_t = tscale.view();
        p.dscale = tdscale.view();
    }

    const bool hopper = g_sm90 && fcsa::sm90_backward_supports(p) == FCSA_STATUS_SUCCESS;
    if (g_sm90 && !hopper) {
        ++g_skipped;
        return true;
    }
    const size_t ws_bytes = fcsa::sm80_backward_workspace(p, hopper);
    void *ws = nullptr;
    CUDA_CHECK(cudaMalloc(&ws, std::max<size_t>(ws_bytes, 1)));
    DeviceTensor *outputs[] = {&tdq, &tdk, &tdv, &tdbias, &tdscale};
    std::vector<std::vector<unsigned char>> first_bits;
    bool ok = true;
    std::string detail;
    const int runs = cs.deterministic ? 2 : 1;
    for (int run = 0; run < runs; ++run) {
        for (DeviceTensor *t : outputs)
            if (t->device) t->poison();
        CUDA_CHECK(cudaMemset(ws, 0xFF, std::max<size_t>(ws_bytes, 1)));
        const fcsa_status st = fcsa::sm80_backward(p, ws, nullptr, hopper);
        const cudaError_t sync = cudaDeviceSynchronize();
        if (st != FCSA_STATUS_SUCCESS || sync != cudaSuccess) {
            printf("FAIL %-44s status %d (%s) cuda %s\n", cs.name.c_str(), int(st), fcsa::g_error_message,
                   cudaGetErrorString(sync));
            cudaFree(ws);
            if (sync != cudaSuccess) exit(3);
            return false;
        }
        std::vector<std::vector<unsigned char>> bits;
        for (DeviceTensor *t : outputs) {
            if (!t->device) continue;
            t->download();
            bits.push_back(t->host);
        }
        if (run == 0)
            first_bits = bits;
        else if (bits != first_bits) {
            ok = false;
            detail += " NOT-REPRODUCIBLE";
        }
    }
    cudaFree(ws);

    const double tol = tolerance(cs.dtype);
    char buf[256];
    auto check = [&](const char *name, DeviceTensor &t, const std::vector<double> &r, const std::vector<double> &abs_ref,
                     double floor) {
        const std::vector<double> x = t.download();
        const Comparison c = compare(x, r, abs_ref, tol, floor);
        const bool gaps = t.gaps_untouched();
        snprintf(buf, sizeof buf, " %s %.1e%s%s", name, c.bound > 0 ? c.error / (c.bound / tol) : 0.0,
                 c.written ? "" : "(UNWRITTEN)", gaps ? "" : "(GAP-WRITTEN)");
        detail += buf;
        if (!c.ok() || !gaps) {
            ok = false;
            if (!c.ok()) detail += "!";
        }
    };
    // Printed: the error relative to the bound's scale (pass: <= tol).
    check("dq", tdq, ref.dq, ref.dq_abs, 0.05);
    check("dk", tdk, ref.dk, ref.dk_abs, 0.05);
    check("dv", tdv, ref.dv, ref.dv_abs, 0.05);
    if (has_bias) check("dbias", tdbias, ref.dbias, ref.dbias_abs, 1.0);
    if (cs.scale_kind != kScaleFloat) check("dscale", tdscale, ref.dscale, ref.dscale_abs, 1.0);
    printf("%s %-44s%s\n", ok ? "PASS" : "FAIL", cs.name.c_str(), detail.c_str());
    fflush(stdout);
    return ok;
}

// ---------------------------------------------------------------- the sweep

static std::vector<Case> sweep(bool quick) {
    std::vector<Case> cases;
    auto add = [&](Case c) { cases.push_back(c); };
    auto named = [](const char *fmt, auto... args) {
        char buf[128];
        snprintf(buf, sizeof buf, fmt, args...);
        return std::string(buf);
    };
    if (quick) {
        Case c;
        c.name = "quick bf16 d64 bias full";
        c.b = 1; c.h = 2; c.hk = 1; c.nq = 70; c.nk = 150; c.d = 64;
        c.bias_shape[0] = 1; c.bias_shape[1] = 2; c.bias_shape[2] = 70; c.bias_shape[3] = 150;
        add(c);
        c = Case{};
        c.name = "quick f16 d128 causal mask dscale";
        c.dtype = FCSA_DTYPE_FLOAT16; c.b = 2; c.h = 2; c.hk = 2; c.nq = 90; c.nk = 140; c.d = 128;
        c.causal = true; c.mask = 1; c.scale_kind = kScalePerHead;
        add(c);
        c.name = "quick f16 d128 deterministic bias (1,1,1,nk)";
        c.causal = false; c.deterministic = true;
        c.bias_shape[0] = 1; c.bias_shape[1] = 1; c.bias_shape[2] = 1; c.bias_shape[3] = 140;
        add(c);
        c = Case{};
        c.name = "quick f32 d256 deterministic (b,h,nq,1)";
        c.dtype = FCSA_DTYPE_FLOAT32; c.b = 1; c.h = 2; c.hk = 1; c.nq = 40; c.nk = 50; c.d = 256;
        c.deterministic = true;
        c.bias_shape[0] = 1; c.bias_shape[1] = 2; c.bias_shape[2] = 40; c.bias_shape[3] = 1; c.bias_f32 = true;
        add(c);
        c = Case{};
        c.name = "quick bf16 d128 causal gqa (shared-scores kernel)";
        c.b = 1; c.h = 2; c.hk = 1; c.nq = 90; c.nk = 200; c.d = 128; c.causal = true;
        add(c);
        c = Case{};
        c.name = "quick f16 d64 groups 2 deterministic (shared-scores kernel)";
        c.dtype = FCSA_DTYPE_FLOAT16; c.b = 1; c.h = 2; c.hk = 2; c.nq = 130; c.nk = 70; c.d = 64; c.groups = 2;
        c.deterministic = true;
        add(c);
        c = Case{};
        c.name = "quick bf16 d256 groups 2 deterministic";
        c.b = 1; c.h = 2; c.hk = 2; c.nq = 40; c.nk = 70; c.d = 256; c.groups = 2; c.deterministic = true;
        add(c);
        c = Case{};
        c.name = "quick bf16 d192 dv128 causal mask dscale";
        c.b = 1; c.h = 2; c.hk = 1; c.nq = 90; c.nk = 150; c.d = 192; c.d_v = 128;
        c.causal = true; c.mask = 1; c.scale_kind = kScalePerHead;
        add(c);
        c = Case{};
        c.name = "quick f16 d32 dv64 (shared-scores kernel)";
        c.dtype = FCSA_DTYPE_FLOAT16; c.b = 1; c.h = 2; c.hk = 1; c.nq = 90; c.nk = 150; c.d = 32; c.d_v = 64;
        add(c);
        return cases;
    }
    const int dtypes[3] = {FCSA_DTYPE_FLOAT32, FCSA_DTYPE_FLOAT16, FCSA_DTYPE_BFLOAT16};
    // Head dims, every dtype.
    for (int dt : dtypes)
        for (int64_t d : {8, 24, 40, 64, 72, 96, 128, 136, 200, 256}) {
            Case c;
            c.dtype = dt; c.d = d;
            c.b = 2; c.h = 2; c.hk = 2; c.nq = 97; c.nk = 131;
            c.name = named("%s d%lld", dtype_name(dt), (long long)d);
            add(c);
        }
    // Grouped-query and single-head kv, causal both ways, cross attention.
    for (int dt : dtypes) {
        for (int64_t hk : {1, 2}) {
            Case c;
            c.dtype = dt; c.h = 4; c.hk = hk; c.d = 64; c.nq = 150; c.nk = 260;
            c.name = named("%s gqa hk=%lld", dtype_name(dt), (long long)hk);
            add(c);
        }
        Case c;
        c.dtype = dt; c.d = 128; c.causal = true; c.nq = 100; c.nk = 300;
        c.name = named("%s causal nq<nk", dtype_name(dt));
        add(c);
        c.nq = 300; c.nk = 100;
        c.name = named("%s causal nq>nk (empty rows)", dtype_name(dt));
        add(c);
        c.nq = 200; c.nk = 200; c.mask = 1;
        c.name = named("%s causal + mask", dtype_name(dt));
        add(c);
        c.causal = false; c.mask = 2; c.nq = 120; c.nk = 400;
        c.name = named("%s mask: hidden tile, empty batch", dtype_name(dt));
        add(c);
    }
    // Groups, l2norm off, scale tensors, layouts.
    for (int dt : dtypes) {
        Case c;
        c.dtype = dt; c.d = 64; c.groups = 2;
        c.name = named("%s groups 2", dtype_name(dt));
        add(c);
        c.d = 24; c.groups = 8;
        c.name = named("%s d24 groups 8 (size 3)", dtype_name(dt));
        add(c);
        c = Case{};
        c.dtype = dt; c.d = 64; c.l2norm = false; c.scale = 0.125f; c.input_scale = 2.0;
        c.bias_shape[0] = 2; c.bias_shape[1] = 4; c.bias_shape[2] = 100; c.bias_shape[3] = 150;
        c.name = named("%s l2norm off, bias, large logits", dtype_name(dt));
        add(c);
        c.bias_shape[0] = 0; c.d = 128; c.causal = true; c.input_scale = 1.0;
        c.name = named("%s l2norm off, causal", dtype_name(dt));
        add(c);
        c = Case{};
        c.dtype = dt; c.scale_kind = kScalePerHead; c.d = 96 - (dt == FCSA_DTYPE_FLOAT32 ? 32 : 0);
        c.name = named("%s scale per head (dscale)", dtype_name(dt));
        add(c);
        c.scale_kind = kScaleScalar; c.hk = 2; c.causal = true;
        c.name = named("%s scale scalar tensor, gqa, causal", dtype_name(dt));
        add(c);
        c = Case{};
        c.dtype = dt; c.layout = kSequenceMajor; c.d = 128;
        c.name = named("%s (b, n, h, d) strides", dtype_name(dt));
        add(c);
        c.layout = kPaddedRows; c.d = 64; c.mask = 1;
        c.name = named("%s unaligned rows", dtype_name(dt));
        add(c);
    }
    // Bias shapes, with and without deterministic.
    const int64_t B = 2, H = 4, NQ = 100, NK = 150;
    const int64_t bias_shapes[][4] = {{B, H, NQ, NK}, {1, H, NQ, NK}, {B, 1, NQ, NK}, {1, 1, 1, NK}, {B, 1, 1, NK},
                                      {1, H, NQ, 1},  {B, H, 1, 1},   {1, 1, NQ, NK}};
    for (int det = 0; det < 2; ++det)
        for (const auto &bsh : bias_shapes)
            for (int dt : {FCSA_DTYPE_FLOAT32, FCSA_DTYPE_BFLOAT16}) {
                Case c;
                c.dtype = dt; c.b = B; c.h = H; c.hk = 2; c.nq = NQ; c.nk = NK; c.d = 64;
                c.deterministic = det; c.causal = bsh[3] == NK && bsh[2] == NQ; c.mask = 1;
                for (int i = 0; i < 4; ++i) c.bias_shape[i] = bsh[i];
                c.bias_f32 = dt == FCSA_DTYPE_BFLOAT16 && bsh[0] == 1;
                c.scale_kind = kScalePerHead;
                c.name = named("%s%s bias (%lld,%lld,%lld,%lld)%s", dtype_name(dt), det ? " det" : "",
                               (long long)bsh[0], (long long)bsh[1], (long long)bsh[2], (long long)bsh[3],
                               c.bias_f32 ? " f32" : "");
                add(c);
            }
    // Deterministic over the rest of the features.
    for (int dt : dtypes) {
        Case c;
        c.dtype = dt; c.deterministic = true; c.h = 4; c.hk = 1; c.causal = true; c.nq = 150; c.nk = 300;
        c.d = 128; c.mask = 2;
        c.name = named("%s det gqa causal mask", dtype_name(dt));
        add(c);
        c.d = 256; c.causal = false; c.mask = 0; c.hk = 2; c.groups = 4;
        c.name = named("%s det d256 groups 4", dtype_name(dt));
        add(c);
        c.d = 64; c.causal = true; c.hk = 1; c.groups = 1; c.nq = 300; c.nk = 150;
        c.name = named("%s det gqa causal nq>nk", dtype_name(dt));
        add(c);
    }
    // v's own head dim: the kernels run in the bucket of the wider, the other zero-padded;
    // at 256 the head dim's two column halves (one with no column of d = 96).
    const int64_t value_dims[][2] = {{32, 64}, {64, 32}, {192, 128}, {24, 40}, {96, 200}, {256, 8}};
    for (int dt : dtypes)
        for (const auto &dims : value_dims) {
            Case c;
            c.dtype = dt; c.d = dims[0]; c.d_v = dims[1];
            c.name = named("%s d%lld dv%lld", dtype_name(dt), (long long)dims[0], (long long)dims[1]);
            add(c);
            c.h = 4; c.hk = 2; c.causal = true; c.mask = 2; c.scale_kind = kScalePerHead; c.groups = 2;
            c.bias_shape[0] = 2; c.bias_shape[1] = 4; c.bias_shape[2] = 100; c.bias_shape[3] = 150;
            c.name = named("%s d%lld dv%lld everything", dtype_name(dt), (long long)dims[0], (long long)dims[1]);
            add(c);
            c.deterministic = true; c.causal = false; c.layout = kPaddedRows;
            c.bias_shape[0] = 1; c.bias_shape[1] = 4; c.bias_shape[2] = 100; c.bias_shape[3] = 1;
            c.name = named("%s d%lld dv%lld det unaligned bias (1,h,nq,1)", dtype_name(dt), (long long)dims[0],
                           (long long)dims[1]);
            add(c);
        }
    // Edge sizes.
    for (int dt : dtypes) {
        Case c;
        c.dtype = dt;
        c.nq = 1; c.nk = 333;
        c.name = named("%s nq=1", dtype_name(dt));
        add(c);
        c.nq = 77; c.nk = 1;
        c.name = named("%s nk=1", dtype_name(dt));
        add(c);
        c.nq = 50; c.nk = 0;
        c.bias_shape[0] = 1; c.bias_shape[1] = 4; c.bias_shape[2] = 50; c.bias_shape[3] = 1;
        c.scale_kind = kScalePerHead;
        c.name = named("%s nk=0", dtype_name(dt));
        add(c);
        c = Case{};
        c.dtype = dt; c.nq = 0; c.nk = 60; c.scale_kind = kScaleScalar;
        c.name = named("%s nq=0", dtype_name(dt));
        add(c);
    }
    return cases;
}

// ---------------------------------------------------------------- timing

// Uniform values of the given mean and standard deviation from a hash of (seed, index).
template <typename T> __global__ void fill_random_kernel(T *p, size_t count, uint64_t seed, float mean, float sd) {
    for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < count; i += size_t(gridDim.x) * blockDim.x) {
        uint64_t z = seed + 0x9E3779B97F4A7C15ull * (i + 1);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        const float u = float(z >> 40) * (1.f / 16777216.f) - 0.5f; // [-0.5, 0.5)
        p[i] = T(mean + sd * 3.4641016f * u);
    }
}
static void fill_random(void *p, size_t count, int dtype, uint64_t seed, double mean, double sd) {
    if (dtype == FCSA_DTYPE_FLOAT32)
        fill_random_kernel<<<1024, 256>>>(static_cast<float *>(p), count, seed, float(mean), float(sd));
    else if (dtype == FCSA_DTYPE_FLOAT16)
        fill_random_kernel<<<1024, 256>>>(static_cast<__half *>(p), count, seed, float(mean), float(sd));
    else
        fill_random_kernel<<<1024, 256>>>(static_cast<__nv_bfloat16 *>(p), count, seed, float(mean), float(sd));
    CUDA_CHECK(cudaGetLastError());
}

static bool g_time_l2norm = true; // --timing-l2norm-off: time without the fused l2norm
static bool g_time_mask = false;  // --timing-mask: with a key mask (every tenth key hidden)

static void time_shape(int dtype, int64_t n, int64_t d, bool causal, bool deterministic) {
    const int64_t b = 16384 / n, h = 2048 / d;
    const size_t elems = size_t(b * h * n * d), esz = dtype_size(dtype);
    void *buf[8];
    for (auto &x : buf) CUDA_CHECK(cudaMalloc(&x, elems * esz));
    float *lse;
    CUDA_CHECK(cudaMalloc(&lse, size_t(b * h * n) * 4));
    for (int i = 0; i < 5; ++i) fill_random(buf[i], elems, dtype, g_seed + i, 0.0, 1.0);
    // lse = log(n) + scale keeps P = exp(s - lse) below 1 for random data.
    fill_random(lse, size_t(b * h * n), FCSA_DTYPE_FLOAT32, g_seed + 9, std::log(double(n)) + 10.0, 0.1);
    Problem p;
    p.b = b; p.h = h; p.hk = h; p.nq = n; p.nk = n; p.d = d; p.d_v = d;
    p.dtype = dtype; p.device_type = FCSA_DEVICE_CUDA; p.causal = causal;
    p.scale = g_time_l2norm ? 10.f : float(1.0 / std::sqrt(double(d))); // bounded logits either way
    p.deterministic = deterministic;
    p.l2norm = g_time_l2norm;
    p.q = contiguous_view(buf[0], dtype, b, h, n, d);
    p.k = contiguous_view(buf[1], dtype, b, h, n, d);
    p.v = contiguous_view(buf[2], dtype, b, h, n, d);
    p.out = contiguous_view(buf[3], dtype, b, h, n, d);
    p.dout = contiguous_view(buf[4], dtype, b, h, n, d);
    p.dq = contiguous_view(buf[5], dtype, b, h, n, d);
    p.dk = contiguous_view(buf[6], dtype, b, h, n, d);
    p.dv = contiguous_view(buf[7], dtype, b, h, n, d);
    p.lse = contiguous_view(lse, FCSA_DTYPE_FLOAT32, b, h, n, 1);
    uint8_t *mask = nullptr;
    if (g_time_mask) {
        std::vector<uint8_t> host(size_t(b * n));
        for (size_t j = 0; j < host.size(); ++j) host[j] = j % 10 != 9;
        CUDA_CHECK(cudaMalloc(&mask, host.size()));
        CUDA_CHECK(cudaMemcpy(mask, host.data(), host.size(), cudaMemcpyHostToDevice));
        p.mask = contiguous_view(mask, FCSA_DTYPE_BOOL, b, 1, 1, n); // (b, 1, 1, nk)
    }
    const bool hopper = g_sm90 && fcsa::sm90_backward_supports(p) == FCSA_STATUS_SUCCESS;
    const size_t ws_bytes = fcsa::sm80_backward_workspace(p, hopper);
    void *ws;
    CUDA_CHECK(cudaMalloc(&ws, ws_bytes));
    const double t = median_launch_ms([&] { return fcsa::sm80_backward(p, ws, nullptr, hopper); }, 10) * 1e-3;
    CUDA_CHECK(cudaGetLastError());
    const double flops = 2.5 * 4.0 * double(b) * double(h) * double(n) * double(n) * double(d) * (causal ? 0.5 : 1.0);
    printf("TIME %-4s d=%-3lld n=%-5lld b=%-2lld h=%-2lld %-6s %-5s%s %-4s %8.3f ms %6.1f TFLOP/s\n", dtype_name(dtype),
           (long long)d, (long long)n, (long long)b, (long long)h, causal ? "causal" : "", deterministic ? "det" : "",
           g_time_mask ? " mask" : "", hopper ? "sm90" : "sm80", t * 1e3, flops / t * 1e-12);
    fflush(stdout);
    cudaFree(ws);
    cudaFree(lse);
    cudaFree(mask);
    for (auto &x : buf) cudaFree(x);
}

int main(int argc, char **argv) {
    bool quick = false, timing = true, sweep_cases = true;
    g_seed = uint64_t(std::chrono::high_resolution_clock::now().time_since_epoch().count());
    for (int i = 1; i < argc; ++i) {
        if (!strcmp(argv[i], "--quick")) quick = true;
        if (!strcmp(argv[i], "--no-timing")) timing = false;
        if (!strcmp(argv[i], "--timing-only")) sweep_cases = false;
        if (!strcmp(argv[i], "--timing-l2norm-off")) g_time_l2norm = false;
        if (!strcmp(argv[i], "--timing-mask")) g_time_mask = true;
        if (!strcmp(argv[i], "--sm90")) g_sm90 = true;
        if (!strcmp(argv[i], "--seed") && i + 1 < argc) g_seed = strtoull(argv[++i], nullptr, 10);
        if (!strcmp(argv[i], "--profile") && i + 4 < argc) { // dtype d n causal: one timed shape, for ncu
            time_shape(atoi(argv[i + 1]), atoll(argv[i + 3]), atoll(argv[i + 2]), atoi(argv[i + 4]) != 0, false);
            return 0;
        }
    }
    cudaDeviceProp prop;
    CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    printf("device %s (sm_%d%d, %d SMs), seed %llu\n", prop.name, prop.major, prop.minor, prop.multiProcessorCount,
           (unsigned long long)g_seed);
    int failures = 0, count = 0;
    const std::vector<Case> cases = sweep_cases ? sweep(quick) : std::vector<Case>();
    for (size_t i = 0; i < cases.size(); ++i) {
        failures += !run_case(cases[i], g_seed + 1000 * i);
        ++count;
    }
    printf("%d of %d cases passed (%d skipped: not covered by --sm90)\n", count - failures - g_skipped, count - g_skipped,
           g_skipped);
    if (timing && !quick) {
        for (int64_t d : {64, 128})
            for (bool causal : {false, true})
                for (int64_t n : {512, 1024, 2048, 4096, 8192, 16384})
                    time_shape(FCSA_DTYPE_BFLOAT16, n, d, causal, false);
        time_shape(FCSA_DTYPE_FLOAT16, 8192, 128, false, false);
        time_shape(FCSA_DTYPE_BFLOAT16, 4096, 128, false, true);
        time_shape(FCSA_DTYPE_FLOAT32, 2048, 64, false, false);
    }
    printf("%s\n", failures == 0 ? "ALL PASS" : "SOME FAILED");
    return failures == 0 ? 0 : 1;
}
