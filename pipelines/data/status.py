"""`uniloom data status`: what a rerun would do, without doing it (no Ray, no writes)."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

from uniloom.pipelines.config import UniloomConfig, build
from uniloom.pipelines.data.config import DataConfig
from uniloom.pipelines.data.manifest import Manifest
from uniloom.pipelines.data.runner import prepare_run
from uniloom.pipelines.errors import UniloomError
from uniloom.pipelines.tokenizer.kinds import KINDS


def recorded_config(cfg: UniloomConfig, recorded: dict[str, Any]) -> UniloomConfig:
    """`cfg` with the data and tokenizer sections the last run used (storage options,
    never recorded, stay those of `cfg`; a run before the kinds recorded MingTok's)."""
    data = build(DataConfig, {**recorded["data"], "storage_options": cfg.data.storage_options}, "data")
    kind = KINDS[recorded.get("kind", "mingtok")]
    tok_cfg = build(kind.config_cls, recorded[kind.name], kind.name)
    tokenizer = dataclasses.replace(cfg.tokenizer, kind=kind.name)
    return dataclasses.replace(cfg, data=data, tokenizer=tokenizer, **{kind.name: tok_cfg})


def status(output: str, inputs: list[str], cfg: UniloomConfig, use_recorded: bool = True) -> dict[str, Any]:
    manifest = Manifest.load(output, cfg.data.storage_options)
    if "inputs" not in manifest.data:
        raise UniloomError(
            f"{manifest.uri} has no data manifest: run `uniloom data run --output {output}` first"
        )
    if use_recorded and "config" in manifest.data:
        cfg = recorded_config(cfg, manifest.data["config"])
    state = prepare_run(cfg, inputs or manifest.data["inputs"], output, train=False)
    p = state["plan"]
    states = p.states()
    details = {
        sid: {"state": s, "reason": p.reasons.get(sid), "rows": manifest.shards.get(sid, {}).get("rows")}
        for sid, s in sorted(states.items())
    }
    totals: dict[str, Any] = {"read": 0, "written": 0, "quarantined": 0, "filtered": Counter()}
    for entry in manifest.shards.values():
        for key in ("read", "written", "quarantined"):
            totals[key] += entry["rows"][key]
        totals["filtered"].update(entry["rows"]["filtered"])
    totals["filtered"] = dict(sorted(totals["filtered"].items()))
    counts = Counter(states.values())
    return {
        "output": manifest.uri,
        "shards": {k: counts.get(k, 0) for k in ("done", "stale", "missing", "orphaned")},
        "rows": totals,
        "text_tokenizer": state["stage"].text_tokenizer,
        "image_tokenizer": state["stage"].image_tokenizer,
        "details": details,
    }
