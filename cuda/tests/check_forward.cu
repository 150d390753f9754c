// check_forward.cu: device check and timing of the CUDA forwards: the portable one
// (cuda/src/sm80) and, with --sm90, the Hopper one (cuda/src/sm90).
//
// It builds Problems itself and calls the backends' entry points directly, so it needs
// only the kernels, not the rest of the library. Build: cuda/tests/check_forward.sh.
//
//   ./check_forward            correctness sweep, then timings
//   ./check_forward --quick    a few small cases (for compute-sanitizer memcheck/racecheck)
//   ./check_forward --no-time  the sweep only
//   ./check_forward --seed N   repeat a run (each run draws a fresh seed and prints it)
//   ./check_forward --mla      the quick cases, then the timings of (d, d_v) = (192, 128)
//                              and (128, 128) only (issue #21's bar, per FLOP)
//   ./check_forward --bf16     timings of bfloat16 only
//   ./check_forward --sm90     the Hopper forward: cases it does not cover are skipped,
//                              and the timings show it beside the portable one
//   ./check_forward --profile DTYPE D N CAUSAL   5 launches of one shape (for ncu);
//                              DTYPE as fcsa_dtype (0 f32, 1 f16, 2 bf16)
//
// Every case draws fresh random inputs, poisons the whole output buffers (gaps between
// strided rows included) with NaN, runs the kernel and compares every element with a
// float64 reference computed here from the same (rounded) inputs: relative l2 error per
// dtype, max error, rows with no visible key exactly 0 with lse = -inf, and every byte
// outside the output's logical elements still NaN. Exit status 1 on any failure.
#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "check_common.h"
#include "problem.h"

using fcsa::Problem;
using fcsa::View;

static std::mt19937_64 rng;

// The backend under test: the portable forward, or with --sm90 the Hopper one.
static bool g_sm90 = false;
static fcsa_status forward_supports(const Problem &p, bool sm90) {
    return sm90 ? fcsa::sm90_forward_supports(p) : fcsa::sm80_supports(p, false);
}
static size_t forward_workspace(const Problem &p, bool sm90) {
    return sm90 ? fcsa::sm90_forward_workspace(p) : fcsa::sm80_forward_workspace(p);
}
static fcsa_status forward(const Problem &p, void *workspace, bool sm90) {
    return sm90 ? fcsa::sm90_forward(p, workspace, nullptr) : fcsa::sm80_forward(p, workspace, nullptr);
}

// ---------------------------------------------------------------- host tensors
// A strided 4-D tensor: host bytes mirror the device buffer exactly.
struct Tensor {
    int dtype = FCSA_DTYPE_FLOAT32;
    int64_t shape[4] = {1, 1, 1, 1};
    int64_t stride[4] = {0, 0, 0, 0};
    size_t elements = 0; // buffer size, gaps included
    std::vector<uint8_t> host;
    void *device = nullptr;

    double get(int64_t i0, int64_t i1, int64_t i2, int64_t i3) const {
        const int64_t o = i0 * stride[0] + i1 * stride[1] + i2 * stride[2] + i3 * stride[3];
        return get_flat(o);
    }
    double get_flat(int64_t o) const {
        switch (dtype) {
        case FCSA_DTYPE_FLOAT32: return reinterpret_cast<const float *>(host.data())[o];
        case FCSA_DTYPE_FLOAT16: return __half2float(reinterpret_cast<const __half *>(host.data())[o]);
        case FCSA_DTYPE_BFLOAT16: return __bfloat162float(reinterpret_cast<const __nv_bfloat16 *>(host.data())[o]);
        default: return host[o];
        }
    }
    void set_flat(int64_t o, double x) {
        switch (dtype) {
        case FCSA_DTYPE_FLOAT32: reinterpret_cast<float *>(host.data())[o] = float(x); break;
        case FCSA_DTYPE_FLOAT16: reinterpret_cast<__half *>(host.data())[o] = __float2half_rn(float(x)); break;
        case FCSA_DTYPE_BFLOAT16:
            reinterpret_cast<__nv_bfloat16 *>(host.data())[o] = __float2bfloat16_rn(float(x));
            break;
        default: host[o] = x != 0.0;
        }
    }
    View view() const {
        View v;
        v.data = device;
        v.dtype = dtype;
        for (int i = 0; i < 4; ++i) {
            v.shape[i] = shape[i];
            v.stride[i] = shape[i] == 1 ? 0 : stride[i];
        }
        return v;
    }
    void upload() { CUDA_CHECK(cudaMemcpy(device, host.data(), host.size(), cudaMemcpyHostToDevice)); }
    void download() { CUDA_CHECK(cudaMemcpy(host.data(), device, host.size(), cudaMemcpyDeviceToHost)); }
    void poison() { CUDA_CHECK(cudaMemset(device, 0xff, host.size())); } // NaN in every float format
    void release() {
        if (device) CUDA_CHECK(cudaFree(device));
        device = nullptr;
    }
};

// Layouts of a (B, H, N, D) tensor in memory.
enum Layout { kContiguous = 0, kSeqMajor = 1, kPaddedRows = 2 };

