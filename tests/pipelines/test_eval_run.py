"""Running the evaluation: a real (tiny, untrained) model through every task with the
edit rounds chained from the cache, sampling tuned on the validation split only, and
the register stage keeping `champion` where a gate fails (real MLflow SQLite store)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import torch

from uniloom.models.mingtok import MingTok, MingTokConfig
from uniloom.models.special_tokens import SPECIAL_IDS
from uniloom.models.univision import UniVision, UniVisionConfig
from uniloom.pipelines.config import load_config
from uniloom.pipelines.corpus.render import render
from uniloom.pipelines.corpus.scenes import scene_objects
from uniloom.pipelines.evaluate import univision
from uniloom.pipelines.evaluate.benchmark import held_out
from uniloom.pipelines.evaluate.config import EvalConfig
from uniloom.pipelines.evaluate.tune import preset_snippet, tune
from uniloom.pipelines.evaluate.univision import Bundle, evaluate_bundle, model_callables
from uniloom.pipelines.workflow import StageResult
from uniloom.pipelines.workflow_stages import MINGTOK_NAME, UNIVISION_NAME, _register

pytestmark = pytest.mark.usefixtures("one_torch_thread")


TOK = MingTokConfig(image_size=16, patch_size=8, enc_width=32, enc_depth=1, enc_heads=2, sem_width=32, sem_depth=1,
                    sem_heads=2, pix_width=32, pix_depth=1, pix_heads=2, pix_patch_size=4, latent_dim=8,
                    latent_shift=0.0, latent_scale=1.0)  # fmt: skip
CFG = UniVisionConfig(vocab_size=48, hidden=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                      rope_theta=100.0, init_std=0.1, num_experts=2, experts_per_token=1, expert_ffn=16,
                      num_shared_experts=1, semantic_dim=32, latent_dim=8, flow_width=16, flow_depth=1,
                      flow_mlp_mult=2.0, flow_steps=2)  # fmt: skip


class CharText:
    """A stand-in for the BPE: one id per character, above the special tokens."""

    def encode(self, text, add_special_tokens=False):
        return SimpleNamespace(ids=[len(SPECIAL_IDS) + ord(c) % (48 - len(SPECIAL_IDS)) for c in text])

    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


@pytest.fixture
def bundle():
    torch.manual_seed(0)
    return Bundle(UniVision(CFG).eval(), MingTok(TOK).eval(), CharText(), {})


def test_evaluate_bundle_reports_every_figure_and_chains_edits_from_the_cache(bundle, monkeypatch):
    e = EvalConfig(scenes=3, batch=3, precision="fp32", flow_steps=1)
    encoded = []
    original = bundle.tokenizer.encode
    monkeypatch.setattr(bundle.tokenizer, "encode", lambda x: encoded.append(len(x)) or original(x))
    _, _, edit_chains = model_callables(bundle, e)
    chains = edit_chains(held_out(0, 3))
    assert encoded == [3]  # round 1's sources, once; rounds 2 and 3 edit features from the cache
    assert [len(c) for c in chains] == [3, 3, 3] and chains[0][2].shape == (16, 16, 3)

    evaluation = evaluate_bundle(bundle, e, corpus_seed=0)
    m = evaluation.metrics
    for name in (
        "geneval_overall",
        "vqa_accuracy",
        "edit_success_1",
        "edit_success_3",
        "tokenizer_detector_agreement",
    ):
        assert {name, f"{name}_n", f"{name}_lo", f"{name}_hi"} <= set(m), name
    assert m["edit_success_1_n"] == 3 and m["tokenizer_psnr_n"] == 3 and np.isfinite(m["tokenizer_psnr"])
    # drawing with the true prefix: a random model's flow loss is about the velocity's variance
    assert 0.5 < m["flow_loss_heldout"] < 10 and 0 <= m["geneval_teacher_forced"] <= 1
    assert m["flow_loss_heldout_n"] == 3
    assert evaluation.tags["precision.eval"] == "fp32"


class Reconstructs(torch.nn.Module):
    """A MingTok stand-in: gives back its input, or a blank background."""

    def __init__(self, exact: bool):
        super().__init__()
        self.cfg, self.exact = SimpleNamespace(image_size=64), exact

    def reconstruct(self, x):  # (B, 3, H, W) in [-1, 1]
        return x if self.exact else torch.full_like(x, 238 / 127.5 - 1)


def test_reconstruction_of_the_carried_tokenizer_is_scored_on_the_test_renders():
    items = held_out(0, 5)
    exact = univision.tokenizer_reconstruction(Reconstructs(True), items, 2)
    assert exact["tokenizer_detector_agreement"] == 1.0 and exact["tokenizer_detector_agreement_n"] == 5
    assert exact["tokenizer_psnr"] > 40 and exact["tokenizer_psnr_n"] == 5
    blank = univision.tokenizer_reconstruction(Reconstructs(False), items, 2)
    assert blank["tokenizer_detector_agreement"] == 0.0 and blank["tokenizer_psnr"] < 20


def test_tune_chooses_on_the_validation_split_and_prints_a_preset_snippet(bundle, monkeypatch):
    seen = []

    def fake_callables(_, e):
        def generate_images(captions):
            by_caption = {i.scene["caption"]: i for i in held_out(0, 6, split="val")}
            seen.extend(by_caption[c].key for c in captions)
            good = e.cfg_cond_scale == 3.0 and e.flow_steps == 16 and e.temperature == 1.0
            return [
                np.asarray(render(scene_objects(by_caption[c].scene["objects"]), 64))
                if good
                else np.full((64, 64, 3), 238, np.uint8)
                for c in captions
            ]

        def answer(items, questions):
            seen.extend(i.key for i in items)
            truth = {(i.key, qa["question"]): qa["answer"] for i in items for qa in i.scene["vqa"]}
            return [truth[(i.key, q)] if e.text_temperature == 0.5 else "" for i, q in zip(items, questions)]

        return generate_images, answer, None

    monkeypatch.setattr(univision, "model_callables", fake_callables)
    e = EvalConfig(val_scenes=6, precision="fp32")
    best, trials, _ = tune(bundle, e, corpus_seed=0)
    assert best == {
        "flow_steps": 16,
        "temperature": 1.0,
        "cfg_cond_scale": 3.0,
        "cfg_text_uncond_scale": 1.1,
        "text_temperature": 0.5,
    }
    assert seen and all(key.startswith("val-") for key in seen)
    assert len(trials) == 2 * 2 * 3 * 1 + 2 and all(t["lo"] <= t["value"] <= t["hi"] for t in trials)
    assert "eval:\n  flow_steps: 16\n" in preset_snippet(best, 6)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Both models registered twice in one SQLite store (creating it takes seconds)."""
    folder = tmp_path_factory.mktemp("registry")
    uri, before = f"sqlite:///{folder}/mlflow.db", mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    for name in (MINGTOK_NAME, UNIVISION_NAME):
        client.create_registered_model(name)
        for _ in range(2):
            client.create_model_version(name, source=str(folder))
    # Its own experiment, passed explicitly: the fluent API's active experiment may be
    # another test's, in another store.
    experiment = client.create_experiment("gates")
    yield client, folder, experiment
    mlflow.set_tracking_uri(before)


