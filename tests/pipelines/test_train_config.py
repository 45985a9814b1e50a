"""The `train:` config, the DeepSpeed config and schedule made from it, and the recipe's
bookkeeping (which stages a run trains, where it resumes)."""

import math

import pytest

from uniloom.pipelines.config import load_config
from uniloom.pipelines.errors import ConfigError, UniloomError
from uniloom.pipelines.train import recipe
from uniloom.pipelines.train.config import PARTS, StageConfig, TrainConfig
from uniloom.pipelines.train.deepspeed_config import engine_config, lr_lambda


def test_both_presets_carry_the_four_stage_recipe():
    for preset in ("tiny", "paper"):
        t = load_config(preset).train
        assert list(t.stages) == ["align", "joint", "sft", "edit"]
        # no pretrained LLM is loaded: the first stage trains it with the heads
        assert t.stages["align"].trainable == ["projector", "flow_head", "llm"]
        assert set(t.stages["joint"].trainable) == set(PARTS)
        assert "semantic_decoder" not in t.stages["sft"].trainable
        assert t.stages["edit"].mix["editing"] == pytest.approx(0.55)
        for stage in t.stages.values():
            assert sum(stage.mix.values()) == pytest.approx(1.0)
    paper = load_config("paper").train
    assert (paper.zero_stage, paper.precision, paper.expert_parallel) == (2, "auto", 8)


def test_one_field_of_one_stage_is_a_plain_override():
    t = load_config(
        "tiny", overrides=["train.stages.joint.steps=7", "train.stages.edit.mix.editing=1.0"]
    ).train
    assert t.stages["joint"].steps == 7 and t.stages["edit"].mix["editing"] == 1.0
    assert t.stages["align"].steps == load_config("tiny").train.stages["align"].steps


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stages.align.trainable=[projector, vision]", "unknown part"),
        ("train.stages.align.mix={understanding: 0.5, painting: 0.5}", "unknown task kind"),
        ("train.stages.align.mix={understanding: 0.0, text_to_image: 0.0}", "positive sum"),
        ("train.zero_stage=3", "train.zero_stage"),
        ("train.precision=fp16", "train.precision"),
    ],
)
def test_bad_train_settings_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", overrides=[override])


def test_a_stage_may_not_freeze_the_untrained_llm():
    with pytest.raises(ConfigError, match=r"stages.align.trainable freezes the LLM.*random weights"):
        load_config("tiny", overrides=["train.stages.align.trainable=[projector, flow_head]"])
    with pytest.raises(ValueError, match="stages.sft.trainable freezes the LLM"):
        TrainConfig(stages={"sft": StageConfig(["projector"]), "joint": StageConfig(list(PARTS))})
    # Once a stage has trained it, later stages may freeze it.
    t = load_config("tiny", overrides=["train.stages.edit.trainable=[projector, flow_head]"]).train
    assert "llm" not in t.stages["edit"].trainable
    assert "llm" in TrainConfig().stages["align"].trainable


def test_deepspeed_config_follows_the_preset():
    t = load_config("tiny", overrides=["train.zero_stage=2", "train.grad_accum=4"]).train
    ds = engine_config(t, world=2, precision="bf16")
    assert ds["train_batch_size"] == t.micro_batch * 4 * 2
    assert ds["gradient_accumulation_steps"] == 4 and ds["gradient_clipping"] == t.grad_clip
    # ZeRO 2 with MoE parameter groups needs both (DeepSpeed asserts on them).
    assert ds["zero_optimization"] == {
        "stage": 2, "contiguous_gradients": True, "reduce_scatter": True, "overlap_comm": False,
    }  # fmt: skip
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert engine_config(load_config("tiny").train, 1, "fp32")["torch_autocast"]["enabled"] is False


def test_schedule_warms_up_then_decays_to_the_floor():
    f = lr_lambda(StageConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1))
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.1)
    assert f(55) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(f(s) >= f(s + 1) for s in range(10, 100))


def test_stage_selection_and_global_steps():
    t = load_config("tiny").train
    assert recipe.select(t, None) == ["align", "joint", "sft", "edit"]
    assert recipe.select(t, 3) == ["sft"]
    with pytest.raises(UniloomError, match="stages 1..4"):
        recipe.select(t, 5)
    steps = [s.steps for s in t.stages.values()]
    assert recipe.global_step(t, "sft", 2) == steps[0] + steps[1] + 2


JOB = {"image_tokenizer": "img", "text_tokenizer": "txt"}


def meta(stage: str, step: int, **kw) -> dict:
    return {"stage": stage, "step": step, "recipe": ["align", "joint", "sft", "edit"], "losses": [[1, stage, 2.0]],
            "world": 2, "resumes": [], **JOB, **kw}  # fmt: skip


def test_resume_plans():
    t = load_config("tiny", overrides=["train.stages.align.steps=10", "train.stages.joint.steps=20"]).train
    names = list(t.stages)
    assert recipe.plan_resume(t, names, None, JOB).todo == names
    with pytest.raises(UniloomError, match=r"stage 2 \(joint\) starts from the end of stage 1"):
        recipe.plan_resume(t, ["joint"], None, JOB)
    mid = recipe.plan_resume(t, names, meta("joint", 5), JOB)
    assert (mid.todo, mid.mid_stage, mid.step, mid.losses) == (names[1:], True, 5, [[1, "joint", 2.0]])
    nxt = recipe.plan_resume(t, ["sft"], meta("joint", 20), JOB)
    assert (nxt.todo, nxt.mid_stage, nxt.step) == (["sft"], False, 0)
    # A finished stage whose step count was raised continues, optimizer and all.
    longer = load_config("tiny", overrides=["train.stages.align.steps=30"]).train
    assert recipe.plan_resume(longer, ["align"], meta("align", 10), JOB).mid_stage
    assert recipe.plan_resume(t, ["align"], meta("sft", 3), JOB).todo == []
    with pytest.raises(UniloomError, match=r"the run stands at stage 2 \(joint\)"):
        recipe.plan_resume(t, ["sft"], meta("align", 10), JOB)
    with pytest.raises(UniloomError, match="trained on shards of image tokenizer other"):
        recipe.plan_resume(t, names, meta("joint", 5, image_tokenizer="other"), JOB)


def test_each_worker_of_a_node_gets_its_own_cores():
    from uniloom.pipelines.train.loop import core_slice

    cores = [0, 1, 2, 3, 4, 5, 6, 7]
    assert [core_slice(cores, r, 2) for r in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [core_slice(cores, r, 3) for r in range(3)] == [[0, 1], [2, 3], [4, 5]]  # 6, 7 float free
    assert core_slice([0, 1], 1, 2) == [1]
    assert core_slice([0, 1], 2, 3) == [0, 1]  # more workers than cores: no binding


def test_expert_rank_load_is_the_busiest_ranks_share_over_the_mean():
    import torch

    from uniloom.pipelines.train.bench import expert_rank_load

    even = torch.full((3, 2, 8), 10.0)
    assert expert_rank_load(even, 2) == pytest.approx(1.0)
    assert expert_rank_load(even, 1) == pytest.approx(1.0)  # one rank holds every expert
    skewed = torch.zeros(1, 2, 8)
    skewed[0, 0, :4] = 10.0  # layer 0: everything on rank 0's experts
    skewed[0, 1] = torch.tensor([30.0, 0, 0, 0, 10, 0, 0, 0])  # layer 1: 3 to 1
    assert expert_rank_load(skewed, 2) == pytest.approx((2.0 + 1.5) / 2)