static Tensor make_tensor(int dtype, int64_t b, int64_t h, int64_t n, int64_t d, Layout layout) {
    Tensor t;
    t.dtype = dtype;
    t.shape[0] = b, t.shape[1] = h, t.shape[2] = n, t.shape[3] = d;
    if (layout == kSeqMajor) { // (B, N, H, D) in memory, as after a projection
        t.stride[3] = 1, t.stride[1] = d, t.stride[2] = h * d, t.stride[0] = n * h * d;
    } else {
        const int64_t row = layout == kPaddedRows ? d + 3 : d; // odd pad: rows not 16-byte aligned
        t.stride[3] = 1, t.stride[2] = row, t.stride[1] = n * row, t.stride[0] = h * n * row + 5 * (layout == kPaddedRows);
    }
    t.elements = size_t((b - 1) * t.stride[0] + (h - 1) * t.stride[1] + (n - 1) * t.stride[2] + d);
    if (b == 0 || h == 0 || n == 0) t.elements = 1;
    t.host.assign(t.elements * dtype_size(dtype), 0);
    CUDA_CHECK(cudaMalloc(&t.device, t.host.size()));
    return t;
}

static void fill_uniform(Tensor &t, double lo, double hi) {
    std::uniform_real_distribution<double> u(lo, hi);
    for (size_t i = 0; i < t.elements; ++i) t.set_flat(int64_t(i), u(rng));
}

// ---------------------------------------------------------------- cases
struct Case {
    std::string name;
    int dtype = FCSA_DTYPE_BFLOAT16;
    int b = 2, h = 4, hk = 4, nq = 77, nk = 93, d = 64;
    int d_v = 0;               // v's (and out's) head dim; 0: d
    int groups = 1;
    bool causal = false, l2norm = true, lse = true;
    int mask = 0;              // 0 none, 1 random keys, 2 padding (prefix visible), 3 padding with one batch fully hidden
    int bias = 0;              // 0 none, 1 full (b,h,nq,nk), 2 (h,nq,nk), 3 (b,1,nq,nk), 4 (1,1,1,nk), 5 (b,h,nq,1)
    bool bias_f32 = false;
    int scale_tensor = 0;      // 0 float, 1 per-head tensor, 2 shape-() tensor
    float scale = 8.f;
    Layout layout = kContiguous;
    double magnitude = 1.0;    // inputs uniform in [-magnitude, magnitude]
    double bias_magnitude = 2.0;
    double tolerance = 0;      // > 0: replaces the dtype's (for ill-conditioned logits)
};

struct Result {
    bool pass = true, skipped = false;
    double rel_l2 = 0, max_err = 0, lse_err = 0;
    std::string why;
};

static double tolerance(int dtype) {
    return dtype == FCSA_DTYPE_FLOAT32 ? 1e-5 : dtype == FCSA_DTYPE_FLOAT16 ? 2e-3 : 1.2e-2;
}

