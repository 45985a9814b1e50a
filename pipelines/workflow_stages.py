"""The stages of `uniloom run`, in order, each a thin call into the module that owns it."""

from __future__ import annotations

from pathlib import Path

from uniloom.pipelines.config import UniloomConfig
from uniloom.pipelines.workflow import Stage, StageResult


def _corpus(cfg: UniloomConfig, _: dict[str, StageResult]) -> StageResult:
    from uniloom.pipelines.corpus.synth import synthesize, write_photos

    root = Path(cfg.workspace).resolve()
    shards = synthesize(cfg.corpus, root / "corpus")
    photos = write_photos(root / "photos")
    return StageResult(
        outputs={"corpus": str(shards[0].parent), "photos": str(photos)},
        metrics={"corpus_samples": float(cfg.corpus.num), "corpus_shards": float(len(shards))},
    )


def workflow_stages() -> list[Stage]:
    return [
        Stage("corpus", ("corpus",), _corpus, description="synthesise the compositional corpus and photos"),
    ]
