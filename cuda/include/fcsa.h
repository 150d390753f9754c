/*
 * fcsa.h: the public C API of libfcsa, fused cosine-similarity attention.
 *
 * This header is self-contained (C99 or C++), and it is the only one a caller needs.
 * The function computed is described in the project's SPEC: for each batch b, query
 * head h and query row i,
 *
 *     s_ij  = scale_h * <l2norm(q_i), l2norm(k_j)> + bias_ij
 *     out_i = sum_j exp(s_ij) v_j / sum_j exp(s_ij)      over the visible keys j
 *
 * q and k share a head dim d; v has a head dim d_v of its own (d_v = d is the common
 * case), and out takes v's.
 *
 * Conventions
 *  - Every function returns an fcsa_status. On failure nothing has been written to any
 *    output, and fcsa_last_error_message() (thread-local) says what was wrong.
 *  - The library never aborts, exits, prints or allocates device memory. The caller
 *    passes the stream and a workspace whose size it asked for beforehand, so calls can
 *    be captured into CUDA graphs.
 *  - Tensors are described by fcsa_tensor: shape and strides counted in elements.
 *    The last dimension must be contiguous (stride 1); other strides are free but not
 *    negative (a dimension of size 1 may have any stride: it is never stepped along).
 *  - Sizes are checked before anything is computed or returned: each tensor's element
 *    count and the bytes it spans, (1 + sum of (shape_i - 1) * stride_i) * element size,
 *    must fit in int64_t, and data plus that span must not pass the end of the address
 *    space. The products the backends size their work by are bounded too: b*h*nq*d,
 *    b*hk*nk*d, b*h*nq*d_v, b*hk*nk*d_v and, with a bias, b*h*nq*nk may not exceed
 *    2^58, nor b*h*nq*nk without one 2^62 (nq, nk, d and d_v rounded up to a multiple
 *    of 256 first, a 0 counted as 1).
 *    A call beyond these is refused with FCSA_STATUS_INVALID_ARGUMENT and a message
 *    naming the tensor. A failed size query leaves *workspace_bytes as it was.
 *  - Memory: outputs (out and lse in the forward; dq, dk, dv, dbias and dscale in the
 *    backward) must not share memory with any input (q, k, v, mask, bias, scale, and
 *    in the backward out, dout and lse), with another output or with themselves. Two
 *    tensors are taken to share memory when the byte ranges from their first to their
 *    last element meet, unless their elements interleave without meeting (slices of
 *    one packed tensor, such as dq, dk and dv in one (b, n, 3, h, d) gradient). An
 *    output overlaps itself when, its dimensions of size > 1 taken by increasing
 *    stride, one of them does not step past everything the smaller ones reach (a
 *    stride of 0, for instance). Such calls are refused (FCSA_STATUS_INVALID_ARGUMENT,
 *    the message naming both tensors). Inputs may share memory with each other and
 *    with themselves (q, k and v from one packed qkv tensor, a stride-0 broadcast).
 *  - Structs that may grow begin with their own size (struct_size): set it to sizeof.
 *  - Status values are fixed and are never renumbered.
 */
#ifndef FCSA_H_
#define FCSA_H_

#include <stddef.h>
#include <stdint.h>

#if defined(_WIN32)
#  if defined(FCSA_BUILDING_LIBRARY)
#    define FCSA_API __declspec(dllexport)
#  else
#    define FCSA_API __declspec(dllimport)
#  endif
#else
#  define FCSA_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------- version */

#define FCSA_VERSION_MAJOR 0
#define FCSA_VERSION_MINOR 1
#define FCSA_VERSION_PATCH 0
/* The ABI is versioned separately from the release: it changes only when a struct
 * or a signature in this header changes incompatibly. */
#define FCSA_ABI_VERSION 1

/* "MAJOR.MINOR.PATCH" of the library that is loaded (may differ from the header). */
FCSA_API const char *fcsa_version(void);
/* FCSA_ABI_VERSION of the library that is loaded. */
FCSA_API int fcsa_abi_version(void);

/* ---------------------------------------------------------------- status */

typedef enum fcsa_status {
    FCSA_STATUS_SUCCESS = 0,
    /* A tensor has the wrong dtype (Python maps this to TypeError). */
    FCSA_STATUS_INVALID_DTYPE = 1,
    /* A tensor has the wrong shape, a stride or a value is out of range (ValueError). */
    FCSA_STATUS_INVALID_ARGUMENT = 2,
    /* A valid combination that this build or device does not support
     * (NotImplementedError), for example a CUDA tensor in a build without CUDA. */
    FCSA_STATUS_NOT_SUPPORTED = 3,
    /* The workspace passed is smaller than the size query asked for. */
    FCSA_STATUS_WORKSPACE_TOO_SMALL = 4,
    /* A CUDA runtime call or kernel launch failed. */
    FCSA_STATUS_CUDA_ERROR = 5,
    /* Host memory could not be allocated (CPU backend). */
    FCSA_STATUS_OUT_OF_MEMORY = 6,
    /* A bug: an internal invariant did not hold. */
    FCSA_STATUS_INTERNAL_ERROR = 7
} fcsa_status;

