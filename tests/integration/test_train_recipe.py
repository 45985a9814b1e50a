"""`uniloom train` end to end on shards made by the real data stage: the four-stage recipe
on 2 Ray Train workers (gloo), DeepSpeed with the experts split over both workers, and
the refusal of shards tokenized by another MingTok."""

import json
import re
from pathlib import Path

import pytest
from trainshards import STEPS, config_file, make_shards, uniloom

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def data(tmp_path_factory, ray_local):
    return make_shards(tmp_path_factory.getbasetemp() / "train-shards", ray_local)


@pytest.fixture(scope="module")
def recipe_run(data, tmp_path_factory):
    work = tmp_path_factory.mktemp("recipe")
    cfg = config_file(work / "train.yaml", data, work / "ws")
    result = uniloom("train", "--config", str(cfg), "--recipe", "--workers", "2", "--json", cwd=work)
    assert result.returncode == 0, result.stderr[-4000:]
    return work, json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def test_the_four_stages_run_on_two_workers_and_the_loss_falls(recipe_run, report):
    work, summary, stderr = recipe_run
    assert summary["stage"] == "edit" and summary["global_step"] == sum(STEPS.values())
    assert summary["workers_last"] == 2
    curve = summary["loss_curve"]
    assert [stage for _, stage, _ in curve][:: len(curve) - 1] == ["align", "edit"]
    assert {stage for _, stage, _ in curve} == set(STEPS)
    losses = [loss for *_, loss in curve]
    first, last = sum(losses[:2]) / 2, sum(losses[-2:]) / 2
    assert last < first - 0.5, curve
    for name in STEPS:
        assert re.search(rf"\[train \+\d+s\] stage {name} done", stderr)
    report(f"recipe, 2 workers, ep 2: loss {first:.3f} -> {last:.3f} over {summary['global_step']} steps, "
           f"{summary['seconds']} s")  # fmt: skip


def test_every_rank_wrote_its_own_experts_into_the_checkpoint(recipe_run):
    work, summary, _ = recipe_run
    folder = Path(summary["checkpoint"])
    meta = json.loads((folder / "meta.json").read_text())
    assert (meta["world"], meta["ep"], meta["stage"], meta["step"]) == (2, 2, "edit", STEPS["edit"])
    starts = []
    for rank in range(2):
        pieces = json.loads((folder / f"rank-{rank:05d}.json").read_text())["pieces"]
        starts.append({p["start"] for p in pieces if p["name"] == "model.layers.0.moe.experts.w1_EFD"})
    rows = 64 * 64  # one expert of w1 (F x D) in the small model
    assert starts == [{0}, {2 * rows}]  # rank 0: experts 0-1, rank 1: experts 2-3


def test_the_export_is_one_consolidated_safetensors_model(recipe_run):
    from uniloom.pipelines.train.registry import load_export

    _, summary, _ = recipe_run
    model, tokenizer, metadata = load_export(summary["export"])
    assert model.layers[0].moe.experts.w1_EFD.shape[0] == 4  # whole again
    assert metadata["stage"] == "edit" and metadata["global_step"] == summary["global_step"]
    assert tokenizer.cfg.num_tokens == 16


def test_mlflow_holds_one_run_with_the_training_record(recipe_run):
    from mlflow.tracking import MlflowClient

    work, summary, _ = recipe_run
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'ws' / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_id for r in runs] == [summary["mlflow_run_id"]]
    run = runs[0]
    metrics = set(run.data.metrics)
    assert {
        "loss",
        "loss_text",
        "loss_flow",
        "lr",
        "tokens_per_s_per_worker",
        "expert_load_cv/layer1",
    } <= metrics
    assert {"loss_understanding_text", "loss_text_to_image_flow", "loss_editing_flow"} <= metrics
    assert any(m.startswith("system/") for m in metrics)
    assert run.data.params["train.expert_parallel"] == "2"
    samples = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert len(samples) == 4  # an evaluation at the end of each stage
    histograms = [
        a.path for a in client.list_artifacts(run.info.run_id, "expert_load") if a.path.endswith(".json")
    ]
    assert len(histograms) == 4
    versions = client.search_model_versions("name='uniloom-univision'")
    assert [v.run_id for v in versions] == [run.info.run_id]


