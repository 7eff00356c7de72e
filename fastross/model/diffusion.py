"""The diffusion objective of ROSS_SPEC.md sections 2 and 4: latent targets and the eps loss.

Noise is keyed, not drawn from a global generator: every image's timesteps, eps and
posterior draw come from generators keyed by (run seed, step, the sample's global index),
so the loss of a sample does not depend on which rank or micro-batch it landed on, and a
resumed run draws exactly what the uninterrupted one did. Keys and timesteps are drawn on the
host by the loader (fastross.data.noise, re-exported here); eps and xi come from the counter-based generator
of fastross.kernels.diffusion_loss, keyed by the same key and indexed in the folded token
layout. The per-image loss comes in two forms with one signature, chosen once by
`model.denoiser.impl` (EPS_LOSSES): `eps_loss_fused` ("triton") draws the noise inside its
kernels and never stores it; `eps_loss_materialised` ("torch", the reference) materialises
the very same numbers with `keyed_eps` / `keyed_xi` and computes in eager PyTorch.
"""

from __future__ import annotations

import math

import torch

from fastross.data.images import latent_moments, vae_input  # noqa: F401  (re-exported; they live on the data side)
from fastross.data.noise import NUM_STEPS, draw_timesteps, noise_key  # noqa: F401  (likewise)
from fastross.kernels import diffusion_loss
from fastross.kernels.diffusion_loss import keyed_eps, keyed_xi  # noqa: F401  (re-exported for the model)


def cosine_alphas_cumprod(num_steps: int = NUM_STEPS) -> torch.Tensor:
    """alpha_bar_t for t = 0 .. num_steps - 1 of the cosine schedule, computed in float64."""

    def f(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = torch.tensor(
        [min(1 - f((i + 1) / num_steps) / f(i / num_steps), 0.999) for i in range(num_steps)],
        dtype=torch.float64,
    )
    return torch.cumprod(1 - betas, dim=0)


def fold_latents(z: torch.Tensor) -> torch.Tensor:
    """(n, C, 2g, 2g) latents -> (n, g * g, 4C) tokens.

    Each 2 x 2 window becomes one token, channel-major: channel c * 4 + 2 * row + col.
    Tokens are in row-major order, aligned with the vision tower's patches.
    """
    n, c, h, w = z.shape
    g = h // 2
    z = z.reshape(n, c, g, 2, g, 2).permute(0, 2, 4, 1, 3, 5)  # n, gy, gx, c, dy, dx
    return z.reshape(n, g * g, c * 4)


def latent_target(mean: torch.Tensor, std: torch.Tensor, xi: torch.Tensor, shift: float, scale: float) -> torch.Tensor:
    """One posterior draw, shifted and scaled, as tokens (n, g * g, 4C).

    mean, std: (n, C, 2g, 2g); xi: (n, g * g, 4C), the standard normal draw in the folded
    layout (as keyed_xi gives it). Equal to fold_latents((mean + std * unfold(xi) - shift) * scale).
    """
    return (fold_latents(mean) + fold_latents(std) * xi - shift) * scale


def eps_loss_per_image(eps_hat: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """(n, R, tokens, C) prediction and noise -> per-image loss (n,): mean over elements, then replicas."""
    return (eps_hat.float() - eps.float()).pow(2).mean(dim=(2, 3)).mean(dim=1)


def eps_loss_materialised(denoiser, mean, std, keys, t, sqrt_ab, sqrt_1m_ab, cond, shift: float, scale: float):
    """Per-image eps loss (n,) fp32 with the keyed noise materialised (the reference).

    mean, std: the posterior moments (n, C, 2g, 2g); keys (n,) int64; t (n, R); sqrt_ab, sqrt_1m_ab: the
    schedule at t (n, R); cond: the normed condition (n, g * g, H); shift, scale: the VAE's factors.
    """
    n, c, side, _ = mean.shape
    tokens, ch = (side // 2) ** 2, 4 * c
    eps = keyed_eps(keys, t.shape[1], tokens, ch)
    x0 = latent_target(mean, std, keyed_xi(keys, tokens, ch), shift, scale)
    x_t = sqrt_ab[..., None, None] * x0[:, None] + sqrt_1m_ab[..., None, None] * eps
    eps_hat = denoiser(x_t, t, cond).view_as(eps)
    return eps_loss_per_image(eps_hat, eps)


def eps_loss_fused(denoiser, mean, std, keys, t, sqrt_ab, sqrt_1m_ab, cond, shift: float, scale: float):
    """eps_loss_materialised through the keyed-noise kernels: x_t and the loss draw eps and xi, never stored."""
    n, c, side, _ = mean.shape
    x_t = diffusion_loss.diffusion_xt(mean, std, keys, sqrt_ab, sqrt_1m_ab, shift, scale)
    eps_hat = denoiser(x_t, t, cond)
    return diffusion_loss.eps_loss(eps_hat.view(n, t.shape[1], (side // 2) ** 2, 4 * c), keys)


EPS_LOSSES = {"torch": eps_loss_materialised, "triton": eps_loss_fused}  # by model.denoiser.impl
