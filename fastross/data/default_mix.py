"""The stated default stage-2 sample mix, for what has to assume one when no shards are at hand.

LLaVA-665K / Cambrian-737K-like instruction data at the 7B recipe's shapes: every image is 729
visual tokens (27 x 27 SigLIP patches), text lengths by kind below. benchmarks/packing.py and
benchmarks/planner.py draw their batches from it.
"""

from __future__ import annotations

import numpy as np

VISUAL = 729  # tokens per image in the 7B recipe (27 x 27 SigLIP patches)
# (share, kind, has image, text-token sampler)
DISTRIBUTION = [
    (0.35, "image + short answer", True, lambda r, n: r.integers(30, 120, n)),
    (0.40, "image + multi-turn", True, lambda r, n: np.clip(r.lognormal(np.log(280), 0.7, n), 60, 2500)),
    (0.08, "image + long description", True, lambda r, n: r.integers(200, 800, n)),
    (0.17, "text-only conversation", False, lambda r, n: np.clip(r.lognormal(np.log(650), 0.9, n), 40, 7000)),
]
# The planner's attention term for Qwen2-7B (fastross.data.packing_planner.attention_cost_tokens).
QWEN2_7B = dict(non_embedding_params=6.53e9, layers=28, hidden=3584)


def draw(rng: np.random.Generator, n: int, visual: int = VISUAL) -> tuple[np.ndarray, np.ndarray]:
    """n sample lengths (`visual` tokens per image included: 576 for a CLIP-336 tower) and whether each has an image."""
    shares = np.array([d[0] for d in DISTRIBUTION])
    kind = rng.choice(len(DISTRIBUTION), size=n, p=shares / shares.sum())
    lengths = np.zeros(n, dtype=np.int64)
    image = np.zeros(n, dtype=bool)
    for k, (_, _, has_image, text) in enumerate(DISTRIBUTION):
        idx = np.flatnonzero(kind == k)
        lengths[idx] = np.asarray(text(rng, len(idx))).astype(np.int64) + (visual if has_image else 0)
        image[idx] = has_image
    return lengths, image
