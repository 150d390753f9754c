"""Checks libfcsa's C API layer: build queries, option and tensor validation, statuses,
messages, workspace checks, and that nothing is written when a call is refused.

    python cuda/tests/cpu/check_api.py [--library PATH]

Exits non-zero when any check fails.
"""
import argparse
import ctypes
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fcsa_ctypes as fc  # noqa: E402

SUCCESS, INVALID_DTYPE, INVALID_ARGUMENT, NOT_SUPPORTED, WORKSPACE_TOO_SMALL = 0, 1, 2, 3, 4

failures = []


def expect(name, condition, detail=""):
    print(("ok   " if condition else "FAIL ") + name + (f"  ({detail})" if detail and not condition else ""))
    if not condition:
        failures.append(name)


class Call:
    """One forward or backward call whose descriptors a check can spoil before running it."""

    def __init__(self, lib, backward=False, b=2, h=4, hk=2, nq=5, nk=7, d=16, dtype=torch.float32):
        self.lib = lib
        self.backward = backward
        q = torch.randn(b, h, nq, d).to(dtype)
        k = torch.randn(b, hk, nk, d).to(dtype)
        v = torch.randn(b, hk, nk, d).to(dtype)
        self.tensors = {"q": q, "k": k, "v": v, "mask": torch.rand(b, nk) > 0.2,
                        "bias": torch.randn(1, h, nq, nk).to(dtype), "scale": torch.rand(h) + 1}
        if backward:
            out, lse = fc.forward(lib, q, k, v, self.tensors["mask"], self.tensors["bias"], self.tensors["scale"])
            self.tensors.update(out=out, lse=lse, dout=torch.randn_like(q), dq=torch.full_like(q, 7.0),
                                dk=torch.full_like(k, 7.0), dv=torch.full_like(v, 7.0),
                                dbias=torch.full_like(self.tensors["bias"], 7.0),
                                dscale=torch.full_like(self.tensors["scale"], 7.0))
        else:
            self.tensors.update(out=torch.full_like(q, 7.0), lse=torch.full((b, h, nq), 7.0))
        self.descriptors = {name: fc.describe(t) for name, t in self.tensors.items()}
        self.options = fc.make_options(lib)

    def outputs(self):
        names = ("dq", "dk", "dv", "dbias", "dscale") if self.backward else ("out", "lse")
        return [self.tensors[n] for n in names]

    def run(self, workspace_bytes=None, options="default", struct_size=None):
        names = (("q", "k", "v", "mask", "bias", "scale", "out", "dout", "lse", "dq", "dk", "dv", "dbias", "dscale")
                 if self.backward else ("q", "k", "v", "mask", "bias", "scale", "out", "lse"))
        kind = fc.BackwardTensors if self.backward else fc.ForwardTensors
        pointers = [fc.pointer(self.descriptors.get(n)) for n in names]
        tensors = kind(struct_size if struct_size is not None else ctypes.sizeof(kind), *pointers)
        opts = ctypes.byref(self.options) if options == "default" else options
        size = ctypes.c_size_t(0)
        query = self.lib.fcsa_backward_workspace_size if self.backward else self.lib.fcsa_forward_workspace_size
        status = query(opts, ctypes.byref(tensors), ctypes.byref(size))
        if status != SUCCESS:
            return status, self.lib.fcsa_last_error_message().decode()
        bytes_given = size.value if workspace_bytes is None else workspace_bytes
        workspace = torch.empty(max(bytes_given, 1), dtype=torch.uint8)
        call = self.lib.fcsa_backward if self.backward else self.lib.fcsa_forward
        status = call(opts, ctypes.byref(tensors), workspace.data_ptr(), bytes_given, None)
        return status, self.lib.fcsa_last_error_message().decode()


