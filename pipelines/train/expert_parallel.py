"""Expert parallelism for the unified model, applied from outside it (as torchtitan's
parallelize.py applies its parallelisms), on DeepSpeed's expert-parallel process groups.

Order of application, fixed (`parallelize`):
  1. create DeepSpeed's expert / expert-data-parallel groups for `ep` ranks
     (deepspeed.utils.groups; names "ep_size_<ep>"),
  2. replace every `MoE.experts` (models/moe.py, the documented seam) by an
     `ExpertParallelExperts` holding only this rank's E/ep experts,
  3. mark the routed-expert parameters `allreduce=False` + `group_name`, as deepspeed.moe
     does, so DeepSpeed reduces their gradients over the expert-data-parallel group only,
  4. `mark_for_deepspeed` (just before deepspeed.initialize, and only when some experts
     train): DeepSpeed switches its MoE handling on (expert param groups in ZeRO, expert
     gradient reduction, norms) when the model contains a `deepspeed.moe.layer.MoE`; we
     attach one parameter-free subclass of it as that switch. Our layer keeps its own
     multi-gate router and grouped weights (models/moe.py says why), so DeepSpeed's MoE
     layer itself is never built.

Rank layout (DeepSpeed's "E + D"): with world W and expert-parallel size ep, ranks
[k*ep, (k+1)*ep) form one expert-parallel group; rank r holds experts
[(r % ep) * E/ep, (r % ep + 1) * E/ep). Parameter names do not change: a sharded tensor is
rows `expert_offset(p)` onwards of the full one, which is all checkpoints need.

Shape legend as in models/moe.py: N token-slots, D hidden, E routed experts (global),
El = E / ep local experts, R = ep ranks of the group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from uniloom.models.moe import GroupedExperts, MoE, expert
from uniloom.pipelines.errors import UniloomError
from uniloom.pipelines.train import ds_ops, shm_comm


def group_name(ep: int) -> str:
    return f"ep_size_{ep}"


def exchange(x, out_splits: list[int], in_splits: list[int], group, channel: shm_comm.ShmChannel | None):
    """all_to_all_single with uneven splits: through shared memory when the group has a
    channel (its ranks share a machine), else through the group's backend."""
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    if channel is not None:
        channel.all_to_all_single(out, x.contiguous(), out_splits, in_splits)
    else:
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """`exchange` whose gradient is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group, channel):
        ctx.splits, ctx.group, ctx.channel = (out_splits, in_splits), group, channel
        return exchange(x, out_splits, in_splits, group, channel)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return exchange(grad, in_splits, out_splits, ctx.group, ctx.channel), None, None, None, None


def all_to_all(x, out_splits: list[int], in_splits: list[int], group, channel=None):
    return _AllToAll.apply(x, out_splits, in_splits, group, channel)


class ExpertParallelExperts(GroupedExperts):
    """This rank's slice of the experts; same call as GroupedExperts (the seam):
    experts(x_ND sorted by global expert, num_tokens_per_expert_E) -> out_ND.

    Shadow experts (FasterMoE's dynamic shadowing): routing is dropless, so the rank
    holding a hot expert gets more token-slots than the others, and in lock step they
    wait for it at the return all-to-all. Every rank sees every rank's counts (the first
    all-to-all sends each its whole row), so all compute the same `shadow_plan`: a rank
    with a light load keeps some of its own slots bound for a hot remote expert and runs
    them itself with that expert's weights, which the owner sends in the same dispatch
    all-to-all as the tokens (3F rows of width D per expert). The weights arrive through
    the differentiable all-to-all, so their gradient goes back to the owner in the
    backward exchange and adds to its own: no extra collective either way, the same
    math, only computed where there is time for it. `shadow_min_slots` 0 turns it off.

    `channel`: the group's shared-memory channel (shm_comm), or None for the backend's
    all-to-all."""

    def __init__(self, full: GroupedExperts, group, group_name: str, shadow_min_slots: int = 0, channel=None):
        nn.Module.__init__(self)
        self.group, self.group_name, self.channel = group, group_name, channel
        self.kernels = full.kernels  # the local experts' grouped matmul (GroupedExperts.forward)
        self.ep, self.ep_rank = dist.get_world_size(group), dist.get_rank(group)
        self.num_experts = full.w1_EFD.shape[0]
        if self.num_experts % self.ep:
            raise UniloomError(f"{self.num_experts} experts do not split over expert-parallel size {self.ep}")
        self.num_local = self.num_experts // self.ep
        self.offset = self.ep_rank * self.num_local
        self.shadow_min_slots = shadow_min_slots
        self.shadowed_slots = 0  # in the last forward: slots this rank ran for other ranks' experts
        rows = slice(self.offset, self.offset + self.num_local)
        for name in ("w1_EFD", "w2_EDF", "w3_EFD"):
            setattr(self, name, nn.Parameter(getattr(full, name).detach()[rows].clone()))

    def forward(self, x_ND, num_tokens_per_expert_E):
        R, El, me = self.ep, self.num_local, self.ep_rank
        F_, D = self.w1_EFD.shape[1:]
        # Every rank's counts, (R, E): each rank sends its row to all.
        counts = exchange(num_tokens_per_expert_E.repeat(R), [self.num_experts] * R, [self.num_experts] * R,
                          self.group, self.channel).view(R, -1).tolist()  # fmt: skip
        keep = shadow_plan(counts, El, self.shadow_min_slots)  # (R, E) slots run by their own rank
        mine = range(self.offset, self.offset + El)
        # sent[r][e]: slots of rank r that go to expert e's owner
        sent = [[n - k for n, k in zip(row, kept)] for row, kept in zip(counts, keep)]
        shadows = [e for e in range(self.num_experts) if keep[me][e]]  # remote experts I run
        self.shadowed_slots = sum(keep[me])

        # Dispatch: to each rank its experts' slots, then the weights of my experts it shadows.
        slots_E = torch.split(x_ND, counts[me])
        pieces, tokens_out, in_splits = [], [], []
        for r in range(R):
            theirs = range(r * El, (r + 1) * El)
            pieces += [slots_E[e][keep[me][e] :] for e in theirs]
            lent = [e - self.offset for e in mine if keep[r][e]]
            pieces += [self._weight_rows(j) for j in lent]
            tokens_out.append(sum(sent[me][e] for e in theirs))
            in_splits.append(tokens_out[-1] + 3 * F_ * len(lent))
        recv_RE = [[sent[r][e] for e in mine] for r in range(R)]  # slots for my experts
        tokens_in = [sum(row) for row in recv_RE]
        borrowed = [[e for e in shadows if e // El == r] for r in range(R)]  # experts each rank lends me
        out_splits = [t + 3 * F_ * len(b) for t, b in zip(tokens_in, borrowed)]
        recv = all_to_all(torch.cat(pieces), out_splits, in_splits, self.group, self.channel)

        # Between the two exchanges (so the ranks' loads even out where they wait for each
        # other, in the forward and, reversed, in the backward pass): my experts over every
        # rank's slots, reordered rank-major -> expert-major, then the slots I shadow.
        blocks = torch.split(recv, [n for t, b in zip(tokens_in, borrowed) for n in (t, 3 * F_ * len(b))])
        x_recv = torch.cat(blocks[0::2]) if shadows else recv
        # Index and count vectors on the tokens' device: index_copy and the grouped
        # matmul take no index from another device (the counts went through lists already).
        order = _expert_major_order(recv_RE, x_ND.device)
        counts_E = torch.tensor([sum(col) for col in zip(*recv_RE)], dtype=torch.long, device=x_ND.device)
        y = super().forward(x_recv[order], counts_E)
        shadowed = {}
        for r in range(R):
            lent_rows = blocks[2 * r + 1].view(-1, 3 * F_, D)
            for i, e in enumerate(borrowed[r]):
                w1, w3, w2 = lent_rows[i].split(F_)
                shadowed[e] = expert(slots_E[e][: keep[me][e]], w1, w3, w2.reshape(D, F_))
        y_recv = torch.empty_like(y).index_copy(0, order, y)  # back to rank-major
        back = all_to_all(y_recv, tokens_out, tokens_in, self.group, self.channel)
        if not shadows:
            return back
        returned_E = torch.split(back, sent[me])  # x_ND's order: shadowed slots first per expert
        return torch.cat(
            [p for e in range(self.num_experts) for p in (shadowed.get(e), returned_E[e]) if p is not None]
        )

    def _weight_rows(self, j: int):
        """Local expert j's w1, w3, w2 as 3F rows of width D (w2 reshaped, not transposed,
        so the borrower's (D, F) matrix has the owner's layout and gives the same bits)."""
        D = self.w1_EFD.shape[2]
        return torch.cat([self.w1_EFD[j], self.w3_EFD[j], self.w2_EDF[j].reshape(-1, D)])

    def extra_repr(self) -> str:
        return (
            f"experts {self.offset}..{self.offset + self.num_local - 1} of {self.num_experts}, ep={self.ep}, "
            f"shadow_min_slots={self.shadow_min_slots}"
        )


def _expert_major_order(counts: list[list[int]], device) -> torch.Tensor:
    """Indices on `device` that turn rows grouped (rank, expert) into rows grouped
    (expert, rank); counts[r][e]: rows of rank r for local expert e."""
    starts, at = [], 0
    for row in counts:
        starts.append([])
        for n in row:
            starts[-1].append(at)
            at += n
    R, El = len(counts), len(counts[0]) if counts else 0
    pieces = [
        torch.arange(starts[r][e], starts[r][e] + counts[r][e], device=device)
        for e in range(El)
        for r in range(R)
    ]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long, device=device)


def shadow_plan(counts: list[list[int]], num_local: int, min_slots: int) -> list[list[int]]:
    """keep[r][e]: how many of rank r's slots for remote expert e rank r runs itself.

    counts[r][e] are the slots rank r routes to expert e (owned by rank e // num_local).
    Greedy and deterministic (every rank computes it from the same counts): hottest expert
    first, its owner lends it to the lightest ranks, each taking at most its own slots for
    that expert and half the load difference, so no rank ends above the owner. A loan of
    fewer than min_slots slots is not worth its 3F x D weights (and their gradient back)."""
    R, E = len(counts), len(counts[0])
    keep = [[0] * E for _ in range(R)]
    if min_slots <= 0 or R < 2:
        return keep
    load = [sum(counts[r][e] for r in range(R) for e in range(o * num_local, (o + 1) * num_local))
            for o in range(R)]  # fmt: skip
    for e in sorted(range(E), key=lambda e: -sum(row[e] for row in counts)):
        owner = e // num_local
        for r in sorted(range(R), key=lambda r: load[r]):
            take = min(counts[r][e], (load[owner] - load[r]) // 2)
            if r == owner or take < min_slots:
                continue
            keep[r][e] = take
            load[owner] -= take
            load[r] += take
    return keep


def effective_ep(configured: int, world: int, num_experts: int) -> int:
    """The configured expert-parallel size, at most the number of workers (so a run
    resumed on fewer workers keeps going); it must divide the workers and the experts."""
    ep = min(configured, world)
    if world % ep or num_experts % ep:
        raise UniloomError(
            f"train.expert_parallel={ep} must divide the {world} workers and the {num_experts} experts"
        )
    return ep


def create_groups(ep: int) -> str:
    """DeepSpeed's expert and expert-data-parallel groups for size `ep` (idempotent)."""
    import deepspeed
    from deepspeed.utils import groups

    ds_ops.pin_ninja()  # DeepSpeed's CPU backend loads (or builds) its shm op here
    deepspeed.init_distributed(dist_backend=dist.get_backend() if dist.is_initialized() else "gloo")
    world = dist.get_world_size()
    if world % ep:
        raise UniloomError(f"expert-parallel size {ep} does not divide the {world} workers")
    name = group_name(ep)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep)
    return name


