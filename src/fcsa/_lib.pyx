# cython: language_level=3, embedsignature=True
"""fcsa._lib: the thin binding between Python and libfcsa's C API (fcsa.h).

It knows nothing of PyTorch. The Python layer describes every tensor as a plain tuple

    (data_ptr, dtype, device_type, device_index, shape, strides)

with ``dtype`` one of the DTYPE_* codes, ``device_type`` one of DEVICE_*, and shape
and strides tuples of ints (strides in elements). This module turns such tuples into
``fcsa_tensor`` descriptors, calls the library with the GIL released, and turns a
failed status into a Python exception carrying the library's message.
"""

from libc.stdint cimport int32_t, int64_t, uintptr_t


cdef extern from "fcsa.h" nogil:
    ctypedef enum fcsa_status:
        FCSA_STATUS_SUCCESS
        FCSA_STATUS_INVALID_DTYPE
        FCSA_STATUS_INVALID_ARGUMENT
        FCSA_STATUS_NOT_SUPPORTED
        FCSA_STATUS_WORKSPACE_TOO_SMALL
        FCSA_STATUS_CUDA_ERROR
        FCSA_STATUS_OUT_OF_MEMORY
        FCSA_STATUS_INTERNAL_ERROR

    ctypedef enum fcsa_dtype:
        FCSA_DTYPE_FLOAT32
        FCSA_DTYPE_FLOAT16
        FCSA_DTYPE_BFLOAT16
        FCSA_DTYPE_BOOL
        FCSA_DTYPE_INT32

    ctypedef enum fcsa_device_type:
        FCSA_DEVICE_CPU
        FCSA_DEVICE_CUDA

    ctypedef enum fcsa_backend:
        FCSA_BACKEND_AUTO
        FCSA_BACKEND_CPU
        FCSA_BACKEND_CUDA_SM80

    enum: FCSA_MAX_DIMS
    enum: FCSA_ABI_VERSION

    ctypedef struct fcsa_tensor:
        void *data
        int32_t ndim
        int32_t dtype
        int32_t device_type
        int32_t device_index
        int64_t shape[FCSA_MAX_DIMS]
        int64_t strides[FCSA_MAX_DIMS]

    ctypedef struct fcsa_options:
        size_t struct_size
        float scale
        int32_t groups
        int32_t causal
        int32_t l2norm_qk
        int32_t deterministic
        int32_t backend
        int32_t num_threads

    ctypedef struct fcsa_forward_tensors:
        size_t struct_size
        const fcsa_tensor *q
        const fcsa_tensor *k
        const fcsa_tensor *v
        const fcsa_tensor *mask
        const fcsa_tensor *bias
        const fcsa_tensor *scale
        const fcsa_tensor *out
        const fcsa_tensor *lse
        const fcsa_tensor *cu_seqlens_q
        const fcsa_tensor *cu_seqlens_k

    ctypedef struct fcsa_backward_tensors:
        size_t struct_size
        const fcsa_tensor *q
        const fcsa_tensor *k
        const fcsa_tensor *v
        const fcsa_tensor *mask
        const fcsa_tensor *bias
        const fcsa_tensor *scale
        const fcsa_tensor *out
        const fcsa_tensor *dout
        const fcsa_tensor *lse
        const fcsa_tensor *dq
        const fcsa_tensor *dk
        const fcsa_tensor *dv
        const fcsa_tensor *dbias
        const fcsa_tensor *dscale
        const fcsa_tensor *cu_seqlens_q
        const fcsa_tensor *cu_seqlens_k

    ctypedef struct fcsa_kvcache_tensors:
        size_t struct_size
        const fcsa_tensor *q
        const fcsa_tensor *k_cache
        const fcsa_tensor *v_cache
        const fcsa_tensor *cache_seqlens
        const fcsa_tensor *block_table
        const fcsa_tensor *k_new
        const fcsa_tensor *v_new
        const fcsa_tensor *scale
        const fcsa_tensor *out
        const fcsa_tensor *lse

    fcsa_status fcsa_kvcache_forward_workspace_size(const fcsa_options *options,
                                                    const fcsa_kvcache_tensors *tensors,
                                                    size_t *workspace_bytes)
    fcsa_status fcsa_kvcache_forward(const fcsa_options *options,
                                     const fcsa_kvcache_tensors *tensors,
                                     void *workspace, size_t workspace_bytes, void *stream)

    const char *fcsa_version()
    int fcsa_abi_version()
    const char *fcsa_status_string(fcsa_status status)
    const char *fcsa_last_error_message()
    const char *fcsa_build_info()
    int fcsa_cuda_compiled()
    int fcsa_cuda_version()
    int fcsa_cuda_available()
    int fcsa_compiled_sm_targets(int *targets, int capacity)
    void fcsa_options_init(fcsa_options *options)
    fcsa_status fcsa_forward_workspace_size(const fcsa_options *options,
                                            const fcsa_forward_tensors *tensors,
                                            size_t *workspace_bytes)
    fcsa_status fcsa_backward_workspace_size(const fcsa_options *options,
                                             const fcsa_backward_tensors *tensors,
                                             size_t *workspace_bytes)
    fcsa_status fcsa_forward(const fcsa_options *options,
                             const fcsa_forward_tensors *tensors,
                             void *workspace, size_t workspace_bytes, void *stream)
    fcsa_status fcsa_backward(const fcsa_options *options,
                              const fcsa_backward_tensors *tensors,
                              void *workspace, size_t workspace_bytes, void *stream)
    int fcsa_last_backend()
    const char *fcsa_backend_name(int backend)


