"""The flow head's rows balanced across the data-parallel ranks.

Every rank packs its own batch, so each has its own number N of image targets, and the
flow head runs `flow_batch_mul` draws of (t, noise) per target: on the tiny preset a
step costs 0.22 ms more per target and N ranges from 0 to 448 per batch, so N decides
most of a step's spread. The ranks run in lock step (the experts' all-to-alls, the
gradient all-reduce), so every step waits for the rank with the most targets.

Here every rank learns every rank's N, ranks above the mean send their last rows (target
latent and condition, one float32 row each) to ranks below it, which run them through
their copy of the flow head (it is replicated: data parallel) and send the per-row
losses back. Both exchanges are differentiable all-to-alls, so each condition's gradient
returns to its own rank, and the flow head's parameter gradients land on the rank that
ran the row, which the data-parallel all-reduce sums anyway. Each row's loss is its own
(the caller's mean is unchanged); only its (t, noise) draw comes from the rank that ran it.

Applied from outside the model, as expert parallelism is: the flow head's class is
swapped for a subclass (as torch's fully_shard does), so parameter names do not change.
Every rank must call the head's loss at every step, also with no targets of its own, and
put what it returns into the loss it backpropagates, also when that is empty (UniVision.loss
does): such a rank may have run other ranks' rows, whose gradients go back through the
exchanges' backward, which every rank must then make in the same order. A rank that left
an empty result out of its graph went on to the experts' all-to-all backward while the
others waited for it in this exchange's (the small preset's hang at sft step 1,475).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from uniloom.pipelines.train.expert_parallel import all_to_all, exchange


class BalancedRows:
    """Mixin before the flow head's class: `loss(x0_NC, cond_NZ, batch_mul) -> (N,)`."""

    balance_group = None
    balance_channel = None  # shm_comm.ShmChannel of the group, or None for its backend
    balance_min_rows = 1

    def loss(self, x0_NC, cond_NZ, batch_mul: int = 1):
        N, C = x0_NC.shape
        group, channel = self.balance_group, self.balance_channel
        R, me = dist.get_world_size(group), dist.get_rank(group)
        counts = torch.full((R,), N, dtype=torch.long, device=x0_NC.device)
        counts = exchange(counts, [1] * R, [1] * R, group, channel).tolist()
        moves = row_moves(counts, self.balance_min_rows)  # moves[s][d]: rows s sends d
        if not any(map(any, moves)):
            return super().loss(x0_NC, cond_NZ, batch_mul)
        sent, received = moves[me], [row[me] for row in moves]
        keep = N - sum(sent)
        # One exchange for both inputs: float32 rows [x0 | cond] (exact for bf16 conditions).
        rows = torch.cat([x0_NC.float(), cond_NZ.float()], 1)
        mine = torch.cat([rows[:keep], all_to_all(rows[keep:], received, sent, group, channel)])
        mse = super().loss(mine[:, :C].to(x0_NC.dtype), mine[:, C:].to(cond_NZ.dtype), batch_mul)
        returned = all_to_all(mse[keep:], sent, received, group, channel)
        return torch.cat([mse[:keep], returned])  # (N,) in the caller's row order


def row_moves(counts: list[int], min_rows: int) -> list[list[int]]:
    """moves[s][d]: rows rank s sends rank d so every rank ends with its share of the
    total (the first total % R ranks one more), donors to receivers in rank order; none
    when no rank is min_rows or more above its share. The same on every rank."""
    R, total = len(counts), sum(counts)
    share = [total // R + (r < total % R) for r in range(R)]
    excess = [n - s for n, s in zip(counts, share)]
    moves = [[0] * R for _ in range(R)]
    if max(excess) < max(min_rows, 1):
        return moves
    receivers = [r for r in range(R) if excess[r] < 0]
    for s in range(R):
        for d in receivers:
            m = min(excess[s], -excess[d])
            if m > 0:
                moves[s][d] += m
                excess[s] -= m
                excess[d] += m
    return moves


def balance(head: nn.Module, min_rows: int, group, channel=None) -> None:
    """Make `head` (a FlowHead) balance its rows over `group` (through `channel` when
    given); min_rows 0, or a group of one rank: leave it as it is."""
    if min_rows <= 0 or dist.get_world_size(group) < 2 or isinstance(head, BalancedRows):
        return
    cls = type(head)
    head.__class__ = type(f"Balanced{cls.__name__}", (BalancedRows, cls), {})
    head.balance_group, head.balance_channel, head.balance_min_rows = group, channel, min_rows
