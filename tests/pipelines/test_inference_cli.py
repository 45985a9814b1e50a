"""`uniloom generate` / `uniloom edit` / `uniloom eval` refuse bad input with one clear line."""

import pytest


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "  ", "--model", "x.safetensors"], "the prompt is empty"),
        (["generate", "a red circle", "--model", "/nonexistent/model.safetensors"], "unknown model"),
        (["eval", "--model", "/nonexistent/model.safetensors"], "unknown model"),
        (["generate", "a red circle", "--num", "0"], "--num must be at least 1"),
    ],
)
def test_inference_commands_reject_bad_input(cli, tmp_path, args, message):
    out = cli(*args, "--set", f"workspace={tmp_path}")
    assert out.returncode != 0
    assert message in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_unknown_registry_model_is_a_clear_error(cli, tmp_path):
    out = cli(
        "generate",
        "a red circle",
        "--model",
        "models:/uniloom-univision@champion",
        "--set",
        f"workspace={tmp_path}",
    )
    assert out.returncode != 0 and "cannot load model models:/uniloom-univision@champion" in out.stderr


def test_edit_rejects_empty_instruction_and_non_images(cli, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    empty = cli("edit", str(bad), "--instruction", " ", "--set", f"workspace={tmp_path}")
    assert empty.returncode != 0 and "an --instruction is empty" in empty.stderr
