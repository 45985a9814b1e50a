import pytest

from uniloom.pipelines.config import flatten, load_config, parse_override, preset_names, to_dict
from uniloom.pipelines.errors import ConfigError


def test_presets_load_and_fill_every_section():
    assert {"tiny", "paper"} <= set(preset_names())
    tiny, paper = load_config("tiny"), load_config("paper")
    assert tiny.preset == "tiny" and paper.preset == "paper"
    assert tiny.corpus.size == 64 and paper.corpus.size == 512


def test_small_extends_tiny_key_by_key():
    tiny, small = load_config("tiny"), load_config("small")
    assert small.preset == "small" and small.mingtok == tiny.mingtok and small.model == tiny.model
    assert (small.corpus.num, small.corpus.size, small.tokenizer.steps) == (12000, 64, 2000)
    # a stage's mapping merges over tiny's: new steps, tiny's mix and trainable parts
    assert small.train.stages["joint"].steps == 2500
    assert small.train.stages["joint"].mix == tiny.train.stages["joint"].mix
    assert small.eval.scenes >= 500


def test_a_preset_cycle_is_refused(monkeypatch):
    from uniloom.pipelines import config

    texts = {"a": "extends: b\n", "b": "extends: a\n"}
    monkeypatch.setattr(config, "preset_names", lambda: ["a", "b"])
    monkeypatch.setattr(config, "_preset_text", lambda name: texts[name])
    with pytest.raises(ConfigError, match="preset 'b' extends 'a', which extends it back"):
        load_config("a")


def test_override_precedence_file_then_set(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("corpus:\n  num: 10\n  seed: 3\n")
    cfg = load_config("tiny", f, ["corpus.num=7", "tracking.experiment=exp-a"])
    assert (cfg.corpus.num, cfg.corpus.seed, cfg.tracking.experiment) == (7, 3, "exp-a")


@pytest.mark.parametrize(
    "override, message",
    [
        ("corpus.nmu=3", "unknown config key 'corpus.nmu'"),
        ("nosection.x=1", "unknown config key 'nosection'"),
        ("corpus.num=abc", "config key 'corpus.num': expected int"),
        ("corpus.num=true", "config key 'corpus.num': expected int"),
        ("corpus=5", "config key 'corpus': expected a mapping"),
        ("corpus.num", "is not of the form key.path=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("tiny", overrides=[override])


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        load_config("huge")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("tiny", tmp_path / "missing.yaml")


def test_override_values_are_yaml_typed():
    assert parse_override("a.b=1.5") == {"a": {"b": 1.5}}
    assert parse_override("a=[1, 2]") == {"a": [1, 2]}
    assert load_config("tiny", overrides=["tokenizer.lr=3e-3"]).tokenizer.lr == 0.003  # YAML: a string
    assert load_config("tiny", overrides=["tokenizer.lr=1E+2"]).tokenizer.lr == 100.0
    with pytest.raises(ConfigError, match="expected float"):
        load_config("tiny", overrides=["tokenizer.lr=3e"])
    flat = flatten(to_dict(load_config("tiny")))
    assert flat["corpus.num"] == 2000 and "tracking.experiment" in flat


def test_the_tokenizer_kind_is_the_one_source_of_the_models_image_kind():
    for kind in ("mingtok", "unitok", "tuna"):
        cfg = load_config("tiny", overrides=[f"tokenizer.kind={kind}"])
        assert cfg.model.image_kind == kind
        assert (cfg.model.num_codebooks, cfg.model.codebook_size) == (8, 256)  # the unitok section's
        assert cfg.tuna.llm_width == cfg.model.hidden
        assert cfg.model.text_loss_weight == (0.2 if kind == "tuna" else 1.0)  # TUNA's paper weights
    tuna = load_config("tiny", overrides=["tokenizer.kind=tuna", "model.text_loss_weight=0.5"])
    assert tuna.model.text_loss_weight == 0.5  # the user's setting wins over the kind's default
    with pytest.raises(ConfigError, match="'model.image_kind' follows tokenizer.kind"):
        load_config("tiny", overrides=["model.image_kind=unitok"])
    with pytest.raises(ConfigError, match="'tuna.llm_width' follows model.hidden"):
        load_config("tiny", overrides=["tuna.llm_width=64"])
    with pytest.raises(ConfigError, match="config section 'tuna'.*not divisible"):
        load_config("tiny", overrides=["model.hidden=130", "model.head_dim=26"])  # 130 / 4 velocity heads
