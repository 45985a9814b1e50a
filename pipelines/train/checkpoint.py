"""Checkpoints that every rank writes and any number of ranks can read back.

Each rank writes only what it holds, straight from DeepSpeed's fragments (no gather):

    rank-NNNNN.safetensors   flat fp32 pieces "<kind>:<param>:<start>", kind in
                             fp32 | exp_avg | exp_avg_sq | ema, start = offset in the FULL
                             parameter, flattened (an expert slice starts at its first row)
    rank-NNNNN.json          the rank's piece index and its data position
    meta.json (rank 0)       full shapes, stage, step, optimizer step, schedule, loss
                             curve, fingerprints, MLflow run id, world and ep sizes

ZeRO 1/2 (and DeepSpeed's bf16 optimizer) give each trainable parameter an `_hp_mapping`:
the slice of it whose fp32 master and Adam moments this rank owns. Frozen parameters,
buffers and ZeRO-0 parameters are written whole by the rank that owns the copy (rank 0;
for experts the ranks of the first expert-parallel group), and so is the weight EMA
(ema.py), which every rank keeps whole for the parameters it holds. A reader assembles a full
parameter from all pieces and takes what its own layout needs, so a checkpoint written by
2 workers resumes on 1 (or with another expert-parallel size): DeepSpeed's universal
checkpoint idea, without pickles: loading never unpickles anything (safetensors + JSON).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from uniloom.pipelines.errors import UniloomError

STATE_KINDS = ("exp_avg", "exp_avg_sq")
META = "meta.json"


def _rank_file(rank: int, suffix: str) -> str:
    return f"rank-{rank:05d}{suffix}"


def full_shape(p: torch.Tensor) -> list[int]:
    rows = getattr(p, "expert_rows", None)
    return [rows[1], *p.shape[1:]] if rows else list(p.shape)


def global_base(p: torch.Tensor) -> int:
    """Flat offset of this rank's tensor inside the full parameter (expert slices)."""
    rows = getattr(p, "expert_rows", None)
    return rows[0] * (p.numel() // p.shape[0]) if rows else 0


def _owns_whole(p: torch.Tensor, rank: int, ep: int) -> bool:
    """Who writes a tensor that every copy holds whole: rank 0, or for expert slices
    the first expert-parallel group (ranks 0..ep-1 hold distinct slices)."""
    return rank < ep if getattr(p, "expert_rows", None) else rank == 0


def _tensors(module: torch.nn.Module):
    yield from module.named_parameters()
    yield from ((n, b) for n, b in module.named_buffers() if b is not None)


# ----------------------------------------------------------------------------- save


def save(engine, module: torch.nn.Module, directory: str | Path, rank: int, ep: int,
         position: dict[str, int], meta: dict[str, Any] | None,
         ema: dict[str, torch.Tensor] | None = None) -> None:  # fmt: skip
    """Write this rank's files into `directory` (rank 0 adds meta.json); `ema` maps
    parameter names to their weight EMA (ema.py), in this rank's layout."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    base_opt = getattr(engine, "basic_optimizer", None) if engine is not None else None
    pieces: dict[str, torch.Tensor] = {}
    index: list[dict[str, Any]] = []

    def add(name: str, start: int, values: dict[str, torch.Tensor]) -> None:
        kinds = []
        for kind, v in values.items():
            pieces[f"{kind}:{name}:{start}"] = v.detach().float().flatten().to("cpu", copy=True)
            kinds.append(kind)
        index.append(
            {"name": name, "start": start, "numel": int(next(iter(values.values())).numel()), "kinds": kinds}
        )

    fragments = _zero_fragments(engine)
    for name, p in _tensors(module):
        if ema is not None and name in ema and _owns_whole(p, rank, ep):
            add(name, global_base(p), {"ema": ema[name]})
        mapping = getattr(p, "_hp_mapping", False)
        if mapping is None:
            continue  # a ZeRO partition owned by another rank
        if mapping is not False:
            add(name, global_base(p) + mapping.lp_fragment_address.start, fragments[p])
        elif _owns_whole(p, rank, ep):
            values = {"fp32": p}
            state = (
                base_opt.state.get(p, {})
                if base_opt is not None and isinstance(p, torch.nn.Parameter)
                else {}
            )
            values |= {k: state[k] for k in STATE_KINDS if k in state}
            add(name, global_base(p), values)
    save_file(pieces, str(directory / _rank_file(rank, ".safetensors")))
    (directory / _rank_file(rank, ".json")).write_text(json.dumps({"pieces": index, "position": position}))
    if meta is not None:
        shapes = {name: full_shape(p) for name, p in _tensors(module)}
        meta = {**meta, "shapes": shapes, "optimizer_step": optimizer_step(base_opt)}
        if engine is not None and engine.lr_scheduler is not None:
            meta["scheduler"] = engine.lr_scheduler.state_dict()  # LambdaLR: numbers only
            meta["engine_steps"] = [engine.global_steps, engine.global_samples]
        (directory / META).write_text(json.dumps(meta, indent=1, sort_keys=True))


def _zero_groups(engine):
    """(lp params, flat fp32 partition) per optimizer group under ZeRO 1/2, else None."""
    zero = getattr(engine, "optimizer", None)
    if zero is None or not hasattr(zero, "bit16_groups"):
        return None
    return list(zip(zero.bit16_groups, zero.single_partition_of_fp32_groups))


def _zero_fragments(engine) -> dict[torch.Tensor, dict[str, torch.Tensor]]:
    """This rank's fp32 master and Adam moments of each ZeRO parameter fragment, read
    from the flat partition's optimizer state (DeepSpeed's own optim_fragment links are
    only set for the first group)."""
    out: dict[torch.Tensor, dict[str, torch.Tensor]] = {}
    for lps, hp in _zero_groups(engine) or []:
        state = engine.basic_optimizer.state.get(hp, {})
        for lp in lps:
            m = lp._hp_mapping
            if m is not None:
                a, n = m.hp_fragment_address.start, m.hp_fragment_address.numel
                out[lp] = {
                    "fp32": m.hp_fragment,
                    **{k: state[k].narrow(0, a, n) for k in STATE_KINDS if k in state},
                }
    return out


def optimizer_step(base_opt) -> float:
    for state in base_opt.state.values() if base_opt is not None else []:
        if "step" in state:
            return float(state["step"])
    return 0.0


# ----------------------------------------------------------------------------- read


class Reader:
    """Full parameters (fp32 and Adam moments) assembled from every rank's pieces."""

    def __init__(self, directory: str | Path):
        from safetensors import safe_open

        self.dir = Path(directory)
        if not (self.dir / META).is_file():
            raise UniloomError(f"{self.dir} is not a uniloom training checkpoint (no {META})")
        self.meta = json.loads((self.dir / META).read_text())
        self.files = sorted(self.dir.glob("rank-*.safetensors"))
        if len(self.files) != self.meta["world"]:
            raise UniloomError(f"{self.dir}: {len(self.files)} rank files, expected {self.meta['world']}")
        self.handles = [safe_open(str(f), framework="pt") for f in self.files]
        self.ranks = [json.loads(f.with_suffix(".json").read_text()) for f in self.files]
        self.pieces: dict[str, list[tuple[int, int, dict]]] = {}
        for i, r in enumerate(self.ranks):
            for piece in r["pieces"]:
                self.pieces.setdefault(piece["name"], []).append((i, piece["start"], piece))

    @property
    def shapes(self) -> dict[str, list[int]]:
        return self.meta["shapes"]

    def has(self, name: str, kind: str) -> bool:
        return any(kind in piece["kinds"] for _, _, piece in self.pieces.get(name, []))

    def full(self, name: str, kind: str = "fp32") -> torch.Tensor:
        """The whole flattened tensor `name` of `kind`; every element must be covered."""
        shape = self.shapes.get(name)
        if shape is None:
            raise UniloomError(f"{self.dir}: the checkpoint has no tensor {name}")
        numel = int(torch.Size(shape).numel())
        out = torch.empty(numel, dtype=torch.float32)
        covered = 0
        for i, start, piece in self.pieces.get(name, []):
            if kind in piece["kinds"]:
                out[start : start + piece["numel"]] = self.handles[i].get_tensor(f"{kind}:{name}:{start}")
                covered += piece["numel"]
        if covered != numel:
            raise UniloomError(f"{self.dir}: {kind} of {name} covers {covered} of {numel} values")
        return out

    def position(self, rank: int, world: int) -> dict[str, int]:
        """This rank's data position: its own at the same world size, else the epoch's
        progress shared out evenly."""
        positions = [r["position"] for r in self.ranks]
        if world == len(positions):
            return positions[rank]
        epoch = max(p["epoch"] for p in positions)
        rows = sum(p["rows"] for p in positions if p["epoch"] == epoch)
        return {"epoch": epoch, "rows": rows // world}


def _local(p: torch.Tensor, full: torch.Tensor, shape: list[int]) -> torch.Tensor:
    full = full.view(shape)
    rows = getattr(p, "expert_rows", None)
    if rows:
        if rows[1] != shape[0]:
            raise UniloomError(f"checkpoint has {shape[0]} experts, the model {rows[1]}")
        full = full[rows[0] : rows[0] + p.shape[0]]
    return full


def load_weights(module: torch.nn.Module, reader: Reader) -> None:
    """Every parameter and buffer of `module` (in its own, possibly sharded, layout)."""
    for name, p in _tensors(module):
        shape = reader.shapes.get(name)
        if shape is None:
            raise UniloomError(f"{reader.dir}: no tensor {name} in the checkpoint")
        local = _local(p, reader.full(name), shape)
        if tuple(local.shape) != tuple(p.shape):
            raise UniloomError(
                f"{reader.dir}: {name} has shape {list(local.shape)}, the model {list(p.shape)}"
            )
        with torch.no_grad():
            p.copy_(local)  # onto p's device and dtype


def load_optimizer(engine, module: torch.nn.Module, reader: Reader) -> None:
    """Adam moments, fp32 masters and step count, into an engine built over `module`."""
    base = engine.basic_optimizer
    if "scheduler" in reader.meta:
        engine.lr_scheduler.load_state_dict(reader.meta["scheduler"])
        for group, lr in zip(base.param_groups, engine.lr_scheduler.get_last_lr()):
            group["lr"] = lr  # the next step's rate, as the scheduler had set it
        engine.global_steps, engine.global_samples = reader.meta["engine_steps"]
    step = torch.tensor(float(reader.meta["optimizer_step"]))
    names = {p: n for n, p in module.named_parameters()}
    groups = _zero_groups(engine)
    if groups is None:  # ZeRO 0: the torch optimizer works on the parameters themselves
        for group in base.param_groups:
            for p in group["params"]:
                local = {k: _local(p, reader.full(names[p], k), reader.shapes[names[p]]) for k in STATE_KINDS}
                moments = {k: v.to(p.device, p.dtype, copy=True) for k, v in local.items()}
                base.state[p] = {"step": step.to(p.device, copy=True), **moments}
        return
    for lps, hp in groups:
        state = {"step": step.to(hp.device, copy=True), **{k: torch.zeros_like(hp) for k in STATE_KINDS}}
        for lp in lps:
            m = lp._hp_mapping
            if m is None:
                continue
            a, n = global_base(lp) + m.lp_fragment_address.start, m.lp_fragment_address.numel
            h = m.hp_fragment_address.start
            name = names[lp]
            hp.data[h : h + n] = reader.full(name)[a : a + n]
            for k in STATE_KINDS:
                state[k][h : h + n] = reader.full(name, k)[a : a + n]
        base.state[hp] = state


# ----------------------------------------------------------------------------- export


def export(reader: Reader, out: str | Path, metadata: dict[str, Any]) -> Path:
    """One consolidated safetensors file (every tensor whole, fp32) for inference and the
    registry: the weight EMA wherever the checkpoint has one, else the weights;
    `metadata` (configs, fingerprints) is stored as JSON strings."""
    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: reader.full(name, "ema" if reader.has(name, "ema") else "fp32").view(shape)
        for name, shape in reader.shapes.items()
    }
    tmp = out.with_name(f".{out.name}.tmp")
    save_file(tensors, str(tmp), metadata={k: json.dumps(v) for k, v in metadata.items()})
    os.replace(tmp, out)
    return out
