"""Argument checks and the canonical 4-D form shared by the fused and the plain attention.

Every accepted call is brought to one form before anything runs:

    q (b, h, nq, d), k (b, hk, nk, d), v (b, hk, nk, d_v), mask (b, nk) bool, bias 4-D
    with each dim equal to (b, h, nq, nk)'s or 1, scale a float or a tensor of shape ()
    or (h,)

v's head dim d_v is its own: it may differ from q's and k's d, and the output takes it.

All reshapes are views, so autograd carries gradients back to the caller's shapes.
Errors name the argument: TypeError for a wrong type or dtype, ValueError for a wrong
shape, value or device.
"""

import math
import numbers
import sys
from typing import NamedTuple, Optional

import torch
from torch import Tensor

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The plain version also runs in float64: that is the tests' reference.
REFERENCE_DTYPES = KERNEL_DTYPES + (torch.float64,)
# The magnitude from which a float64 rounds to infinity in float32: the largest float32
# plus half of its last step (the tie rounds to the even neighbour, infinity).
FLOAT32_OVERFLOW = 2.0**128 - 2.0**103


class Inputs(NamedTuple):
    q: Tensor                 # (b, h, nq, d)
    k: Tensor                 # (b, hk, nk, d)
    v: Tensor                 # (b, hk, nk, d_v)
    mask: Optional[Tensor]    # (b, nk), bool
    bias: Optional[Tensor]    # 4-D, broadcastable to (b, h, nq, nk)
    scale: Optional[Tensor]   # () or (h,), as given
    scale_value: float        # used when scale is None
    merged: bool              # q came as (b * h, nq, d)


def _dtype_names(dtypes):
    return ", ".join(str(t).replace("torch.", "") for t in dtypes)


def _require_tensor(name, t):
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _require_device(name, t, q):
    if t.device != q.device:
        raise ValueError(f"{name} is on {t.device} but q is on {q.device}: "
                         "all tensors must be on one device")


def _shape(t):
    return tuple(t.shape)


def _shown(value):
    """A short text for a value in a message: its repr when short, else its type."""
    if value is None or isinstance(value, (str, numbers.Number)):
        text = repr(value)
        if len(text) <= 32:
            return text
        return f"{type(value).__name__} {text[:16]}... ({len(text)} characters)"
    return f"a {type(value).__name__}"


def check_flag(name, value) -> bool:
    """A flag argument as a bool. Accepted: True and False, numpy's bools, and the
    integers 0 and 1; anything else (a string, None, a tensor, 2) is a TypeError, so
    that causal="False" cannot mean True."""
    if isinstance(value, bool):
        return value
    numpy = sys.modules.get("numpy")  # a numpy bool means numpy is imported already
    if numpy is not None and isinstance(value, numpy.bool_):
        return bool(value)
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    raise TypeError(f"{name} must be a bool (True or False), got {_shown(value)}")


def check_groups(groups, d):
    """groups: an int (not a bool) that divides the head dim d."""
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral):
        raise TypeError(f"groups must be an int, got {type(groups).__name__}")
    if groups < 1 or d % groups != 0:
        raise ValueError(f"groups must be a positive divisor of the head dim {d}, got {groups}")


def check_flags(**flags):
    """check_flag on each keyword argument; the bools in the order given."""
    return tuple(check_flag(name, value) for name, value in flags.items())