DTYPE_FLOAT32 = FCSA_DTYPE_FLOAT32
DTYPE_FLOAT16 = FCSA_DTYPE_FLOAT16
DTYPE_BFLOAT16 = FCSA_DTYPE_BFLOAT16
DTYPE_BOOL = FCSA_DTYPE_BOOL
DTYPE_INT32 = FCSA_DTYPE_INT32
DEVICE_CPU = FCSA_DEVICE_CPU
DEVICE_CUDA = FCSA_DEVICE_CUDA
BACKEND_AUTO = FCSA_BACKEND_AUTO
BACKEND_CPU = FCSA_BACKEND_CPU
BACKEND_CUDA_SM80 = FCSA_BACKEND_CUDA_SM80
ABI_VERSION = FCSA_ABI_VERSION  # the header this module was compiled against
MAX_DIMS = FCSA_MAX_DIMS


# ---------------------------------------------------------------- queries

cdef str _text(const char *s):
    if s == NULL:
        return ""
    return (<bytes>s).decode("utf-8", "replace")


def version():
    """The version of the loaded libfcsa, "MAJOR.MINOR.PATCH"."""
    return _text(fcsa_version())


def abi_version():
    """The ABI version of the loaded libfcsa."""
    return fcsa_abi_version()


def build_info():
    """libfcsa's one-line description of its build."""
    return _text(fcsa_build_info())


def cuda_compiled():
    """True if libfcsa was built with its CUDA backends."""
    return fcsa_cuda_compiled() != 0


def cuda_version():
    """The CUDA runtime version libfcsa was built with (e.g. 13000), 0 without CUDA."""
    return fcsa_cuda_version()


def cuda_available():
    """True if libfcsa has CUDA backends and a usable device is present."""
    return fcsa_cuda_available() != 0


def compiled_sm_targets():
    """The SM targets libfcsa was compiled for, e.g. (80, 90)."""
    cdef int targets[64]
    cdef int count = fcsa_compiled_sm_targets(targets, 64)
    return tuple(targets[i] for i in range(min(count, 64)))


def last_backend():
    """Name of the backend that ran this thread's last successful call ("auto" if none)."""
    return _text(fcsa_backend_name(fcsa_last_backend()))


def backend_name(int backend):
    return _text(fcsa_backend_name(backend))


def status_string(int status):
    return _text(fcsa_status_string(<fcsa_status>status))


