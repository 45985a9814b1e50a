"""`uniloom train` refuses bad requests with one line naming what to fix, before any
training (no Ray is started for these)."""

from uniloom.models.mingtok_config import MingTokConfig
from uniloom.pipelines.data.image_tokenizer import save_random_weights

SMALL = MingTokConfig(
    image_size=32, patch_size=8, enc_width=64, enc_heads=2, enc_depth=1, sem_width=64, sem_heads=2,
    sem_depth=1, pix_width=64, pix_heads=2, pix_depth=1, pix_patch_size=4,
)  # fmt: skip


def test_bad_requests_fail_with_one_clear_line(cli, tmp_path):
    weights = save_random_weights(SMALL, str(tmp_path / "mingtok.safetensors"))
    base = ("train", "--set", f"workspace={tmp_path}", "--set", f"data.tokenizer_weights={weights}")
    cases = [
        ((*base, "--stage", "9"), "--stage 9: the recipe has stages 1..4 (align, joint, sft, edit)"),
        ((*base, "--stage", "1", "--recipe"), "--stage and --recipe exclude each other"),
        ((*base, "--set", "model.semantic_dim=96"), "does not match the model (semantic 96, latent 32)"),
        ((*base, "--set", "model.semantic_dim=64"), "make the shards with `uniloom data run --output"),
    ]
    for args, message in cases:
        result = cli(*args, cwd=tmp_path, timeout=120)
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
        assert message in result.stderr.strip().splitlines()[-1], (args, result.stderr)
    assert not (tmp_path / "ray_results").exists()
