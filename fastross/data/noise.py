"""Keyed noise for the diffusion objective, on the data side: per-image keys and timesteps.

Every image's timesteps, eps and posterior draw come from generators keyed by (run seed,
step, the sample's global index), so a sample's loss does not depend on which rank, worker
or micro-batch it landed on, and a resumed run draws exactly what the uninterrupted one did.
The loader computes keys and timesteps here (host work, off the training step); the model
draws eps and xi from the same keys with fastross.kernels' counter-based generator. This
module imports neither the model nor the kernels.
"""

from __future__ import annotations

import torch

NUM_STEPS = 1000  # diffusion timesteps of the cosine schedule (ROSS_SPEC.md section 4)


def noise_key(seed: int, step: int, index: int) -> int:
    """A 63-bit generator seed for one sample at one step (splitmix64 of the three)."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    return x & (2**63 - 1)


def draw_timesteps(keys: torch.Tensor, replicas: int) -> torch.Tensor:
    """Per image, `replicas` timesteps uniform in [0, NUM_STEPS): (n, R) int64, drawn on the CPU.

    keys: int64 (n,), one generator seed per image (the same key then keys its noise).
    """
    t = torch.empty(keys.numel(), replicas, dtype=torch.long)
    g = torch.Generator()
    # Host loop over images: this runs in the data path (loader workers), not in the step.
    for i, k in enumerate(keys.tolist()):
        g.manual_seed(k)
        t[i] = torch.randint(0, NUM_STEPS, (replicas,), generator=g)
    return t
