"""MoE ops (kernels/moe.py): the Triton path (here in Triton's CPU interpreter) against the
PyTorch reference, forward and backward, at odd sizes (37 tokens, 5 experts, k = 2,
hidden 24, FFN 40), with experts that get no slot, no tokens at all and padded batches;
and the MoE layer with kernels=triton against kernels=reference for the same weights."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from uniloom.kernels import moe
from uniloom.models.moe import MoE
from uniloom.models.univision_config import UniVisionConfig

M, E, K, D, F = 37, 5, 2, 24, 40
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def assert_close(actual, expected, dtype=torch.float32):
    """Max error relative to the largest magnitude: bf16 paths round at different steps."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    scale = expected.float().abs().max().clamp_min(1e-6)
    err = (actual.float() - expected.float()).abs().max() / scale
    assert err <= TOL[dtype], f"relative error {err:.3g} > {TOL[dtype]}"


def grads(outputs, inputs, seed=1):
    """Gradients of sum(output * fixed random weights) with respect to inputs."""
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outputs)
    return torch.autograd.grad(loss, inputs)


# ---------------------------------------------------------------------------------------
# Routing


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grad_of", ["both", "probs", "scores"])
def test_route_matches_reference(dtype, grad_of):
    torch.manual_seed(0)
    logits = (3 * torch.randn(M, E)).to(dtype).requires_grad_()
    ref = moe.route(logits, K, triton=False)
    out = moe.route(logits, K, triton=True)
    assert torch.equal(out.selected_MK, ref.selected_MK)
    assert torch.equal(out.counts_E, ref.counts_E) and out.counts_E.dtype == torch.int64
    for a, b in ((out.probs_ME, ref.probs_ME), (out.scores_MK, ref.scores_MK)):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.scores_MK.sum(-1), torch.ones(M))
    picked = {"both": [0, 1], "probs": [0], "scores": [1]}[grad_of]
    (g_out,) = grads([out[i] for i in picked], [logits])
    (g_ref,) = grads([ref[i] for i in picked], [logits])
    assert g_out.dtype == dtype
    assert_close(g_out, g_ref, torch.float32 if dtype == torch.float32 else dtype)


def test_route_counts_experts_with_no_token_and_many_blocks():
    """64 experts, 300 tokens (several programs), 6 per token; half the experts never chosen."""
    torch.manual_seed(0)
    logits = torch.randn(300, 64)
    logits[:, 32:] -= 100.0
    out = moe.route(logits, 6, triton=True)
    ref = moe.route(logits, 6, triton=False)
    assert torch.equal(out.counts_E, ref.counts_E) and out.counts_E[32:].sum() == 0
    assert torch.equal(out.selected_MK, ref.selected_MK)


def test_route_exact_ties_take_the_lowest_expert():
    """The Triton kernel's documented tie rule (torch.topk's choice among ties is its own)."""
    logits = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    out = moe.route(logits, 2, triton=True)
    assert out.selected_MK.tolist() == [[1, 2], [0, 1]]
    assert out.counts_E.tolist() == [1, 2, 1, 0, 0]


def test_route_no_tokens():
    logits = torch.zeros(0, E, requires_grad=True)
    out = moe.route(logits, K, triton=True)
    assert out.probs_ME.shape == (0, E) and out.selected_MK.shape == (0, K)
    assert out.counts_E.tolist() == [0] * E
    (g,) = grads([out.probs_ME, out.scores_MK], [logits])
    assert g.shape == (0, E)


# ---------------------------------------------------------------------------------------
# Permutation


