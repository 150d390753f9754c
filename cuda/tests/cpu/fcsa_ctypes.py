"""fcsa_ctypes: libfcsa's C API through ctypes, for the CPU backend's own checks.

It maps torch tensors onto fcsa_tensor descriptors and calls fcsa_forward /
fcsa_backward with a workspace of the size the library asks for. Outputs are
poisoned with NaN first, so an element the library forgets to write shows up.
The library is --library in the scripts, else $FCSA_LIBRARY, else build/cuda/libfcsa.so
(a CPU-only build: cmake -S . -B build -G Ninja -DFCSA_CUDA=OFF && cmake --build build).
"""
import ctypes
import os

import torch

FLOAT32, FLOAT16, BFLOAT16, BOOL = 0, 1, 2, 3
DTYPES = {torch.float32: FLOAT32, torch.float16: FLOAT16, torch.bfloat16: BFLOAT16, torch.bool: BOOL}
STATUS = {0: "SUCCESS", 1: "INVALID_DTYPE", 2: "INVALID_ARGUMENT", 3: "NOT_SUPPORTED",
          4: "WORKSPACE_TOO_SMALL", 5: "CUDA_ERROR", 6: "OUT_OF_MEMORY", 7: "INTERNAL_ERROR"}


class Tensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("ndim", ctypes.c_int32), ("dtype", ctypes.c_int32),
                ("device_type", ctypes.c_int32), ("device_index", ctypes.c_int32),
                ("shape", ctypes.c_int64 * 4), ("strides", ctypes.c_int64 * 4)]


class Options(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("scale", ctypes.c_float), ("groups", ctypes.c_int32),
                ("causal", ctypes.c_int32), ("l2norm_qk", ctypes.c_int32), ("deterministic", ctypes.c_int32),
                ("backend", ctypes.c_int32), ("num_threads", ctypes.c_int32)]


TensorPtr = ctypes.POINTER(Tensor)


class ForwardTensors(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t)] + [
        (name, TensorPtr) for name in ("q", "k", "v", "mask", "bias", "scale", "out", "lse")]


class BackwardTensors(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t)] + [
        (name, TensorPtr) for name in ("q", "k", "v", "mask", "bias", "scale", "out", "dout", "lse",
                                       "dq", "dk", "dv", "dbias", "dscale")]


def load(path=None):
    path = path or os.environ.get("FCSA_LIBRARY", "build/cuda/libfcsa.so")
    lib = ctypes.CDLL(path)
    for name in ("fcsa_version", "fcsa_build_info", "fcsa_last_error_message", "fcsa_backend_name",
                 "fcsa_status_string"):
        getattr(lib, name).restype = ctypes.c_char_p
    lib.fcsa_options_init.argtypes = [ctypes.POINTER(Options)]
    lib.fcsa_forward_workspace_size.argtypes = [ctypes.POINTER(Options), ctypes.POINTER(ForwardTensors),
                                                ctypes.POINTER(ctypes.c_size_t)]
    lib.fcsa_backward_workspace_size.argtypes = [ctypes.POINTER(Options), ctypes.POINTER(BackwardTensors),
                                                 ctypes.POINTER(ctypes.c_size_t)]
    lib.fcsa_forward.argtypes = [ctypes.POINTER(Options), ctypes.POINTER(ForwardTensors), ctypes.c_void_p,
                                 ctypes.c_size_t, ctypes.c_void_p]
    lib.fcsa_backward.argtypes = [ctypes.POINTER(Options), ctypes.POINTER(BackwardTensors), ctypes.c_void_p,
                                  ctypes.c_size_t, ctypes.c_void_p]
    return lib


class FcsaError(RuntimeError):
    def __init__(self, status, message):
        super().__init__(f"{STATUS.get(status, status)}: {message}")
        self.status = status
        self.message = message


