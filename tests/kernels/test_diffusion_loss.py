"""The keyed generator, x_t from the stored moments, and the eps loss regenerating eps (ROSS_SPEC.md 2, 4)."""

import math

import pytest
import torch
from fastross.kernels import diffusion_loss as D

from kernel_checks import rel_err

KEYS = torch.tensor([2**62 + 12345, 7, 123456789012345], dtype=torch.int64)  # 63-bit, as noise_key gives


def test_same_key_same_noise_and_it_is_philox():
    eps, xi = D.keyed_eps(KEYS, 3, 9, 20), D.keyed_xi(KEYS, 9, 20)
    assert torch.equal(eps, D.keyed_eps(KEYS, 3, 9, 20)) and torch.equal(xi, D.keyed_xi(KEYS, 9, 20))
    ref_eps, ref_xi = D.keyed_noise_ref(KEYS, 3, 9, 20)  # Philox 4x32-10 + Box-Muller written in torch
    assert (eps - ref_eps).abs().max() < 1e-5 and (xi - ref_xi).abs().max() < 1e-5
    # an element's draw depends on (key, offset) only: the same image alone, or with fewer replicas
    assert torch.equal(D.keyed_eps(KEYS[1:2], 2, 9, 20), eps[1:2, :2])


def test_million_draws_statistics_and_independence():
    n_img, per = 4, 1 << 18  # 1,048,576 draws
    keys = torch.tensor([11, 12, 2**40 + 3, 2**62 + 5], dtype=torch.int64)
    eps = D.keyed_eps(keys, 1, per // 64, 64).reshape(n_img, per)
    xi = D.keyed_xi(keys, per // 64, 64).reshape(n_img, per)  # stream 1: same key, same low offsets
    z = eps.double().flatten()
    n = z.numel()
    # 5-sigma bounds: mean ~ N(0, 1/n), variance ~ N(1, 2/n), P(|z| < 1) ~ N(0.6827, p(1-p)/n)
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    p = math.erf(1 / math.sqrt(2))
    assert abs((z.abs() < 1).double().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)

    def corr(a, b):
        a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
        return ((a * b).sum() / (a.norm() * b.norm())).item()

    bound = 5 / math.sqrt(per)
    assert abs(corr(eps[0], xi[0])) < bound  # the two streams of one key
    assert abs(corr(eps[0], eps[1])) < bound  # neighbouring keys
    assert abs(corr(eps[0, 1:], eps[0, :-1])) < bound  # neighbouring offsets


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_xt_equals_reference_with_materialised_noise(dtype):
    g = torch.Generator().manual_seed(0)
    n, c, grid, r = 3, 5, 3, 3  # N = 9 tokens of 20 channels: not multiples of the blocks
    mean, std = torch.randn(n, c, 2 * grid, 2 * grid, generator=g), torch.rand(n, c, 2 * grid, 2 * grid, generator=g)
    sab, s1m = torch.rand(n, r, generator=g), torch.rand(n, r, generator=g)
    got = D.diffusion_xt(mean, std, KEYS, sab, s1m, 0.1159, 0.3611, dtype=dtype)
    want = D.diffusion_xt_ref(mean, std, D.keyed_xi(KEYS, 9, 20), D.keyed_eps(KEYS, r, 9, 20), sab, s1m, 0.1159, 0.3611)
    assert got.shape == (n, r, 9, 20) and got.dtype == dtype
    if dtype == torch.float32:
        assert rel_err(got, want) <= 1e-5
    else:  # one rounding of the fp32 value, as PyTorch's own cast
        assert (got.float() - want).abs().max() <= 2 * (want.to(dtype).float() - want).abs().max() + 1e-6
    # keyed by image, not by position: the images in another order give the same rows
    perm = torch.tensor([2, 0, 1])
    again = D.diffusion_xt(mean[perm], std[perm], KEYS[perm], sab[perm], s1m[perm], 0.1159, 0.3611, dtype=dtype)
    assert torch.equal(again, got[perm])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eps_loss_and_gradient_equal_reference_with_materialised_noise(check, dtype):
    """The fused loss regenerates eps in forward and backward; the reference gets it materialised."""
    n, r, tokens, ch = 3, 3, 9, 20
    eps = D.keyed_eps(KEYS, r, tokens, ch)
    eps_hat = eps + torch.randn(n, r, tokens, ch, generator=torch.Generator().manual_seed(1)) * 0.3
    check(lambda e: D.eps_loss(e, KEYS), lambda e: D.eps_loss_ref(e, eps), [eps_hat], [True], dtype)


def test_dummy_image_adds_exactly_nothing():
    """A zero-image micro-batch runs a dummy image (key 0, zero moments) with weight 0."""
    zero = torch.zeros(1, 16, 6, 6)
    keys, t = torch.zeros(1, dtype=torch.int64), torch.zeros(1, 4)
    xt = D.diffusion_xt(zero, zero, keys, t + 1, t, 0.1159, 0.3611)
    torch.testing.assert_close(xt, torch.full_like(xt, -0.1159 * 0.3611))
    eh = torch.randn(1, 4, 9, 64, requires_grad=True)
    loss = (D.eps_loss(eh, keys) * torch.zeros(1)).sum()
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(eh.grad) == 0
