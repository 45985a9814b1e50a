"""The weight EMA: its update, and that checkpoints carry it (per-rank expert slices
included) so a resume on another number of workers continues the same average and the
export takes it."""

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

from uniloom.pipelines.train import checkpoint as ckpt
from uniloom.pipelines.train import ema


class Net(nn.Module):
    """A dense weight, a frozen one, and routed experts (rows [first, first + n) of 4)."""

    def __init__(self, rows: slice = slice(0, 4)):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.dense = nn.Parameter(torch.randn(3, 2, generator=g))
        self.frozen = nn.Parameter(torch.randn(2, generator=g), requires_grad=False)
        self.experts = nn.Parameter(torch.randn(4, 3, generator=g)[rows].clone())
        if rows != slice(0, 4):
            self.experts.expert_rows = (rows.start, 4)


def train_step(net: Net, step: int) -> None:
    """A deterministic stand-in for an optimizer step, on the rows this rank holds."""
    first = getattr(net.experts, "expert_rows", (0, 4))[0]
    rows = torch.arange(first, first + net.experts.shape[0], dtype=torch.float32)[:, None]
    with torch.no_grad():
        net.dense.add_(0.1 * (step + 1))
        net.experts.add_(0.01 * (step + 1) * (rows + 1))


def test_update_is_a_warmed_up_exponential_average_of_the_trained_weights():
    net = Net()
    average = ema.WeightEma(net, decay=0.8)
    assert set(average.shadow) == {"dense", "experts"}  # frozen weights are their own average
    expected = net.dense.detach().clone()
    for step in range(40):
        train_step(net, step)
        rate = min(0.8, (1 + step) / (10 + step))
        expected = rate * expected + (1 - rate) * net.dense.detach()
        average.update()
    torch.testing.assert_close(average.shadow["dense"], expected)
    assert average.rate() == 0.8 and average.updates == 40  # warm-up over from 35 updates on
    # the first update keeps only a tenth of the initial (random) weights
    fresh = Net()
    first = ema.WeightEma(fresh, decay=0.999)
    start = fresh.dense.detach().clone()
    train_step(fresh, 0)
    first.update()
    torch.testing.assert_close(first.shadow["dense"], 0.1 * start + 0.9 * fresh.dense.detach())
    with pytest.raises(ValueError, match="decay"):
        ema.WeightEma(net, decay=1.0)
    assert ema.start(net, 0.0, None) is None


def test_swapped_weights_come_back():
    net = Net()
    average = ema.WeightEma(net, decay=0.5)
    trained = net.dense.detach().clone()
    average.shadow["dense"].fill_(7.0)
    with average.swapped():
        assert (net.dense == 7.0).all()
    torch.testing.assert_close(net.dense.detach(), trained)


def save_two_ranks(directory, nets, averages, step: int) -> None:
    """What two expert-parallel ranks write at a checkpoint."""
    for rank, (net, average) in enumerate(zip(nets, averages)):
        meta = {"world": 2, "ema_updates": average.updates, "step": step} if rank == 0 else None
        ckpt.save(None, net, directory, rank, 2, {"epoch": 0, "rows": 0}, meta, average.shadow)


def test_a_resume_on_one_worker_continues_the_two_ranks_average_and_the_export_takes_it(tmp_path):
    nets = [Net(slice(0, 2)), Net(slice(2, 4))]
    averages = [ema.WeightEma(net, decay=0.8) for net in nets]
    whole = Net()  # the same run, unsharded and uninterrupted
    reference = ema.WeightEma(whole, decay=0.8)
    for step in range(5):
        for net in [*nets, whole]:
            train_step(net, step)
        for average in [*averages, reference]:
            average.update()
    torch.testing.assert_close(
        torch.cat([a.shadow["experts"] for a in averages]), reference.shadow["experts"]
    )
    save_two_ranks(tmp_path / "ckpt", nets, averages, 5)

    reader = ckpt.Reader(tmp_path / "ckpt")
    resumed = Net()
    ckpt.load_weights(resumed, reader)
    average = ema.start(resumed, 0.8, reader)
    assert average.updates == 5
    for name in ("dense", "experts"):
        torch.testing.assert_close(average.shadow[name], reference.shadow[name], rtol=0, atol=0)
        assert not torch.equal(average.shadow[name], getattr(resumed, name).detach())  # not the weights
    for step in range(5, 8):
        for net in (resumed, whole):
            train_step(net, step)
        for a in (average, reference):
            a.update()
    torch.testing.assert_close(average.shadow["experts"], reference.shadow["experts"], rtol=0, atol=0)

    exported = load_file(ckpt.export(reader, tmp_path / "export.safetensors", {}))
    torch.testing.assert_close(exported["experts"], torch.cat([a.shadow["experts"] for a in averages]))
    torch.testing.assert_close(exported["dense"], averages[0].shadow["dense"])
    torch.testing.assert_close(exported["frozen"], nets[0].frozen.detach())  # no average: the weights


def test_a_part_the_checkpoint_did_not_average_starts_from_its_weights(tmp_path):
    net = Net()
    net.experts.requires_grad_(False)  # an earlier stage froze the experts
    average = ema.WeightEma(net, decay=0.8)
    train_step(net, 0)
    average.update()
    ckpt.save(
        None, net, tmp_path, 0, 1, {"epoch": 0, "rows": 0}, {"world": 1, "ema_updates": 1}, average.shadow
    )
    reader = ckpt.Reader(tmp_path)
    assert reader.has("dense", "ema") and not reader.has("experts", "ema")
    nxt = Net()
    ckpt.load_weights(nxt, reader)  # the next stage trains the experts too
    continued = ema.start(nxt, 0.8, reader)
    torch.testing.assert_close(continued.shadow["experts"], nxt.experts.detach())
    torch.testing.assert_close(continued.shadow["dense"], average.shadow["dense"])