def describe(t):
    """An fcsa_tensor for a torch tensor (None stays None)."""
    if t is None:
        return None
    d = Tensor()
    d.data = t.data_ptr() if t.numel() > 0 else 0
    d.ndim = t.dim()
    d.dtype = DTYPES[t.dtype]
    d.device_type = 0 if t.device.type == "cpu" else 1
    d.device_index = t.device.index or 0
    for i in range(t.dim()):
        d.shape[i] = t.shape[i]
        d.strides[i] = t.stride(i)
    return d


def pointer(d):
    return ctypes.pointer(d) if d is not None else None


def make_options(lib, scale=8.0, groups=1, causal=False, l2norm=True, num_threads=0, backend=0,
                 deterministic=False):
    o = Options()
    lib.fcsa_options_init(ctypes.byref(o))
    o.scale = scale
    o.groups = groups
    o.causal = int(causal)
    o.l2norm_qk = int(l2norm)
    o.num_threads = num_threads
    o.backend = backend
    o.deterministic = int(deterministic)
    return o


def check(lib, status):
    if status != 0:
        raise FcsaError(status, lib.fcsa_last_error_message().decode())


def poisoned_like(t):
    return torch.full_like(t, float("nan")) if t.is_floating_point() else torch.empty_like(t)


def forward(lib, q, k, v, mask=None, bias=None, scale=8.0, groups=1, causal=False, l2norm=True,
            num_threads=0, out=None, lse=None, want_lse=True):
    """Runs fcsa_forward; returns (out, lse)."""
    scale_t = scale if torch.is_tensor(scale) else None
    if out is None:
        out = torch.full((*q.shape[:-1], v.shape[-1]), float("nan"), dtype=q.dtype)  # v's head dim
    if lse is None and want_lse:
        lse = torch.full(q.shape[:3], float("nan"), dtype=torch.float32)
    opts = make_options(lib, 8.0 if scale_t is not None else float(scale), groups, causal, l2norm, num_threads)
    keep = [describe(x) for x in (q, k, v, mask, bias, scale_t, out, lse)]
    ft = ForwardTensors(ctypes.sizeof(ForwardTensors), *[pointer(x) for x in keep])
    size = ctypes.c_size_t(0)
    check(lib, lib.fcsa_forward_workspace_size(ctypes.byref(opts), ctypes.byref(ft), ctypes.byref(size)))
    workspace = torch.empty(max(size.value, 1), dtype=torch.uint8)
    check(lib, lib.fcsa_forward(ctypes.byref(opts), ctypes.byref(ft), workspace.data_ptr(), size.value, None))
    return out, lse


def backward(lib, q, k, v, out, dout, lse, mask=None, bias=None, scale=8.0, groups=1, causal=False,
             l2norm=True, num_threads=0, want_dbias=False, want_dscale=False, grads=None):
    """Runs fcsa_backward; returns (dq, dk, dv, dbias, dscale), poisoned before the call."""
    scale_t = scale if torch.is_tensor(scale) else None
    if grads is None:
        dq, dk, dv = poisoned_like(q), poisoned_like(k), poisoned_like(v)
        dbias = poisoned_like(bias) if want_dbias else None
        dscale = poisoned_like(scale_t) if want_dscale else None
    else:
        dq, dk, dv, dbias, dscale = grads
    opts = make_options(lib, 8.0 if scale_t is not None else float(scale), groups, causal, l2norm, num_threads)
    keep = [describe(x) for x in (q, k, v, mask, bias, scale_t, out, dout, lse, dq, dk, dv, dbias, dscale)]
    bt = BackwardTensors(ctypes.sizeof(BackwardTensors), *[pointer(x) for x in keep])
    size = ctypes.c_size_t(0)
    check(lib, lib.fcsa_backward_workspace_size(ctypes.byref(opts), ctypes.byref(bt), ctypes.byref(size)))
    workspace = torch.empty(max(size.value, 1), dtype=torch.uint8)
    check(lib, lib.fcsa_backward(ctypes.byref(opts), ctypes.byref(bt), workspace.data_ptr(), size.value, None))
    return dq, dk, dv, dbias, dscale