static Result run_case(const Case &c) {
    Result res;
    const int64_t b = c.b, h = c.h, hk = c.hk, nq = c.nq, nk = c.nk, d = c.d, dv = c.d_v > 0 ? c.d_v : c.d;
    Tensor q = make_tensor(c.dtype, b, h, nq, d, c.layout);
    Tensor k = make_tensor(c.dtype, b, hk, nk, d, c.layout);
    Tensor v = make_tensor(c.dtype, b, hk, nk, dv, c.layout);
    Tensor out = make_tensor(c.dtype, b, h, nq, dv, c.layout);
    Tensor lse = make_tensor(FCSA_DTYPE_FLOAT32, b, h, nq, 1, kContiguous);
    fill_uniform(q, -c.magnitude, c.magnitude);
    fill_uniform(k, -c.magnitude, c.magnitude);
    fill_uniform(v, -1, 1);
    q.upload(), k.upload(), v.upload();

    Tensor mask, bias, scale_t;
    if (c.mask) { // stored (nk, b): strided on both dims
        mask.dtype = FCSA_DTYPE_BOOL;
        mask.shape[0] = b, mask.shape[3] = nk;
        mask.stride[0] = 1, mask.stride[3] = b;
        mask.elements = size_t(std::max<int64_t>(1, b * nk));
        mask.host.assign(mask.elements, 0);
        std::uniform_real_distribution<double> u(0, 1);
        for (int64_t bi = 0; bi < b; ++bi) {
            const int64_t visible = int64_t(u(rng) * nk * 0.8) + nk / 5;
            for (int64_t j = 0; j < nk; ++j) {
                bool on = c.mask == 1 ? u(rng) < 0.6 : j < visible;
                if (c.mask == 3 && bi == 0) on = false;
                mask.host[bi * mask.stride[0] + j * mask.stride[3]] = on;
            }
        }
        CUDA_CHECK(cudaMalloc(&mask.device, mask.host.size()));
        mask.upload();
    }
    if (c.bias) {
        bias.dtype = c.bias_f32 ? FCSA_DTYPE_FLOAT32 : c.dtype;
        const int64_t full[4] = {b, h, nq, nk};
        const bool keep[6][4] = {{}, {1, 1, 1, 1}, {0, 1, 1, 1}, {1, 0, 1, 1}, {0, 0, 0, 1}, {1, 1, 1, 0}};
        int64_t s = 1;
        for (int i = 3; i >= 0; --i) {
            bias.shape[i] = keep[c.bias][i] ? full[i] : 1;
            bias.stride[i] = keep[c.bias][i] ? s : 0;
            s *= bias.shape[i];
        }
        bias.elements = size_t(std::max<int64_t>(1, s));
        bias.host.assign(bias.elements * dtype_size(bias.dtype), 0);
        CUDA_CHECK(cudaMalloc(&bias.device, bias.host.size()));
        fill_uniform(bias, -c.bias_magnitude, c.bias_magnitude);
        bias.upload();
    }
    std::vector<double> scales(h, c.scale);
    if (c.scale_tensor) {
        scale_t.dtype = FCSA_DTYPE_FLOAT32;
        scale_t.shape[1] = c.scale_tensor == 1 ? h : 1;
        scale_t.stride[1] = c.scale_tensor == 1 ? 1 : 0;
        scale_t.elements = size_t(scale_t.shape[1]);
        scale_t.host.assign(scale_t.elements * 4, 0);
        std::uniform_real_distribution<double> u(2, 16);
        for (size_t i = 0; i < scale_t.elements; ++i) scale_t.set_flat(int64_t(i), (i % 3 == 2 ? -1 : 1) * u(rng));
        for (int64_t hi = 0; hi < h; ++hi) scales[hi] = scale_t.get(0, hi, 0, 0);
        CUDA_CHECK(cudaMalloc(&scale_t.device, scale_t.host.size()));
        scale_t.upload();
    }

    Problem p;
    p.b = b, p.h = h, p.hk = hk, p.nq = nq, p.nk = nk, p.d = d, p.d_v = dv;
    p.dtype = c.dtype;
    p.device_type = FCSA_DEVICE_CUDA;
    p.device_index = 0;
    p.scale = c.scale;
    p.groups = c.groups;
    p.causal = c.causal;
    p.l2norm = c.l2norm;
    p.q = q.view(), p.k = k.view(), p.v = v.view(), p.out = out.view();
    if (c.lse) p.lse = lse.view();
    if (c.mask) p.mask = mask.view();
    if (c.bias) p.bias = bias.view();
    if (c.scale_tensor) p.scale_t = scale_t.view();

    out.poison();
    lse.poison();
    fcsa_status st = forward_supports(p, g_sm90);
    if (g_sm90 && st == FCSA_STATUS_NOT_SUPPORTED) { // a case for the portable path
        res.skipped = true;
        res.why = fcsa::g_error_message;
        q.release(), k.release(), v.release(), out.release(), lse.release(), mask.release(), bias.release(),
            scale_t.release();
        return res;
    }
    // The workspace (the key-norm pass's output) poisoned too: the pass writes all of it.
    const size_t workspace_bytes = forward_workspace(p, g_sm90);
    void *workspace = nullptr;
    if (workspace_bytes > 0) {
        CUDA_CHECK(cudaMalloc(&workspace, workspace_bytes));
        CUDA_CHECK(cudaMemset(workspace, 0xff, workspace_bytes));
    }
    if (st == FCSA_STATUS_SUCCESS) st = forward(p, workspace, g_sm90);
    CUDA_CHECK(cudaDeviceSynchronize());
    CUDA_CHECK(cudaFree(workspace));
    if (st != FCSA_STATUS_SUCCESS) {
        res.pass = false;
        res.why = std::string("status ") + std::to_string(st) + ": " + fcsa::g_error_message;
        q.release(), k.release(), v.release(), out.release(), lse.release(), mask.release(), bias.release(),
            scale_t.release();
        return res;
    }
    CUDA_CHECK(cudaGetLastError());
    CUDA_CHECK(cudaDeviceSynchronize());
    out.download();
    lse.download();

    // float64 reference
    const int64_t group_size = d / c.groups;
    const int64_t per_kv = h / hk;
    std::vector<double> kn(static_cast<size_t>(nk * d)), qn(static_cast<size_t>(d));
    std::vector<double> logits(static_cast<size_t>(nk)), ref(static_cast<size_t>(dv));
    std::vector<char> written(out.elements, 0);
    double err2 = 0, ref2 = 0;
    auto normalize = [&](std::vector<double> &x, int64_t offset) {
        for (int64_t g0 = 0; g0 < d; g0 += group_size) {
            double ss = 0;
            for (int64_t e = g0; e < g0 + group_size; ++e) ss += x[offset + e] * x[offset + e];
            const double inv = 1.0 / std::max(std::sqrt(ss), 1e-12);
            for (int64_t e = g0; e < g0 + group_size; ++e) x[offset + e] *= inv;
        }
    };
    for (int64_t bi = 0; bi < b; ++bi)
        for (int64_t hi = 0; hi < h; ++hi) {
            const int64_t kvh = hi / per_kv;
            for (int64_t j = 0; j < nk; ++j) {
                for (int64_t e = 0; e < d; ++e) kn[j * d + e] = k.get(bi, kvh, j, e);
                if (c.l2norm) normalize(kn, j * d);
            }
            for (int64_t i = 0; i < nq; ++i) {
                for (int64_t e = 0; e < d; ++e) qn[e] = q.get(bi, hi, i, e);
                if (c.l2norm) normalize(qn, 0);
                double mx = -INFINITY;
                for (int64_t j = 0; j < nk; ++j) {
                    bool vis = true;
                    if (c.causal && j > i + nk - nq) vis = false;
                    if (c.mask && !mask.host[bi * mask.stride[0] + j * mask.stride[3]]) vis = false;
                    if (!vis) {
                        logits[j] = -INFINITY;
                        continue;
                    }
                    double s = 0;
                    for (int64_t e = 0; e < d; ++e) s += qn[e] * kn[j * d + e];
                    s *= scales[hi];
                    if (c.bias)
                        s += bias.get(bias.shape[0] > 1 ? bi : 0, bias.shape[1] > 1 ? hi : 0, bias.shape[2] > 1 ? i : 0,
                                      bias.shape[3] > 1 ? j : 0);
                    logits[j] = s;
                    mx = std::max(mx, s);
                }
                double sum = 0;
                std::fill(ref.begin(), ref.end(), 0.0);
                if (mx > -INFINITY)
                    for (int64_t j = 0; j < nk; ++j) {
                        if (logits[j] == -INFINITY) continue;
                        const double pj = std::exp(logits[j] - mx);
                        sum += pj;
                        for (int64_t e = 0; e < dv; ++e) ref[e] += pj * v.get(bi, kvh, j, e);
                    }
                const bool empty = sum == 0;
                const double ref_lse = empty ? -INFINITY : mx + std::log(sum);
                for (int64_t e = 0; e < dv; ++e) {
                    const double r = empty ? 0.0 : ref[e] / sum;
                    const int64_t o = bi * out.stride[0] + hi * out.stride[1] + i * out.stride[2] + e;
                    written[o] = 1;
                    const double got = out.get_flat(o);
                    if (std::isnan(got)) {
                        if (res.pass) res.why = "unwritten or NaN output element";
                        res.pass = false;
                    }
                    if (empty && got != 0.0) {
                        if (res.pass) res.why = "row with no visible key is not 0";
                        res.pass = false;
                    }
                    err2 += (got - r) * (got - r);
                    ref2 += r * r;
                    res.max_err = std::max(res.max_err, std::fabs(got - r));
                }
                if (c.lse) {
                    const double got = lse.get(bi, hi, i, 0);
                    if (empty) {
                        if (!(std::isinf(got) && got < 0)) {
                            if (res.pass) res.why = "lse of a row with no visible key is not -inf";
                            res.pass = false;
                        }
                    } else {
                        const double e = std::fabs(got - ref_lse) / std::max(1.0, std::fabs(ref_lse));
                        if (!(e <= 1e-2)) res.lse_err = std::max(res.lse_err, 1.0); // NaN or far off
                        res.lse_err = std::max(res.lse_err, e);
                    }
                }
            }
        }
    // Nothing outside the logical elements may have been touched.
    for (size_t o = 0; o < out.elements; ++o)
        if (!written[o] && !std::isnan(out.get_flat(int64_t(o)))) {
            if (res.pass) res.why = "a byte outside the output's elements was written";
            res.pass = false;
            break;
        }
    res.rel_l2 = ref2 > 0 ? std::sqrt(err2 / ref2) : std::sqrt(err2);
    const double tol = c.tolerance > 0 ? c.tolerance : tolerance(c.dtype);
    if (!(res.rel_l2 <= tol)) {
        if (res.pass) res.why = "relative l2 error above " + std::to_string(tol);
        res.pass = false;
    }
    // 16-bit inputs: q is normalized into its own dtype (as F.normalize would), which
    // moves the logits by about |scale| * 2^-9 (bf16) or 2^-12 (f16). float32: lse is
    // formed as (offset + log2(sum)) * ln 2 with the fixed offset of bounded logits, so
    // log2(sum) reaches 2 * |scale| * log2(e) (23.1 at the cases' scale 8), where
    // lg2.approx's relative error 2^-22.6 alone is 2.5e-6 (a row that sees one key at
    // the far end of the range); 2e-6 was below that.
    const double lse_tol = c.dtype == FCSA_DTYPE_FLOAT32 ? 4e-6 : c.dtype == FCSA_DTYPE_FLOAT16 ? 2e-3 : 1.5e-2;
    if (!(res.lse_err <= lse_tol)) {
        if (res.pass) res.why = "lse error above " + std::to_string(lse_tol);
        res.pass = false;
    }
    q.release(), k.release(), v.release(), out.release(), lse.release(), mask.release(), bias.release(),
        scale_t.release();
    return res;
}

