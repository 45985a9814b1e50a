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
    with shadow experts (then every layer must have lent at least one expert), exchanging
    through gloo and through shared memory."""
    init(rank, world, port)
    for shadow_min_slots in (0, 1):
        for shm in (False, True):
            _parity(rank, world, shadow_min_slots, shm)
    dist.barrier()
    dist.destroy_process_group()  # not at interpreter exit, where gloo's threads may abort


def _parity(rank: int, world: int, shadow_min_slots: int, shm: bool) -> None:
    from uniloom.pipelines.train.expert_parallel import parallelize
    from uniloom.pipelines.train.module import Trainee

    torch.manual_seed(0)
    sharded = Trainee(MODEL, MINGTOK)
    torch.manual_seed(0)
    whole = Trainee(MODEL, MINGTOK)
    parallelize(sharded, world, shadow_min_slots, shm)
    assert (sharded.model.layers[0].moe.experts.channel is not None) == shm
    b = batch(rank)  # each rank its own tokens: the all-to-all really moves them

    def hidden(m):
        f = m.kind.loss_inputs(m.tokenizer, b)["image_features_PD"]
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


def reduction(rank: int, world: int, port: int, folder: str) -> None:
    """ZeRO 0: the shared-memory gradient reduction leaves the weights DeepSpeed's own
    reduction leaves, bit for bit, over three steps."""
    init(rank, world, port)
    weights = {}
    for shm in (False, True):
        cfg = config(0)
        cfg.train.shm_collectives = shm
        engine, trainee, _ = _engine(cfg, world, f"{folder}/mingtok.safetensors")
        assert (engine.uniloom_reduction is not None) == shm and engine.enable_backward_allreduce == (not shm)
        _steps(engine, rank, range(3))
        weights[shm] = {n: p.detach().clone() for n, p in trainee.named_parameters()}
    for name, p in weights[True].items():
        assert torch.equal(p, weights[False][name]), (name, (p - weights[False][name]).abs().max())
    dist.barrier()
    dist.destroy_process_group()


def shm_collectives(rank: int, world: int, port: int) -> None:
    """ShmChannel against gloo on random uneven splits (empty ones too) and sizes that
    make the outboxes grow; no file left in /dev/shm."""
    from uniloom.pipelines.train.shm_comm import SHM_DIR, ShmChannel

    init(rank, world, port)
    ch = ShmChannel.open(dist.group.WORLD, initial_bytes=4096)
    assert ch is not None
    g = torch.Generator().manual_seed(rank)
    for it in range(30):
        splits = torch.randint(
            0, 40 if it % 5 else 4000, (world, world), generator=torch.Generator().manual_seed(it)
        )
        splits[it % world, (it + 1) % world] = 0
        ins, outs = splits[rank].tolist(), splits[:, rank].tolist()
        x = torch.randn(sum(ins), 3, 5, generator=g)
        want, got = torch.empty(sum(outs), 3, 5), torch.empty(sum(outs), 3, 5)
        dist.all_to_all_single(want, x, outs, ins)
        ch.all_to_all_single(got, x, outs, ins)
        assert torch.equal(want, got), it
        parts = [torch.randn(n, generator=g) for n in (1, 7 * it + 3, 5)]
        summed = torch.cat(parts)
        dist.all_reduce(summed)
        ch.all_reduce_(parts)
        assert torch.allclose(torch.cat(parts), summed, atol=1e-5), it
        everyone = [torch.empty_like(summed) for _ in range(world)]
        dist.all_gather(everyone, torch.cat(parts))
        assert all(torch.equal(everyone[0], e) for e in everyone), "ranks disagree"
    assert ch.gens[rank] > 0, "the outbox never grew"
    ch.all_to_all_single(torch.empty(0), torch.empty(0), [0] * world, [0] * world)
    dist.barrier()
    assert not list(SHM_DIR.glob(f"{ch.name}*")), list(SHM_DIR.glob(f"{ch.name}*"))
    dist.destroy_process_group()


def shm_fallback(rank: int, world: int, port: int) -> None:
    """A rank that cannot use shared memory turns the channel off on every rank."""
    from uniloom.pipelines.train import shm_comm

    init(rank, world, port)
    if rank == world - 1:
        shm_comm._supported = lambda: False
    assert shm_comm.ShmChannel.open(dist.group.WORLD) is None
    dist.barrier()
    assert not list(shm_comm.SHM_DIR.glob(f"uniloom-shm-{os.getpid()}-*"))
    dist.destroy_process_group()


def shm_dead_peer(rank: int, world: int, port: int) -> None:
    """A rank that dies (os._exit, as a killed worker) makes the others' next collective
    raise within seconds instead of waiting for it forever."""
    import time

    from uniloom.pipelines.errors import UniloomError
    from uniloom.pipelines.train.shm_comm import ShmChannel

    init(rank, world, port)
    ch = ShmChannel.open(dist.group.WORLD, timeout_s=60)
    dist.barrier()
    if rank == world - 1:
        os._exit(0)
    started = time.monotonic()
    try:
        ch.all_reduce_([torch.ones(4)])
    except UniloomError as e:
        assert "exited" in str(e) and time.monotonic() - started < 10, (str(e), time.monotonic() - started)
    else:
        raise AssertionError("a collective with a dead peer returned")
    os._exit(0)  # gloo's peer is gone: skip its teardown


def flow_balance(rank: int, world: int, port: int) -> None:
    """A flow head balanced over the ranks (through gloo and through shared memory)
    returns each rank's own per-row losses, and the gradients of the conditions and
    (summed over ranks) of the head that the unbalanced heads give. The head's random
    (t, noise) draw is replaced by a fixed t: rows run elsewhere must compare exactly."""
    import copy

    from uniloom.models.flow_head import FlowHead
    from uniloom.pipelines.train import flow_balance, shm_comm

    class FixedTimeHead(FlowHead):
        def loss(self, x0_NC, cond_NZ, batch_mul: int = 1):
            t = torch.full((x0_NC.shape[0],), 0.3)
            return (self.velocity(0.7 * x0_NC, t, cond_NZ) + x0_NC).pow(2).mean(-1)

    init(rank, world, port)
    rows = [40, 0, 5, 9][rank]  # shares of 54 over 4: 14 14 13 13
    for channel in (None, shm_comm.channel(dist.group.WORLD)):
        torch.manual_seed(0)
        local = FixedTimeHead(8, 12, 16, 2, 2.0)
        for p in local.parameters():
            torch.nn.init.normal_(p, std=0.2)
        balanced = copy.deepcopy(local)
        flow_balance.balance(balanced, 1, dist.group.WORLD, channel)
        g = torch.Generator().manual_seed(rank)
        x0, cond = torch.randn(rows, 8, generator=g), torch.randn(rows, 12, generator=g)
        weights = torch.arange(1.0, rows + 1)
        grads = []
        for head in (local, balanced):
            c = cond.clone().requires_grad_()
            loss = head.loss(x0, c)
            (loss * weights).sum().backward()
            grads.append((loss.detach(), c.grad))
        assert torch.allclose(grads[0][0], grads[1][0], atol=1e-5), (grads[0][0] - grads[1][0]).abs().max()
        assert torch.allclose(grads[0][1], grads[1][1], atol=1e-5)
        for (name, p), q in zip(local.named_parameters(), balanced.parameters()):
            summed = torch.stack([p.grad, q.grad])
            dist.all_reduce(summed)
            assert torch.allclose(summed[0], summed[1], atol=1e-4), (
                name,
                (summed[0] - summed[1]).abs().max(),
            )
        moved = torch.tensor([float(bool(q.grad.abs().sum())) for q in balanced.parameters()])
        if rank == 1:  # no rows of its own: its head's gradients are the rows it ran for rank 0
            assert moved.all(), moved
    dist.barrier()
    dist.destroy_process_group()


def shm_stress(rank: int, world: int, port: int) -> None:
    """Many small collectives on two channels, of random kinds, widths and splits (empty
    splits and empty tensors too, and now and then one that grows the outboxes), each
    rank pausing (sleep or sched_yield) at its own random points, and checking its peers'
    liveness and order at every poll: every result exact, nothing raised, no hang. A rank's
    data is a function of (rank, call), so each knows what it must receive."""
    import random
    import time

    from uniloom.pipelines.train import shm_comm

    init(rank, world, port)
    shm_comm.LIVENESS_S = 0.0  # the liveness and order checks at every poll, not once a second
    channels = [
        shm_comm.ShmChannel.open(dist.group.WORLD, initial_bytes=4096, timeout_s=60) for _ in range(2)
    ]
    pauses = random.Random(rank)  # each rank its own pauses
    for it in range(600):
        plan = random.Random(it)  # the same plan on every rank
        ch = plan.choice(channels)
        if pauses.random() < 0.3:
            time.sleep(pauses.random() * 0.003)
        elif pauses.random() < 0.5:
            os.sched_yield()
        base = [1000.0 * (world * it + r) for r in range(world)]  # rank r's values start here
        if plan.random() < 0.6:
            width = plan.choice([1, 3, 64])
            big = it % 97 == 0
            splits = [[plan.choice([0, 0, 1, 2, 5, 40] + ([3000] if big else [])) for _ in range(world)]
                      for _ in range(world)]  # fmt: skip
            ins, outs = splits[rank], [row[rank] for row in splits]
            x = torch.arange(sum(ins) * width, dtype=torch.float32).view(-1, width) + base[rank]
            got = torch.empty(sum(outs), width)
            ch.all_to_all_single(got, x, outs, ins)
            starts = [sum(splits[j][:rank]) * width for j in range(world)]  # where j's rows for me begin
            want = [torch.arange(starts[j], starts[j] + outs[j] * width, dtype=torch.float32) + base[j]
                    for j in range(world)]  # fmt: skip
            assert torch.equal(got, torch.cat(want).view(-1, width)), it
        else:
            sizes = [plan.choice([0, 1, 7, 300]) for _ in range(plan.randint(1, 3))]
            parts = [torch.arange(n, dtype=torch.float32) * (rank + 1) + it for n in sizes]
            ch.all_reduce_(parts)
            want = [
                torch.arange(n, dtype=torch.float32) * sum(range(1, world + 1)) + world * it for n in sizes
            ]
            assert all(torch.equal(p, w) for p, w in zip(parts, want)), it
    assert max(c.gens[rank] for c in channels) > 0, "no outbox grew"
    dist.barrier()
    dist.destroy_process_group()


def shm_misuse(rank: int, world: int, port: int) -> None:
    """Ranks that call their collectives in different orders, across two channels or
    within one (another kind, another size, splits that disagree), and a rank that does
    not come in time: each rank raises an error naming the collective and the ranks,
    before the channel's own timeout (30 s), instead of hanging or returning wrong bits."""
    import time

    from uniloom.pipelines.errors import UniloomError
    from uniloom.pipelines.train.shm_comm import ShmChannel

    def raises(call, words: list[str], within_s: float = 25) -> None:
        started = time.monotonic()
        try:
            call()
        except UniloomError as e:
            took = time.monotonic() - started
            assert all(w in str(e) for w in words) and took < within_s, (words, str(e), took)
        else:
            raise AssertionError(f"no error ({words})")

    init(rank, world, port)
    open_ = lambda timeout_s=30: ShmChannel.open(dist.group.WORLD, timeout_s=timeout_s)  # noqa: E731

    # Two channels, called in opposite orders: each rank waits in one for the other.
    a, b = open_(), open_()
    first, second = (a, b) if rank == 0 else (b, a)
    raises(lambda: first.all_reduce_([torch.ones(4)]), ["all_reduce_ #1", "different orders", second.name])
    for ch in (a, b):
        ch.close()  # the other rank has a collective open in it
    dist.barrier()

    ch = open_()  # another kind of collective at the same point
    if rank == 0:
        call, words = lambda: ch.all_reduce_([torch.ones(4)]), ["rank 1 called all_to_all_single"]
    else:
        call = lambda: ch.all_to_all_single(torch.empty(2, 3), torch.ones(2, 3), [1, 1], [1, 1])  # noqa: E731
        words = ["rank 0 called all_reduce_ of 16 bytes where this rank called all_to_all_single"]
    raises(call, words)
    dist.barrier()

    ch = open_()  # an all-reduce of another size
    raises(lambda: ch.all_reduce_([torch.ones(4 + rank)]), ["all_reduce_ #1", "20 bytes", "16 bytes"])
    dist.barrier()

    ch = open_()  # each rank expects one row more than its peer sends it
    ins = [1, 2] if rank == 0 else [1, 1]
    outs = [ins[0], 3] if rank == 0 else [3, ins[1]]
    raises(lambda: ch.all_to_all_single(torch.empty(sum(outs), 2), torch.ones(sum(ins), 2), outs, ins),
           [f"rank {1 - rank} sends this rank", "3 rows of 8 bytes expected"])  # fmt: skip
    dist.barrier()

    # Rank 1 is alive (in a gloo barrier) but comes after rank 0 has given up; then rank
    # 0, which arrived before giving up, never reduces its part.
    ch = open_(timeout_s=2)
    if rank == 1:
        dist.barrier()
    counter = "ARRIVED" if rank == 0 else "REDUCED"
    raises(
        lambda: ch.all_reduce_([torch.ones(4)]),
        ["all_reduce_ #1", f"ranks [{1 - rank}] did not bring {counter} to #1 in 2 s"],
    )
    if rank == 0:
        dist.barrier()
    dist.barrier()
    dist.destroy_process_group()