# ---------------------------------------------------------------- errors

cdef int _check(fcsa_status status) except -1:
    """Raises the Python exception that matches a failed status."""
    if status == FCSA_STATUS_SUCCESS:
        return 0
    message = _text(fcsa_last_error_message())
    if not message:
        message = _text(fcsa_status_string(status))
    if status == FCSA_STATUS_INVALID_DTYPE:
        raise TypeError(message)
    if status == FCSA_STATUS_INVALID_ARGUMENT:
        raise ValueError(message)
    if status == FCSA_STATUS_NOT_SUPPORTED:
        raise NotImplementedError(message)
    if status == FCSA_STATUS_OUT_OF_MEMORY:
        raise MemoryError(message)
    raise RuntimeError(f"{_text(fcsa_status_string(status))}: {message}")


# ---------------------------------------------------------------- options

cdef class Options:
    """fcsa_options: the scalar arguments of a call. Defaults are the library's."""

    cdef fcsa_options c

    def __init__(self, float scale=8.0, int groups=1, bint causal=False,
                 bint l2norm_qk=True, bint deterministic=False,
                 int backend=FCSA_BACKEND_AUTO, int num_threads=0):
        fcsa_options_init(&self.c)
        self.c.scale = scale
        self.c.groups = groups
        self.c.causal = causal
        self.c.l2norm_qk = l2norm_qk
        self.c.deterministic = deterministic
        self.c.backend = backend
        self.c.num_threads = num_threads

    def __repr__(self):
        return (f"Options(scale={self.c.scale}, groups={self.c.groups}, "
                f"causal={bool(self.c.causal)}, l2norm_qk={bool(self.c.l2norm_qk)}, "
                f"deterministic={bool(self.c.deterministic)}, backend={self.c.backend}, "
                f"num_threads={self.c.num_threads})")


# ---------------------------------------------------------------- tensors

cdef int _fill(fcsa_tensor *t, str name, object desc) except -1:
    """Writes the descriptor tuple `desc` into *t."""
    try:
        data, dtype, device_type, device_index, shape, strides = desc
        shape = tuple(shape)
        strides = tuple(strides)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a tuple (data_ptr, dtype, device_type, "
                        f"device_index, shape, strides), got {desc!r}") from None
    if len(shape) > FCSA_MAX_DIMS or len(strides) != len(shape):
        raise ValueError(f"{name}: shape {shape} and strides {strides} must have the "
                         f"same length, at most {FCSA_MAX_DIMS}")
    t.data = <void *><uintptr_t>data
    t.ndim = len(shape)
    t.dtype = dtype
    t.device_type = device_type
    t.device_index = device_index
    cdef int i
    for i in range(FCSA_MAX_DIMS):
        t.shape[i] = shape[i] if i < t.ndim else 1
        t.strides[i] = strides[i] if i < t.ndim else 0
    return 0


cdef const fcsa_tensor *_slot(fcsa_tensor *t, str name, object desc) except? NULL:
    """Fills *t from desc and returns t, or returns NULL when desc is None."""
    if desc is None:
        return NULL
    _fill(t, name, desc)
    return t


cdef struct ForwardArgs:
    fcsa_tensor q, k, v, mask, bias, scale, out, lse, cu_seqlens_q, cu_seqlens_k
    fcsa_forward_tensors tensors


cdef int _forward_args(ForwardArgs *a, q, k, v, mask, bias, scale, out, lse,
                       cu_seqlens_q, cu_seqlens_k) except -1:
    a.tensors.struct_size = sizeof(fcsa_forward_tensors)
    a.tensors.q = _slot(&a.q, "q", q)
    a.tensors.k = _slot(&a.k, "k", k)
    a.tensors.v = _slot(&a.v, "v", v)
    a.tensors.mask = _slot(&a.mask, "mask", mask)
    a.tensors.bias = _slot(&a.bias, "bias", bias)
    a.tensors.scale = _slot(&a.scale, "scale", scale)
    a.tensors.out = _slot(&a.out, "out", out)
    a.tensors.lse = _slot(&a.lse, "lse", lse)
    a.tensors.cu_seqlens_q = _slot(&a.cu_seqlens_q, "cu_seqlens_q", cu_seqlens_q)
    a.tensors.cu_seqlens_k = _slot(&a.cu_seqlens_k, "cu_seqlens_k", cu_seqlens_k)
    return 0


