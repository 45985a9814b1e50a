"""RMSNorm: the Triton kernels (in the interpreter here) against the reference, forward and
both gradients, for odd widths, leading dims, strided rows, mixed dtypes, empty input and
under CPU bf16 autocast; the decoder's module keeps its checkpoint keys."""

from __future__ import annotations

import pytest
import torch

from uniloom.kernels.rms_norm import rms_norm
from uniloom.models.blocks import RMSNorm

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def assert_matches(actual, expected, tol, what):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    if expected.numel():
        err = (actual.float() - expected.float()).abs().max().item()
        bound = tol * max(expected.float().abs().max().item(), 1.0)
        assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def run(x, weight, triton, dy_seed=1):
    x = x.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    y = rms_norm(x, weight, 1e-5, triton=triton)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(dy_seed)).to(y.dtype)
    y.backward(dy)
    return y.detach(), x.grad, weight.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_dtype", ["float32", "same"])
@pytest.mark.parametrize("shape", [(37, 129), (2, 3, 129)])
def test_forward_and_grads_match_reference(dtype, weight_dtype, shape):
    torch.manual_seed(0)
    # Rows of a wider buffer: a row stride that is not the width.
    x = (3 * torch.randn(*shape[:-1], shape[-1] + 11))[..., : shape[-1]].to(dtype)
    weight = (1 + 0.5 * torch.randn(shape[-1])).to(dtype if weight_dtype == "same" else torch.float32)
    expected = run(x, weight, triton=False)
    actual = run(x, weight, triton=True)
    # bf16 x with an fp32 weight promotes to fp32, as the module always did.
    assert actual[0].dtype == torch.promote_types(dtype, weight.dtype)
    for name, a, e in zip(("y", "dx", "dweight"), actual, expected):
        assert_matches(a, e, TOL[dtype], name)


def test_empty_input():
    x, weight = torch.randn(0, 129), torch.randn(129)
    y, dx, dweight = run(x, weight, triton=True)
    assert y.shape == (0, 129) and dx.shape == (0, 129)
    assert torch.equal(dweight, torch.zeros(129))


def test_under_cpu_bf16_autocast():
    torch.manual_seed(0)
    results = []
    for triton in (False, True):
        proj = torch.nn.Linear(64, 129)
        norm = RMSNorm(129, kernels="triton" if triton else "reference")
        torch.manual_seed(1)
        for p in (*proj.parameters(), *norm.parameters()):
            torch.nn.init.normal_(p)
        x = torch.randn(37, 64)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = norm(proj(x))  # bf16 rows, fp32 weight -> fp32
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(2)))
        results.append((y.detach(), proj.weight.grad, norm.weight.grad))
    assert results[1][0].dtype == torch.float32
    for name, a, e in zip(("y", "dproj", "dweight"), results[1], results[0]):
        assert_matches(a, e, TOL[torch.bfloat16], name)


def test_module_keeps_its_checkpoint_keys_and_checks_its_mode():
    assert list(RMSNorm(8, kernels="triton").state_dict()) == ["weight"]
    with pytest.raises(ValueError, match="kernels"):
        RMSNorm(8, kernels="fast")


def test_weight_of_the_wrong_width_is_an_error():
    with pytest.raises(ValueError, match="width 129"):
        rms_norm(torch.randn(3, 129), torch.ones(128), 1e-5, triton=True)


def test_benchmark_times_both_paths():
    from uniloom.kernels.benchmarks import rms_norm as bench

    figures = bench.measure(torch.device("cpu"), N=8, H=33, with_triton=True, repeats=1)
    assert figures["rms_norm_ref_ms"] > 0 and figures["rms_norm_triton_ms"] > 0
    assert figures["rms_norm_speedup"] > 0
    quick = bench.run(torch.device("cpu"), quick=True)  # a CPU times the reference only
    assert quick["rms_norm_ref_ms"] > 0 and "rms_norm_speedup" not in quick
