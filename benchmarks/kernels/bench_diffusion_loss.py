"""The diffusion objective around the denoiser: x_t from the stored latent moments and the eps loss.

    python benchmarks/kernels/bench_diffusion_loss.py [--providers ...] [--modes ...] [--smoke]

7B shape: 16 images, 4 replicas, 27 x 27 tokens of 64 folded channels (16 latent channels on a
54 x 54 grid). forward = draw the noise, make x_t (n, R, N, 64), and the per-image loss of a given
eps_hat; backward = the loss's gradient w.r.t. eps_hat. Providers: reference (fp32: eps and xi
materialised with torch.randn each step, fold, mix, mean squared error), torch_bf16 (the same
with eps_hat and x_t in bf16), torch_bf16_compiled, fastross (kernels.diffusion_loss: noise
drawn in the kernels from the per-image keys, never stored, regenerated in backward).
Memory-bound: GB/s of fastross's minimal traffic (moments read, x_t written, eps_hat read; in
backward eps_hat read and its gradient written) against the copy bandwidth of the same run.
"""

from __future__ import annotations

import torch
from fastross.kernels.diffusion_loss import diffusion_xt, eps_loss, fold_ref

import _harness as H

SHAPES = {"7b": dict(n=16, r=4, grid=27, c=16), "smoke": dict(n=2, r=2, grid=3, c=4)}
SHIFT, SCALE = 0.1159, 0.3611


def bytes_moved(shape: str, mode: str) -> float:
    s = SHAPES[shape]
    moments = 2 * s["n"] * s["c"] * (2 * s["grid"]) ** 2 * 4
    big = s["n"] * s["r"] * s["grid"] ** 2 * 4 * s["c"] * 2  # one bf16 (n, R, N, 4C) tensor
    return {"forward": moments + 2 * big, "backward": 2 * big, "full": moments + 4 * big}[mode]


def cases(shape: str, provider: str) -> H.Case:
    s = SHAPES[shape]
    n, r, g, c = s["n"], s["r"], s["grid"], s["c"]
    dev = H.device()
    dt = torch.float32 if provider == "reference" else torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(n, c, 2 * g, 2 * g, generator=gen).to(dev)
    std = torch.rand(n, c, 2 * g, 2 * g, generator=gen).to(dev)
    sab, s1m = torch.rand(n, r, generator=gen).to(dev), torch.rand(n, r, generator=gen).to(dev)
    keys = torch.randint(0, 2**62, (n,), generator=gen).to(dev)
    eps_hat = torch.randn(n, r, g * g, 4 * c, generator=gen).to(dev, dt).requires_grad_(True)

    if provider == "fastross":

        def fn(eps_hat):
            x_t = diffusion_xt(mean, std, keys, sab, s1m, SHIFT, SCALE, dtype=dt)
            return x_t, eps_loss(eps_hat, keys)
    else:

        def fn(eps_hat):
            eps = torch.randn(n, r, g * g, 4 * c, device=dev)
            xi = torch.randn(n, c, 2 * g, 2 * g, device=dev)
            x0 = fold_ref((mean + std * xi - SHIFT) * SCALE)
            x_t = (sab[..., None, None] * x0[:, None] + s1m[..., None, None] * eps).to(dt)
            return x_t, (eps_hat.float() - eps).pow(2).mean(dim=(1, 2, 3))

        if provider == "torch_bf16_compiled":
            fn = H.compiled(fn)
    return H.Case(lambda: fn(eps_hat)[1], [eps_hat])


def main(argv=None) -> int:
    return H.memory_bound_main(__doc__.splitlines()[0], "diffusion_loss", SHAPES, cases, bytes_moved, argv)


if __name__ == "__main__":
    raise SystemExit(main())