cdef struct BackwardArgs:
    fcsa_tensor q, k, v, mask, bias, scale, out, dout, lse, dq, dk, dv, dbias, dscale
    fcsa_tensor cu_seqlens_q, cu_seqlens_k
    fcsa_backward_tensors tensors


cdef int _backward_args(BackwardArgs *a, q, k, v, mask, bias, scale, out, dout, lse,
                        dq, dk, dv, dbias, dscale, cu_seqlens_q, cu_seqlens_k) except -1:
    a.tensors.struct_size = sizeof(fcsa_backward_tensors)
    a.tensors.q = _slot(&a.q, "q", q)
    a.tensors.k = _slot(&a.k, "k", k)
    a.tensors.v = _slot(&a.v, "v", v)
    a.tensors.mask = _slot(&a.mask, "mask", mask)
    a.tensors.bias = _slot(&a.bias, "bias", bias)
    a.tensors.scale = _slot(&a.scale, "scale", scale)
    a.tensors.out = _slot(&a.out, "out", out)
    a.tensors.dout = _slot(&a.dout, "dout", dout)
    a.tensors.lse = _slot(&a.lse, "lse", lse)
    a.tensors.dq = _slot(&a.dq, "dq", dq)
    a.tensors.dk = _slot(&a.dk, "dk", dk)
    a.tensors.dv = _slot(&a.dv, "dv", dv)
    a.tensors.dbias = _slot(&a.dbias, "dbias", dbias)
    a.tensors.dscale = _slot(&a.dscale, "dscale", dscale)
    a.tensors.cu_seqlens_q = _slot(&a.cu_seqlens_q, "cu_seqlens_q", cu_seqlens_q)
    a.tensors.cu_seqlens_k = _slot(&a.cu_seqlens_k, "cu_seqlens_k", cu_seqlens_k)
    return 0


# ---------------------------------------------------------------- attention

def forward_workspace_size(Options options not None, q, k, v, mask=None, bias=None,
                           scale=None, out=None, lse=None, cu_seqlens_q=None,
                           cu_seqlens_k=None):
    """Bytes of workspace fcsa_forward needs for these arguments (validates them)."""
    cdef ForwardArgs a
    cdef size_t nbytes = 0
    cdef fcsa_status status
    _forward_args(&a, q, k, v, mask, bias, scale, out, lse, cu_seqlens_q, cu_seqlens_k)
    with nogil:
        status = fcsa_forward_workspace_size(&options.c, &a.tensors, &nbytes)
    _check(status)
    return nbytes


def forward(Options options not None, q, k, v, mask=None, bias=None, scale=None,
            out=None, lse=None, cu_seqlens_q=None, cu_seqlens_k=None,
            uintptr_t workspace=0, size_t workspace_bytes=0, uintptr_t stream=0):
    """Runs fcsa_forward: writes out (and lse when given). Asynchronous on CUDA."""
    cdef ForwardArgs a
    cdef fcsa_status status
    _forward_args(&a, q, k, v, mask, bias, scale, out, lse, cu_seqlens_q, cu_seqlens_k)
    with nogil:
        status = fcsa_forward(&options.c, &a.tensors, <void *>workspace,
                              workspace_bytes, <void *>stream)
    _check(status)


