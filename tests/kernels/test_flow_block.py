"""The flow head's block: modulated LayerNorm and SwiGLU, Triton kernels (in the
interpreter here) against the references, forward and every gradient, for odd widths,
mixed dtypes, empty input and under CPU bf16 autocast; and the whole FlowHead, which must
give the same loss and parameter gradients with either implementation."""

from __future__ import annotations

import pytest
import torch

from uniloom.kernels.flow_block import modulated_layer_norm, swiglu
from uniloom.models.flow_head import FlowHead

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def assert_matches(actual, expected, tol, what):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    if expected.numel():
        err = (actual.float() - expected.float()).abs().max().item()
        bound = tol * max(expected.float().abs().max().item(), 1.0)
        assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def leaf(t):
    return t.detach().requires_grad_()


def modulated_ln_run(x, ada, weight, bias, triton):
    """Shift and scale are chunks of one ada output, as in the model (strided rows)."""
    x, ada = leaf(x), leaf(ada)
    params = [leaf(p) if p is not None else None for p in (weight, bias)]
    shift, scale, _ = ada.chunk(3, dim=-1)
    h = modulated_layer_norm(x, *params, shift, scale, 1e-6, triton=triton)
    h.backward(torch.randn(h.shape, generator=torch.Generator().manual_seed(1)).to(h.dtype))
    return [h.detach(), x.grad, ada.grad] + [p.grad for p in params if p is not None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("affine", ["weight+bias", "weight", "none"])
def test_modulated_layer_norm_matches_reference(dtype, affine):
    torch.manual_seed(0)
    N, W = 37, 129
    x = (2 + 3 * torch.randn(N, W)).to(dtype)  # an offset: the mean matters
    ada = (0.5 * torch.randn(N, 3 * W)).to(dtype)
    weight = (1 + 0.5 * torch.randn(W)) if affine != "none" else None
    bias = 0.5 * torch.randn(W) if affine == "weight+bias" else None
    expected = modulated_ln_run(x, ada, weight, bias, triton=False)
    actual = modulated_ln_run(x, ada, weight, bias, triton=True)
    names = ("h", "dx", "dada", "dweight", "dbias")
    for name, a, e in zip(names, actual, expected):
        assert_matches(a, e, TOL[dtype], f"{affine} {name}")


def test_modulated_layer_norm_promotes_like_the_reference():
    """bf16 rows modulated by fp32 shift/scale give fp32, as `modulate` promotes."""
    torch.manual_seed(0)
    x, ada = torch.randn(5, 16).bfloat16(), torch.randn(5, 48)
    expected = modulated_ln_run(x, ada, torch.ones(16), torch.zeros(16), triton=False)
    actual = modulated_ln_run(x, ada, torch.ones(16), torch.zeros(16), triton=True)
    assert actual[0].dtype == torch.float32
    for name, a, e in zip(("h", "dx", "dada", "dweight", "dbias"), actual, expected):
        assert_matches(a, e, TOL[torch.bfloat16], name)


def swiglu_run(gate_up, triton):
    gate_up = leaf(gate_up)
    y = swiglu(gate_up, triton=triton)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype))
    return y.detach(), gate_up.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 2 * 129), (2, 3, 2 * 129)])
def test_swiglu_matches_reference(dtype, shape):
    torch.manual_seed(0)
    gate_up = (3 * torch.randn(shape)).to(dtype)
    for name, a, e in zip(("y", "dgate_up"), swiglu_run(gate_up, True), swiglu_run(gate_up, False)):
        assert_matches(a, e, TOL[dtype], name)


def test_empty_input():
    y, dgate_up = swiglu_run(torch.randn(0, 2 * 129), triton=True)
    assert y.shape == (0, 129) and dgate_up.shape == (0, 2 * 129)
    h, dx, dada, dweight, dbias = modulated_ln_run(
        torch.randn(0, 129), torch.randn(0, 3 * 129), torch.ones(129), torch.zeros(129), triton=True
    )
    assert h.shape == dx.shape == (0, 129) and dada.shape == (0, 3 * 129)
    assert torch.equal(dweight, torch.zeros(129)) and torch.equal(dbias, torch.zeros(129))