GOOD_EVAL = {
    "geneval_overall": 0.8, "geneval_overall_n": 96, "geneval_overall_lo": 0.74, "geneval_overall_hi": 0.86,
    "vqa_accuracy": 0.9, "vqa_accuracy_n": 400, "vqa_accuracy_lo": 0.87, "vqa_accuracy_hi": 0.93,
    "tokenizer_psnr": 33.0, "tokenizer_psnr_n": 96,
    "tokenizer_detector_agreement": 1.0, "tokenizer_detector_agreement_n": 96,
    "tokenizer_detector_agreement_lo": 0.96, "tokenizer_detector_agreement_hi": 1.0,
}  # fmt: skip
GOOD_TOKENIZER = {"psnr": 35.0, "detector_agreement": 0.99, "detector_agreement_n": 250,
                  "detector_agreement_lo": 0.97, "detector_agreement_hi": 1.0, "registered_version": 2.0}  # fmt: skip


@pytest.mark.parametrize(
    ("tokenizer", "evaluation", "moved"),
    [
        ({}, {}, {MINGTOK_NAME: "2", UNIVISION_NAME: "2"}),
        ({"psnr": 19.4}, {}, {MINGTOK_NAME: "1", UNIVISION_NAME: "1"}),  # the tokenizer stage failed
        ({}, {"tokenizer_psnr": 20.0}, {MINGTOK_NAME: "2", UNIVISION_NAME: "1"}),  # the exported MingTok
        ({}, {"tokenizer_detector_agreement_lo": 0.7}, {MINGTOK_NAME: "2", UNIVISION_NAME: "1"}),
        ({}, {"geneval_overall": 1.0, "geneval_overall_lo": 0.35}, {MINGTOK_NAME: "2", UNIVISION_NAME: "1"}),
    ],
)
def test_champion_moves_only_when_the_model_and_its_tokenizer_pass(registry, tokenizer, evaluation, moved):
    """Version 1 is champion; the stages registered version 2."""
    client, folder, experiment = registry
    for name in (MINGTOK_NAME, UNIVISION_NAME):
        client.set_registered_model_alias(name, "champion", "1")
    cfg = load_config("tiny", overrides=[f"workspace={folder}"])
    done = {
        "tokenizer": StageResult(metrics={**GOOD_TOKENIZER, **tokenizer}),
        "train": StageResult(metrics={"registered_version": 2.0}),
        "eval": StageResult(metrics={**GOOD_EVAL, **evaluation}),
    }
    with mlflow.start_run(experiment_id=experiment):
        _register(cfg, done)
    for name, version in moved.items():
        assert str(client.get_model_version_by_alias(name, "champion").version) == version, name