@pytest.fixture(scope="module")
def champion(recipe_run):
    """The registry as the workflow's register stage leaves it: version 1 is `champion`."""
    from mlflow.tracking import MlflowClient

    work, _, _ = recipe_run
    uri = f"sqlite:///{work / 'ws' / 'mlflow.db'}"
    MlflowClient(tracking_uri=uri).set_registered_model_alias("uniloom-univision", "champion", "1")
    return uri


def _png(data: bytes):
    import io

    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)))


def test_the_registered_model_generates_answers_and_edits(champion):
    import mlflow
    import pandas as pd

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(champion)
    try:  # models from code: loading runs pipelines/train/pyfunc_model.py, unpickles nothing
        model = mlflow.pyfunc.load_model("models:/uniloom-univision@champion")
        drawn = model.predict(pd.DataFrame({"prompt": ["a red circle", "two squares"]}), params={"steps": 2})
        png = drawn["image"][0]
        rows = pd.DataFrame({"prompt": ["what colour is the circle?", "make it blue"], "image": [png, png],
                             "task": ["answer", "edit"]})  # fmt: skip
        other = model.predict(rows, params={"steps": 2, "max_new_tokens": 4})
        with pytest.raises(Exception, match="needs an image"):
            model.predict(pd.DataFrame({"prompt": ["x"], "task": ["edit"]}))
    finally:
        mlflow.set_tracking_uri(previous)
    assert list(drawn.columns) == ["image", "text"] and list(drawn["text"]) == ["", ""]
    assert [_png(b).shape for b in drawn["image"]] == [(32, 32, 3)] * 2
    assert isinstance(other["text"][0], str) and other["image"][0] == b""
    assert _png(other["image"][1]).shape == (32, 32, 3) and other["text"][1] == ""
    signature = model.metadata.signature
    assert signature.inputs.input_names() == ["prompt", "image", "task"]
    assert signature.outputs.input_names() == ["image", "text"]


def test_mlflow_serves_the_champion_on_loopback(champion, tmp_path):
    """`mlflow models serve -m models:/uniloom-univision@champion` answers a generation
    request over HTTP; the server listens on 127.0.0.1 only."""
    import base64
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    from localcluster import free_port

    port, bin_dir = free_port(), str(Path(sys.executable).parent)
    env = {**os.environ, "MLFLOW_TRACKING_URI": champion, "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "MLFLOW_DISABLE_TELEMETRY": "true"}  # fmt: skip
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(
        [f"{bin_dir}/mlflow", "models", "serve", "-m", "models:/uniloom-univision@champion",
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 180
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5)
                break
            except OSError:
                assert time.time() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
                time.sleep(1)
        body = json.dumps(
            {"dataframe_records": [{"prompt": "a red circle"}], "params": {"seed": 1, "steps": 2}}
        )
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body.encode(),
                                         {"Content-Type": "application/json"})  # fmt: skip
        answer = json.loads(urllib.request.urlopen(request, timeout=120).read())
        listening = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True).stdout
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    [prediction] = answer["predictions"]
    assert _png(base64.b64decode(prediction["image"])).shape == (32, 32, 3)
    assert [line.split()[3] for line in listening.splitlines()] == [f"127.0.0.1:{port}"]


def test_uniloom_generate_uses_the_same_registry(champion, recipe_run, tmp_path, cli):
    work, _, _ = recipe_run
    result = cli("generate", "a red circle", "--model", "models:/uniloom-univision@champion", "--out",
                 str(tmp_path / "out"), "--num", "2", "--set", f"tracking.tracking_uri={champion}",
                 "--steps", "2", "--json", cwd=work)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    paths = json.loads(result.stdout.strip().splitlines()[-1])["images"]
    assert [_png(Path(p).read_bytes()).shape for p in paths] == [(32, 32, 3)] * 2


