"""Chunked linear cross-entropy: the reference and the Triton path (in the interpreter here)
against eager full-logits F.cross_entropy, forward (loss, per-row CE) and the gradients of x
and W, for odd sizes, chunks that do not divide the rows, ignored rows, token weights, fp32,
bf16 and CPU bf16 autocast; the model's text loss through it equals the formula it replaced."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from uniloom.kernels.linear_ce import default_chunk_rows, eager_linear_cross_entropy, linear_cross_entropy
from uniloom.models import sequence as sq
from uniloom.models.univision import UniVision, UniVisionConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Loss, CE: fp32 throughout in both. Gradients: bf16 ones are rounded matmul outputs.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
IMPLS = ["reference", "triton"]


def make(N=37, H=24, V=129, dtype=torch.float32, ignored=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, H, generator=g).to(DEVICE, dtype)
    w = (torch.randn(V, H, generator=g) * H**-0.5).to(DEVICE, dtype)
    target = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    target[::ignored] = -100
    token_weight = torch.rand(N, generator=g).to(DEVICE)
    return x, w, target, token_weight


def run(fn, x, w, target, token_weight=None, **kw):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    loss, ce = fn(x, w, target, token_weight, **kw)
    loss.backward()
    return loss.detach(), ce, x.grad, w.grad


def assert_matches(actual, expected, tol, what):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    if expected.numel():
        err = (actual.float() - expected.float()).abs().max().item()
        bound = tol * max(expected.float().abs().max().item(), 1.0)
        assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def assert_all_match(actual, expected, tol):
    for a, e, what in zip(actual, expected, ("loss", "ce", "grad x", "grad W")):
        assert_matches(a, e, tol, what)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("chunk_rows", [None, 1, 10, 64])
def test_matches_eager(impl, dtype, weighted, chunk_rows):
    x, w, target, token_weight = make(dtype=dtype)
    token_weight = token_weight if weighted else None
    expected = run(eager_linear_cross_entropy, x, w, target, token_weight)
    actual = run(
        linear_cross_entropy, x, w, target, token_weight, chunk_rows=chunk_rows, triton=impl == "triton"
    )
    assert_all_match(actual, expected, TOL[dtype])
    assert actual[1].dtype == torch.float32 and not actual[1].requires_grad
    assert (actual[1][target == -100] == 0).all() and (actual[1][target != -100] > 0).all()
    if not weighted:  # the mean over non-ignored rows, as F.cross_entropy's own reduction
        logits = (x.float() @ w.float().T) if dtype == torch.float32 else F.linear(x, w).float()
        torch.testing.assert_close(actual[0], F.cross_entropy(logits, target), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_wide_vocabulary_walked_in_blocks(impl, monkeypatch):
    if impl == "triton":  # rows wider than one block: the kernel's online max/sum across blocks
        from uniloom.kernels import _triton_linear_ce

        monkeypatch.setattr(_triton_linear_ce, "MAX_BLOCK", 64)
    x, w, target, token_weight = make(N=19, H=8, V=300, seed=1)
    x = 4 * x  # peaked softmaxes: a running max that moves between blocks
    expected = run(eager_linear_cross_entropy, x, w, target, token_weight)
    actual = run(linear_cross_entropy, x, w, target, token_weight, chunk_rows=7, triton=impl == "triton")
    assert_all_match(actual, expected, 1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_all_rows_ignored_and_empty_input(impl):
    x, w, target, _ = make(N=9)
    target[:] = -100
    loss, ce, gx, gw = run(linear_cross_entropy, x, w, target, chunk_rows=4, triton=impl == "triton")
    assert loss.item() == 0 and not ce.any() and not gx.any() and not gw.any()
    eager = run(eager_linear_cross_entropy, x, w, target)
    assert eager[0].item() == 0 and not eager[2].any()  # the baseline agrees (not F.cross_entropy's NaN mean)

    x0, w0, t0, _ = make(N=0)
    loss, ce, gx, gw = run(linear_cross_entropy, x0, w0, t0, triton=impl == "triton")
    assert loss.item() == 0 and ce.shape == (0,) and gx.shape == (0, 24) and not gw.any()


@pytest.mark.parametrize("impl", IMPLS)
def test_under_bf16_autocast(impl):
    """fp32 x and W under autocast: the logits in bf16 as F.linear computes them there, the CE
    in fp32, fp32 gradients for the fp32 leaves."""
    x, w, target, token_weight = make()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        expected = run(eager_linear_cross_entropy, x, w, target, token_weight)
        actual = run(linear_cross_entropy, x, w, target, token_weight, chunk_rows=16, triton=impl == "triton")
    assert F.linear(x, w).dtype == torch.float32  # outside autocast
    assert_all_match(actual, expected, TOL[torch.bfloat16])
    assert actual[2].dtype == actual[3].dtype == torch.float32
    # The CE is of bf16 logits: close to, but not exactly, the fp32 one.
    fp32 = run(linear_cross_entropy, x, w, target, token_weight)
    assert not torch.equal(actual[1], fp32[1])
    assert_matches(actual[1], fp32[1], TOL[torch.bfloat16], "ce vs fp32")


@pytest.mark.parametrize("impl", IMPLS)
def test_backward_scales_by_the_incoming_gradient(impl):
    x, w, target, token_weight = make()
    x, w = x.requires_grad_(), w.requires_grad_()
    loss, _ = linear_cross_entropy(x, w, target, token_weight, chunk_rows=8, triton=impl == "triton")
    (3 * loss + x.sum()).backward()
    _, _, gx, gw = run(eager_linear_cross_entropy, x, w, target, token_weight)
    assert_matches(x.grad, 3 * gx + 1, 1e-5, "grad x")
    assert_matches(w.grad, 3 * gw, 1e-5, "grad W")
    # Its gradients are computed in forward and handed out once.
    x.grad = w.grad = None
    loss, _ = linear_cross_entropy(x, w, target, triton=impl == "triton")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward through the same loss twice"):
        loss.backward()


def test_no_grad_and_one_sided_grads():
    x, w, target, token_weight = make()
    expected = run(eager_linear_cross_entropy, x, w, target, token_weight)
    with torch.no_grad():
        loss, ce = linear_cross_entropy(x.requires_grad_(), w, target, token_weight, chunk_rows=8)
    assert loss.grad_fn is None
    assert_matches(loss, expected[0], 1e-5, "loss")
    assert_matches(ce, expected[1], 1e-5, "ce")
    w_only = w.detach().requires_grad_()
    loss, _ = linear_cross_entropy(x.detach(), w_only, target, token_weight, chunk_rows=8)
    loss.backward()
    assert_matches(w_only.grad, expected[3], 1e-5, "grad W alone")


def test_bad_inputs_are_refused():
    x, w, target, token_weight = make()
    for t, what in [(torch.full_like(target, 129), "outside the vocabulary"), (target.int(), "int64")]:
        with pytest.raises(ValueError, match=what):
            linear_cross_entropy(x, w, t)
    with pytest.raises(ValueError, match="bfloat16"):
        linear_cross_entropy(x, w.bfloat16(), target)
    with pytest.raises(ValueError, match="token_weight"):
        linear_cross_entropy(x, w, target, token_weight[:-1])
    with pytest.raises(ValueError, match=r"\(N, H\) and \(V, H\)"):
        linear_cross_entropy(x, w[:, :-1], target)


def test_default_chunk_rows():
    # Liger's rule: chunk logits (rows x V) about the size of x (N x H), in powers of two ...
    assert default_chunk_rows(16384, 2048, 126464) == 512
    assert default_chunk_rows(65536, 4096, 126464) == 4096
    # ... at least 128 rows (the grad_W accumulator's traffic per chunk), at most N.
    assert default_chunk_rows(2048, 256, 126464) == 128
    assert default_chunk_rows(37, 24, 129) == 37


SMALL = UniVisionConfig(vocab_size=64, hidden=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                        rope_theta=100.0, init_std=0.1, num_experts=4, experts_per_token=2, expert_ffn=24,
                        num_shared_experts=1, semantic_dim=12, latent_dim=6, flow_width=16, flow_depth=2,
                        flow_mlp_mult=2.0)  # fmt: skip


def test_model_text_loss_equals_the_turn_mean_it_replaced():
    """UniVision.loss through the chunked op: the text term (and its gradients) equal the
    formula it replaced, F.cross_entropy over the full logits then the mean over turns of
    each turn's mean; per-task figures are the CE's token means."""
    g = torch.Generator().manual_seed(0)

    def lat(n):
        return torch.randn(n, SMALL.latent_dim, generator=g)

    samples = [
        sq.text_to_image([20, 21, 22], lat(4)),
        sq.understanding(lat(4), [23], [24, 25]),
        sq.text_only([26, 27, 28, 29, 30, 31, 32]),
        sq.editing(lat(4), [([30], lat(4))]),
    ]
    batch = sq.pack(samples, 48)
    feats = torch.randn(batch.image_latents.shape[0], SMALL.semantic_dim, generator=g)
    torch.manual_seed(0)
    model = UniVision(replace(SMALL, kernels="reference"))

    losses = model.loss(batch, feats)
    params = [p for p in model.parameters() if p.requires_grad]
    new_grads = torch.autograd.grad(losses.text, params, allow_unused=True)

    hidden = model(batch.input_ids, feats, batch.image_mask, position_ids_BT=batch.position_ids,
                   doc_ids_BT=batch.doc_ids).hidden  # fmt: skip
    sel = batch.text_targets != -100
    ce = F.cross_entropy(model.logits(hidden[sel]).float(), batch.text_targets[sel], reduction="none")
    _, inverse, counts = sq.turn_ids(batch)[sel].unique(return_inverse=True, return_counts=True)
    old = (ce / counts[inverse]).sum() / counts.numel()
    old_grads = torch.autograd.grad(old, params, allow_unused=True)

    assert counts.numel() >= 4 and counts.unique().numel() > 1  # turns of different lengths
    torch.testing.assert_close(losses.text, old, atol=1e-5, rtol=1e-5)
    for new, before in zip(new_grads, old_grads):
        assert (new is None) == (before is None)
        if new is not None:
            torch.testing.assert_close(new, before, atol=1e-5, rtol=1e-5)
    tasks = batch.task_ids[sel]
    for i, name in enumerate(sq.TASKS):
        if (tasks == i).any():
            assert losses.per_task[f"{name}/text"] == pytest.approx(ce[tasks == i].mean().item(), abs=1e-5)


@pytest.mark.parametrize("kernels", ["reference", "triton"])
def test_model_text_loss_takes_the_configured_path(kernels, monkeypatch):
    from uniloom.kernels import _triton_linear_ce

    calls = []
    real = _triton_linear_ce.ce_and_grad_
    monkeypatch.setattr(_triton_linear_ce, "ce_and_grad_", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    model = UniVision(replace(SMALL, kernels=kernels))
    hidden, _, target, token_weight = make(N=23, H=SMALL.hidden, V=SMALL.vocab_size)
    target[target == -100] = 3  # the model passes only its text targets
    loss, ce = model.text_loss(hidden, target, token_weight)
    expected = eager_linear_cross_entropy(hidden, model.lm_head.weight, target, token_weight)
    assert_matches(loss, expected[0], 1e-5, "loss")
    assert_matches(ce, expected[1], 1e-5, "ce")
    assert bool(calls) == (kernels == "triton")