def check_scale_value(name, value, expected="a float") -> float:
    """A number scale as a float: a real number (not a bool), finite, and finite once
    rounded to float32, which is what the kernels compute with. `expected` names what
    the caller accepts, for the TypeError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {_shown(value)}")
    try:
        number = float(value)
    except OverflowError:  # an int or a fraction beyond float64
        number = math.inf
    if abs(number) < FLOAT32_OVERFLOW:  # False for inf and nan too
        return number
    raise ValueError(f"{name} must be finite in float32, got {_shown(value)}")


def canonical_inputs(q, k, v, mask, attn_bias, scale, groups, attn_bias_batch_dim,
                     dtypes=KERNEL_DTYPES) -> Inputs:
    """Checks the arguments of an attention call and returns their canonical 4-D form."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _require_tensor(name, t)
    if q.dtype not in dtypes:
        raise TypeError(f"q must have dtype {_dtype_names(dtypes)}, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}: "
                            "q, k and v must have one dtype")
        _require_device(name, t, q)

    if q.dim() not in (3, 4):
        raise ValueError("q must be 4-D (batch, heads, seq, dim) or 3-D "
                         f"(batch * heads, seq, dim), got shape {_shape(q)}")
    merged = q.dim() == 3
    kv_dims = (3,) if merged else (3, 4)
    for name, t in (("k", k), ("v", v)):
        if t.dim() not in kv_dims:
            expected = ("3-D (batch * heads, seq, dim) like q" if merged else
                        "4-D (batch, kv_heads, seq, dim) or 3-D (batch, seq, dim)")
            raise ValueError(f"{name} must be {expected}, got shape {_shape(t)}")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"k and v must have the same shape but for the head dim (the "
                         f"last), got k {_shape(k)} and v {_shape(v)}")

    # Views in the canonical form; 3-D k and v are single-headed.
    if merged:
        q = q.unsqueeze(1)
    if k.dim() == 3:
        k, v = k.unsqueeze(1), v.unsqueeze(1)
    b, h, nq, d = q.shape
    hk, nk = k.shape[1], k.shape[2]
    if k.shape[0] != b:
        raise ValueError(f"k and v have batch size {k.shape[0]} but q has {b}")
    if k.shape[3] != d:
        raise ValueError(f"k has head dim {k.shape[3]} but q has {d}")
    if d < 1:
        raise ValueError(f"q must have a head dim of at least 1, got shape {_shape(q)}")
    if v.shape[3] < 1:
        raise ValueError(f"v must have a head dim of at least 1, got shape {_shape(v)}")
    if hk < 1 or h % hk != 0:
        raise ValueError(f"q's {h} heads must be a multiple of k's and v's {hk} heads")

    check_groups(groups, d)

    if mask is not None:
        _require_tensor("mask", mask)
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = attend), got {mask.dtype}")
        _require_device("mask", mask, q)
        if mask.shape != (b, nk):
            raise ValueError(f"mask must have shape (batch, key length) = {(b, nk)}, "
                             f"got {_shape(mask)}")

    bias = None
    if attn_bias is not None:
        bias = _canonical_bias(attn_bias, q.dtype, q, (b, h, nq, nk), attn_bias_batch_dim)

    scale_t, scale_value = _canonical_scale(scale, h, q)
    return Inputs(q, k, v, mask, bias, scale_t, scale_value, merged)


def _canonical_bias(bias, dtype, q, full, batch_dim):
    _require_tensor("attn_bias", bias)
    if bias.dtype not in (dtype, torch.float32):
        raise TypeError(f"attn_bias must have q's dtype ({dtype}) or float32, "
                        f"got {bias.dtype}")
    _require_device("attn_bias", bias, q)
    b, h, nq, nk = full
    if bias.dim() == 3:
        if batch_dim:
            if bias.shape != (b, nq, nk):
                raise ValueError("attn_bias with attn_bias_batch_dim=True must have shape "
                                 f"(batch, q length, key length) = {(b, nq, nk)}, "
                                 f"got {_shape(bias)}")
            return bias.unsqueeze(1)
        if bias.shape != (h, nq, nk):
            raise ValueError("attn_bias must have shape (heads, q length, key length) = "
                             f"{(h, nq, nk)}, got {_shape(bias)}")
        return bias.unsqueeze(0)
    if bias.dim() == 4:
        if any(s != f and s != 1 for s, f in zip(bias.shape, full)):
            raise ValueError(f"attn_bias of shape {_shape(bias)} does not broadcast to "
                             f"(batch, heads, q length, key length) = {full}")
        return bias
    raise ValueError("attn_bias must be 3-D (heads, q length, key length), "
                     "(batch, q length, key length) with attn_bias_batch_dim=True, or 4-D "
                     f"broadcastable to {full}; got shape {_shape(bias)}")


def _canonical_scale(scale, h, q):
    if isinstance(scale, Tensor):
        if not scale.dtype.is_floating_point:
            raise TypeError(f"scale must be a floating-point tensor, got {scale.dtype}")
        _require_device("scale", scale, q)
        if scale.shape not in ((), (h,)):
            raise ValueError(f"scale must be a float or a tensor of shape () or (heads,) = "
                             f"({h},), got shape {_shape(scale)}")
        # Its values are not looked at: that would wait for the GPU on every call.
        return scale, 8.0
    return None, check_scale_value("scale", scale,
                                   "a float or a tensor of shape () or (heads,)")
