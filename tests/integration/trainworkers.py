"""Worker functions for tests/integration/test_train_parallel.py, run by
torch.multiprocessing.spawn as gloo process groups (importable by name in the children)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from uniloom.models import sequence
from uniloom.models.mingtok import MingTokConfig
from uniloom.models.univision import UniVisionConfig
from uniloom.pipelines.config import UniloomConfig

MODEL = UniVisionConfig(
    vocab_size=64, hidden=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, num_experts=4,
    experts_per_token=2, expert_ffn=32, num_shared_experts=1, semantic_dim=64, flow_width=32, flow_depth=1,
    init_std=0.02,
)  # fmt: skip
MINGTOK = MingTokConfig(
    image_size=16, patch_size=8, pix_patch_size=4, enc_width=64, enc_depth=1, enc_heads=2, sem_width=64,
    sem_depth=1, sem_heads=2, pix_width=32, pix_depth=1, pix_heads=2,
)  # fmt: skip


def init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def batch(seed: int) -> sequence.Batch:
    """Every task kind in one packed batch (4 image latents per image)."""
    g = torch.Generator().manual_seed(seed)
    latents = lambda: torch.randn(4, 32, generator=g)  # noqa: E731
    samples = [
        sequence.text_to_image([10, 11, 12], latents()),
        sequence.understanding(latents(), [13, 14], [15, 16]),
        sequence.text_only([20, 21, 22, 23]),
        sequence.editing(latents(), [([30, 31], latents())]),
    ]
    return sequence.pack(samples, 40)


def config(zero: int) -> UniloomConfig:
    cfg = UniloomConfig(model=MODEL, mingtok=MINGTOK)
    cfg.train.zero_stage = zero
    cfg.train.stages = {"joint": cfg.train.stages["joint"]}
    cfg.train.stages["joint"].lr = 1e-2
    return cfg


def parity(rank: int, world: int, port: int) -> None:
    """Expert-parallel layers compute what the single-device model computes, without and
    with shadow experts (then every layer must have lent at least one expert)."""
    init(rank, world, port)
    for shadow_min_slots in (0, 1):
        _parity(rank, world, shadow_min_slots)
    dist.barrier()
    dist.destroy_process_group()  # not at interpreter exit, where gloo's threads may abort


def _parity(rank: int, world: int, shadow_min_slots: int) -> None:
    from uniloom.pipelines.train.expert_parallel import parallelize
    from uniloom.pipelines.train.module import Trainee

    torch.manual_seed(0)
    sharded = Trainee(MODEL, MINGTOK)
    torch.manual_seed(0)
    whole = Trainee(MODEL, MINGTOK)
    parallelize(sharded, world, shadow_min_slots)
    b = batch(rank)  # each rank its own tokens: the all-to-all really moves them

    def hidden(m):
        f = m.features(b.image_latents)
        return m.model(
            b.input_ids, f, b.image_mask, position_ids_BT=b.position_ids, doc_ids_BT=b.doc_ids
        ).hidden

    h_sharded, h_whole = hidden(sharded), hidden(whole)
    assert torch.equal(h_sharded, h_whole), (h_sharded - h_whole).abs().max()
    if shadow_min_slots:
        lent = torch.tensor([layer.moe.experts.shadowed_slots for layer in sharded.model.layers])
        dist.all_reduce(lent)
        assert (lent > 0).all(), lent
    h_sharded.square().sum().backward()
    h_whole.square().sum().backward()
    for layer_s, layer_w in zip(sharded.model.layers, whole.model.layers):
        ep = layer_s.moe.experts
        assert ep.w1_EFD.shape[0] == MODEL.num_experts // world and ep.w1_EFD.allreduce is False
        for name in ("w1_EFD", "w2_EDF", "w3_EFD"):
            full = getattr(layer_w.moe.experts, name).grad.clone()
            dist.all_reduce(full)  # the whole model's gradient from every rank's tokens
            local, grad = full[ep.offset : ep.offset + ep.num_local], getattr(ep, name).grad
            assert torch.allclose(grad, local, atol=1e-6), (name, (grad - local).abs().max())
        assert torch.allclose(layer_s.attn.wq.weight.grad, layer_w.attn.wq.weight.grad, atol=1e-6)


def _engine(cfg: UniloomConfig, world: int, weights: str, reader=None):
    from uniloom.pipelines.train import checkpoint as ckpt
    from uniloom.pipelines.train.expert_parallel import effective_ep
    from uniloom.pipelines.train.loop import build_engine

    ep = effective_ep(cfg.train.expert_parallel, world, MODEL.num_experts)
    engine, trainee = build_engine(cfg, "joint", world, ep, reader, {"tokenizer_weights": weights})
    if reader is not None:
        ckpt.load_optimizer(engine, trainee, reader)
    return engine, trainee, ep


def _steps(engine, rank: int, seeds) -> list[float]:
    from uniloom.pipelines.train.loop import backward_and_step

    out = []
    for s in seeds:
        torch.manual_seed(1000 + s)  # the flow loss's noise, as the loop fixes it per step
        loss = engine(batch(10 * s + rank)).total
        backward_and_step(engine, loss)
        out.append(loss.item())
    return out


def save_then_continue(rank: int, world: int, port: int, zero: int, folder: str) -> None:
    """3 steps, checkpoint, 2 more steps (the uninterrupted reference)."""
    init(rank, world, port)
    from uniloom.pipelines.train import checkpoint as ckpt

    engine, trainee, ep = _engine(config(zero), world, f"{folder}/mingtok.safetensors")
    _steps(engine, rank, range(3))
    meta = {"world": world, "ep": ep} if rank == 0 else None
    ckpt.save(engine, trainee, f"{folder}/ckpt", rank, ep, {"epoch": 0, "rows": 10 + rank}, meta)
    dist.barrier()
    Path(f"{folder}/continued-{world}-{rank}.json").write_text(json.dumps(_steps(engine, rank, range(3, 5))))


def resume(rank: int, world: int, port: int, zero: int, folder: str) -> None:
    """Load the checkpoint (any world size) and take the same 2 steps."""
    init(rank, world, port)
    from uniloom.pipelines.train import checkpoint as ckpt

    reader = ckpt.Reader(f"{folder}/ckpt")
    engine, trainee, _ = _engine(config(zero), world, f"{folder}/mingtok.safetensors", reader)
    for name, p in trainee.named_parameters():
        local = ckpt._local(p, reader.full(name), reader.shapes[name])
        assert torch.equal(p.detach(), local), name
    losses = _steps(engine, rank, range(3, 5))
    position = reader.position(rank, world)
    Path(f"{folder}/resumed-{world}-{rank}.json").write_text(
        json.dumps({"losses": losses, "position": position})
    )