static std::vector<Case> sweep(bool quick) {
    std::vector<Case> cases;
    const int dtypes[3] = {FCSA_DTYPE_FLOAT32, FCSA_DTYPE_FLOAT16, FCSA_DTYPE_BFLOAT16};
    auto add = [&](Case c, const std::string &name) {
        c.name = name;
        cases.push_back(c);
    };
    if (quick) {
        for (int dt : dtypes) {
            Case c;
            c.dtype = dt, c.b = 1, c.h = 2, c.hk = 1, c.nq = 70, c.nk = 90, c.d = 40;
            c.causal = true, c.mask = 2, c.bias = 0;
            add(c, "quick causal+mask gqa d40");
            c.causal = false, c.mask = 0, c.bias = 3, c.groups = 2, c.d = 64, c.layout = kPaddedRows;
            add(c, "quick bias groups unaligned d64");
            c.bias = 0, c.groups = 4, c.d = 128; // swizzled K/V tiles (16-bit), element copies
            add(c, "quick groups unaligned d128");
            c.groups = 1, c.layout = kContiguous, c.nq = 2050, c.nk = 130, c.mask = 1;
            add(c, "quick key-norm pass + mask d128");
            c.nq = 150, c.d = 192, c.d_v = 128, c.causal = true, c.bias = 1;
            add(c, "quick causal+mask+bias d192 dv128");
        }
        return cases;
    }
    const int dims[] = {8, 16, 32, 40, 64, 72, 96, 128, 136, 192, 200, 256};
    for (int dt : dtypes)
        for (int d : dims) {
            Case c;
            c.dtype = dt, c.d = d;
            add(c, "plain d" + std::to_string(d));
        }
    for (int dt : dtypes) {
        Case c;
        c.dtype = dt;
        c.causal = true;
        add(c, "causal nq<nk");
        c.nq = 150, c.nk = 61;
        add(c, "causal nq>nk (empty rows)");
        c.nq = 200, c.nk = 200, c.d = 128;
        add(c, "causal square d128");
        c = Case();
        c.dtype = dt, c.mask = 1;
        add(c, "mask random");
        c.mask = 3, c.nk = 300;
        add(c, "mask padding, one batch fully hidden");
        c.causal = true, c.mask = 2;
        add(c, "mask padding + causal");
        c = Case();
        c.dtype = dt, c.nk = 0;
        add(c, "nk = 0");
        c.nk = 1, c.nq = 1;
        add(c, "nq = nk = 1");
        c = Case();
        c.dtype = dt, c.hk = 1;
        add(c, "single kv head");
        c.hk = 2, c.d = 128, c.layout = kSeqMajor;
        add(c, "gqa 4/2, (b,n,h,d) layout d128");
        c = Case();
        c.dtype = dt, c.layout = kPaddedRows, c.d = 72;
        add(c, "unaligned rows d72");
        c.d = 128;
        add(c, "unaligned rows d128");
        c = Case();
        c.dtype = dt, c.groups = 4;
        add(c, "groups 4 d64");
        c.groups = 5, c.d = 40;
        add(c, "groups 5 d40 (group size 8)");
        c.groups = 3, c.d = 48;
        add(c, "groups 3 d48 (group size 16)");
        c.groups = 4, c.d = 40;
        add(c, "groups 4 d40 (group size 10)");
        // From d = 128 on 16-bit K/V tiles are swizzled: groups permuted within the rows.
        c.groups = 16, c.d = 128;
        add(c, "groups 16 d128 (group size 8)");
        c.groups = 5, c.d = 200;
        add(c, "groups 5 d200 (group size 40)");
        c.groups = 2, c.d = 136, c.layout = kPaddedRows;
        add(c, "groups 2 unaligned rows d136");
        c = Case();
        c.dtype = dt, c.scale_tensor = 1;
        add(c, "per-head scale tensor (some negative)");
        c.scale_tensor = 2;
        add(c, "scalar scale tensor");
        c = Case();
        c.dtype = dt, c.scale = 40.f;
        add(c, "scale 40 (running max)");
        for (int kind = 1; kind <= 5; ++kind) {
            c = Case();
            c.dtype = dt, c.bias = kind, c.bias_f32 = kind % 2 == 0, c.causal = kind == 3, c.mask = kind == 4 ? 1 : 0;
            add(c, "bias kind " + std::to_string(kind) + (c.bias_f32 ? " f32" : ""));
        }
        c = Case();
        // Logits near 1e4 carry float32 rounding of ~1e-3 absolute: any float32
        // computation is that far from the float64 reference.
        c.dtype = dt, c.bias = 1, c.bias_magnitude = dt == FCSA_DTYPE_FLOAT16 ? 5000 : 1e4;
        c.tolerance = dt == FCSA_DTYPE_FLOAT32 ? 3e-3 : 0;
        add(c, "large bias");
        c = Case();
        c.dtype = dt, c.l2norm = false, c.magnitude = dt == FCSA_DTYPE_FLOAT16 ? 8 : 30, c.scale = 0.125f;
        c.tolerance = dt == FCSA_DTYPE_FLOAT32 ? 1e-3 : 0;
        add(c, "no l2norm, large logits");
        c.causal = true, c.mask = 2, c.lse = false;
        add(c, "no l2norm + causal + mask, no lse");
        c = Case();
        c.dtype = dt, c.nq = 300, c.nk = 700, c.b = 1, c.h = 2, c.hk = 2, c.d = 128, c.causal = true;
        add(c, "longer causal d128");
        c = Case();
        c.dtype = dt, c.magnitude = 1e-20;
        add(c, "tiny inputs");
        // From nq = 2048 on (4096 with causal), 1 / ||k|| comes from the key-norm pass
        // (forward.cu); nk not a multiple of 4 or of the key tile, so the padding is read too.
        c = Case();
        c.dtype = dt, c.b = 1, c.h = 2, c.hk = 2, c.nq = 2050, c.nk = 1030;
        add(c, "key-norm pass d64");
        c.h = 2, c.hk = 1, c.nq = 4100, c.nk = 3001, c.d = 128, c.causal = true;
        add(c, "key-norm pass single kv head, causal d128");
        c.h = 4, c.hk = 2, c.nq = 2048, c.nk = 301, c.d = 64, c.causal = false, c.mask = 1, c.bias = 4;
        add(c, "key-norm pass gqa 4/2, mask + bias");
        c.h = 2, c.hk = 1, c.mask = 0, c.bias = 0, c.scale_tensor = 1, c.d = 256;
        add(c, "key-norm pass per-head scale d256");
        c.scale_tensor = 0, c.d = 128, c.layout = kPaddedRows;
        add(c, "unaligned rows, nq 2048 (norms in the kernel)");
        c.layout = kContiguous, c.magnitude = 1e-20;
        add(c, "key-norm pass tiny inputs");
        // v's own head dim: (192, 128) runs its own kernel, other pairs padded to the
        // wider bucket; masked V rows, unaligned rows and float bias among them.
        const int value_dims[][2] = {{192, 128}, {32, 64}, {64, 32}, {24, 40}, {136, 64}, {96, 200}, {8, 256}};
        for (const auto &dims : value_dims) {
            const std::string tag = " d" + std::to_string(dims[0]) + " dv" + std::to_string(dims[1]);
            c = Case();
            c.dtype = dt, c.d = dims[0], c.d_v = dims[1];
            add(c, "plain" + tag);
            c.causal = true, c.mask = 1, c.bias = 3, c.bias_f32 = true, c.scale_tensor = 1, c.hk = 2;
            add(c, "causal+mask+bias+scale gqa" + tag);
            c.causal = false, c.mask = 2, c.bias = 0, c.scale_tensor = 0, c.groups = 2, c.layout = kPaddedRows;
            add(c, "mask groups unaligned" + tag);
            c.groups = 1, c.mask = 0, c.layout = kContiguous, c.b = 1, c.nq = 2050, c.nk = 301;
            add(c, "key-norm pass" + tag);
        }
    }
    return cases;
}