/* A constant English name for a status, e.g. "FCSA_STATUS_INVALID_DTYPE". */
FCSA_API const char *fcsa_status_string(fcsa_status status);
/* The message of the last failed call on this thread ("" when none). The pointer
 * stays valid until the next fcsa call on this thread. */
FCSA_API const char *fcsa_last_error_message(void);

/* ---------------------------------------------------------------- build and device */

/* A one-line description of the build: version, CUDA version, SM targets, CPU ISA. */
FCSA_API const char *fcsa_build_info(void);
/* 1 if the library was compiled with its CUDA backends, else 0. */
FCSA_API int fcsa_cuda_compiled(void);
/* CUDA runtime version the library was built with (e.g. 13000), 0 without CUDA. */
FCSA_API int fcsa_cuda_version(void);
/* 1 if CUDA was compiled in and at least one usable device is present now. */
FCSA_API int fcsa_cuda_available(void);
/* Writes up to `capacity` compiled SM targets (e.g. 80, 86, 89, 90) into `targets`
 * and returns how many there are in all. */
FCSA_API int fcsa_compiled_sm_targets(int *targets, int capacity);

/* ---------------------------------------------------------------- tensors */

typedef enum fcsa_dtype {
    FCSA_DTYPE_FLOAT32 = 0,
    FCSA_DTYPE_FLOAT16 = 1,
    FCSA_DTYPE_BFLOAT16 = 2,
    FCSA_DTYPE_BOOL = 3, /* one byte per element, 0 or 1 */
    FCSA_DTYPE_INT32 = 4 /* cache lengths and block tables (fcsa_kvcache_forward) */
} fcsa_dtype;

typedef enum fcsa_device_type {
    FCSA_DEVICE_CPU = 0,
    FCSA_DEVICE_CUDA = 1
} fcsa_device_type;

#define FCSA_MAX_DIMS 4

/* A strided view of memory the caller owns. shape/strides beyond ndim are ignored. */
typedef struct fcsa_tensor {
    void *data;
    int32_t ndim;
    int32_t dtype;        /* fcsa_dtype */
    int32_t device_type;  /* fcsa_device_type */
    int32_t device_index; /* CUDA ordinal; 0 for the CPU */
    int64_t shape[FCSA_MAX_DIMS];
    int64_t strides[FCSA_MAX_DIMS]; /* in elements */
} fcsa_tensor;

/* ---------------------------------------------------------------- options */

typedef enum fcsa_backend {
    FCSA_BACKEND_AUTO = 0,     /* chosen from the tensors' device and its capability */
    FCSA_BACKEND_CPU = 1,
    FCSA_BACKEND_CUDA_SM80 = 2, /* portable tensor-core path: sm_80 and newer */
    FCSA_BACKEND_CUDA_SM90 = 3  /* Hopper path (wgmma, TMA): compute capability 9.0, the forward
                                   and (bf16, d = 128) the backward of the common case; AUTO
                                   takes it where it applies (unless the environment sets
                                   FCSA_DISABLE_SM90=1) and sm80 elsewhere; asked for where it
                                   does not apply: FCSA_STATUS_NOT_SUPPORTED with the reason */
} fcsa_backend;

typedef struct fcsa_options {
    size_t struct_size;     /* sizeof(fcsa_options) */
    float scale;            /* logit scale, used when no scale tensor is given */
    int32_t groups;         /* l2norm over this many equal chunks of the head dim */
    int32_t causal;         /* key j is hidden from row i when j > i + (nk - nq) */
    int32_t l2norm_qk;      /* 1: normalize q and k inside the kernel */
    int32_t deterministic;  /* backward: bitwise reproducible, no float atomics */
    int32_t backend;        /* fcsa_backend: AUTO, or force one path (tests) */
    int32_t num_threads;    /* CPU backend: worker threads, 0 = all hardware threads */
} fcsa_options;

/* Fills the defaults: scale 8, groups 1, l2norm_qk 1, everything else 0. */
FCSA_API void fcsa_options_init(fcsa_options *options);