def refused(lib, name, status_wanted, words, spoil, backward=False, **kwargs):
    """Spoils one thing, runs, expects the status, a message with `words`, and untouched outputs."""
    call = Call(lib, backward=backward)
    before = [t.clone() for t in call.outputs()]
    run_kwargs = spoil(call) or {}
    status, message = call.run(**run_kwargs)
    untouched = all(torch.equal(a, b) for a, b in zip(before, call.outputs()))
    ok = status == status_wanted and all(w in message for w in words) and untouched
    expect(f"{name}: {fc.STATUS.get(status_wanted)}", ok,
           f"got {fc.STATUS.get(status, status)} {message!r}, outputs untouched: {untouched}")


def set_field(name, field, value):
    def spoil(call):
        if field == "shape":
            index, size = value
            call.descriptors[name].shape[index] = size
        elif field == "strides":
            index, stride = value
            call.descriptors[name].strides[index] = stride
        else:
            setattr(call.descriptors[name], field, value)
    return spoil


def drop(name):
    def spoil(call):
        call.descriptors[name] = None
    return spoil


def check_build_queries(lib):
    expect("fcsa_version is 0.1.0", lib.fcsa_version().decode() == "0.1.0")
    expect("fcsa_abi_version is 1", lib.fcsa_abi_version() == 1)
    info = lib.fcsa_build_info().decode()
    expect("build info names version and CPU kernels", "0.1.0" in info and "CPU kernels" in info, info)
    compiled = lib.fcsa_cuda_compiled()
    expect("cuda_available is 0 or 1, never more than compiled", lib.fcsa_cuda_available() in (0, compiled))
    targets = (ctypes.c_int * 16)()
    count = lib.fcsa_compiled_sm_targets(targets, 16)
    expect("SM targets: none without CUDA, else numbers like 80 or 90", (count == 0) if not compiled else
           all(t >= 50 for t in targets[:min(count, 16)]), f"{count} {list(targets[:count])}")
    expect("SM target count with a NULL array", lib.fcsa_compiled_sm_targets(None, 0) == count)
    expect("status strings", lib.fcsa_status_string(1).decode() == "FCSA_STATUS_INVALID_DTYPE"
           and lib.fcsa_status_string(99).decode() == "FCSA_STATUS_UNKNOWN")
    expect("backend names", lib.fcsa_backend_name(1).decode() == "cpu"
           and lib.fcsa_backend_name(2).decode() == "cuda-sm80")
    options = fc.Options()
    lib.fcsa_options_init(ctypes.byref(options))
    expect("options defaults", options.struct_size == ctypes.sizeof(fc.Options) and options.scale == 8.0
           and options.groups == 1 and options.l2norm_qk == 1 and options.causal == 0 and options.backend == 0)