// The Hopper forward's cases: every tile edge (64-row warpgroups, 128-row query and key
// tiles, the K/V ring's wrap), head dims padded to 64 and 128, causal both ways,
// grouped-query kv, strided layouts; then the cases it must decline (not run here).
static std::vector<Case> sm90_sweep(bool quick) {
    std::vector<Case> cases;
    auto add = [&](Case c, const std::string &name) {
        c.name = name;
        cases.push_back(c);
    };
    for (int dt : {FCSA_DTYPE_BFLOAT16, FCSA_DTYPE_FLOAT16}) {
        Case c;
        c.dtype = dt;
        if (quick) {
            c.b = 1, c.h = 2, c.hk = 1, c.nq = 200, c.nk = 300, c.d = 128, c.causal = true;
            add(c, "quick causal gqa d128");
            c.causal = false, c.d = 40, c.nq = 70, c.nk = 600, c.layout = kSeqMajor;
            add(c, "quick (b,n,h,d) d40");
            continue;
        }
        for (int d : {8, 16, 32, 40, 64, 72, 96, 128}) {
            c.d = d;
            add(c, "plain d" + std::to_string(d));
        }
        for (int d : {64, 128})
            for (int nq : {1, 63, 64, 65, 128, 129, 255, 257})
                for (int nk : {1, 127, 128, 129, 384, 385, 1000}) {
                    c = Case();
                    c.dtype = dt, c.d = d, c.b = 1, c.h = 2, c.hk = 2, c.nq = nq, c.nk = nk;
                    c.causal = (nq + nk) % 2 == 0;
                    add(c, std::string("edges") + (c.causal ? " causal" : ""));
                }
        c = Case();
        c.dtype = dt, c.causal = true, c.nq = 150, c.nk = 61;
        add(c, "causal nq>nk (empty rows)");
        c.nq = 700, c.nk = 1300, c.d = 128;
        add(c, "causal nq<nk d128");
        c = Case();
        c.dtype = dt, c.hk = 1;
        add(c, "single kv head");
        c.h = 8, c.hk = 2, c.d = 128, c.layout = kSeqMajor, c.nq = 300, c.nk = 2000;
        add(c, "gqa 8/2, (b,n,h,d) layout d128");
        c = Case();
        c.dtype = dt, c.b = 1, c.h = 2, c.hk = 1, c.nq = 2100, c.nk = 4100, c.d = 128, c.causal = true;
        add(c, "long causal d128");
        c.causal = false, c.d = 64, c.nk = 5000;
        add(c, "long d64 (K/V ring wraps many times)");
        c = Case();
        c.dtype = dt, c.scale = -6.f;
        add(c, "negative scale");
        c.scale = 10.f, c.lse = false;
        add(c, "scale 10, no lse");
        c = Case();
        c.dtype = dt, c.magnitude = 1e-20;
        add(c, "tiny inputs");
        c.magnitude = dt == FCSA_DTYPE_FLOAT16 ? 3e4 : 1e30;
        add(c, "huge inputs");
        // Declined (the portable path runs them): reported as not covered.
        c = Case();
        c.dtype = dt, c.mask = 1;
        add(c, "mask (declined)");
        c.mask = 0, c.layout = kPaddedRows, c.d = 72;
        add(c, "unaligned rows (declined)");
    }
    return cases;
}