/*
 * Shapes (all tensors on one device; q, k, v, out, dout, dq, dk, dv of one dtype,
 * except that out may be float32 whatever q's dtype):
 *   q, dq            : (b, h, nq, d)
 *   k, dk            : (b, hk, nk, d)   h % hk == 0 (hk < h: kv heads shared)
 *   v, dv            : (b, hk, nk, d_v) the value head dim d_v >= 1 is v's own: it
 *                      may differ from d (the GPU backend needs d_v == d for now)
 *   out, dout        : (b, h, nq, d_v)
 *   mask             : (b, nk) bool, nonzero = the key may be attended; optional
 *   bias, dbias      : 4-D, each dim equal to (b, h, nq, nk)'s or 1 (broadcast);
 *                      dtype of q or float32; optional. dbias has bias' shape and
 *                      dtype and receives the gradient summed over broadcast dims.
 *                      (A bias of one column, broadcast over the keys, shifts each
 *                      row's logits alike, which softmax does not see: its gradient
 *                      is 0, and the CUDA backend writes 0 without summing.)
 *   scale, dscale    : float32, shape () or (h,); optional. When given, scale
 *                      replaces options.scale; dscale receives d(loss)/d(scale).
 *   lse              : float32 (b, h, nq): log sum_j exp(s_ij), -inf for a row that
 *                      sees no key. Optional in the forward, required in the backward
 *                      (the forward's lse of the same inputs; or, with out, those of
 *                      the attention over a superset of these keys, combined through
 *                      lse: the backward then gives this subset's share of each
 *                      gradient, as ring attention needs; P = exp(s - lse) <= 1 holds
 *                      all the more).
 *   out (float32)    : with float16/bfloat16 q, the forward writes out unrounded, and
 *                      the backward takes delta_i = <dO_i, O_i> from it: the gradients
 *                      that sum dS over the keys (dscale, dbias of a bias broadcast over
 *                      the keys) then keep their precision, which O rounded to 16 bits
 *                      costs them. The backward's out is the forward's, in its dtype.
 * Pass NULL for an absent optional tensor.
 *
 * Variable-length packed sequences (cu_seqlens_q and cu_seqlens_k given, both or
 * neither): the b sequences of a batch lie one after another along the length dim, as
 * FlashAttention's varlen functions take them, and the descriptors' batch dim is 1:
 *   q, dq            : (1, h, total_q, d)   e.g. a (total_q, h, d) tensor, transposed
 *   k, v, dk, dv     : (1, hk, total_k, d) and (1, hk, total_k, d_v)
 *   out, dout        : (1, h, total_q, d_v); lse (1, h, total_q)
 *   cu_seqlens_q     : int32 (b + 1,): sequence s holds query rows [cu_seqlens_q[s],
 *                      cu_seqlens_q[s + 1]); 0 first, non-decreasing, total_q last
 *   cu_seqlens_k     : int32 (b + 1,): the same for its keys, total_k last
 * Sequence s's rows see its own keys only (causal: aligned to the end of each sequence,
 * row i of it sees its keys j <= i + nk_s - nq_s); a sequence may be empty. No mask
 * and no bias with them (FCSA_STATUS_NOT_SUPPORTED). The offsets' values are checked
 * before any work when they are host memory (the CPU backend). In CUDA memory they are
 * read by the kernels only, so that no call synchronizes: there the caller guarantees
 * them (the Python layer checks them), and the kernels clamp every sequence to the
 * tensors so that no memory outside them is touched. The Hopper path declines varlen
 * calls (AUTO then runs the portable one).
 */
typedef struct fcsa_forward_tensors {
    size_t struct_size; /* sizeof(fcsa_forward_tensors) */
    const fcsa_tensor *q, *k, *v;
    const fcsa_tensor *mask, *bias, *scale;
    const fcsa_tensor *out; /* written */
    const fcsa_tensor *lse; /* written, optional */
    /* Appended in 0.1 (read when struct_size covers them): packed sequences, optional. */
    const fcsa_tensor *cu_seqlens_q, *cu_seqlens_k;
} fcsa_forward_tensors;

typedef struct fcsa_backward_tensors {
    size_t struct_size; /* sizeof(fcsa_backward_tensors) */
    const fcsa_tensor *q, *k, *v;
    const fcsa_tensor *mask, *bias, *scale;
    const fcsa_tensor *out, *dout, *lse;
    const fcsa_tensor *dq, *dk, *dv;   /* written */
    const fcsa_tensor *dbias, *dscale; /* written, optional */
    /* Appended in 0.1 (read when struct_size covers them): packed sequences, optional. */
    const fcsa_tensor *cu_seqlens_q, *cu_seqlens_k;
} fcsa_backward_tensors;

/* ---------------------------------------------------------------- attention */

/* Bytes of workspace the call with these arguments needs (device memory on the
 * tensors' device for CUDA, host memory for the CPU; 0 is a valid answer).
 * Validates the arguments exactly as the call itself does. */
FCSA_API fcsa_status fcsa_forward_workspace_size(const fcsa_options *options,
                                                 const fcsa_forward_tensors *tensors,
                                                 size_t *workspace_bytes);
