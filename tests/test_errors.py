"""Bad input: the right exception, a message naming the argument, nothing crashes, and
the process keeps working afterwards."""

import pytest
import torch

import fcsa

B, H, NQ, NK, D = 2, 4, 9, 11, 16


def good_args():
    return dict(q=torch.randn(B, H, NQ, D), k=torch.randn(B, H, NK, D),
                v=torch.randn(B, H, NK, D))


# name: (changes to the good arguments, exception type, words the message must contain)
BAD = {
    "q_not_tensor": (dict(q=[[1.0]]), TypeError, ["q", "torch.Tensor"]),
    "k_not_tensor": (dict(k=None), TypeError, ["k", "torch.Tensor"]),
    "v_not_tensor": (dict(v=3.0), TypeError, ["v", "torch.Tensor"]),
    "q_float64": (dict(q=torch.randn(B, H, NQ, D, dtype=torch.float64)), TypeError,
                  ["q", "float64"]),
    "q_int": (dict(q=torch.ones(B, H, NQ, D, dtype=torch.int32)), TypeError, ["q", "int32"]),
    "k_mixed_dtype": (dict(k=torch.randn(B, H, NK, D, dtype=torch.float16)), TypeError,
                      ["k", "float16"]),
    "v_mixed_dtype": (dict(v=torch.randn(B, H, NK, D, dtype=torch.bfloat16)), TypeError,
                      ["v", "bfloat16"]),
    "q_2d": (dict(q=torch.randn(NQ, D)), ValueError, ["q", "4-D"]),
    "q_1d": (dict(q=torch.randn(D)), ValueError, ["q"]),
    "q_5d": (dict(q=torch.randn(1, B, H, NQ, D)), ValueError, ["q", "3-D"]),
    "k_5d": (dict(k=torch.randn(1, B, H, NK, D), v=torch.randn(1, B, H, NK, D)), ValueError,
             ["k"]),
    "k_2d": (dict(k=torch.randn(NK, D), v=torch.randn(NK, D)), ValueError, ["k"]),
    "kv_4d_with_3d_q": (dict(q=torch.randn(B * H, NQ, D)), ValueError, ["k", "3-D"]),
    "k_v_shapes_differ": (dict(v=torch.randn(B, H, NK + 1, D)), ValueError, ["k", "v"]),
    "batch_mismatch": (dict(k=torch.randn(B + 1, H, NK, D), v=torch.randn(B + 1, H, NK, D)),
                       ValueError, ["batch"]),
    "head_dim_mismatch": (dict(k=torch.randn(B, H, NK, D + 8),
                               v=torch.randn(B, H, NK, D + 8)), ValueError, ["head dim"]),
    "heads_not_divisible": (dict(k=torch.randn(B, 3, NK, D), v=torch.randn(B, 3, NK, D)),
                            ValueError, ["heads"]),
    "zero_head_dim": (dict(q=torch.randn(B, H, NQ, 0), k=torch.randn(B, H, NK, 0),
                           v=torch.randn(B, H, NK, 0)), ValueError, ["head dim"]),
    "mask_not_bool": (dict(mask=torch.ones(B, NK)), TypeError, ["mask", "bool"]),
    "mask_not_tensor": (dict(mask=[True] * NK), TypeError, ["mask", "torch.Tensor"]),
    "mask_wrong_shape": (dict(mask=torch.ones(B, NQ, dtype=torch.bool)), ValueError,
                         ["mask", "shape"]),
    "mask_3d": (dict(mask=torch.ones(B, 1, NK, dtype=torch.bool)), ValueError, ["mask"]),
    "bias_wrong_dtype": (dict(attn_bias=torch.randn(H, NQ, NK, dtype=torch.float64)),
                         TypeError, ["attn_bias", "float64"]),
    "bias_half_with_float32_q": (dict(attn_bias=torch.randn(H, NQ, NK).half()), TypeError,
                                 ["attn_bias", "float16"]),
    "bias_wrong_heads": (dict(attn_bias=torch.randn(H + 1, NQ, NK)), ValueError,
                         ["attn_bias", "shape"]),
    "bias_batch_dim_wrong": (dict(attn_bias=torch.randn(H, NQ, NK), attn_bias_batch_dim=True),
                             ValueError, ["attn_bias", "attn_bias_batch_dim"]),
    "bias_not_broadcastable": (dict(attn_bias=torch.randn(B, H, NQ, 2)), ValueError,
                               ["attn_bias", "broadcast"]),
    "bias_2d": (dict(attn_bias=torch.randn(NQ, NK)), ValueError, ["attn_bias"]),
    "bias_5d": (dict(attn_bias=torch.randn(1, B, H, NQ, NK)), ValueError, ["attn_bias"]),
    "scale_string": (dict(scale="8"), TypeError, ["scale"]),
    "scale_none": (dict(scale=None), TypeError, ["scale"]),
    "scale_nan": (dict(scale=float("nan")), ValueError, ["scale", "finite"]),
    "scale_inf": (dict(scale=float("inf")), ValueError, ["scale", "finite"]),
    "scale_wrong_shape": (dict(scale=torch.ones(H + 1)), ValueError, ["scale", "shape"]),
    "scale_2d": (dict(scale=torch.ones(1, H)), ValueError, ["scale"]),
    "scale_int_tensor": (dict(scale=torch.tensor(8)), TypeError, ["scale"]),
    "groups_not_divisor": (dict(groups=3), ValueError, ["groups"]),
    "groups_zero": (dict(groups=0), ValueError, ["groups"]),
    "groups_float": (dict(groups=2.0), TypeError, ["groups"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case):
    changes, error, words = BAD[case]
    args = {**good_args(), **changes}
    for attention in (fcsa.flash_cosine_sim_attention, fcsa.plain_cosine_sim_attention):
        if attention is fcsa.plain_cosine_sim_attention and case == "q_float64":
            continue  # the plain version runs in float64 too
        with pytest.raises(error) as info:
            attention(**args)
        for word in words:
            assert word in str(info.value), f"{word!r} not in {str(info.value)!r}"
    # The process keeps working.
    out = fcsa.flash_cosine_sim_attention(**good_args())
    assert torch.isfinite(out).all()


def test_mixed_devices():
    meta = torch.empty(B, H, NK, D, device="meta")
    for name in ("k", "v"):
        args = {**good_args(), name: meta}
        with pytest.raises(ValueError, match=f"{name} is on meta but q is on cpu"):
            fcsa.flash_cosine_sim_attention(**args)
    with pytest.raises(ValueError, match="mask is on meta"):
        fcsa.flash_cosine_sim_attention(**good_args(),
                                        mask=torch.ones(B, NK, dtype=torch.bool,
                                                        device="meta"))
    with pytest.raises(ValueError, match="attn_bias is on meta"):
        fcsa.flash_cosine_sim_attention(**good_args(),
                                        attn_bias=torch.ones(H, NQ, NK, device="meta"))
    with pytest.raises(ValueError, match="scale is on meta"):
        fcsa.flash_cosine_sim_attention(**good_args(), scale=torch.ones((), device="meta"))


def test_unsupported_device_type():
    q, k, v = (torch.empty(1, 1, 4, 8, device="meta") for _ in range(3))
    with pytest.raises(NotImplementedError, match="meta"):
        fcsa.flash_cosine_sim_attention(q, k, v)


def test_merged_input_scale_shape():
    q, k, v = torch.randn(6, 5, 8), torch.randn(6, 7, 8), torch.randn(6, 7, 8)
    with pytest.raises(ValueError, match="scale"):
        fcsa.flash_cosine_sim_attention(q, k, v, scale=torch.ones(6))
    out = fcsa.flash_cosine_sim_attention(q, k, v, scale=torch.tensor(3.0))
    assert out.shape == q.shape


def test_l2norm_tensors_errors():
    with pytest.raises(ValueError, match="at least one"):
        fcsa.l2norm_tensors()
    with pytest.raises(TypeError, match=r"tensors\[1\]"):
        fcsa.l2norm_tensors(torch.randn(2, 4), "x")
    with pytest.raises(TypeError, match=r"tensors\[0\]"):
        fcsa.l2norm_tensors(torch.ones(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="groups"):
        fcsa.l2norm_tensors(torch.randn(2, 6), groups=4)
    with pytest.raises(TypeError, match="groups"):
        fcsa.l2norm_tensors(torch.randn(2, 6), groups=1.5)


def test_module_errors():
    with pytest.raises(ValueError, match="kv_heads"):
        fcsa.CosineSimAttention(32, heads=4, dim_head=8, kv_heads=3)