// ---------------------------------------------------------------- timing
// Every timed shape holds 16384 * 2048 elements per tensor, so one set of buffers per
// dtype serves them all; a hash fills them on the device (uniform in [-1, 1)).
__global__ void fill_random(void *data, int dtype, int64_t n, uint64_t seed) {
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
        uint64_t x = (uint64_t(i) + seed) * 0x9E3779B97F4A7C15ull;
        x ^= x >> 31, x *= 0xBF58476D1CE4E5B9ull, x ^= x >> 29;
        const float u = float(x >> 40) * (2.f / 16777216.f) - 1.f;
        if (dtype == FCSA_DTYPE_FLOAT32) static_cast<float *>(data)[i] = u;
        else if (dtype == FCSA_DTYPE_FLOAT16) static_cast<__half *>(data)[i] = __float2half_rn(u);
        else static_cast<__nv_bfloat16 *>(data)[i] = __float2bfloat16_rn(u);
    }
}

struct TimingBuffers {
    void *q = nullptr, *k = nullptr, *v = nullptr, *out = nullptr;
    float *lse = nullptr;
    static constexpr int64_t kElements = int64_t(16384) * 2048;
    explicit TimingBuffers(int dtype) {
        const size_t bytes = size_t(kElements) * dtype_size(dtype);
        void **tensors[3] = {&q, &k, &v};
        for (int i = 0; i < 3; ++i) {
            CUDA_CHECK(cudaMalloc(tensors[i], bytes));
            fill_random<<<1024, 256>>>(*tensors[i], dtype, kElements, rng());
            CUDA_CHECK(cudaGetLastError());
        }
        CUDA_CHECK(cudaMalloc(&out, bytes));
        CUDA_CHECK(cudaMalloc(&lse, size_t(kElements / 32) * 4)); // nq * b * h <= elements / 8
        CUDA_CHECK(cudaDeviceSynchronize());
    }
    ~TimingBuffers() {
        cudaFree(q), cudaFree(k), cudaFree(v), cudaFree(out), cudaFree(lse);
    }
};

