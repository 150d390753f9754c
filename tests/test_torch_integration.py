"""The torch.library operators (opcheck), torch.compile, and the nn.Module."""

import pytest
import torch

import fcsa
from helpers import DEVICES


def op_args(device, *, grad, bias=True, mask=True, scale_tensor=True, hk=2, need_lse=True,
            dtype=torch.float32, float32_out=False, d_v=16):
    """Arguments of fcsa::forward in the canonical form; v is d_v wide."""
    b, h, nq, nk, d = 2, 4, 9, 14, 16

    def leaf(*shape, offset=0.0, dtype=dtype):
        return (torch.randn(*shape, device=device) + offset).to(dtype).requires_grad_(grad)

    mask_t = None
    if mask:
        mask_t = torch.rand(b, nk, device=device) < 0.8
        mask_t[:, 0] = True
    return (leaf(b, h, nq, d), leaf(b, hk, nk, d), leaf(b, hk, nk, d_v), mask_t,
            leaf(1, h, nq, nk) if bias else None,
            leaf(h, offset=8.0, dtype=torch.float32) if scale_tensor else None,
            8.0, 1, True, True, False, need_lse, float32_out)


OPCHECK_CASES = {
    "plain": dict(bias=False, mask=False, scale_tensor=False),
    "everything": dict(),
    "single_kv_head": dict(hk=1, mask=False),
    "bfloat16_float32_out": dict(dtype=torch.bfloat16, float32_out=True),
    "value_head_dim": dict(d_v=24),
    "value_head_dim_bfloat16_float32_out": dict(dtype=torch.bfloat16, float32_out=True, d_v=40),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("case", list(OPCHECK_CASES))
def test_opcheck_forward(case, grad, device):
    args = op_args(device, grad=grad, **OPCHECK_CASES[case])
    torch.library.opcheck(torch.ops.fcsa.forward.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_forward_without_lse(device):
    args = op_args(device, grad=False, need_lse=False)
    torch.library.opcheck(torch.ops.fcsa.forward.default, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d_v", [16, 40])
@pytest.mark.parametrize("need", [(True, True), (False, False)], ids=["all", "qkv_only"])
def test_opcheck_backward(need, d_v, device):
    q, k, v, mask, bias, scale, *flags = op_args(device, grad=False, d_v=d_v)
    out, lse = torch.ops.fcsa.forward(q, k, v, mask, bias, scale, *flags)
    dout = torch.randn_like(out)
    args = (dout, q, k, v, mask, bias, scale, out, lse, *flags[:5], *need)
    torch.library.opcheck(torch.ops.fcsa.backward.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_backward_with_float32_out(device):
    q, k, v, mask, bias, scale, *flags = op_args(device, grad=False, dtype=torch.bfloat16,
                                                 float32_out=True)
    out, lse = torch.ops.fcsa.forward(q, k, v, mask, bias, scale, *flags)
    assert out.dtype == torch.float32
    dout = torch.randn_like(q)
    args = (dout, q, k, v, mask, bias, scale, out, lse, *flags[:5], True, True)
    torch.library.opcheck(torch.ops.fcsa.backward.default, args)


def attention_loss(q, k, v, bias, scale):
    out = fcsa.flash_cosine_sim_attention(q, k, v, attn_bias=bias, scale=scale, causal=True)
    return (out.float() * torch.linspace(-1, 1, out.shape[-1], device=out.device)).sum()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_forward_and_backward(backend, device):
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile is unavailable")
    torch._dynamo.reset()
    b, h, hk, n, d = 2, 4, 2, 24, 32
    inputs = [torch.randn(b, h, n, d, device=device), torch.randn(b, hk, n, d, device=device),
              torch.randn(b, hk, n, d, device=device), torch.randn(h, n, n, device=device),
              torch.full((h,), 8.0, device=device)]
    eager = [t.clone().requires_grad_() for t in inputs]
    compiled = [t.clone().requires_grad_() for t in inputs]

    loss = attention_loss(*eager)
    loss.backward()
    compiled_loss = torch.compile(attention_loss, fullgraph=True, backend=backend)(*compiled)
    compiled_loss.backward()
    # Inductor fuses the weighting and the sum of ~6k float32 terms and reduces them in
    # its own order: the loss may differ by float32 rounding of that sum.
    torch.testing.assert_close(compiled_loss, loss, rtol=1e-5, atol=1e-4)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c.grad, e.grad)


def test_torch_compile_value_head_dim_on_cpu():
    """v's own head dim through the fake implementations: out and dv take it."""
    torch._dynamo.reset()
    inputs = [torch.randn(2, 4, 24, 32), torch.randn(2, 2, 24, 32), torch.randn(2, 2, 24, 48),
              torch.randn(4, 24, 24), torch.full((4,), 8.0)]
    eager = [t.clone().requires_grad_() for t in inputs]
    compiled = [t.clone().requires_grad_() for t in inputs]
    loss = attention_loss(*eager)
    loss.backward()
    compiled_loss = torch.compile(attention_loss, fullgraph=True, backend="aot_eager")(*compiled)
    compiled_loss.backward()
    torch.testing.assert_close(compiled_loss, loss)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c.grad, e.grad)
    assert compiled[2].grad.shape == (2, 2, 24, 48)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_merged_input_with_lse(device):
    torch._dynamo.reset()

    def fn(q, k, v):
        out, lse = fcsa.flash_cosine_sim_attention(q, k, v, return_lse=True)
        return out * 2, lse

    q, k, v = (torch.randn(6, 10, 16, device=device) for _ in range(3))
    out, lse = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v)
    ref_out, ref_lse = fn(q, k, v)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)


