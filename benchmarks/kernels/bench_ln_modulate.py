"""LayerNorm (no affine) + adaLN modulation, memory-bound, at the 7B shape.

    python benchmarks/kernels/bench_ln_modulate.py [--providers ...] [--modes ...] [--smoke]

46656 tokens x W = 1024; shift and scale are chunks of a (M, 6W) adaLN output. Providers:
reference (fp32 eager: layer_norm, then * (1 + scale) + shift), torch_bf16, torch_bf16_compiled,
fastross (kernels.ln_modulate). No matmuls (floor 0): the figure of merit is GB/s of the minimal
traffic (forward reads x, shift, scale and writes y; backward reads dy, x, scale and writes dx,
dscale; dshift is dy) against the copy bandwidth measured in the same run (target >= 70 %).
"""

from __future__ import annotations

import torch
from fastross.kernels.ln_modulate import ln_modulate, ln_modulate_ref

import _harness as H

SHAPES = {"7b": dict(m=16 * 4 * 729, w=1024), "smoke": dict(m=150, w=40)}
PASSES = {"forward": 4, "backward": 5, "full": 9}  # (M, W) tensors read or written, minimal traffic


def bytes_moved(shape: str, mode: str, provider: str = "fastross") -> float:
    s = SHAPES[shape]
    return PASSES[mode] * s["m"] * s["w"] * (4 if provider == "reference" else 2)


def cases(shape: str, provider: str) -> H.Case:
    s = SHAPES[shape]
    dt = torch.float32 if provider == "reference" else torch.bfloat16
    g = torch.Generator().manual_seed(0)
    x = torch.randn(s["m"], s["w"], generator=g).to(H.device(), dt).requires_grad_(True)
    ada = torch.randn(s["m"], 6 * s["w"], generator=g).to(H.device(), dt).requires_grad_(True)
    fn = ln_modulate if provider == "fastross" else ln_modulate_ref
    if provider == "torch_bf16_compiled":
        fn = H.compiled(fn)
    return H.Case(lambda: fn(x, *ada.chunk(6, dim=-1)[:2]), [x, ada])


def main(argv=None) -> int:
    return H.memory_bound_main(__doc__.splitlines()[0], "ln_modulate", SHAPES, cases, bytes_moved, argv)


if __name__ == "__main__":
    raise SystemExit(main())
