/*
 * attention.c: cosine-similarity self-attention through libfcsa's C API.
 *
 * Uses nothing but fcsa.h, libfcsa and the C standard library. It
 *   1. prints the library's version and build,
 *   2. runs a small causal self-attention problem (float32, CPU tensors, two query
 *      heads per key/value head) forward and backward,
 *   3. checks out, dq, dk and dv against a float64 computation written out below,
 *   4. shows how a refused call reports its error.
 * It exits 0 when every check passes and 1 otherwise.
 *
 * Build it with CMake against the installed package's library (examples/c/CMakeLists.txt
 * finds it with find_package(fcsa)):
 *
 *   cmake -S examples/c -B build/example \
 *         -Dfcsa_DIR="$(python -c 'import fcsa; print(fcsa.get_cmake_dir())')"
 *   cmake --build build/example && build/example/attention
 *
 * or with pkg-config (fcsa.pc lies beside the library):
 *
 *   export PKG_CONFIG_PATH="$(python -c 'import fcsa; print(fcsa.get_pkgconfig_dir())')"
 *   mkdir -p build && cc -std=c99 -O2 examples/c/attention.c $(pkg-config --cflags --libs fcsa) \
 *      -Wl,-rpath,"$(pkg-config --variable=libdir fcsa)" -lm -o build/attention
 *   build/attention
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <fcsa.h>

/* The problem: batch B, H query heads sharing HK key/value heads, N tokens, head dim D. */
enum { B = 2, H = 4, HK = 2, N = 48, D = 32 };
#define SCALE 8.0f
#define NQ ((size_t)B * H * N * D)  /* elements of q, out, dout, dq */
#define NKV ((size_t)B * HK * N * D) /* elements of k, v, dk, dv */

/* Tolerances of float32 against float64, relative to the largest reference value. */
#define TOL_OUT 2e-5
#define TOL_GRAD 1e-4

/* ---------------------------------------------------------------- helpers */