# ---------------------------------------------------------------- nn.Module

def module_reference(module, x, context=None, mask=None):
    """The module's computation written out with the plain float64 attention."""
    context = x if context is None else context
    b, n, _ = x.shape
    m = context.shape[1]
    h, hk, dh = module.heads, module.kv_heads, module.dim_head
    q = (x @ module.to_q.weight.T).view(b, n, h, dh).transpose(1, 2)
    k, v = (context @ module.to_kv.weight.T).chunk(2, dim=-1)
    k = k.reshape(b, m, hk, dh).transpose(1, 2)
    v = v.reshape(b, m, hk, dh).transpose(1, 2)
    out = fcsa.plain_cosine_sim_attention(q, k, v, mask=mask, scale=module.scale,
                                          causal=module.causal, groups=module.groups)
    return out.transpose(1, 2).reshape(b, n, h * dh) @ module.to_out.weight.T


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", [
    dict(heads=4, dim_head=16, causal=True),
    dict(heads=4, dim_head=24, kv_heads=1, learned_scale=True),
    dict(heads=6, dim_head=16, kv_heads=2, groups=2, learned_scale=True, scale=10),
], ids=["causal", "single_kv_learned_scale", "gqa_groups"])
def test_module_forward_backward(config, device):
    dim = 48
    module = fcsa.CosineSimAttention(dim, **config).to(device)
    ref_module = fcsa.CosineSimAttention(dim, **config).double().to(device)
    ref_module.load_state_dict(module.state_dict())
    x = torch.randn(2, 19, dim, device=device, requires_grad=True)
    mask = torch.rand(2, 19, device=device) < 0.8
    mask[:, 0] = True

    out = module(x, mask=mask)
    assert out.shape == x.shape
    xd = x.detach().double().requires_grad_()
    ref = module_reference(ref_module, xd, mask=mask)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)

    dout = torch.randn_like(out)
    out.backward(dout)
    ref.backward(dout.double())
    torch.testing.assert_close(x.grad.double(), xd.grad, atol=1e-4, rtol=1e-4)
    for (name, p), (_, rp) in zip(module.named_parameters(), ref_module.named_parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad.double(), rp.grad, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_module_cross_attention(device):
    module = fcsa.CosineSimAttention(32, heads=2, dim_head=16, dim_context=20,
                                     causal=True).to(device)
    x = torch.randn(3, 7, 32, device=device)
    context = torch.randn(3, 12, 20, device=device)
    out = module(x, context=context)
    ref = module_reference(module.double(), x.double(), context.double())
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_module_training_step_reduces_loss():
    torch.manual_seed(0)
    module = fcsa.CosineSimAttention(32, heads=4, dim_head=8, learned_scale=True,
                                     causal=True)
    opt = torch.optim.Adam(module.parameters(), lr=1e-2)
    x = torch.randn(4, 16, 32)
    target = torch.randn(4, 16, 32)
    losses = []
    for _ in range(20):
        loss = torch.nn.functional.mse_loss(module(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.9


def test_backward_with_combined_out_and_lse_gives_each_key_blocks_share():
    """The kernel support ring attention is built on: fcsa::backward over a part of the
    keys, given the out and lse of the attention over all of them, returns that part's
    dk, dv and its share of dq and dscale."""
    b, h, hk, n, d = 2, 4, 2, 13, 16
    q, k, v = torch.randn(b, h, n, d), torch.randn(b, hk, n, d), torch.randn(b, hk, n, d)
    scale = torch.rand(h) * 4 + 4
    dout = torch.randn(b, h, n, d)
    flags = (8.0, 1, False, True, False)  # scale_value, groups, causal, l2norm_qk, det.
    out, lse = torch.ops.fcsa.forward(q, k, v, None, None, scale, *flags, True, False)
    whole = torch.ops.fcsa.backward(dout, q, k, v, None, None, scale, out, lse, *flags,
                                    False, True)
    cut = 5
    parts = [torch.ops.fcsa.backward(dout, q, k[:, :, keys], v[:, :, keys], None, None,
                                     scale, out, lse, *flags, False, True)
             for keys in (slice(0, cut), slice(cut, n))]
    dq, dk, dv, _, dscale = whole
    torch.testing.assert_close(parts[0][0] + parts[1][0], dq, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([parts[0][1], parts[1][1]], 2), dk,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([parts[0][2], parts[1][2]], 2), dv,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(parts[0][4] + parts[1][4], dscale, atol=1e-5, rtol=1e-5)
