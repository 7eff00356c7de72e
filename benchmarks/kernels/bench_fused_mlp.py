"""The modulated MLP branch x + gate * fc2(act(fc1(LN(x) * (1 + scale) + shift))), at the 7B shapes.

    python benchmarks/kernels/bench_fused_mlp.py [--shapes 7b_dit,7b_mlp] [--providers ...] [--modes ...] [--smoke]

Shapes: 16 x 4 x 729 = 46656 tokens of width 1024; `7b_dit` hidden 4096 with tanh-GELU (a DiT
block's MLP), `7b_mlp` hidden 1024 with SiLU (a block of the MLP variant). shift, scale and gate
are chunks of one adaLN output, as in the model. Providers: reference (fp32 eager, TF32 allowed),
torch_bf16, torch_bf16_compiled (of the same eager function), fastross (kernels.fused_mlp).
The matmul floor is fc1 + fc2 (forward 2 x 2 M W hidden FLOPs, backward twice that) at the bf16
matmul rate measured in the same run; the last line gives fastross's share of it per mode.
"""

from __future__ import annotations

import torch
from fastross.kernels.fused_mlp import fused_mlp_branch, fused_mlp_branch_ref

import _harness as H

SHAPES = {
    "7b_dit": dict(m=16 * 4 * 729, w=1024, hidden=4096, act="gelu_tanh"),
    "7b_mlp": dict(m=16 * 4 * 729, w=1024, hidden=1024, act="silu"),
    "smoke": dict(m=150, w=40, hidden=160, act="gelu_tanh"),
}


def matmul_flops(shape: str, mode: str) -> float:
    s = SHAPES[shape]
    fwd = 2 * 2 * s["m"] * s["w"] * s["hidden"]
    return {"forward": fwd, "backward": 2 * fwd, "full": 3 * fwd}[mode]


def cases(shape: str, provider: str) -> H.Case:
    s = SHAPES[shape]
    m, w, hid, act = s["m"], s["w"], s["hidden"], s["act"]
    dt = torch.float32 if provider == "reference" else torch.bfloat16
    g = torch.Generator().manual_seed(0)
    leaves = [
        t.to(H.device(), dt).requires_grad_(True)
        for t in (
            torch.randn(m, w, generator=g),
            torch.randn(m, 3 * w, generator=g) * 0.5,
            torch.randn(hid, w, generator=g) / w**0.5,
            torch.randn(hid, generator=g) * 0.1,
            torch.randn(w, hid, generator=g) / hid**0.5,
            torch.randn(w, generator=g) * 0.1,
        )
    ]
    fn = fused_mlp_branch if provider == "fastross" else fused_mlp_branch_ref
    if provider == "torch_bf16_compiled":
        fn = H.compiled(fn)

    def fwd():
        x, ada, w1, b1, w2, b2 = leaves
        return fn(x, *ada.chunk(3, dim=-1), w1, b1, w2, b2, act)

    return H.Case(fwd, leaves)


def main(argv=None) -> int:
    def allow_tf32():  # the reference provider runs fp32 matmuls as the reference recipe does
        torch.backends.cuda.matmul.allow_tf32 = True

    return H.report_main(
        __doc__.splitlines()[0],
        "fused_mlp",
        SHAPES,
        cases,
        matmul_flops,
        None,
        "of_floor ",
        lambda row: f"{row['floor_ms'] / row['ms']:.2f}",
        argv,
        setup=allow_tf32,
    )


if __name__ == "__main__":
    raise SystemExit(main())