def test_registered_versions_carry_their_lineage_and_evaluation(registry, tmp_path):
    """The training run's shards as its MLflow dataset (fingerprint, row counts), and on
    the registered version: the data fingerprint, its MingTok's version (tags, as the train
    stage records them), the eval figures and gate (the register stage), a description."""
    from uniloom.pipelines.data.manifest import Manifest
    from uniloom.pipelines.train.registry import record_lineage, shards_lineage

    client, folder, experiment = registry
    manifest = Manifest(str(tmp_path / "data"), {})
    for i, written in enumerate((40, 2)):
        rows = {"read": written + 3, "written": written, "quarantined": 1, "filtered": {"dedup": 2}}
        manifest.shards[f"shard-{i}"] = {"fingerprint": f"{i}" * 16, "rows": rows}
    manifest.save()
    run = client.create_run(experiment)
    job = {"mlflow_run_id": run.info.run_id, "shards_uri": str(tmp_path / "data"), "image_tokenizer": "i" * 16,
           "text_tokenizer": "t" * 16, "tokenizer_name": "uniloom-unitok", "tokenizer_version": "2"}  # fmt: skip
    record_lineage(job, {}, "2")
    cfg = load_config("tiny", overrides=[f"workspace={folder}"])
    done = {
        "tokenizer": StageResult(metrics=GOOD_TOKENIZER),
        "train": StageResult(metrics={"registered_version": 2.0}),
        "eval": StageResult(metrics=GOOD_EVAL),
    }
    with mlflow.start_run(experiment_id=experiment):
        _register(cfg, done)

    fingerprint = shards_lineage(str(tmp_path / "data"), {})[0]
    (dataset,) = client.get_run(run.info.run_id).inputs.dataset_inputs
    assert dataset.dataset.digest == fingerprint and json.loads(dataset.dataset.source)["uri"] == str(
        tmp_path / "data"
    )
    counts = {t.key: t.value for t in dataset.tags}
    assert counts["shards"] == "2" and counts["rows_written"] == "42" and counts["rows_read"] == "48"
    assert counts["rows_quarantined"] == "2" and counts["rows_filtered"] == "4"
    version = client.get_model_version(UNIVISION_NAME, "2")
    assert version.tags["data.fingerprint"] == fingerprint and version.tags["data.rows"] == "42"
    assert version.tags["tokenizer.version"] == "2" and version.tags["text_tokenizer"] == "t" * 16
    assert version.tags["eval.geneval_overall"] == "0.8" and version.tags["eval.vqa_accuracy"] == "0.9"
    assert version.tags["gate"] == "passed" and "eval.geneval_overall_lo" not in version.tags
    # the description names the image tokenizer the run recorded (a UniTok run's, here)
    assert version.tags["tokenizer.name"] == "uniloom-unitok"
    assert f"data {fingerprint}, rows 42, uniloom-unitok version 2" in version.description
    assert "geneval_overall 0.8 (n 96, 95% 0.740-0.860)" in version.description
    mingtok = client.get_model_version(MINGTOK_NAME, "2")
    assert mingtok.tags["eval.psnr"] == "35" and mingtok.tags["eval.detector_agreement"] == "0.99"
    assert "registered_version" not in " ".join(mingtok.tags)