/* A small deterministic generator (xorshift64*), uniform in [-1, 1). */
static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static float uniform(void) {
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    uint64_t x = rng_state * 0x2545f4914f6cdd1dull;
    return (float)((double)(x >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}

static float *random_buffer(size_t count) {
    float *p = malloc(count * sizeof *p);
    if (p != NULL) {
        for (size_t i = 0; i < count; ++i) p[i] = uniform();
    }
    return p;
}

/* A contiguous 4-D (or lower) CPU tensor over `data`. */
static fcsa_tensor cpu_tensor(void *data, fcsa_dtype dtype, int ndim, int64_t d0, int64_t d1,
                              int64_t d2, int64_t d3) {
    fcsa_tensor t;
    int64_t dims[4] = {d0, d1, d2, d3};
    memset(&t, 0, sizeof t);
    t.data = data;
    t.ndim = ndim;
    t.dtype = (int32_t)dtype;
    t.device_type = FCSA_DEVICE_CPU;
    t.device_index = 0;
    int64_t stride = 1;
    for (int i = ndim - 1; i >= 0; --i) {
        t.shape[i] = dims[i];
        t.strides[i] = stride;
        stride *= dims[i];
    }
    return t;
}

static size_t at(int b, int h, int heads, int i, int e) {
    return (((size_t)b * heads + h) * N + i) * D + e;
}

/* Prints a failed status with the library's message and returns 0; 1 on success. */
static int ok(fcsa_status status, const char *what) {
    if (status == FCSA_STATUS_SUCCESS) return 1;
    fprintf(stderr, "%s failed: %s: %s\n", what, fcsa_status_string(status),
            fcsa_last_error_message());
    return 0;
}

/* max |a - ref| / max(max |ref|, 1) */
static double rel_error(const float *a, const double *ref, size_t count) {
    double err = 0.0, mag = 1.0;
    for (size_t i = 0; i < count; ++i) {
        double e = fabs((double)a[i] - ref[i]);
        if (e > err || e != e) err = e; /* keeps a NaN */
        if (fabs(ref[i]) > mag) mag = fabs(ref[i]);
    }
    return err / mag;
}

/* ---------------------------------------------------------------- float64 reference */

/* x / max(|x|, 1e-12) over D values; returns the divisor. */
static double l2norm(const float *x, double *xn) {
    double ss = 0.0;
    for (int e = 0; e < D; ++e) ss += (double)x[e] * x[e];
    double n = sqrt(ss);
    if (n < 1e-12) n = 1e-12;
    for (int e = 0; e < D; ++e) xn[e] = x[e] / n;
    return n;
}

/* Forward and backward of causal cosine-similarity attention, in double precision.
 * Key/value head of query head h: h / (H / HK). Gradients of shared key/value heads
 * are summed over the query heads that read them. */
static void reference(const float *q, const float *k, const float *v, const float *dout,
                      double *out, double *dq, double *dk, double *dv) {
    static double qn[N][D], kn[N][D], qnorm[N], knorm[N];
    static double p[N][N], dqn[N][D], dkn[N][D];

    memset(dk, 0, NKV * sizeof *dk);
    memset(dv, 0, NKV * sizeof *dv);
    for (int b = 0; b < B; ++b) {
        for (int h = 0; h < H; ++h) {
            int hk = h / (H / HK);
            for (int i = 0; i < N; ++i) {
                qnorm[i] = l2norm(&q[at(b, h, H, i, 0)], qn[i]);
                knorm[i] = l2norm(&k[at(b, hk, HK, i, 0)], kn[i]);
            }
            memset(dkn, 0, sizeof dkn);
            for (int i = 0; i < N; ++i) {
                /* Causal with nq == nk: row i sees keys 0..i. */
                double sum = 0.0;
                for (int j = 0; j <= i; ++j) {
                    double s = 0.0;
                    for (int e = 0; e < D; ++e) s += qn[i][e] * kn[j][e];
                    p[i][j] = exp(SCALE * s - SCALE); /* |s| <= 1: SCALE bounds the logit */
                    sum += p[i][j];
                }
                for (int j = 0; j <= i; ++j) p[i][j] /= sum;

                double *o = &out[at(b, h, H, i, 0)];
                for (int e = 0; e < D; ++e) o[e] = 0.0;
                for (int j = 0; j <= i; ++j)
                    for (int e = 0; e < D; ++e) o[e] += p[i][j] * v[at(b, hk, HK, j, e)];

                /* dS_ij = P_ij (dP_ij - delta_i), dP_ij = <dO_i, v_j>, delta_i = <dO_i, O_i> */
                const float *g = &dout[at(b, h, H, i, 0)];
                double delta = 0.0;
                for (int e = 0; e < D; ++e) delta += g[e] * o[e];
                for (int e = 0; e < D; ++e) dqn[i][e] = 0.0;
                for (int j = 0; j <= i; ++j) {
                    double dp = 0.0;
                    for (int e = 0; e < D; ++e) dp += (double)g[e] * v[at(b, hk, HK, j, e)];
                    double ds = p[i][j] * (dp - delta) * SCALE;
                    for (int e = 0; e < D; ++e) {
                        dqn[i][e] += ds * kn[j][e];
                        dkn[j][e] += ds * qn[i][e];
                        dv[at(b, hk, HK, j, e)] += p[i][j] * g[e];
                    }
                }
            }
            /* Through the l2norm: dx = (dxn - xn <xn, dxn>) / max(|x|, 1e-12). */
            for (int i = 0; i < N; ++i) {
                double cq = 0.0, ck = 0.0;
                for (int e = 0; e < D; ++e) {
                    cq += qn[i][e] * dqn[i][e];
                    ck += kn[i][e] * dkn[i][e];
                }
                for (int e = 0; e < D; ++e) {
                    dq[at(b, h, H, i, e)] = (dqn[i][e] - qn[i][e] * cq) / qnorm[i];
                    dk[at(b, hk, HK, i, e)] += (dkn[i][e] - kn[i][e] * ck) / knorm[i];
                }
            }
        }
    }
}

/* ---------------------------------------------------------------- main */

int main(void) {
    int failures = 0;
    printf("fcsa %s (ABI %d)\n", fcsa_version(), fcsa_abi_version());
    printf("build: %s\n", fcsa_build_info());

    float *q = random_buffer(NQ), *k = random_buffer(NKV), *v = random_buffer(NKV);
    float *dout = random_buffer(NQ);
    float *out = calloc(NQ, sizeof *out), *lse = calloc((size_t)B * H * N, sizeof *lse);
    float *dq = calloc(NQ, sizeof *dq), *dk = calloc(NKV, sizeof *dk);
    float *dv = calloc(NKV, sizeof *dv);
    double *ref_out = malloc(NQ * sizeof *ref_out), *ref_dq = malloc(NQ * sizeof *ref_dq);
    double *ref_dk = malloc(NKV * sizeof *ref_dk), *ref_dv = malloc(NKV * sizeof *ref_dv);
    if (!q || !k || !v || !dout || !out || !lse || !dq || !dk || !dv || !ref_out || !ref_dq ||
        !ref_dk || !ref_dv) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }

    /* Tensor descriptors: the library reads and writes the caller's memory in place. */
    fcsa_tensor tq = cpu_tensor(q, FCSA_DTYPE_FLOAT32, 4, B, H, N, D);
    fcsa_tensor tk = cpu_tensor(k, FCSA_DTYPE_FLOAT32, 4, B, HK, N, D);
    fcsa_tensor tv = cpu_tensor(v, FCSA_DTYPE_FLOAT32, 4, B, HK, N, D);
    fcsa_tensor tout = cpu_tensor(out, FCSA_DTYPE_FLOAT32, 4, B, H, N, D);
    fcsa_tensor tlse = cpu_tensor(lse, FCSA_DTYPE_FLOAT32, 3, B, H, N, 1);
    fcsa_tensor tdout = cpu_tensor(dout, FCSA_DTYPE_FLOAT32, 4, B, H, N, D);
    fcsa_tensor tdq = cpu_tensor(dq, FCSA_DTYPE_FLOAT32, 4, B, H, N, D);
    fcsa_tensor tdk = cpu_tensor(dk, FCSA_DTYPE_FLOAT32, 4, B, HK, N, D);
    fcsa_tensor tdv = cpu_tensor(dv, FCSA_DTYPE_FLOAT32, 4, B, HK, N, D);

    fcsa_options opt;
    fcsa_options_init(&opt); /* scale 8, groups 1, l2norm_qk 1 */
    opt.scale = SCALE;
    opt.causal = 1;

    /* ---- forward: ask for the workspace size, provide it, run. */
    fcsa_forward_tensors fwd;
    memset(&fwd, 0, sizeof fwd);
    fwd.struct_size = sizeof fwd;
    fwd.q = &tq;
    fwd.k = &tk;
    fwd.v = &tv;
    fwd.out = &tout;
    fwd.lse = &tlse; /* the backward needs it */

    size_t ws_bytes = 0;
    if (!ok(fcsa_forward_workspace_size(&opt, &fwd, &ws_bytes), "fcsa_forward_workspace_size"))
        return 1;
    void *ws = ws_bytes ? malloc(ws_bytes) : NULL;
    if (ws_bytes && !ws) return 1;
    if (!ok(fcsa_forward(&opt, &fwd, ws, ws_bytes, NULL), "fcsa_forward")) return 1;
    free(ws);
    printf("forward: backend %s, workspace %zu bytes\n", fcsa_backend_name(fcsa_last_backend()),
           ws_bytes);

    /* ---- backward */
    fcsa_backward_tensors bwd;
    memset(&bwd, 0, sizeof bwd);
    bwd.struct_size = sizeof bwd;
    bwd.q = &tq;
    bwd.k = &tk;
    bwd.v = &tv;
    bwd.out = &tout;
    bwd.dout = &tdout;
    bwd.lse = &tlse;
    bwd.dq = &tdq;
    bwd.dk = &tdk;
    bwd.dv = &tdv;

    if (!ok(fcsa_backward_workspace_size(&opt, &bwd, &ws_bytes), "fcsa_backward_workspace_size"))
        return 1;
    ws = ws_bytes ? malloc(ws_bytes) : NULL;
    if (ws_bytes && !ws) return 1;
    if (!ok(fcsa_backward(&opt, &bwd, ws, ws_bytes, NULL), "fcsa_backward")) return 1;
    free(ws);
    printf("backward: backend %s, workspace %zu bytes\n", fcsa_backend_name(fcsa_last_backend()),
           ws_bytes);

    /* ---- compare with float64 */
    reference(q, k, v, dout, ref_out, ref_dq, ref_dk, ref_dv);
    struct {
        const char *name;
        const float *got;
        const double *want;
        size_t count;
        double tol;
    } checks[] = {{"out", out, ref_out, NQ, TOL_OUT},
                  {"dq", dq, ref_dq, NQ, TOL_GRAD},
                  {"dk", dk, ref_dk, NKV, TOL_GRAD},
                  {"dv", dv, ref_dv, NKV, TOL_GRAD}};
    for (size_t c = 0; c < sizeof checks / sizeof checks[0]; ++c) {
        double err = rel_error(checks[c].got, checks[c].want, checks[c].count);
        int pass = err <= checks[c].tol;
        printf("%-3s max error vs float64: %.3g (tolerance %.0e) %s\n", checks[c].name, err,
               checks[c].tol, pass ? "ok" : "MISMATCH");
        failures += !pass;
    }

    /* ---- a refused call: k's head dimension does not match q's. Nothing is written. */
    fcsa_tensor bad_k = cpu_tensor(k, FCSA_DTYPE_FLOAT32, 4, B, HK, N, D / 2);
    fwd.k = &bad_k;
    out[0] = 12345.0f;
    fcsa_status st = fcsa_forward(&opt, &fwd, NULL, 0, NULL);
    printf("mismatched shape: %s: %s\n", fcsa_status_string(st), fcsa_last_error_message());
    if (st != FCSA_STATUS_INVALID_ARGUMENT || fcsa_last_error_message()[0] == '\0' ||
        out[0] != 12345.0f) {
        fprintf(stderr, "expected FCSA_STATUS_INVALID_ARGUMENT with a message, out untouched\n");
        ++failures;
    }

    free(q);
    free(k);
    free(v);
    free(dout);
    free(out);
    free(lse);
    free(dq);
    free(dk);
    free(dv);
    free(ref_out);
    free(ref_dq);
    free(ref_dk);
    free(ref_dv);
    if (failures) {
        printf("FAILED: %d check(s)\n", failures);
        return 1;
    }
    printf("all checks passed\n");
    return 0;
}
