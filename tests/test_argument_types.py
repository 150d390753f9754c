"""Flags, number scales and gradient order: what is accepted, and the exception that
names the argument for what is not."""

import numpy
import pytest
import torch

import fcsa

B, H, NQ, NK, D = 2, 2, 7, 9, 16

FLASH_FLAGS = ("causal", "l2norm_qk", "attn_bias_batch_dim", "return_lse", "deterministic")
PLAIN_FLAGS = ("causal", "l2norm_qk", "attn_bias_batch_dim", "return_lse")
ATTENTIONS = {"flash": (fcsa.flash_cosine_sim_attention, FLASH_FLAGS),
              "plain": (fcsa.plain_cosine_sim_attention, PLAIN_FLAGS)}
FLAG_CASES = [(a, f) for a, (_, flags) in ATTENTIONS.items() for f in flags]

# bool() took all of these: "False" and 2 as True, a tensor of two as an error that
# named nothing.
BAD_FLAGS = {"string": "False", "two": 2, "tensor": torch.tensor([True, False]),
             "one_element_tensor": torch.tensor(True), "none": None, "float": 1.0}
GOOD_FLAGS = {"true": True, "false": False, "zero": 0, "one": 1,
              "numpy_true": numpy.bool_(True), "numpy_false": numpy.bool_(False)}


def tensors():
    return {"q": torch.randn(B, H, NQ, D), "k": torch.randn(B, H, NK, D),
            "v": torch.randn(B, H, NK, D), "attn_bias": torch.randn(B, NQ, NK)}


@pytest.mark.parametrize("bad", list(BAD_FLAGS))
@pytest.mark.parametrize("attention,flag", FLAG_CASES)
def test_flags_other_than_bools_are_type_errors(attention, flag, bad):
    function, _ = ATTENTIONS[attention]
    args = {**tensors(), "attn_bias_batch_dim": True, flag: BAD_FLAGS[bad]}
    with pytest.raises(TypeError, match=rf"^{flag} must be a bool \(True or False\), got "):
        function(**args)


@pytest.mark.parametrize("attention,flag", FLAG_CASES)
def test_flags_take_bools_numpy_bools_and_0_or_1(attention, flag):
    function, _ = ATTENTIONS[attention]
    t = tensors()
    if flag != "attn_bias_batch_dim":  # (its 3-D bias is (b, nq, nk) only with True)
        t["attn_bias"] = torch.randn(H, NQ, NK)
    for value in GOOD_FLAGS.values():
        got = function(**t, **{flag: value})
        want = function(**t, **{flag: bool(value)})
        assert isinstance(got, tuple) == (flag == "return_lse" and bool(value))
        for a, b in zip(got if isinstance(got, tuple) else (got,),
                        want if isinstance(want, tuple) else (want,)):
            assert torch.equal(a, b)
    # The flag is followed: l2norm_qk=0 does not normalize, 1 does.
    if flag == "l2norm_qk":
        assert not torch.equal(function(**t, l2norm_qk=0), function(**t, l2norm_qk=1))


def test_module_flags_and_scale():
    for bad in ("yes", None, 2):
        with pytest.raises(TypeError, match="^causal must be a bool"):
            fcsa.CosineSimAttention(16, heads=2, dim_head=8, causal=bad)
        with pytest.raises(TypeError, match="^learned_scale must be a bool"):
            fcsa.CosineSimAttention(16, heads=2, dim_head=8, learned_scale=bad)
    with pytest.raises(ValueError, match=r"^scale must be finite in float32, got 1e\+39$"):
        fcsa.CosineSimAttention(16, heads=2, dim_head=8, scale=1e39)
    with pytest.raises(TypeError, match="^scale must be a number, got '8'$"):
        fcsa.CosineSimAttention(16, heads=2, dim_head=8, scale="8")
    module = fcsa.CosineSimAttention(16, heads=2, dim_head=8, causal=numpy.bool_(True),
                                     learned_scale=1, scale=4)
    assert module.causal is True and isinstance(module.scale, torch.nn.Parameter)
    assert torch.equal(module.scale.detach(), torch.full((2,), 4.0))
    assert module(torch.randn(1, 5, 16)).shape == (1, 5, 16)


# ---------------------------------------------------------------- scale

@pytest.mark.parametrize("attention", list(ATTENTIONS))
def test_scale_must_be_finite_in_float32(attention):
    function, _ = ATTENTIONS[attention]
    cases = {10**400: "int 1000000000000000... (401 characters)", 1e39: "1e+39",
             -1e39: "-1e+39", float("inf"): "inf", float("nan"): "nan",
             # The float64 that rounds to infinity in float32 (largest float32 + half a step).
             2.0**128 - 2.0**103: "3.4028235677973366e+38"}
    for scale, shown in cases.items():
        with pytest.raises(ValueError) as info:
            function(**tensors(), attn_bias_batch_dim=True, scale=scale)
        assert str(info.value) == f"scale must be finite in float32, got {shown}"
    with pytest.raises(TypeError, match="^scale must be a float or a tensor"):
        function(**tensors(), attn_bias_batch_dim=True, scale=True)


def test_scales_finite_in_float32_are_accepted():
    # The largest that still rounds to a finite float32, and a Python int, both reach the
    # computation (run here in float64, where such logits stay finite).
    t = {n: x.double() for n, x in tensors().items() if n != "attn_bias"}
    for scale in (2.0**128 - 2.0**104, 10**38, numpy.float32(3.0)):
        out = fcsa.plain_cosine_sim_attention(**t, scale=scale)
        assert torch.isfinite(out).all()
    want = fcsa.flash_cosine_sim_attention(**{n: x.float() for n, x in t.items()}, scale=3.0)
    got = fcsa.flash_cosine_sim_attention(**{n: x.float() for n, x in t.items()},
                                          scale=numpy.float32(3.0))
    assert torch.equal(got, want)


# ---------------------------------------------------------------- gradient order

def test_double_backward_is_refused_at_the_first_backward():
    t = {n: x.requires_grad_() for n, x in tensors().items() if n != "attn_bias"}
    out = fcsa.flash_cosine_sim_attention(**t)
    with pytest.raises(NotImplementedError, match=r"double backward \(create_graph=True\)"):
        torch.autograd.grad(out.square().sum(), list(t.values()), create_graph=True)
    # A first-order backward of the same graph still works.
    grads = torch.autograd.grad(out.square().sum(), list(t.values()))
    assert all(torch.isfinite(g).all() for g in grads)