def check_validation(lib):
    # Required tensors.
    for name in ("q", "k", "v", "out"):
        refused(lib, f"{name} NULL", INVALID_ARGUMENT, [name, "NULL"], drop(name))
    for name in ("dout", "lse", "dq", "dk", "dv"):
        refused(lib, f"backward {name} NULL", INVALID_ARGUMENT, [name, "NULL"], drop(name), backward=True)
    # ndim.
    refused(lib, "q 3-D", INVALID_ARGUMENT, ["q:", "4-D"], set_field("q", "ndim", 3))
    refused(lib, "mask 3-D", INVALID_ARGUMENT, ["mask:"], set_field("mask", "ndim", 3))
    refused(lib, "lse 2-D", INVALID_ARGUMENT, ["lse:"], set_field("lse", "ndim", 2))
    refused(lib, "scale 2-D", INVALID_ARGUMENT, ["scale:"], set_field("scale", "ndim", 2))
    # dtypes.
    refused(lib, "mask float16", INVALID_DTYPE, ["mask: expected dtype bool, got float16"],
            set_field("mask", "dtype", fc.FLOAT16))
    refused(lib, "k float16 with float32 q", INVALID_DTYPE, ["k:", "float32", "float16"],
            set_field("k", "dtype", fc.FLOAT16))
    refused(lib, "q bool", INVALID_DTYPE, ["q:", "bool"], set_field("q", "dtype", fc.BOOL))
    refused(lib, "q unknown dtype", INVALID_DTYPE, ["q:", "unknown dtype"], set_field("q", "dtype", 17))
    refused(lib, "bias bfloat16 with float32 q", INVALID_DTYPE, ["bias:"], set_field("bias", "dtype", fc.BFLOAT16))
    refused(lib, "scale float16", INVALID_DTYPE, ["scale:"], set_field("scale", "dtype", fc.FLOAT16))
    refused(lib, "lse float16", INVALID_DTYPE, ["lse:"], set_field("lse", "dtype", fc.FLOAT16))
    refused(lib, "dbias dtype unlike bias", INVALID_DTYPE, ["dbias:"], set_field("dbias", "dtype", fc.FLOAT16),
            backward=True)
    # Shapes.
    refused(lib, "k heads 3 with h 4", INVALID_ARGUMENT, ["k: expected shape (2, 4, 7, 16) or (2, hk, 7, 16)",
                                                         "4 % hk == 0", "got (2, 3, 7, 16)"],
            set_field("k", "shape", (1, 3)))
    refused(lib, "k head dim unlike q", INVALID_ARGUMENT, ["k:"], set_field("k", "shape", (3, 8)))
    refused(lib, "v unlike k", INVALID_ARGUMENT, ["v:", "k's but for the head dim"],
            set_field("v", "shape", (2, 6)))
    refused(lib, "v head dim 0", INVALID_ARGUMENT, ["v:", "d_v >= 1"], set_field("v", "shape", (3, 0)))
    refused(lib, "out unlike q", INVALID_ARGUMENT, ["out:"], set_field("out", "shape", (2, 4)))
    # v has a head dim of its own (d_v); out, dout and dv take it.
    refused(lib, "out with q's head dim, v's another", INVALID_ARGUMENT, ["out:", "(2, 4, 5, 8)", "v's head dim"],
            set_field("v", "shape", (3, 8)))
    refused(lib, "dout unlike out", INVALID_ARGUMENT, ["dout:", "like out"], set_field("dout", "shape", (3, 8)),
            backward=True)
    refused(lib, "dv unlike v", INVALID_ARGUMENT, ["dv:", "like v"], set_field("dv", "shape", (3, 8)),
            backward=True)
    refused(lib, "mask length", INVALID_ARGUMENT, ["mask:"], set_field("mask", "shape", (1, 6)))
    refused(lib, "bias dim neither full nor 1", INVALID_ARGUMENT, ["bias:", "broadcastable"],
            set_field("bias", "shape", (2, 3)))
    refused(lib, "scale (3,) with h 4", INVALID_ARGUMENT, ["scale:", "(4,)"], set_field("scale", "shape", (0, 3)))
    refused(lib, "lse shape", INVALID_ARGUMENT, ["lse:"], set_field("lse", "shape", (2, 4)))
    refused(lib, "dk unlike k", INVALID_ARGUMENT, ["dk:"], set_field("dk", "shape", (1, 4)), backward=True)
    refused(lib, "dbias unlike bias", INVALID_ARGUMENT, ["dbias:"], set_field("dbias", "shape", (0, 2)),
            backward=True)
    refused(lib, "negative size", INVALID_ARGUMENT, ["q:", "negative"], set_field("q", "shape", (2, -1)))
    refused(lib, "zero head dim", INVALID_ARGUMENT, ["q:"], set_field("q", "shape", (3, 0)))

    def dbias_without_bias(call):
        call.descriptors["bias"] = None
    refused(lib, "dbias without bias", INVALID_ARGUMENT, ["dbias:"], dbias_without_bias, backward=True)

    def dscale_without_scale(call):
        call.descriptors["scale"] = None
    refused(lib, "dscale without scale", INVALID_ARGUMENT, ["dscale:"], dscale_without_scale, backward=True)
    # Strides and data.
    refused(lib, "q last dim not contiguous", INVALID_ARGUMENT, ["q:", "stride 1"], set_field("q", "strides", (3, 2)))
    refused(lib, "v data NULL", INVALID_ARGUMENT, ["v:", "NULL"], set_field("v", "data", None))
    # Devices.
    refused(lib, "k on another device type", INVALID_ARGUMENT, ["k:", "cpu"], set_field("k", "device_type", 1))
    refused(lib, "unknown device type", INVALID_ARGUMENT, ["q:", "device"], set_field("q", "device_type", 7))

    def all_cuda(call):
        for d in call.descriptors.values():
            if d is not None:
                d.device_type = 1
    if lib.fcsa_cuda_compiled() == 0:
        refused(lib, "CUDA tensors in a CPU-only build", NOT_SUPPORTED, ["CUDA", "cuda:0"], all_cuda)

    # Options.
    def option(field, value):
        def spoil(call):
            setattr(call.options, field, value)
        return spoil
    refused(lib, "groups 0", INVALID_ARGUMENT, ["options.groups"], option("groups", 0))
    refused(lib, "groups 3 with d 16", INVALID_ARGUMENT, ["options.groups", "divisible"], option("groups", 3))
    refused(lib, "scale inf", INVALID_ARGUMENT, ["options.scale"], option("scale", float("inf")))
    refused(lib, "scale nan", INVALID_ARGUMENT, ["options.scale"], option("scale", float("nan")))
    refused(lib, "backend 9", INVALID_ARGUMENT, ["options.backend"], option("backend", 9))
    refused(lib, "num_threads -1", INVALID_ARGUMENT, ["options.num_threads"], option("num_threads", -1))
    refused(lib, "CUDA backend forced with CPU tensors", NOT_SUPPORTED, ["options.backend"], option("backend", 2))
    refused(lib, "options struct_size too small", INVALID_ARGUMENT, ["options", "struct_size"],
            option("struct_size", 8))
    refused(lib, "tensors struct_size too small", INVALID_ARGUMENT, ["tensors", "struct_size"],
            lambda call: {"struct_size": 8})
    refused(lib, "workspace too small", WORKSPACE_TOO_SMALL, ["workspace"], lambda call: {"workspace_bytes": 3})
    refused(lib, "backward workspace too small", WORKSPACE_TOO_SMALL, ["workspace"],
            lambda call: {"workspace_bytes": 3}, backward=True)


