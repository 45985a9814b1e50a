"""MingTok training pieces: masking, schedule, losses, teachers, caption embeddings,
exported weights and the evaluation metrics."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from uniloom.models.mingtok import MingTok, MingTokConfig
from uniloom.models.mingtok_loss import LossWeights, MIMObjective, edge_band
from uniloom.pipelines.errors import UniloomError
from uniloom.pipelines.tokenizer.config import TokenizerConfig
from uniloom.pipelines.tokenizer.data import decode_image
from uniloom.pipelines.tokenizer.evaluate import fit_linear_probe, grid_image, probe_scenes, psnr, ssim
from uniloom.pipelines.tokenizer.loop import Budget
from uniloom.pipelines.tokenizer.step import MIMTraining, learning_rate, random_mask
from uniloom.pipelines.tokenizer.teachers import EMATeacher, Teachers
from uniloom.pipelines.tokenizer.weights import calibrate_latents, load_mingtok, save_tokenizer

SMALL = MingTokConfig(
    image_size=32, patch_size=8, enc_width=64, enc_depth=1, enc_heads=2, sem_width=64, sem_depth=2,
    sem_heads=2, pix_width=32, pix_depth=1, pix_heads=2, pix_patch_size=4,
)  # fmt: skip


def small_model(seed: int = 0) -> MingTok:
    torch.manual_seed(seed)
    return MingTok(SMALL)


def images(batch: int) -> torch.Tensor:
    return torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1


def test_random_mask_masks_the_configured_share_of_the_configured_rows():
    t = TokenizerConfig(mask_ratio=0.25, masked_fraction=0.5)
    mask = random_mask(8, 16, t, torch.Generator().manual_seed(0))
    assert mask.shape == (8, 16)
    assert mask[:4].sum(1).tolist() == [4] * 4  # 25% of 16 patches in the masked half
    assert not mask[4:].any()  # the other half goes in whole
    assert len({tuple(row.tolist()) for row in mask[:4]}) > 1  # rows differ
    small = TokenizerConfig(mask_ratio=0.25, masked_fraction=0.1)
    assert random_mask(2, 16, small, torch.Generator()).any(1).tolist() == [True, False]  # one row, not 0.2
    none = TokenizerConfig(mask_ratio=0.25, masked_fraction=0.0)
    assert not random_mask(8, 16, none, torch.Generator()).any()


def test_learning_rate_warms_up_then_decays_by_cosine_over_the_step_budget():
    t = TokenizerConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1, steps=1000, max_minutes=1.0)
    assert learning_rate(t, 0) == pytest.approx(1e-4)
    assert learning_rate(t, 9) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 0.009))))
    assert learning_rate(t, 500) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert learning_rate(t, 1000) == pytest.approx(1e-4) == learning_rate(t, 1200)


def test_the_safety_cap_cuts_a_run_only_before_its_steps_and_says_so():
    budget = Budget(steps=1500, max_minutes=20)
    assert not budget.cut(800, 1199.0)  # under the cap
    assert budget.cut(800, 1200.0)  # the cap ends the run at step 800 of 1500
    assert not budget.cut(1500, 1300.0)  # the steps were done: the cap cut nothing
    assert not Budget(steps=1500, max_minutes=0).cut(800, 1e9)  # no cap
    line = budget.warning(800)
    assert line.startswith("WARNING:") and "800 of 1500 planned steps" in line and "20-minute" in line


def test_the_edge_band_follows_object_outlines():
    image = torch.full((1, 3, 16, 16), 0.9)
    image[:, 0, 4:10, 4:10] = -0.8  # a 6 x 6 square that differs in one channel only
    band = edge_band(image, radius=2)[0, 0]
    assert band.shape == (16, 16)
    assert band[4, 4] == band[2, 6] == band[11, 6] == 1  # corner, 2 px above, 2 px below
    assert band[0, 0] == band[14, 14] == 0  # background far from the square
    assert band[4:10, 4:10].sum() == 36 - 4  # inside: all but the 2 x 2 centre (2 px from every side)
    assert edge_band(torch.zeros(1, 3, 8, 8)).sum() == 0  # a flat image has no edges


def test_contrastive_term_picks_the_own_caption_among_every_caption():
    model = small_model()
    objective = MIMObjective(model, latent_teacher_dim=8, semantic_teacher_dim=8, text_dim=64)
    with torch.no_grad():
        objective.text_proj.weight.copy_(torch.eye(64))
        objective.logit_scale.fill_(np.log(100))
    table = torch.nn.functional.normalize(
        torch.randn(20, 64, generator=torch.Generator().manual_seed(0)), dim=-1
    )
    caption = torch.tensor([3, 7, 7, 12])
    right = objective.contrastive(table[caption], table, caption)
    wrong = objective.contrastive(table[caption.flip(0)], table, caption)
    assert right < 0.1 < 5 < wrong


def test_the_objective_gives_every_loss_and_trains_every_part():
    model = small_model()
    objective = MIMObjective(model, latent_teacher_dim=48, semantic_teacher_dim=40, text_dim=24)
    x = images(4)
    mask = random_mask(4, 16, TokenizerConfig(mask_ratio=0.5, masked_fraction=0.5), torch.Generator())
    caption = torch.tensor([0, 1, 0, 2])
    table = torch.randn(3, 24)
    losses = objective(
        model, x, mask, torch.randn(2, 16, 48), torch.randn(2, 16, 40), table, caption, LossWeights()
    )
    for name in ("pixel", "latent", "semantic", "text", "total"):
        assert torch.isfinite(losses[name]), name
    assert "pixel_edge" not in losses  # off by default
    edged = objective(model, x, mask, torch.randn(2, 16, 48), torch.randn(2, 16, 40), table, caption,
                      LossWeights(pixel_edge=1.0))  # fmt: skip
    assert torch.isfinite(edged["pixel_edge"]) and edged["total"] > losses["total"]
    assert losses["recon"].shape == x.shape and not losses["recon"].requires_grad
    losses["total"].backward()
    for part in (
        model.encoder.head,
        objective.latent_head[0],
        objective.semantic_head[0],
        objective.text_proj,
    ):
        assert part.weight.grad is not None and part.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_steps_fit_a_batch_and_ask_the_teacher_for_masked_rows_only(precision):
    t = TokenizerConfig(lr=3e-3, warmup_steps=1, masked_fraction=0.25, precision=precision)
    training = MIMTraining(SMALL, t, np.random.default_rng(0).standard_normal((3, 24)).astype(np.float32))
    asked = []
    targets = training.teachers.targets
    training.teachers.targets = lambda x: asked.append(len(x)) or targets(x)
    blocks = torch.rand(8, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    batch = (torch.nn.functional.interpolate(blocks, size=32) * 255).round().to(torch.uint8)  # learnable
    caption = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    first = training.step(batch, caption, 0)
    for step in range(1, 15):
        last = training.step(batch, caption, step)
    assert asked == [2] * 15  # a quarter of 8 rows are masked; the others need no targets
    assert all(np.isfinite(v) for v in last.values())
    assert last["loss/pixel"] < 0.5 * first["loss/pixel"], (first, last)
    assert next(training.module.parameters()).dtype == torch.float32  # autocast keeps fp32 weights


@pytest.mark.parametrize("bf16_ms, chosen", [(39.0, "fp32"), (5.0, "bf16")])
def test_auto_precision_trains_in_what_this_machine_runs_faster(monkeypatch, tmp_path, bf16_ms, chosen):
    from uniloom.pipelines import precision

    monkeypatch.setenv(precision.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(precision, "_TIMINGS", {})
    monkeypatch.setattr(precision, "measure", lambda: precision.Timing(7.6, bf16_ms, "2026-01-01"))
    training = MIMTraining(SMALL, TokenizerConfig(precision="auto"), np.ones((2, 24), np.float32))
    assert training.precision == chosen


def test_ema_teacher_follows_the_student_and_gives_grid_features():
    student = small_model()
    teacher = EMATeacher(student, decay=0.5)
    with torch.no_grad():
        student.encoder.head.weight.add_(1.0)
    before = teacher.model.encoder.head.weight.clone()
    teacher.update(student)
    expected = before + 0.5 * (student.encoder.head.weight - before)
    assert torch.allclose(teacher.model.encoder.head.weight, expected)
    assert not teacher.model.encoder.head.weight.requires_grad
    a, b = teacher.targets(images(2))
    assert a.shape == (2, 16, 64) and b.shape == (2, 16, 64)


def _save_hf_model(kind: str, folder) -> int:
    """A tiny randomly initialised Hugging Face vision model written to `folder`."""
    import transformers

    torch.manual_seed(0)
    vision = {"image_size": 32, "patch_size": 8, "hidden_size": 48, "num_hidden_layers": 1,
              "num_attention_heads": 2, "intermediate_size": 64}  # fmt: skip
    if kind == "vit":
        model = transformers.ViTModel(transformers.ViTConfig(**vision))
    else:  # a full SigLIP (text + vision): the teacher must find the vision tower
        text = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
        model = transformers.SiglipModel(transformers.SiglipConfig(text_config=text, vision_config=vision))
    model.save_pretrained(folder)
    return vision["hidden_size"]


@pytest.mark.parametrize("kind", ["vit", "siglip"])
def test_hugging_face_teachers_load_from_a_local_folder(tmp_path, kind):
    dim = _save_hf_model(kind, tmp_path / kind)
    student = small_model()
    teachers = Teachers(f"hf:{tmp_path / kind}", "ema", student, ema_decay=0.9)
    assert (teachers.latent_dim, teachers.semantic_dim) == (dim, 64)
    a, b = teachers.targets(images(2))
    assert a.shape == (2, 16, dim) and b.shape == (2, 16, 64)
    assert a.std() > 0 and torch.isfinite(a).all()


def test_unknown_or_missing_teachers_are_clear_errors(tmp_path):
    with pytest.raises(UniloomError, match="tokenizer.teacher"):
        Teachers("dino", "ema", small_model(), 0.9)
    with pytest.raises(UniloomError, match="no config.json"):
        Teachers(f"hf:{tmp_path}", "ema", small_model(), 0.9)


def test_caption_embeddings_are_cached_and_meaningful(tmp_path):
    from uniloom.pipelines.tokenizer.text import caption_embeddings

    captions = ["a red circle", "one red circle on a plain background", "three blue squares"]
    emb = caption_embeddings(captions, tmp_path)
    assert emb.shape == (3, 384)
    assert emb[0] @ emb[1] > emb[0] @ emb[2]  # paraphrases are closer than different scenes
    cached = np.load(tmp_path / "captions-all-MiniLM-L6-v2.npz")
    assert sorted(cached["captions"].tolist()) == sorted(captions)
    again = caption_embeddings(captions[::-1], tmp_path)
    assert np.array_equal(again, emb[::-1])


def test_exported_weights_rebuild_the_same_model(tmp_path):
    model = small_model().eval()
    calibrate_latents(model, images(4))
    path = save_tokenizer(model, tmp_path / "w" / "mingtok.safetensors")
    loaded = load_mingtok(path)
    assert loaded.cfg == SMALL
    with torch.no_grad():
        assert torch.equal(loaded.encode(images(2)), model.encode(images(2)))
        assert torch.equal(loaded.reconstruct(images(2)), model.reconstruct(images(2)))
    (tmp_path / "bad.safetensors").write_bytes(b"not weights")
    with pytest.raises(UniloomError, match="bad.safetensors"):
        load_mingtok(tmp_path / "bad.safetensors")


def test_calibration_normalises_latents_without_changing_reconstructions():
    model = small_model().eval()
    x = images(8)
    with torch.no_grad():
        before = model.reconstruct(x)
        calibrate_latents(model, x)
        z = model.encode(x)
        assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - 1) < 0.05
        assert torch.allclose(model.reconstruct(x), before, atol=1e-5)


def test_truncated_and_non_image_bytes_name_the_file():
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buf, format="PNG")
    good = buf.getvalue()
    assert decode_image(good, 32, "ok.png").shape == (3, 32, 32)
    with pytest.raises(UniloomError, match="cut.png"):
        decode_image(good[: len(good) // 2], 32, "cut.png")
    with pytest.raises(UniloomError, match="notes.txt"):
        decode_image(b"hello", 32, "notes.txt")


def test_metrics_psnr_ssim_and_grid():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    noisy = np.clip(a.astype(int) + rng.integers(-8, 9, a.shape), 0, 255).astype(np.uint8)
    assert (psnr(a, a) > 90).all() and (25 < psnr(a, noisy)).all() and (psnr(a, noisy) < 40).all()
    assert ssim(a, a) == pytest.approx([1, 1, 1]) and (ssim(a, noisy) < 1).all()
    assert grid_image(a, noisy, columns=2).size == (32, 64)  # 2 columns; 2 rows of pairs


def test_linear_probe_reads_shape_and_colour_from_separable_features():
    probes = probe_scenes(seed=5, count=60, size=32)
    assert probes.images.shape == (60, 3, 32, 32) and set(probes.shapes) == {0, 1, 2}
    onehot = np.eye(3)[probes.shapes] + 0.01 * np.random.default_rng(0).normal(size=(60, 3))
    predict = fit_linear_probe(onehot[:40], probes.shapes[:40], classes=3)
    assert (predict(onehot[40:]) == probes.shapes[40:]).all()
    noise = np.random.default_rng(1).normal(size=(60, 3))
    predict = fit_linear_probe(noise[:40], probes.shapes[:40], classes=3)
    assert (predict(noise[40:]) == probes.shapes[40:]).mean() < 0.8