// FLOPs counted as 2 b h nq nk (d + d_v) (S = Q K^T and O = P V), halved with causal.
static double time_forward(const TimingBuffers &buf, int dtype, int n, int d, int d_v, bool causal, int reps,
                           bool sm90 = false) {
    const int64_t b = 16384 / n, h = 2048 / std::max(d, d_v);
    Problem p;
    p.b = b, p.h = h, p.hk = h, p.nq = n, p.nk = n, p.d = d, p.d_v = d_v, p.dtype = dtype;
    p.device_type = FCSA_DEVICE_CUDA;
    p.scale = 10.f;
    p.causal = causal;
    p.q = contiguous_view(buf.q, dtype, b, h, n, d);
    p.k = contiguous_view(buf.k, dtype, b, h, n, d);
    p.v = contiguous_view(buf.v, dtype, b, h, n, d_v);
    p.out = contiguous_view(buf.out, dtype, b, h, n, d_v);
    p.lse = contiguous_view(buf.lse, FCSA_DTYPE_FLOAT32, b, h, n, 1);
    if (forward_supports(p, sm90) != FCSA_STATUS_SUCCESS) return 0.0;
    void *workspace = nullptr;
    if (const size_t bytes = forward_workspace(p, sm90)) CUDA_CHECK(cudaMalloc(&workspace, bytes));
    const double median = median_launch_ms([&] { return forward(p, workspace, sm90); }, reps);
    CUDA_CHECK(cudaFree(workspace));
    double flops = 2.0 * b * h * double(n) * n * (d + d_v);
    if (causal) flops /= 2;
    return flops / (median * 1e-3) / 1e12;
}