def flow_without_targets(rank: int, world: int, port: int) -> None:
    """The small preset's hang at sft step 1,475: a rank whose batch has no image targets
    runs rows of a rank with many (the flow head balanced over the data-parallel group's
    shared-memory channel, the experts over the expert group's). Its backward must take
    part in the flow head's exchanges too, and the rows it ran get their gradients."""
    from deepspeed.utils import groups

    from uniloom.pipelines.train import expert_parallel, flow_balance, shm_comm
    from uniloom.pipelines.train.module import Trainee

    init(rank, world, port)
    torch.manual_seed(0)
    trainee = Trainee(MODEL, MINGTOK)
    expert_parallel.parallelize(trainee, world, 0, shm=True)
    group = groups._get_data_parallel_group()
    flow_balance.balance(trainee.model.flow_head, 1, group, shm_comm.channel(group))
    g = torch.Generator().manual_seed(rank)
    latents = lambda: torch.randn(4, 32, generator=g)  # noqa: E731
    if rank == 0:
        samples = [
            sequence.text_only([20, 21, 22, 23]),
            sequence.understanding(latents(), [13, 14], [15, 16]),
        ]
    else:
        samples = [sequence.text_to_image([10 + i, 11, 12], latents()) for i in range(world * 2)]
    b = sequence.pack(samples, 40)
    assert (b.image_targets.sum() > 0) == (rank > 0)
    trainee(b).total.backward()
    head = [p.grad for p in trainee.model.flow_head.parameters()]
    assert all(g is not None for g in head) and any(g.abs().sum() > 0 for g in head), (
        "the rows run here got no gradient"
    )
    dist.barrier()
    dist.destroy_process_group()
