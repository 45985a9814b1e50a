"""The unified model's training, export, registry and evaluation for every tokenizer kind
(tokenizer.kind): a Trainee of each kind trains on rows stored as the data stage stores
them (UniTok codes stay integers), its parts are the kind's modules with the rest of the
tokenizer frozen, and its export loads back, generates and edits through the CLI, serves
through the registered pyfunc and is evaluated."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from smallkinds import SMALL

from uniloom.models.sequence import pack
from uniloom.pipelines.config import load_config
from uniloom.pipelines.corpus.render import render
from uniloom.pipelines.corpus.scenes import scene_objects
from uniloom.pipelines.evaluate.benchmark import held_out
from uniloom.pipelines.tokenizer.data import to_unit
from uniloom.pipelines.tokenizer.kinds import kind_of
from uniloom.pipelines.train.config import PARTS, StageConfig
from uniloom.pipelines.train.data import TaskSampler
from uniloom.pipelines.train.metrics import Window
from uniloom.pipelines.train.module import Trainee

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KINDS = ("mingtok", "unitok", "tuna")
MODEL = {"vocab_size": 300, "hidden": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "head_dim": 16,
         "num_experts": 2, "experts_per_token": 1, "expert_ffn": 32, "num_shared_experts": 0, "coarse_codes": 0,
         "semantic_dim": 32, "latent_dim": 8, "flow_width": 16, "flow_depth": 1, "depth_width": 32,
         "depth_layers": 1, "depth_heads": 2, "flow_steps": 2}  # fmt: skip
CAPTIONS = ["a red circle", "two blue squares", "a green triangle left of a red circle"] * 4


def config(kind: str, *more: str):
    return load_config("tiny", overrides=[f"tokenizer.kind={kind}", *(f"{kind}.{k}={v}" for k, v in SMALL[kind].items()),
                                          *(f"model.{k}={v}" for k, v in MODEL.items()), *more])  # fmt: skip


def scenes(n: int) -> list[np.ndarray]:
    return [np.asarray(render(scene_objects(i.scene["objects"]), 32)) for i in held_out(0, n)]


def stored_rows(cfg, tokenizer, n: int = 2) -> list[dict]:
    """Rows as the data stage writes them: each image's values in the kind's stored dtype
    (codes as integers) as bytes, a caption, a VQA pair and a one-round edit chain."""
    kind = kind_of(cfg)
    dtype = np.dtype(kind.dtype(kind.config(cfg), cfg.data.latent_dtype))
    with torch.no_grad():
        images = to_unit(np.stack(scenes(2 * n)).transpose(0, 3, 1, 2), "cpu")
        values = kind.values(tokenizer.eval(), images).numpy().astype(dtype)
    return [{"key": f"k{i}", "text_ids": [40 + i, 41, 42], "latents": values[i].tobytes(),
             "latent_shape": list(values.shape[1:]), "latent_dtype": dtype.name, "image_tokenizer": "f" * 16,
             "vqa_question_ids": [[50, 51]], "vqa_answer_ids": [[52]], "edit_instruction_ids": [[60, 61]],
             "edit_latents": [values[n + i].tobytes()]} for i in range(n)]  # fmt: skip


def batch_of(cfg, rows: list[dict]):
    """One packed batch of every row as each task."""
    t = dataclasses.replace(cfg.train, seq_len=128)
    samples, tasks = [], set()
    for task in ("understanding", "text_to_image", "editing", "text"):
        sampler = TaskSampler(StageConfig(mix={task: 1.0}), t, "f" * 16)
        samples += [sampler(row, 0) for row in rows]
        tasks.add(samples[-1].task)
    assert tasks == {"understanding", "text_to_image", "editing", "text"}
    return pack(samples, 128)


def trained_parameters(trainee: Trainee) -> dict[str, set[str]]:
    names = {id(p): n for n, p in trainee.named_parameters()}
    return {
        part: {names[id(p)] for m in modules for p in m.parameters()}
        for part, modules in trainee.parts().items()
    }


@pytest.mark.parametrize("kind", KINDS)
def test_a_trainee_of_each_kind_trains_its_parts_on_stored_rows(kind):
    cfg = config(kind)
    torch.manual_seed(0)
    trainee = Trainee(cfg.model, kind_of(cfg).config(cfg))
    batch = batch_of(cfg, stored_rows(cfg, trainee.tokenizer))
    assert batch.image_latents.dtype == (torch.long if kind == "unitok" else torch.float32)
    trainee.set_trainable(list(PARTS))
    losses = trainee(batch)
    losses.total.backward()
    assert torch.isfinite(losses.total) and losses.text > 0
    assert (losses.code if kind == "unitok" else losses.flow) > 0  # the kind's image term
    window = Window()
    window.add(losses, 1)
    logged, term = window.reduce(1), "code" if kind == "unitok" else "flow"
    assert logged[f"loss_{term}"] > 0 and logged[f"loss_text_to_image_{term}"] > 0  # as training logs it
    grads = {n: p.grad for n, p in trainee.named_parameters()}
    parts = trained_parameters(trainee)
    for part in ("projector", "flow_head", "llm"):  # each learns from this batch
        assert any(grads[n] is not None and grads[n].abs().sum() > 0 for n in parts[part]), part
    trained = set().union(*parts.values())
    tokenizer = {n for n in grads if n.startswith("tokenizer.")}
    # the rest of the tokenizer stays as the tokenizer stage made it
    assert all(grads[n] is None for n in tokenizer - trained)
    frozen = {
        "mingtok": "tokenizer.encoder.",
        "unitok": "tokenizer.quantizer.",
        "tuna": "tokenizer.vae_encoder.",
    }
    assert any(n.startswith(frozen[kind]) for n in tokenizer - trained)
    # the joint stage's semantic_decoder: MingTok's; nothing of UniTok or TUNA
    assert bool(parts["semantic_decoder"]) == (kind == "mingtok")


@pytest.mark.parametrize("kind", ("unitok", "tuna"))
def test_the_anchor_is_a_no_op_for_a_tokenizer_without_a_semantic_decoder(kind):
    cfg = config(kind)
    trainee = Trainee(cfg.model, kind_of(cfg).config(cfg))
    trainee.anchor(trainee.tokenizer.state_dict(), 1.0)
    assert trainee.anchor_weight == 0.0 and trainee.reference == {}


def test_tokenizer_weights_that_do_not_fit_the_model_are_refused_in_one_line(tmp_path):
    from uniloom.pipelines.data.image_tokenizer import save_random_weights
    from uniloom.pipelines.errors import UniloomError
    from uniloom.pipelines.train.trainer import effective_config

    cfg = config("tuna", f"data.tokenizer_weights={tmp_path / 'tuna.safetensors'}")
    save_random_weights(cfg.tuna, cfg.data.tokenizer_weights)
    resolved, fingerprint = effective_config(cfg)
    assert resolved.tuna == cfg.tuna and len(fingerprint) == 16
    wider = config("tuna", f"data.tokenizer_weights={cfg.data.tokenizer_weights}", "model.hidden=64")
    with pytest.raises(UniloomError, match="TUNA .llm_width 32. does not match the model .hidden 64."):
        effective_config(wider)
    unitok = config("unitok", f"data.tokenizer_weights={cfg.data.tokenizer_weights}")
    with pytest.raises(UniloomError, match="a unitok model needs a unitok tokenizer, got Tuna"):
        effective_config(unitok)


@pytest.fixture(scope="module", params=("unitok", "tuna"))
def exported(request, tmp_path_factory):
    """(kind, export file, workspace) of a random Trainee of the kind, exported as the trainer exports."""
    from uniloom.pipelines.config import to_dict
    from uniloom.pipelines.data.text_tokenizer import fingerprint, train_bpe
    from uniloom.pipelines.train import checkpoint as ckpt
    from uniloom.pipelines.train.registry import export_model

    kind = request.param
    cfg = config(kind)
    text = train_bpe(CAPTIONS, 300, 1)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(f"ckpt-{kind}")
    ckpt.save(None, Trainee(cfg.model, kind_of(cfg).config(cfg)), folder, 0, 1, {"epoch": 0, "rows": 0},
              {"world": 1})  # fmt: skip
    metadata = {"model": to_dict(cfg.model), kind: to_dict(kind_of(cfg).config(cfg)), "image_tokenizer": "0" * 16,
                "text_tokenizer": fingerprint(text), "stage": "edit", "global_step": 0}  # fmt: skip
    out = export_model(ckpt.Reader(folder), folder / "univision.safetensors", metadata, text)
    return kind, out, folder


def test_the_export_loads_back_as_its_kind_and_generates_and_edits_through_the_cli(exported, tmp_path,
                                                                                  monkeypatch, uniloom_main):  # fmt: skip
    from PIL import Image

    from uniloom.pipelines.train.registry import load_export

    kind, export, _ = exported
    model, tokenizer, metadata = load_export(export)
    assert (model.cfg.image_kind, type(tokenizer).__name__) == (
        kind,
        {"unitok": "UniTok", "tuna": "Tuna"}[kind],
    )
    Image.fromarray(scenes(1)[0]).save(tmp_path / "scene.png")
    monkeypatch.chdir(tmp_path)
    code, out, err = uniloom_main("generate", "a red circle", "--model", str(export), "--num", "2", "--steps", "1",
                                  "--json")  # fmt: skip
    assert code == 0, err
    assert [
        np.asarray(Image.open(tmp_path / p)).shape for p in json.loads(out.splitlines()[-1])["images"]
    ] == [(32, 32, 3)] * 2
    code, out, err = uniloom_main("edit", "scene.png", "--instruction", "make it blue", "--instruction",
                                  "move it left", "--model", str(export), "--steps", "1", "--json")  # fmt: skip
    assert code == 0, err
    assert json.loads(out.splitlines()[-1])["images"] == ["edited/round1-0.png", "edited/round2-0.png"]


def test_the_registered_pyfunc_of_each_kind_generates_answers_and_edits(exported, tmp_path, monkeypatch):
    import io

    import mlflow
    import pandas as pd
    from PIL import Image

    from tests.pipelines.test_train_export import registered

    kind, export, _ = exported
    cfg = config(kind, f"workspace={tmp_path / 'ws'}")
    with registered(cfg, export, monkeypatch) as info:
        model = mlflow.pyfunc.load_model(f"models:/uniloom-univision/{info.registered_model_version}")
        drawn = model.predict(pd.DataFrame({"prompt": ["a red circle"]}), params={"steps": 1})
        png = drawn["image"][0]
        rows = pd.DataFrame({"prompt": ["what colour?", "make it blue"], "image": [png, png],
                             "task": ["answer", "edit"]})  # fmt: skip
        other = model.predict(rows, params={"steps": 1, "max_new_tokens": 2})
    assert model.metadata.signature.inputs.input_names() == ["prompt", "image", "task"]
    assert np.asarray(Image.open(io.BytesIO(png))).shape == (32, 32, 3)
    assert isinstance(other["text"][0], str) and other["image"][0] == b""
    assert np.asarray(Image.open(io.BytesIO(other["image"][1]))).shape == (32, 32, 3)


def test_evaluation_scores_each_kind_and_the_tokenizer_it_carries(exported):
    from uniloom.pipelines.evaluate.config import EvalConfig
    from uniloom.pipelines.evaluate.univision import evaluate_bundle, load_bundle

    kind, export, _ = exported
    bundle = load_bundle(str(export), "unused")
    m = evaluate_bundle(
        bundle, EvalConfig(scenes=2, batch=2, precision="fp32", flow_steps=1), corpus_seed=0
    ).metrics
    for name in ("geneval_overall", "vqa_accuracy", "edit_success_1", "edit_success_3",
                 "tokenizer_detector_agreement"):  # fmt: skip
        assert {name, f"{name}_n", f"{name}_lo", f"{name}_hi"} <= set(m), name
    assert m["edit_success_1_n"] == 2 and np.isfinite(m["tokenizer_psnr"])
    assert "flow_loss_heldout" not in m  # MingTok's per-token flow head only