int main(int argc, char **argv) {
    bool quick = false, timing = true, mla = false, bf16_only = false;
    uint64_t seed = std::random_device{}() ^ (uint64_t(std::random_device{}()) << 32);
    for (int i = 1; i < argc; ++i) {
        if (!strcmp(argv[i], "--quick")) quick = true, timing = false;
        else if (!strcmp(argv[i], "--no-time")) timing = false;
        else if (!strcmp(argv[i], "--seed") && i + 1 < argc) seed = strtoull(argv[++i], nullptr, 10);
        else if (!strcmp(argv[i], "--sm90")) g_sm90 = true;
        else if (!strcmp(argv[i], "--mla")) mla = true, quick = true; // the timings of (192, 128) and (128, 128) only
        else if (!strcmp(argv[i], "--bf16")) bf16_only = true;       // the timings of bfloat16 only
        else if (!strcmp(argv[i], "--profile") && i + 4 < argc) { // dtype d n causal: a few launches, for ncu
            const int dt = atoi(argv[i + 1]), d = atoi(argv[i + 2]), n = atoi(argv[i + 3]), causal = atoi(argv[i + 4]);
            rng.seed(seed);
            const TimingBuffers buffers(dt);
            printf("%s d=%d n=%d causal=%d: %.1f TFLOP/s\n", dtype_name(dt), d, n, causal,
                   time_forward(buffers, dt, n, d, d, causal != 0, 5, g_sm90));
            return 0;
        }
    }
    rng.seed(seed);
    cudaDeviceProp prop;
    CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    printf("device: %s (sm_%d%d, %d SMs), seed %llu\n", prop.name, prop.major, prop.minor, prop.multiProcessorCount,
           static_cast<unsigned long long>(seed));

    int failures = 0, skipped = 0;
    const std::vector<Case> cases = g_sm90 ? sm90_sweep(quick) : sweep(quick);
    for (const Case &c : cases) {
        Result r = run_case(c);
        // The Hopper sweep names the cases it must decline: any other skip is a failure
        // (a supports regression, or a build without sm_90a code), and so is running one.
        const bool declined = c.name.find("(declined)") != std::string::npos;
        if (g_sm90 && r.skipped != declined) {
            r.pass = false;
            r.why = r.skipped ? "declined by the Hopper forward: " + r.why : "should have been declined";
        } else if (r.skipped) {
            ++skipped;
            continue;
        }
        printf("%-4s %-5s d=%-3d dv=%-3d b=%d h=%d hk=%d nq=%-3d nk=%-3d %-42s rel_l2 %.2e max %.2e lse %.2e %s\n",
               r.pass ? "PASS" : "FAIL", dtype_name(c.dtype), c.d, c.d_v > 0 ? c.d_v : c.d, c.b, c.h, c.hk, c.nq, c.nk,
               c.name.c_str(),
               r.rel_l2, r.max_err, r.lse_err, r.why.c_str());
        failures += !r.pass;
    }
    printf("correctness: %d of %zu cases failed, %d not covered by this backend\n", failures, cases.size() - skipped,
           skipped);

    if (timing && g_sm90) {
        printf("\nforward TFLOP/s, Hopper with / without ping-pong (portable) (batch = 16384/n, heads = 2048/d, "
               "median of 10 after 3 warm-ups)\n");
        printf("%-6s %-4s %-7s %14s %14s %14s %14s %14s %14s\n", "dtype", "d", "causal", "512", "1k", "2k", "4k", "8k",
               "16k");
        const int ns[6] = {512, 1024, 2048, 4096, 8192, 16384};
        for (int dt : {FCSA_DTYPE_BFLOAT16, FCSA_DTYPE_FLOAT16}) {
            if (bf16_only && dt != FCSA_DTYPE_BFLOAT16) continue;
            const TimingBuffers buffers(dt);
            for (int d : {64, 128})
                for (bool causal : {false, true}) {
                    printf("%-6s %-4d %-7s", dtype_name(dt), d, causal ? "yes" : "no");
                    for (int n : ns) {
                        // with and without ping-pong between the consumers (forward.cu)
                        setenv("FCSA_SM90_PINGPONG", "1", 1);
                        const double hopper = time_forward(buffers, dt, n, d, d, causal, 10, true);
                        setenv("FCSA_SM90_PINGPONG", "0", 1);
                        const double hopper_np = time_forward(buffers, dt, n, d, d, causal, 10, true);
                        unsetenv("FCSA_SM90_PINGPONG");
                        const double portable = time_forward(buffers, dt, n, d, d, causal, 10, false);
                        printf("  %5.1f/%5.1f (%5.1f)", hopper, hopper_np, portable);
                        fflush(stdout);
                    }
                    printf("\n");
                }
        }
    } else if (timing) {
        printf("\nforward TFLOP/s (batch = 16384/n, heads = 2048/max(d, d_v), median of 10 after 3 warm-ups)\n");
        printf("%-6s %-7s %-7s %8s %8s %8s %8s %8s %8s\n", "dtype", "d/d_v", "causal", "512", "1k", "2k", "4k", "8k",
               "16k");
        const int ns[6] = {512, 1024, 2048, 4096, 8192, 16384};
        // (192, 128), the MLA shape, against (128, 128): issue #21's bar is 15% per FLOP.
        const int dims[3][2] = {{64, 64}, {128, 128}, {192, 128}};
        for (int dt : {FCSA_DTYPE_BFLOAT16, FCSA_DTYPE_FLOAT16, FCSA_DTYPE_FLOAT32}) {
            if ((mla && dt == FCSA_DTYPE_FLOAT32) || (bf16_only && dt != FCSA_DTYPE_BFLOAT16)) continue;
            const TimingBuffers buffers(dt);
            for (const auto &dd : dims)
                for (bool causal : {false, true}) {
                    const int d = dd[0], d_v = dd[1];
                    if (mla && d == 64) continue;
                    if (dt == FCSA_DTYPE_FLOAT32 && (causal || d != d_v)) continue;
                    const std::string name = std::to_string(d) + "/" + std::to_string(d_v);
                    printf("%-6s %-7s %-7s", dtype_name(dt), name.c_str(), causal ? "yes" : "no");
                    for (int n : ns) {
                        if (dt == FCSA_DTYPE_FLOAT32 && n > 4096) {
                            printf(" %8s", "-");
                            continue;
                        }
                        printf(" %8.1f",
                               time_forward(buffers, dt, n, d, d_v, causal, dt == FCSA_DTYPE_FLOAT32 ? 5 : 10));
                        fflush(stdout);
                    }
                    printf("\n");
                }
        }
    }
    return failures ? 1 : 0;
}