def test_shards_of_another_mingtok_are_refused(data, tmp_path, cli):
    from trainshards import SMALL_MINGTOK

    from uniloom.models.mingtok_config import MingTokConfig
    from uniloom.pipelines.data.image_tokenizer import save_random_weights

    other = save_random_weights(MingTokConfig(**SMALL_MINGTOK), str(tmp_path / "other.safetensors"), seed=9)
    cfg = config_file(tmp_path / "train.yaml", {**data, "weights": other}, tmp_path / "ws")
    result = cli("train", "--config", str(cfg), cwd=tmp_path, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert "were tokenized by image tokenizer" in line and "other.safetensors" in line, line
    assert not (tmp_path / "ws" / "ray_results").exists()  # refused before any training started


TRAIN_STAGE = """
import json, sys
from uniloom.pipelines.config import load_config
from uniloom.pipelines.train.trainer import ray_output_on_stderr
from uniloom.pipelines.workflow import StageResult
from uniloom.pipelines.workflow_stages import _train, train_config

cfg = load_config("tiny", sys.argv[1])
done = {"data": StageResult({"shards": sys.argv[2]}), "tokenizer": StageResult({"weights": sys.argv[3]})}
with ray_output_on_stderr():
    result = _train(cfg, done)
print(json.dumps({"run": train_config(cfg, done).train.run_name, **result.outputs, **result.metrics}))
"""


def test_a_changed_sft_stage_trains_from_an_earlier_run_s_end_of_stage_2(data, tmp_path):
    """`uniloom run`'s train stage after a change to stage 3 only: a new Ray Train run that
    starts at stage 3 from the first run's copy of its end of stage 2 (Ray Train kept only
    its last checkpoint), trains sft and edit, and exports weights under the new recipe."""
    import subprocess
    import sys

    from uniloom.pipelines.train.registry import load_export

    def train_stage(sft_steps: int) -> tuple[dict, str]:
        steps = {"align": 2, "joint": 2, "sft": sft_steps, "edit": 2}
        stages = {name: {"steps": n, "warmup_steps": 1} for name, n in steps.items()}
        cfg = config_file(tmp_path / f"sft{sft_steps}.yaml", data, tmp_path / "ws", stages=stages,
                          checkpoint_every=50, keep_checkpoints=1)  # fmt: skip
        result = subprocess.run([sys.executable, "-c", TRAIN_STAGE, str(cfg), data["shards"], data["weights"]],
                                cwd=tmp_path, capture_output=True, text=True, timeout=900)  # fmt: skip
        assert result.returncode == 0, result.stderr[-4000:]
        return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr

    first, first_err = train_stage(2)
    first_weights = {k: v.clone() for k, v in load_export(first["export"])[0].state_dict().items()}
    for name in STEPS:
        assert re.search(rf"\[train \+\d+s\] stage {name} done", first_err)
    second, err = train_stage(3)
    assert second["run"] != first["run"]
    assert f"starting sft after stage joint step 2 (2 workers) of run {first['run']}" in err, err[-3000:]
    trained = [name for name in STEPS if re.search(rf"\[train \+\d+s\] stage {name} done", err)]
    assert trained == ["sft", "edit"]

    storage = tmp_path / "ws" / "ray_results"
    start = storage / first["run"] / "stage-ends" / "joint"
    assert not list((storage / first["run"]).glob("ckpt-*-joint"))  # Ray Train kept the last only
    [last] = (storage / second["run"]).glob("ckpt-*-edit")
    meta = json.loads((last / "meta.json").read_text())
    started = meta["started_from"]
    assert (started["run"], started["stage"]) == (first["run"], "joint")
    assert Path(started["checkpoint"]).resolve() == start.resolve()
    assert meta["global_step"] == second["global_step"] == 2 + 2 + 3 + 2
    origin = json.loads((start / "meta.json").read_text())
    assert meta["losses"][: len(origin["losses"])] == origin["losses"]  # stages 1-2 are the first run's
    assert [stage for _, stage, _ in meta["losses"][len(origin["losses"]) :]] == ["sft", "sft", "edit"]
    # the weight EMA came along: it continues stage 2's average
    assert (origin["ema_updates"], meta["ema_updates"]) == (2 + 2, 2 + 2 + 3 + 2)
    # every stage's end is kept but the last one's (the run's result, which nothing starts after)
    assert sorted(p.name for p in (storage / first["run"] / "stage-ends").iterdir()) == [
        "align",
        "joint",
        "sft",
    ]

    model, _, metadata = load_export(second["export"])
    assert metadata["recipe"]["sft"]["steps"] == 3 and metadata["global_step"] == 9
    assert metadata["started_from"]["run"] == first["run"]
    # the same export path as the first run's: it holds the new run's weights
    assert any(not (v == first_weights[k]).all() for k, v in model.state_dict().items())