def test_bad_shapes_are_errors():
    with pytest.raises(ValueError, match="one \\(N, W\\) shape"):
        modulated_layer_norm(torch.randn(3, 8), None, None, torch.randn(3, 8), torch.randn(1, 8), 1e-6)
    with pytest.raises(ValueError, match="bias of shape"):
        modulated_layer_norm(
            torch.randn(3, 8), None, torch.zeros(7), torch.randn(3, 8), torch.randn(3, 8), 1e-6
        )
    with pytest.raises(ValueError, match="two equal halves"):
        swiglu(torch.randn(3, 7), triton=True)


def head(kernels: str) -> FlowHead:
    torch.manual_seed(0)
    h = FlowHead(latent_dim=4, cond_dim=8, width=24, depth=2, mlp_mult=2.0, kernels=kernels)
    with torch.no_grad():  # away from the zero initialisation, so every gradient is non-trivial
        for p in h.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return h


def head_loss_and_grads(h: FlowHead, autocast: bool):
    g = torch.Generator().manual_seed(3)
    x0, cond = torch.randn(13, 4, generator=g), torch.randn(13, 8, generator=g)
    torch.manual_seed(4)  # the (t, noise) draws of the loss
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = h.loss(x0, cond, batch_mul=2).mean()
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in h.named_parameters()}


def test_flow_head_same_loss_and_grads_with_either_implementation():
    reference, fused = head("reference"), head("triton")
    assert list(fused.state_dict()) == list(reference.state_dict())
    fused.load_state_dict(reference.state_dict())
    loss_r, grads_r = head_loss_and_grads(reference, autocast=False)
    loss_t, grads_t = head_loss_and_grads(fused, autocast=False)
    assert_matches(loss_t, loss_r, TOL[torch.float32], "loss")
    assert set(grads_t) == set(grads_r)
    for name in grads_r:
        assert grads_r[name].abs().max() > 0, f"{name}: a zero gradient checks nothing"
        assert_matches(grads_t[name], grads_r[name], TOL[torch.float32], name)


def test_flow_head_under_cpu_bf16_autocast_is_as_close_to_fp32_as_the_reference():
    """Under autocast both paths round to bf16 in different places (the reference after
    each op, the kernels once): each must stay as close to the fp32 result as the other."""
    exact, reference, fused = head("reference"), head("reference"), head("triton")
    loss_e, grads_e = head_loss_and_grads(exact, autocast=False)
    loss_r, grads_r = head_loss_and_grads(reference, autocast=True)
    loss_t, grads_t = head_loss_and_grads(fused, autocast=True)
    assert loss_t.dtype == loss_r.dtype == torch.float32
    assert (loss_t - loss_e).abs() <= 2 * (loss_r - loss_e).abs() + 1e-3 * loss_e.abs()
    for name, g_e in grads_e.items():
        err_r, err_t = ((g[name] - g_e).abs().max() / g_e.abs().max() for g in (grads_r, grads_t))
        assert err_t <= 2 * err_r + 1e-3, f"{name}: {err_t:.3g} from fp32, the reference {err_r:.3g}"


def test_flow_head_keeps_its_checkpoint_keys():
    keys = set(FlowHead(4, 8, 16, 1, 2.0, kernels="triton").state_dict())
    block = {f"blocks.0.{k}" for k in ("norm.weight", "norm.bias", "mlp.w12.weight", "mlp.w12.bias",
                                       "mlp.w3.weight", "mlp.w3.bias", "ada.1.weight", "ada.1.bias")}  # fmt: skip
    rest = {f"{m}.{p}" for m in ("time_embed.mlp.0", "time_embed.mlp.2", "cond_embed", "input_proj",
                                 "final.linear", "final.ada.1") for p in ("weight", "bias")}  # fmt: skip
    assert keys == block | rest


def test_benchmark_times_both_paths():
    from uniloom.kernels.benchmarks import flow_block as bench

    figures = bench.measure(torch.device("cpu"), N=8, W=16, with_triton=True, repeats=1)
    for name in ("flow_block", "flow_block_modln", "flow_block_swiglu"):
        assert figures[f"{name}_ref_ms"] > 0 and figures[f"{name}_triton_ms"] > 0
        assert figures[f"{name}_speedup"] > 0
    quick = bench.run(torch.device("cpu"), quick=True)  # a CPU times the reference only
    assert quick["flow_block_ref_ms"] > 0 and "flow_block_speedup" not in quick