def selection(num_tokens, num_experts, k, used, seed=0):
    """(M, k) distinct experts per token, drawn only from the first `used` experts."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(used, generator=g)[:k] for _ in range(num_tokens)])


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("num_tokens,num_experts,k", [(M, E, K), (150, 64, 6)])
def test_sort_slots_is_the_stable_argsort(padded, num_tokens, num_experts, k):
    """Experts beyond `used` get no slot; 150 x 6 slots over 64 experts span several blocks."""
    selected = selection(num_tokens, num_experts, k, used=num_experts - 2)
    token_M = torch.arange(num_tokens) * 2 + 1 if padded else None
    ref = moe.sort_slots(selected, num_experts, token_M, triton=False)
    out = moe.sort_slots(selected, num_experts, token_M, triton=True)
    assert torch.equal(out.order_N, ref.order_N) and torch.equal(out.token_N, ref.token_N)
    inverse = torch.empty_like(out.order_N).index_copy_(0, out.order_N, torch.arange(num_tokens * k))
    assert torch.equal(out.position_MK.reshape(-1), inverse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padded", [False, True])
def test_permute_and_unpermute_match_reference(dtype, padded):
    torch.manual_seed(0)
    T = M + 6 if padded else M
    token_M = torch.randperm(T)[:M].sort().values if padded else None
    selected = selection(M, E, K, used=E - 1)  # the last expert gets no slot
    ref_slots = moe.sort_slots(selected, E, token_M, triton=False)
    slots = moe.sort_slots(selected, E, token_M, triton=True)

    x = torch.randn(T, D, dtype=dtype, requires_grad=True)
    x_ref = moe.permute(x, ref_slots, triton=False)
    x_out = moe.permute(x, slots, triton=True)
    assert torch.equal(x_out, x_ref)  # a gather: exact
    (g_out,), (g_ref,) = grads([x_out], [x]), grads([x_ref], [x])
    assert_close(g_out, g_ref, dtype)
    if padded:  # rows no token was routed from get no gradient
        unrouted = torch.ones(T, dtype=torch.bool).index_fill_(0, token_M, False)
        assert g_out[unrouted].abs().sum() == 0

    y = torch.randn(M * K, D, dtype=dtype, requires_grad=True)
    scores = torch.rand(M, K).softmax(-1).requires_grad_()
    out = moe.unpermute(y, scores, slots, T, triton=True)
    ref = moe.unpermute(y, scores, ref_slots, T, triton=False)
    assert out.dtype == dtype
    assert_close(out, ref, dtype)
    for a, b in zip(grads([out], [y, scores]), grads([ref], [y, scores])):
        assert_close(a, b, dtype)


def test_permutation_of_no_tokens():
    selected = torch.zeros(0, K, dtype=torch.int64)
    token_M = torch.zeros(0, dtype=torch.int64)
    slots = moe.sort_slots(selected, E, token_M, triton=True)
    x = torch.randn(4, D, requires_grad=True)  # 4 rows of padding
    x_ND = moe.permute(x, slots, triton=True)
    out = moe.unpermute(x_ND, torch.zeros(0, K), slots, 4, triton=True)
    assert x_ND.shape == (0, D) and torch.equal(out, torch.zeros(4, D))
    (g,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(g, torch.zeros(4, D))


# ---------------------------------------------------------------------------------------
# Grouped SwiGLU experts


def expert_weights(dtype, num_experts=E, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(num_experts, F, D), (num_experts, F, D), (num_experts, D, F)]
    return [(0.2 * torch.randn(s, generator=g)).to(dtype).requires_grad_() for s in shapes]


def grouped_case(backend, counts, dtype):
    torch.manual_seed(0)
    x = torch.randn(int(counts.sum()), D, dtype=dtype, requires_grad=True)
    w = expert_weights(dtype)
    ref = moe.grouped_swiglu(x, counts, *w, backend="loop")
    out = moe.grouped_swiglu(x, counts, *w, backend=backend)
    assert out.dtype == ref.dtype == dtype
    assert_close(out, ref, dtype)
    for a, b in zip(grads([out], [x, *w]), grads([ref], [x, *w])):
        assert_close(a, b, dtype)


COUNTS = {
    "spread": torch.tensor([9, 0, 30, 1, 34]),  # 74 = 37 x 2 slots; expert 1 gets none
    "hot": torch.tensor([0, 70, 3, 0, 1]),  # expert 1 spans two 64-row tiles
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("counts", COUNTS.values(), ids=COUNTS.keys())
def test_triton_grouped_swiglu_matches_the_loop(dtype, counts):
    grouped_case("triton", counts, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_grouped_mm_matches_the_loop(dtype):
    """F.grouped_mm runs on this CPU too (torch >= 2.9, 16-byte aligned rows)."""
    grouped_case("grouped_mm", COUNTS["spread"], dtype)


@pytest.mark.parametrize("backend", ["triton", "grouped_mm"])
def test_grouped_swiglu_of_no_slots(backend):
    x = torch.zeros(0, D, requires_grad=True)
    w = expert_weights(torch.float32)
    out = moe.grouped_swiglu(x, torch.zeros(E, dtype=torch.int64), *w, backend=backend)
    assert out.shape == (0, D)
    gx, *gw = torch.autograd.grad(out.sum(), [x, *w], allow_unused=True)
    assert gx.shape == (0, D) and all(g is None or g.abs().sum() == 0 for g in gw)


def test_grouped_swiglu_under_autocast_casts_like_the_reference():
    """fp32 weights, bf16 autocast: bf16 outputs, fp32 weight grads, as the loop's matmuls."""
    counts = COUNTS["spread"]
    x = torch.randn(int(counts.sum()), D, requires_grad=True)
    w = expert_weights(torch.float32)
    results = []
    for backend in ("loop", "triton"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = moe.grouped_swiglu(x, counts, *w, backend=backend)
        results.append((out, *grads([out], [x, *w])))
    for a, b in zip(*results):
        assert a.dtype == b.dtype
        assert_close(a, b, torch.bfloat16)
    assert results[0][0].dtype == torch.bfloat16 and results[1][2].dtype == torch.float32


def test_grouped_backend_choice_on_cpu():
    x, w = torch.randn(3, D), torch.randn(E, F, D)
    assert moe.grouped_backend(False, x, w) == "loop"
    assert moe.grouped_backend(True, x, w) == "triton"  # F.grouped_mm's fast path is CUDA's
    with pytest.raises(ValueError, match="backend"):
        moe.grouped_swiglu(x, torch.tensor([3, 0, 0, 0, 0]), w, w, w.transpose(1, 2), backend="cutlass")


# ---------------------------------------------------------------------------------------
# The MoE layer


CFG = UniVisionConfig(hidden=D, num_experts=E, experts_per_token=K, expert_ffn=F, num_shared_experts=1,
                      init_std=0.2)  # fmt: skip


def layer_results(kernels, x, image_mask, valid, autocast=False):
    torch.manual_seed(0)
    layer = MoE(replace(CFG, kernels=kernels))
    x = x.detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out, stats = layer(x, image_mask, valid)
        loss = out.float().square().mean() + stats.aux_loss
    loss.backward()
    grads = {name: p.grad for name, p in layer.named_parameters()}
    return out, stats, x.grad, grads


@pytest.mark.parametrize("padded,autocast", [(False, False), (True, False), (True, True)])
def test_moe_layer_triton_equals_reference(padded, autocast):
    torch.manual_seed(0)
    x = torch.randn(2, 19, D)  # 38 rows
    image_mask = torch.rand(2, 19) < 0.5
    valid = torch.arange(19).expand(2, 19) < torch.tensor([[19], [13]]) if padded else None
    ref = layer_results("reference", x, image_mask, valid, autocast)
    out = layer_results("triton", x, image_mask, valid, autocast)
    dtype = torch.bfloat16 if autocast else torch.float32
    assert_close(out[0], ref[0], dtype)
    torch.testing.assert_close(out[1].aux_loss, ref[1].aux_loss, atol=1e-6, rtol=1e-5)
    assert torch.equal(out[1].tokens_per_expert, ref[1].tokens_per_expert)
    assert_close(out[2], ref[2], dtype)
    assert ref[3].keys() == out[3].keys()
    for name, g in ref[3].items():
        assert g is not None and out[3][name] is not None, name
        assert_close(out[3][name], g, dtype)


def test_moe_layer_of_padding_only():
    """A rank's empty step: no token routed, a zero loss, the shared experts alone."""
    x = torch.randn(1, 5, D)
    valid = torch.zeros(1, 5, dtype=torch.bool)
    out, stats, gx, grads = layer_results("triton", x, None, valid)
    ref = layer_results("reference", x, None, valid)
    assert stats.tokens_per_expert.sum() == 0 and stats.aux_loss.item() == 0.0
    torch.testing.assert_close(out, ref[0])
    torch.testing.assert_close(gx, ref[2])


def test_benchmark_quick_run_reports_the_cpu_figures():
    from uniloom.kernels.benchmarks.moe import run

    figures = run(torch.device("cpu"), quick=True)
    assert figures["routing_permutation_eager_ms"] > 0 and figures["grouped_loop_ms"] > 0
    assert figures["grouped_mm_speedup"] == figures["grouped_torch_mm_speedup"] > 0
    assert "routing_permutation_speedup" not in figures  # Triton is not timed on a CPU
