"""Rectified-flow head: MAR's zero initialisation, the path/velocity convention (a head
trained on the loss carries noise at t = 1 to the data at t = 0 with Euler steps), and the
three-way guidance combination with shared noise."""

from __future__ import annotations

import pytest
import torch

from uniloom.models.flow_head import FlowHead

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def head(**kw):
    torch.manual_seed(0)
    return FlowHead(
        latent_dim=4, cond_dim=8, width=kw.get("width", 32), depth=kw.get("depth", 2), mlp_mult=2.0
    )


def test_zero_initialised_head_predicts_zero_velocity():
    h = head()
    v = h.velocity(torch.randn(5, 4), torch.rand(5), torch.randn(5, 8))
    assert torch.equal(v, torch.zeros(5, 4))
    # So the loss at initialisation is E |noise - x0|^2 per channel: 1 + |x0|^2 / C.
    x0 = torch.full((4000, 4), 0.5)
    loss = h.loss(x0, torch.randn(4000, 8))
    assert loss.shape == (4000,)
    assert abs(loss.mean().item() - 1.25) < 0.05


def test_trained_head_carries_noise_to_data():
    h = head(width=64)
    targets = torch.tensor([[1.0, -1.0, 0.5, 0.0], [-0.5, 0.5, -1.0, 1.0]])
    conds = torch.randn(2, 8)
    opt = torch.optim.Adam(h.parameters(), lr=3e-3)
    for _ in range(300):
        loss = h.loss(targets, conds, batch_mul=64).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    samples = h.sample(conds.repeat(16, 1), steps=16, generator=torch.Generator().manual_seed(0))
    error = (samples - targets.repeat(16, 1)).abs().mean()
    assert error < 0.1, f"mean |sample - target| = {error:.3f}"


def test_three_way_guidance_with_shared_noise():
    h = head()
    with torch.no_grad():  # non-trivial velocities
        for p in h.parameters():
            p.add_(0.1 * torch.randn_like(p))
    cond_GNZ = torch.randn(3, 5, 8)  # unconditional, text-unconditional, conditional
    s_t, s_c, steps = 1.1, 3.0, 4
    guided = h.sample(
        cond_GNZ, steps, temperature=0.7, cfg=(s_t, s_c), generator=torch.Generator().manual_seed(1)
    )

    x = 0.7 * torch.randn(5, 4, generator=torch.Generator().manual_seed(1))  # the one shared noise
    times = torch.linspace(1, 0, steps + 1)
    with torch.no_grad():
        for t, t_next in zip(times[:-1], times[1:]):
            v_u, v_tu, v_c = (h.velocity(x, t.expand(5), cond_GNZ[g]) for g in range(3))
            x = x + (t_next - t) * (v_u + s_t * (v_tu - v_u) + s_c * (v_c - v_tu))
    torch.testing.assert_close(guided, x, atol=1e-5, rtol=1e-5)

    # With both scales at 1 the guidance telescopes to the conditional velocity.
    unit = h.sample(cond_GNZ, steps, cfg=(1.0, 1.0), generator=torch.Generator().manual_seed(2))
    plain = h.sample(cond_GNZ[2], steps, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(unit, plain, atol=1e-5, rtol=1e-5)
