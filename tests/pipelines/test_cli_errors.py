"""No command ends in a traceback on a user's mistake: every command (`uniloom --help` and
its groups' subcommands) is walked with a missing input file, and some with a wrong file, a
bad URI or a wrong config key; each must exit non-zero with one line naming the problem.
In this process (main(), as the console script runs it): only argument checks run, so
nothing here needs a server or a subprocess."""

import click
import numpy as np
import pytest
from PIL import Image

from uniloom.models.mingtok_config import MingTokConfig
from uniloom.pipelines.cli import cli
from uniloom.pipelines.data.image_tokenizer import save_random_weights

SMALL = MingTokConfig(image_size=32, patch_size=8, enc_width=64, enc_heads=2, enc_depth=1, sem_width=64,
                      sem_heads=2, sem_depth=1, pix_width=64, pix_heads=2, pix_depth=1, pix_patch_size=4)  # fmt: skip

# Per command, argument lists that each name one missing input ({m}: a path that does not
# exist, {ws}: an empty workspace, {weights}: a real MingTok file, {image}: a real PNG),
# and the path the error must name.
MISSING = {
    "bench data": [(["--config", "{m}.yaml"], "{m}.yaml")],
    "bench kernels": [(["--config", "{m}.yaml"], "{m}.yaml")],
    "bench tokenizer": [(["--config", "{m}.yaml"], "{m}.yaml")],
    "bench tokenizers": [(["--config", "{m}.yaml"], "{m}.yaml"), (["--corpus", "{m}"], "{m}")],
    "bench train": [(["--config", "{m}.yaml"], "{m}.yaml")],
    "corpus photos": [(["--out", "{image}/photos"], "{image}/photos")],  # no input: an output under a file
    "corpus synth": [(["--out", "{ws}/corpus", "--config", "{m}.yaml"], "{m}.yaml")],
    "data run": [
        (["--input", "{m}", "--output", "{ws}/out", "--set", "data.tokenizer_weights={weights}"], "{m}"),
        (["--input", "{ws}", "--output", "{ws}/out", "--set", "data.tokenizer_weights={m}.st"], "{m}.st"),
    ],
    "data status": [(["{m}"], "{m}")],
    "edit": [
        (["{m}.png", "--instruction", "x"], "{m}.png"),
        (["{image}", "--instruction", "x", "--model", "{m}.safetensors"], "{m}.safetensors"),
    ],
    "eval": [(["--model", "{m}.safetensors"], "{m}.safetensors")],
    "generate": [(["a red circle", "--model", "{m}.safetensors"], "{m}.safetensors")],
    "model info": [(["--config", "{m}.yaml"], "{m}.yaml")],
    "run": [(["--config", "{m}.yaml"], "{m}.yaml")],
    "submit": [
        (
            ["--address", "http://127.0.0.1:9", "--runtime-env", "{m}.yaml", "--", "data", "status", "x"],
            "{m}.yaml",
        ),
        (["--address", "http://127.0.0.1:9", "--token-path", "{m}", "--", "data", "status", "x"], "{m}"),
    ],  # fmt: skip
    "tokenizer eval": [(["--weights", "{m}.safetensors"], "{m}.safetensors")],
    "tokenizer reconstruct": [
        (["{m}.png", "--out", "{ws}/r", "--weights", "{weights}"], "{m}.png"),
        (["{image}", "--out", "{ws}/r", "--weights", "{m}.safetensors"], "{m}.safetensors"),
    ],
    "tokenizer train": [(["--corpus", "{m}"], "{m}")],
    "train": [
        (["--set", "data.tokenizer_weights={m}.safetensors"], "{m}.safetensors"),
        (
            [
                "--set",
                "train.shards={m}",
                "--set",
                "data.tokenizer_weights={weights}",
                "--set",
                f"model.semantic_dim={SMALL.sem_width}",
            ],
            "{m}",
        ),
    ],  # fmt: skip
    "ui": [(["--workspace", "{m}"], "{m}")],
}

