"""Every usage example of the original package's README, at test size: the output and
every gradient against the float64 reference."""

import pytest
import torch

import fcsa
from helpers import DEVICES, check_attention, dtype_id, random_mask

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def l2norm_first(attention, q, k, v):
    # Normalize outside (e.g. to rotate q and k in between), then attend without l2norm.
    q, k = fcsa.l2norm_tensors(q, k)
    return attention(q, k, v, l2norm_qk=False)


def with_kwargs(**kwargs):
    def run(attention, **tensors):
        return attention(**tensors, **kwargs)
    return run


EXAMPLES = {
    # name: (q shape, k/v shape, run, extra tensors made per test)
    "self_attention": ((1, 8, 96, 64), (1, 8, 96, 64), with_kwargs(), dict),
    "cross_attention": ((1, 8, 64, 64), (1, 8, 128, 64), with_kwargs(), dict),
    "key_mask": ((1, 8, 64, 64), (1, 8, 128, 64), with_kwargs(),
                 lambda: {"mask": random_mask(1, 128)}),
    "causal": ((4, 8, 64, 64), (4, 8, 64, 64), with_kwargs(causal=True), dict),
    "single_headed_kv": ((4, 8, 64, 64), (4, 64, 64), with_kwargs(causal=True), dict),
    "l2norm_first": ((4, 8, 64, 64), (4, 64, 64), l2norm_first, dict),
    "causal_cross_attention": ((1, 8, 64, 64), (1, 8, 128, 64), with_kwargs(causal=True),
                               dict),
    "merged_batch_heads": ((32, 64, 64), (32, 128, 64), with_kwargs(causal=True), dict),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("example", list(EXAMPLES))
def test_readme_example(example, device, dtype):
    q_shape, kv_shape, run, extra = EXAMPLES[example]
    tensors = {"q": torch.randn(q_shape), "k": torch.randn(kv_shape),
               "v": torch.randn(kv_shape), **extra()}
    got = check_attention(tensors, dtype, device, run)
    assert got["out"].shape == q_shape
    assert got["dk"].shape == kv_shape and got["dv"].shape == kv_shape