FCSA_API fcsa_status fcsa_backward_workspace_size(const fcsa_options *options,
                                                  const fcsa_backward_tensors *tensors,
                                                  size_t *workspace_bytes);

/* `stream` is a cudaStream_t (NULL: the legacy default stream), ignored on the CPU.
 * The call is asynchronous on CUDA: it returns once the work is enqueued. The
 * workspace needs no initialization, must be 16-byte aligned (as memory from any
 * allocator is) and must stay valid until the work finishes. */
FCSA_API fcsa_status fcsa_forward(const fcsa_options *options,
                                  const fcsa_forward_tensors *tensors,
                                  void *workspace, size_t workspace_bytes, void *stream);
FCSA_API fcsa_status fcsa_backward(const fcsa_options *options,
                                   const fcsa_backward_tensors *tensors,
                                   void *workspace, size_t workspace_bytes, void *stream);

/* ---------------------------------------------------------------- KV-cache attention
 *
 * Decoding and short queries over a KV cache: the forward only, for inference. With
 * nk_b the valid keys of sequence b (cache_seqlens[b], or the cache's capacity without
 * cache_seqlens), plus nq_new when new keys are appended:
 *
 *   1. k_new and v_new (when given) are written into the cache in place, at positions
 *      cache_seqlens[b] ... cache_seqlens[b] + nq_new - 1 of each sequence b (the caller
 *      advances cache_seqlens afterwards);
 *   2. out = the attention of q over the first nk_b = cache_seqlens[b] + nq_new keys of
 *      each sequence's cache, exactly as fcsa_forward would compute it with those keys
 *      as k and v (causal end-aligned to them: row i sees keys j <= i + nk_b - nq).
 *
 * Shapes (q, caches, k_new, v_new and out of one dtype; one device):
 *   q                : (b, h, nq, d)
 *   k_cache, v_cache : contiguous, (b, hk, n_max, d) and (b, hk, n_max, d_v), capacity
 *                      n_max; or, with block_table, paged: (num_blocks, hk, page_size, d)
 *                      and (num_blocks, hk, page_size, d_v), capacity max_blocks *
 *                      page_size, key j of sequence b in block block_table[b, j /
 *                      page_size], row j % page_size. h % hk == 0.
 *   cache_seqlens    : int32 (b,), 0 <= cache_seqlens[b] <= capacity - nq_new; optional
 *                      (NULL: every sequence holds `capacity` keys), required with k_new
 *   block_table      : int32 (b, max_blocks), the blocks a sequence's keys use in
 *                      [0, num_blocks); optional (NULL: a contiguous cache)
 *   k_new, v_new     : (b, hk, nq_new, d) and (b, hk, nq_new, d_v); both or neither
 *   scale            : float32 () or (h,), optional (as in fcsa_forward)
 *   out              : (b, h, nq, d_v), written
 *   lse              : float32 (b, h, nq), written, optional
 * options: scale, groups, causal, l2norm_qk, backend and num_threads as in fcsa_forward.
 *
 * The caches are outputs when k_new is given (they must not overlap q, out, lse, the
 * new keys or each other) and inputs otherwise. The values of cache_seqlens and of the
 * block table entries in use are checked before any work when they are host memory
 * (the CPU backend). On a CUDA device they are read by the kernels only, so that no
 * call synchronizes: there the caller guarantees them (the Python layer checks them),
 * and the kernels clamp lengths to the capacity and skip blocks outside the cache so
 * that no memory outside the tensors is touched. The CUDA path needs d == d_v, a
 * multiple of 8 up to 256, and 16-byte aligned cache, q and new-key rows.
 */
typedef struct fcsa_kvcache_tensors {
    size_t struct_size; /* sizeof(fcsa_kvcache_tensors) */
    const fcsa_tensor *q;
    const fcsa_tensor *k_cache, *v_cache; /* written where k_new is given */
    const fcsa_tensor *cache_seqlens, *block_table;
    const fcsa_tensor *k_new, *v_new;
    const fcsa_tensor *scale;
    const fcsa_tensor *out; /* written */
    const fcsa_tensor *lse; /* written, optional */
} fcsa_kvcache_tensors;

FCSA_API fcsa_status fcsa_kvcache_forward_workspace_size(const fcsa_options *options,
                                                         const fcsa_kvcache_tensors *tensors,
                                                         size_t *workspace_bytes);
FCSA_API fcsa_status fcsa_kvcache_forward(const fcsa_options *options,
                                          const fcsa_kvcache_tensors *tensors,
                                          void *workspace, size_t workspace_bytes, void *stream);

/* The backend that ran the last successful forward or backward on this thread
 * (an fcsa_backend value other than AUTO), and its name ("cpu", "cuda-sm80", "cuda-sm90"). */
FCSA_API int fcsa_last_backend(void);
FCSA_API const char *fcsa_backend_name(int backend);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* FCSA_H_ */