def backward_workspace_size(Options options not None, q, k, v, mask=None, bias=None,
                            scale=None, out=None, dout=None, lse=None, dq=None,
                            dk=None, dv=None, dbias=None, dscale=None, cu_seqlens_q=None,
                            cu_seqlens_k=None):
    """Bytes of workspace fcsa_backward needs for these arguments (validates them)."""
    cdef BackwardArgs a
    cdef size_t nbytes = 0
    cdef fcsa_status status
    _backward_args(&a, q, k, v, mask, bias, scale, out, dout, lse, dq, dk, dv, dbias, dscale,
                   cu_seqlens_q, cu_seqlens_k)
    with nogil:
        status = fcsa_backward_workspace_size(&options.c, &a.tensors, &nbytes)
    _check(status)
    return nbytes


def backward(Options options not None, q, k, v, mask=None, bias=None, scale=None,
             out=None, dout=None, lse=None, dq=None, dk=None, dv=None, dbias=None,
             dscale=None, cu_seqlens_q=None, cu_seqlens_k=None, uintptr_t workspace=0,
             size_t workspace_bytes=0, uintptr_t stream=0):
    """Runs fcsa_backward: writes dq, dk, dv (and dbias, dscale when given)."""
    cdef BackwardArgs a
    cdef fcsa_status status
    _backward_args(&a, q, k, v, mask, bias, scale, out, dout, lse, dq, dk, dv, dbias, dscale,
                   cu_seqlens_q, cu_seqlens_k)
    with nogil:
        status = fcsa_backward(&options.c, &a.tensors, <void *>workspace,
                               workspace_bytes, <void *>stream)
    _check(status)


# ---------------------------------------------------------------- KV-cache attention

cdef struct KvCacheArgs:
    fcsa_tensor q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new, scale, out, lse
    fcsa_kvcache_tensors tensors


cdef int _kvcache_args(KvCacheArgs *a, q, k_cache, v_cache, cache_seqlens, block_table,
                       k_new, v_new, scale, out, lse) except -1:
    a.tensors.struct_size = sizeof(fcsa_kvcache_tensors)
    a.tensors.q = _slot(&a.q, "q", q)
    a.tensors.k_cache = _slot(&a.k_cache, "k_cache", k_cache)
    a.tensors.v_cache = _slot(&a.v_cache, "v_cache", v_cache)
    a.tensors.cache_seqlens = _slot(&a.cache_seqlens, "cache_seqlens", cache_seqlens)
    a.tensors.block_table = _slot(&a.block_table, "block_table", block_table)
    a.tensors.k_new = _slot(&a.k_new, "k_new", k_new)
    a.tensors.v_new = _slot(&a.v_new, "v_new", v_new)
    a.tensors.scale = _slot(&a.scale, "scale", scale)
    a.tensors.out = _slot(&a.out, "out", out)
    a.tensors.lse = _slot(&a.lse, "lse", lse)
    return 0


def kvcache_forward_workspace_size(Options options not None, q, k_cache, v_cache,
                                   cache_seqlens=None, block_table=None, k_new=None,
                                   v_new=None, scale=None, out=None, lse=None):
    """Bytes of workspace fcsa_kvcache_forward needs for these arguments (validates them)."""
    cdef KvCacheArgs a
    cdef size_t nbytes = 0
    cdef fcsa_status status
    _kvcache_args(&a, q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new, scale,
                  out, lse)
    with nogil:
        status = fcsa_kvcache_forward_workspace_size(&options.c, &a.tensors, &nbytes)
    _check(status)
    return nbytes


def kvcache_forward(Options options not None, q, k_cache, v_cache, cache_seqlens=None,
                    block_table=None, k_new=None, v_new=None, scale=None, out=None, lse=None,
                    uintptr_t workspace=0, size_t workspace_bytes=0, uintptr_t stream=0):
    """Runs fcsa_kvcache_forward: appends k_new, v_new to the caches (when given), then
    writes out (and lse when given). Asynchronous on CUDA."""
    cdef KvCacheArgs a
    cdef fcsa_status status
    _kvcache_args(&a, q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new, scale,
                  out, lse)
    with nogil:
        status = fcsa_kvcache_forward(&options.c, &a.tensors, <void *>workspace,
                                      workspace_bytes, <void *>stream)
    _check(status)