# A wrong file, a bad URI, a wrong config key: (arguments, what the one line must say).
WRONG = [
    (["generate", "x", "--model", "{text}"], "{text}: not a safetensors file"),
    (["eval", "--model", "{weights}"], "{weights}: not a uniloom-univision export"),
    (["tokenizer", "eval", "--weights", "{text}"], "{text}: not a tokenizer weights file"),
    (["train", "--config", "{weights}"], "config file {weights}: not a text file"),
    (["submit", "--address", "http://127.0.0.1:9", "--runtime-env", "{weights}", "--", "x"], "{weights}: not a YAML"),
    (["eval", "--set", "tracking.tracking_uri=sqllite:///x.db"], "unknown scheme 'sqllite:'"),
    (["data", "run", "--input", "s4://bucket/x", "--output", "{ws}/out", "--set", "data.tokenizer_weights={weights}"],
     "cannot open s4://bucket/x"),
    (["train", "--set", "train.nope=1"], "unknown config key 'train.nope'"),
    (["run", "--workspace", "s3://bucket/ws"], "workspace s3://bucket/ws is remote, but no MLflow tracking server is given"),
    (["run", "--workspace", "s3://bucket/ws", "--set", "tracking.tracking_uri=sqlite:///{ws}/mlflow.db"],
     "workspace s3://bucket/ws is remote, but the MLflow store sqlite:///{ws}/mlflow.db is a file on this node"),
    (["ui", "--preset", "nope"], "unknown preset 'nope'"),
]  # fmt: skip


def leaf_commands(group: click.Group, prefix: tuple[str, ...] = ()) -> dict[str, click.Command]:
    out = {}
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            out.update(leaf_commands(command, (*prefix, name)))
        else:
            out[" ".join((*prefix, name))] = command
    return out


def _has_config(command: str) -> bool:
    found = leaf_commands(cli).get(command)  # a command gone is test_every_command_is_walked's
    return found is not None and any("--config" in p.opts for p in found.params)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-errors")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "image.png")
    (root / "notes.txt").write_text("not a model\n")
    return {
        "m": str(root / "missing" / "input"),
        "weights": save_random_weights(SMALL, str(root / "mingtok.safetensors")),
        "image": str(root / "image.png"),
        "text": str(root / "notes.txt"),
        "root": root,
    }


@pytest.fixture
def run(paths, tmp_path, monkeypatch, uniloom_main):
    """`uniloom ARGS` in an empty working folder with an empty workspace: the one error line."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def fill(text: str) -> str:
        return text.format(**paths, ws=tmp_path / "ws")

    def go(command: str, args: list[str]) -> tuple[str, dict]:
        argv = [*command.split(), *map(fill, args)]
        if _has_config(command):
            argv += ["--set", f"workspace={tmp_path / 'ws'}"]
        code, _, err = uniloom_main(*argv)
        assert code not in (0, None) and "Traceback" not in err, (argv, err)
        # The precision notice is printed once per process, by whichever command in this
        # test process first resolves "auto" (in the full suite that was `train`'s case).
        lines = [line for line in err.strip().splitlines() if not line.startswith("precision auto -> ")]
        assert len(lines) == 1 and lines[0].startswith("error"), (argv, err)
        return lines[0], fill

    return go


def test_every_command_is_walked():
    assert set(MISSING) == set(leaf_commands(cli)), "give each new command its missing-input cases"


@pytest.mark.parametrize("command", sorted(MISSING))
def test_a_missing_input_is_one_line_naming_it(command, run):
    for args, named in MISSING[command]:
        line, fill = run(command, args)
        assert fill(named) in line, line


@pytest.mark.parametrize("command", sorted(c for c in MISSING if _has_config(c)))
def test_a_missing_config_file_is_one_line_naming_it(command, run):
    """The config loads before any input is read: its error comes first."""
    args = [*MISSING[command][-1][0], "--config", "{m}.yaml"]  # the last case parses
    line, fill = run(command, args)
    assert f"config file {fill('{m}.yaml')} does not exist" in line


@pytest.mark.parametrize(("args", "says"), WRONG, ids=[" ".join(a[:2]) for a, _ in WRONG])
def test_a_wrong_file_uri_or_key_is_one_line_saying_so(args, says, run):
    command = args[0] if args[0] not in ("tokenizer", "data") else " ".join(args[:2])
    rest = args[len(command.split()) :]
    line, fill = run(command, rest)
    assert fill(says) in line, line