def check_accepted(lib):
    call = Call(lib)
    status, message = call.run(options=None)
    expect("NULL options mean the defaults", status == SUCCESS, message)
    expect("last backend is the CPU", lib.fcsa_last_backend() == 1)

    call = Call(lib)
    call.options.struct_size = ctypes.sizeof(fc.Options) + 16  # a later, larger version of the struct
    status, message = call.run()
    expect("larger options struct_size accepted", status == SUCCESS, message)

    call = Call(lib)
    call.descriptors["mask"] = call.descriptors["bias"] = call.descriptors["scale"] = call.descriptors["lse"] = None
    status, message = call.run()
    expect("optional tensors absent", status == SUCCESS and not torch.isnan(call.tensors["out"]).any(), message)

    # A 0-size tensor may come with NULL data.
    q = torch.randn(1, 2, 1, 8)
    k = torch.randn(1, 2, 0, 8)
    out, lse = fc.forward(lib, q, k, k.clone())
    expect("nk = 0 gives zeros and -inf", torch.equal(out, torch.zeros_like(out)) and bool((lse == -float("inf")).all()))

    # A dimension of size 1 may have any stride: it is never stepped along.
    call = Call(lib, nq=1)
    status, _ = call.run()
    reference = call.tensors["out"].clone()
    call.tensors["out"].fill_(7.0)
    call.descriptors["q"].strides[2] = 12345
    call.descriptors["out"].strides[2] = -3
    status_odd, message = call.run()
    expect("size-1 dims accept any stride", status == SUCCESS and status_odd == SUCCESS
           and torch.equal(call.tensors["out"], reference), message)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--library", default=None)
    args = parser.parse_args()
    lib = fc.load(args.library)
    lib.fcsa_compiled_sm_targets.argtypes = [ctypes.c_void_p, ctypes.c_int]
    torch.manual_seed(0)
    check_build_queries(lib)
    check_validation(lib)
    check_accepted(lib)
    print(f"{len(failures)} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
