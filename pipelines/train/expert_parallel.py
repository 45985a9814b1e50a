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

from uniloom.models.moe import GroupedExperts, MoE
from uniloom.pipelines.errors import UniloomError


def group_name(ep: int) -> str:
    return f"ep_size_{ep}"


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; its gradient is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(x, out_splits: list[int], in_splits: list[int], group):
    return _AllToAll.apply(x, out_splits, in_splits, group)


class ExpertParallelExperts(GroupedExperts):
    """This rank's slice of the experts; same call as GroupedExperts (the seam):
    experts(x_ND sorted by global expert, num_tokens_per_expert_E) -> out_ND."""

    def __init__(self, full: GroupedExperts, group, group_name: str):
        nn.Module.__init__(self)
        self.group, self.group_name = group, group_name
        self.ep, self.ep_rank = dist.get_world_size(group), dist.get_rank(group)
        self.num_experts = full.w1_EFD.shape[0]
        if self.num_experts % self.ep:
            raise UniloomError(f"{self.num_experts} experts do not split over expert-parallel size {self.ep}")
        self.num_local = self.num_experts // self.ep
        self.offset = self.ep_rank * self.num_local
        rows = slice(self.offset, self.offset + self.num_local)
        for name in ("w1_EFD", "w2_EDF", "w3_EFD"):
            setattr(self, name, nn.Parameter(getattr(full, name).detach()[rows].clone()))

    def forward(self, x_ND, num_tokens_per_expert_E):
        R, El = self.ep, self.num_local
        # How many slots each rank sends to each of my experts: (R, El) after the exchange.
        counts_RE = num_tokens_per_expert_E.view(R, El)
        recv_RE = torch.empty_like(counts_RE)
        dist.all_to_all_single(recv_RE, counts_RE, group=self.group)
        in_splits = counts_RE.sum(1).tolist()
        out_splits = recv_RE.sum(1).tolist()
        x_recv = all_to_all(x_ND, out_splits, in_splits, self.group)  # rank-major, then expert
        # Reorder rank-major -> expert-major so each local expert reads one block.
        order = _expert_major_order(recv_RE)
        y = super().forward(x_recv[order], recv_RE.sum(0))
        y_recv = torch.empty_like(y).index_copy(0, order, y)  # back to rank-major
        return all_to_all(y_recv, in_splits, out_splits, self.group)

    def extra_repr(self) -> str:
        return (
            f"experts {self.offset}..{self.offset + self.num_local - 1} of {self.num_experts}, ep={self.ep}"
        )


def _expert_major_order(recv_RE: torch.Tensor) -> torch.Tensor:
    """Indices that turn rows grouped (rank, expert) into rows grouped (expert, rank)."""
    counts = recv_RE.tolist()
    starts, at = [], 0
    for row in counts:
        starts.append([])
        for n in row:
            starts[-1].append(at)
            at += n
    R, El = recv_RE.shape
    pieces = [torch.arange(starts[r][e], starts[r][e] + counts[r][e]) for e in range(El) for r in range(R)]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


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

    deepspeed.init_distributed(dist_backend=dist.get_backend() if dist.is_initialized() else "gloo")
    world = dist.get_world_size()
    if world % ep:
        raise UniloomError(f"expert-parallel size {ep} does not divide the {world} workers")
    name = group_name(ep)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep)
    return name


def parallelize(model: nn.Module, ep: int) -> str:
    """Steps 1-3 of the module docstring on every MoE layer of `model`; returns the
    group name. With ep == 1 the experts stay whole but are still marked, so the
    optimizer groups and checkpoints look the same at every size."""
    from deepspeed.utils import groups

    name = create_groups(ep)
    group = groups._get_expert_parallel_group(name)
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        if ep > 1:
            moe.experts = ExpertParallelExperts(moe.experts, group, name)
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