def test_eval_command_logs_metrics_table_and_examples_to_mlflow(registry, bundle, monkeypatch):
    import json

    from click.testing import CliRunner

    from uniloom.pipelines.commands.evaluate import evaluate
    from uniloom.pipelines.evaluate import loading

    client, folder, _ = registry
    monkeypatch.setattr(loading, "resolve_model", lambda cfg, model: bundle)
    args = [
        "--set",
        f"workspace={folder}",
        "--set",
        "eval.scenes=2",
        "--set",
        "eval.precision=fp32",
        "--json",
    ]
    out = CliRunner().invoke(evaluate, args)
    assert out.exit_code == 0, out.output
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["gate_passed"] is False and "edit_success_3_lo" in summary
    assert "95% interval" in out.stderr
    run = client.search_runs([mlflow.get_experiment_by_name("uniloom").experiment_id], "run_name = 'eval'")[0]
    assert run.data.metrics["vqa_accuracy_n"] == summary["vqa_accuracy_n"]
    assert run.data.tags["precision.eval"] == "fp32"
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/scores.json", "eval/examples"} <= logged
    examples = {a.path for a in client.list_artifacts(run.info.run_id, "eval/examples")}
    assert "eval/examples/edit_round_3.png" in examples
    # Every judgement as a table: a row per GenEval check and per edit round, each with its
    # image; the answers in another. Their pass counts are the figures.
    samples = mlflow.load_table("eval/samples.json", run_ids=[run.info.run_id])
    assert list(samples.columns[:4]) == ["prompt", "category", "passed", "image"]
    rounds = samples[samples.category == "edit_round_3"]
    assert len(rounds) == summary["edit_success_3_n"] == 2
    assert rounds.passed.mean() == summary["edit_success_3"]
    assert all(cell["type"] == "image" for cell in samples.image)
    stored = {a.path for a in client.list_artifacts(run.info.run_id, "table_images/eval/samples")}
    assert {cell["filepath"] for cell in samples.image} <= stored
    answers = mlflow.load_table("eval/answers.json", run_ids=[run.info.run_id])
    assert len(answers) == summary["vqa_accuracy_n"] and answers.passed.mean() == summary["vqa_accuracy"]


def test_eval_tune_prints_the_chosen_settings_as_preset_yaml(registry, bundle, monkeypatch):
    import yaml
    from click.testing import CliRunner

    from uniloom.pipelines.commands.evaluate import evaluate
    from uniloom.pipelines.evaluate import loading

    _, folder, _ = registry
    monkeypatch.setattr(loading, "resolve_model", lambda cfg, model: bundle)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow.get_tracking_uri())
    grid = "eval.tune_grid={flow_steps: [1, 2], cfg_cond_scale: [3.0], text_temperature: [0.0]}"
    args = ["--tune", "--set", f"workspace={folder}", "--set", "eval.val_scenes=2", "--set", grid,
            "--set", "eval.precision=fp32"]  # fmt: skip
    out = CliRunner().invoke(evaluate, args)
    assert out.exit_code == 0, out.output
    chosen = yaml.safe_load(out.stdout)["eval"]
    assert set(chosen) == {"flow_steps", "cfg_cond_scale", "text_temperature"} and chosen["flow_steps"] in (
        1,
        2,
    )
    assert "validation" in out.stdout and "GenEval overall" in out.stderr