def parallelize(model: nn.Module, ep: int, shadow_min_slots: int = 0, shm: bool = False) -> str:
    """Steps 1-3 of the module docstring on every MoE layer of `model`; returns the
    group name. With ep == 1 the experts stay whole but are still marked, so the
    optimizer groups and checkpoints look the same at every size. shadow_min_slots: see
    ExpertParallelExperts; shm: exchange through shared memory where the group's ranks
    share a machine (shm_comm)."""
    from deepspeed.utils import groups

    name = create_groups(ep)
    group = groups._get_expert_parallel_group(name)
    channel = shm_comm.channel(group) if shm and ep > 1 else None
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        if ep > 1:
            moe.experts = ExpertParallelExperts(moe.experts, group, name, shadow_min_slots, channel)
        for p in moe.experts.parameters():
            p.allreduce = False
            p.group_name = name
            p.expert_rows = (expert_offset(moe.experts), moe.num_experts)  # (first row held, all rows)
    return name


def expert_offset(module: nn.Module) -> int:
    """First global expert row held by `module` (a GroupedExperts or its EP slice)."""
    return getattr(module, "offset", 0)


def has_trainable_experts(model: nn.Module) -> bool:
    return any(getattr(p, "allreduce", True) is False and p.requires_grad for p in model.parameters())


def mark_for_deepspeed(model: nn.Module, ep: int) -> None:
    """Step 4: DeepSpeed's MoE switch, only when expert parameters are being trained
    (DeepSpeed insists that an MoE model has an MoE optimizer group)."""
    if has_trainable_experts(model) and not hasattr(model, "deepspeed_moe_marker"):
        model.deepspeed_moe_marker = _marker_class()(ep)


def _marker_class():
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    class DeepSpeedMoEMarker(DeepSpeedMoE):
        """No parameters and no forward: DeepSpeed's MoE layer class is how its engine
        recognises expert parallelism (module docstring, step 4)."""

        def __init__(self, ep: int):
            nn.Module.__init__(self)  # not DeepSpeedMoE.__init__: builds no gate, no experts
            self.ep_size, self.expert_group_name = ep, group_name(ep)
            self.num_experts = 0
            self.num_local_experts = 0

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            create_groups(self.ep_size)  # already made by parallelize(); the engine calls this hook

        def forward(self, *args, **kwargs):
            raise RuntimeError("the DeepSpeed MoE marker is not a layer")

    return DeepSpeedMoEMarker
