"""Per-token rectified-flow head (MAR's diffusion head, as Ming-UniVision adapts it: a
residual MLP with adaptive LayerNorm modulated by time + condition, SwiGLU inside).

Path and velocity: x_t = (1 - t) x0 + t noise, t = 1 is noise and t = 0 data, so the
velocity dx_t/dt = noise - x0 is what the head predicts (MSE). Sampling integrates it
with Euler steps from t = 1 down to 0: x_{t - dt} = x_t - dt v. Time enters the network as
t * 1000 through a sinusoidal embedding, as in the released code.

Shape legend: N tokens, C latent channels (32), Z condition width (vis_head output),
W head width, G guidance branches.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from uniloom.kernels import check_mode, use_triton
from uniloom.kernels.flow_block import modulated_layer_norm
from uniloom.models.blocks import SwiGLU


class TimestepEmbedder(nn.Module):
    """Scalar times (N,) -> (N, W): sinusoidal features, then an MLP."""

    def __init__(self, width: int, frequencies: int = 256):
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(frequencies, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t_N):
        half = self.frequencies // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t_N.device).float() / half)
        args = t_N.float()[:, None] * freqs[None]  # (N, half)
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=-1))


class ResBlock(nn.Module):
    """x + gate * SwiGLU(modulate(LayerNorm(x), shift, scale)), the modulation fused with
    the norm (kernels/flow_block.py)."""

    def __init__(self, width: int, mlp_mult: float, *, kernels: str = "auto"):
        super().__init__()
        self.kernels = check_mode(kernels)
        self.norm = nn.LayerNorm(width, eps=1e-6)
        hidden = (int(width * mlp_mult * 2 / 3) + 7) // 8 * 8  # the released head's rule
        # The shared SwiGLU under the released names (w12, w3), which the checkpoints carry.
        self.mlp = SwiGLU(width, hidden, kernels=kernels, names=("w12", "w3"))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x, y):  # x, y (N, W)
        shift, scale, gate = self.ada(y).chunk(3, dim=-1)
        h = modulated_layer_norm(
            x, self.norm.weight, self.norm.bias, shift, scale, self.norm.eps,
            triton=use_triton(self.kernels, x.device),
        )  # fmt: skip
        return x + gate * self.mlp(h)


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_channels: int, *, kernels: str = "auto"):
        super().__init__()
        self.kernels = check_mode(kernels)
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, y):  # (N, W)
        shift, scale = self.ada(y).chunk(2, dim=-1)
        h = modulated_layer_norm(
            x, None, None, shift, scale, self.norm.eps, triton=use_triton(self.kernels, x.device)
        )
        return self.linear(h)


class FlowHead(nn.Module):
    def __init__(
        self,
        latent_dim: int,
        cond_dim: int,
        width: int,
        depth: int,
        mlp_mult: float,
        *,
        kernels: str = "auto",
    ):
        super().__init__()
        self.latent_dim = latent_dim
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(latent_dim, width)
        self.blocks = nn.ModuleList(ResBlock(width, mlp_mult, kernels=kernels) for _ in range(depth))
        self.final = FinalLayer(width, latent_dim, kernels=kernels)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for layer in (self.time_embed.mlp[0], self.time_embed.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        # Zero modulations and output: every block starts as the identity, the head at v = 0.
        for ada in [b.ada[-1] for b in self.blocks] + [self.final.ada[-1]]:
            nn.init.zeros_(ada.weight)
            nn.init.zeros_(ada.bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)

    def velocity(self, x_NC, t_N, cond_NZ):
        y_NW = self.time_embed(t_N * 1000) + self.cond_embed(cond_NZ)
        x_NW = self.input_proj(x_NC)
        for block in self.blocks:
            x_NW = block(x_NW, y_NW)
        return self.final(x_NW, y_NW)  # (N, C)

    def loss(self, x0_NC, cond_NZ, batch_mul: int = 1):
        """Flow-matching MSE per token (N,), averaged over `batch_mul` draws of (t, noise)."""
        N, C = x0_NC.shape
        x0_MC = x0_NC.repeat(batch_mul, 1)  # (M = batch_mul * N, C)
        cond_MZ = cond_NZ.repeat(batch_mul, 1)
        t_M = torch.rand(x0_MC.shape[0], device=x0_MC.device)
        noise_MC = torch.randn_like(x0_MC)
        x_t = (1 - t_M[:, None]) * x0_MC + t_M[:, None] * noise_MC
        err_M = (self.velocity(x_t, t_M, cond_MZ) - (noise_MC - x0_MC)).pow(2).mean(-1)
        return err_M.view(batch_mul, N).mean(0)

    @torch.no_grad()
    def sample(self, cond, steps: int, temperature: float = 1.0, cfg: tuple[float, float] | None = None,
               generator: torch.Generator | None = None):  # fmt: skip
        """Euler from t = 1 to 0. cond (N, Z), or with cfg = (s_t, s_c) the three guidance
        branches (3, N, Z) = [unconditional, text-unconditional, conditional], which share
        their noise: v = v_u + s_t (v_tu - v_u) + s_c (v_c - v_tu). Returns x0 (N, C)."""
        G = 3 if cfg is not None else 1
        cond_GNZ = cond.view(G, -1, cond.shape[-1])
        N = cond_GNZ.shape[1]
        x_NC = temperature * torch.randn(
            N, self.latent_dim, device=cond.device, dtype=cond.dtype, generator=generator
        )
        times = torch.linspace(1.0, 0.0, steps + 1, device=cond.device)
        for t, t_next in zip(times[:-1], times[1:]):
            v_GNC = self.velocity(x_NC.repeat(G, 1), t.expand(G * N), cond_GNZ.reshape(G * N, -1)).view(
                G, N, -1
            )
            if cfg is None:
                v_NC = v_GNC[0]
            else:
                s_t, s_c = cfg
                v_NC = v_GNC[0] + s_t * (v_GNC[1] - v_GNC[0]) + s_c * (v_GNC[2] - v_GNC[1])
            x_NC = x_NC + (t_next - t) * v_NC
        return x_NC
