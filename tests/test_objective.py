"""The reconstruction target and the diffusion objective against direct computations (ROSS_SPEC.md 2-4)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastross.model import diffusion
from fastross.model.denoiser import Denoiser, sincos_2d, timestep_features


def test_cosine_schedule_matches_formula():
    ab = diffusion.cosine_alphas_cumprod()
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    prod, expect = 1.0, []
    for i in range(1000):
        prod *= 1 - min(1 - f((i + 1) / 1000) / f(i / 1000), 0.999)
        expect.append(prod)
    assert ab.dtype == torch.float64 and ab.shape == (1000,)
    np.testing.assert_allclose(ab.numpy(), np.array(expect), rtol=1e-12, atol=0)
    assert (ab[1:] < ab[:-1]).all()
    assert 0.9999 < ab[0] < 1 and 0 < ab[-1] < 1e-4


def test_fold_latents_channel_major_2x2():
    g, c = 3, 5
    z = torch.randn(2, c, 2 * g, 2 * g)
    tokens = diffusion.fold_latents(z)
    assert tokens.shape == (2, g * g, 4 * c)
    for n in range(2):
        for gy in range(g):
            for gx in range(g):
                for ch in range(c):
                    for dy in range(2):
                        for dx in range(2):
                            got = tokens[n, gy * g + gx, ch * 4 + 2 * dy + dx]
                            assert got == z[n, ch, 2 * gy + dy, 2 * gx + dx]


def test_latent_target_shift_scale_and_posterior_draw():
    mean, std, xi = torch.randn(2, 16, 4, 4), torch.rand(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    got = diffusion.latent_target(mean, std, diffusion.fold_latents(xi), 0.1159, 0.3611)  # xi comes folded
    direct = diffusion.fold_latents((mean + std * xi - 0.1159) * 0.3611)
    torch.testing.assert_close(got, direct, rtol=0, atol=1e-7)


def test_vae_input_and_moments_match_direct_computation(tiny_models):
    from diffusers import AutoencoderKL

    from fastross.data.images import ImageSpec

    vae = AutoencoderKL.from_pretrained(tiny_models / "vae").eval()
    grid = 8
    pix = torch.rand(2, 3, 64, 64) * 2.4 - 1.2  # a little outside [-1, 1]: must be clamped
    spec = ImageSpec.from_pretrained(str(tiny_models / "vision"))  # SigLIP's mean and std 0.5
    x = diffusion.vae_input(pix, grid, spec)
    direct = ((pix * 0.5 + 0.5) * 2 - 1).clamp(-1, 1)
    direct = F.interpolate(direct, size=(128, 128), mode="bilinear", align_corners=False, antialias=False)
    torch.testing.assert_close(x, direct, rtol=0, atol=0)
    assert x.min() >= -1 and x.max() <= 1
    mean, std = diffusion.latent_moments(vae, pix, grid, spec)
    with torch.no_grad():
        dist = vae.encode(direct).latent_dist
    assert mean.shape == (2, 16, 16, 16)
    torch.testing.assert_close(mean, dist.mean, rtol=0, atol=0)
    torch.testing.assert_close(std, dist.std, rtol=0, atol=0)
    # (z - shift) * scale folded: 64 channels per token, 8 x 8 tokens
    assert diffusion.latent_target(mean, std, torch.zeros(2, 64, 64), 0.1159, 0.3611).shape == (2, 64, 64)


def test_sincos_2d_layout():
    w, g = 16, 3
    pe = sincos_2d(w, g)
    q = w // 4
    omega = 10000.0 ** (-np.arange(q) / q)
    for row in range(g):
        for col in range(g):
            v = pe[row * g + col].double().numpy()
            np.testing.assert_allclose(v[:q], np.sin(col * omega), atol=1e-6)
            np.testing.assert_allclose(v[q : 2 * q], np.cos(col * omega), atol=1e-6)
            np.testing.assert_allclose(v[2 * q : 3 * q], np.sin(row * omega), atol=1e-6)
            np.testing.assert_allclose(v[3 * q :], np.cos(row * omega), atol=1e-6)


def test_timestep_features_cos_first():
    t = torch.tensor([0, 7, 999])
    f = timestep_features(t, 256)
    freqs = torch.exp(-math.log(10000) * torch.arange(128) / 128)
    torch.testing.assert_close(f[:, :128], torch.cos(t[:, None] * freqs))
    torch.testing.assert_close(f[:, 128:], torch.sin(t[:, None] * freqs))


@pytest.mark.parametrize("kind", ["dit", "mlp"])
def test_denoiser_starts_at_zero_and_learns_shapes(kind):
    d = Denoiser(kind, cond_width=24, width=32, depth=2, heads=4, grid=3)
    x = torch.randn(2, 4, 9, 64)
    t = torch.randint(0, 1000, (2, 4))
    cond = torch.randn(2, 9, 24)
    out = d(x, t, cond)
    assert out.shape == (8 * 9, 64)  # rows: image, replica, token
    assert torch.count_nonzero(out) == 0  # adaLN-Zero: final layer and modulations start at zero
    for blk in d.blocks:
        assert torch.count_nonzero(blk.ada[-1].weight) == 0
    # a few optimiser steps in, the zero-initialised modulations open and the output depends
    # on the condition (after the first step only the output layer has moved)
    opt = torch.optim.SGD(d.parameters(), lr=0.1)
    eps = torch.randn(2, 4, 9, 64)
    for _ in range(3):
        opt.zero_grad()
        diffusion.eps_loss_per_image(d(x, t, cond).view(2, 4, 9, 64), eps).sum().backward()
        opt.step()
    a = d(x, t, cond)
    b = d(x, t, cond + 1)
    assert not torch.allclose(a, b)


def test_condition_embedding_once_per_image():
    """The condition goes through c_embed once per image, not once per replica."""
    d = Denoiser("dit", cond_width=24, width=32, depth=1, heads=4, grid=3)
    seen = []
    d.c_embed.register_forward_hook(lambda m, i, o: seen.append(i[0].shape))
    d(torch.randn(2, 4, 9, 64), torch.randint(0, 1000, (2, 4)), torch.randn(2, 9, 24))
    assert seen == [torch.Size([2, 9, 24])]


def test_noise_is_keyed_by_sample_not_by_order():
    keys = torch.tensor([diffusion.noise_key(0, 3, i) for i in (5, 9)])
    t1, t2 = diffusion.draw_timesteps(keys, 4), diffusion.draw_timesteps(keys.flip(0), 4)
    e1, e2 = diffusion.keyed_eps(keys, 4, 4, 64), diffusion.keyed_eps(keys.flip(0), 4, 4, 64)
    x1, x2 = diffusion.keyed_xi(keys, 4, 64), diffusion.keyed_xi(keys.flip(0), 4, 64)
    assert torch.equal(t1, t2.flip(0)) and torch.equal(e1, e2.flip(0)) and torch.equal(x1, x2.flip(0))
    assert not torch.equal(e1[0], e1[1])
    # replica r's noise does not depend on how many replicas there are
    assert torch.equal(diffusion.keyed_eps(keys, 2, 4, 64), e1[:, :2])
    assert diffusion.noise_key(0, 3, 5) != diffusion.noise_key(0, 4, 5) != diffusion.noise_key(1, 3, 5)
