"""The adaLN conditioning input SiLU(c_embed(cond)[i, j] + t_embed(t)[i, r]) for all blocks, at the 7B shape.

    python benchmarks/kernels/bench_adaln.py [--providers ...] [--modes ...] [--smoke]

16 images x 4 replicas x 729 tokens, W = 1024. reference: fp32, the condition embedding repeated
for every replica and SiLU applied inside each of the 4 adaLN modules (3 blocks + final layer),
as the reference code does; torch_bf16 / torch_bf16_compiled: fastross's torch path (one
broadcast add, SiLU per module); fastross: one kernels.adaln.silu_cond shared by all modules.
The outputs are the k modules' inputs (their gradients summed in backward). Memory-bound:
GB/s of fastross's minimal traffic against the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from fastross.kernels.adaln import silu_cond

import _harness as H

SHAPES = {"7b": dict(n=16, r=4, tokens=729, w=1024, modules=4), "smoke": dict(n=2, r=3, tokens=11, w=40, modules=2)}


def bytes_moved(shape: str, mode: str) -> float:
    s = SHAPES[shape]
    big, small = s["n"] * s["r"] * s["tokens"] * s["w"], s["n"] * s["tokens"] * s["w"]
    return 2 * {"forward": big + small, "backward": big + 2 * small, "full": 2 * big + 3 * small}[mode]


def cases(shape: str, provider: str) -> H.Case:
    s = SHAPES[shape]
    n, r, k = s["n"], s["r"], s["modules"]
    dt = torch.float32 if provider == "reference" else torch.bfloat16
    g = torch.Generator().manual_seed(0)
    cc = torch.randn(n, s["tokens"], s["w"], generator=g).to(H.device(), dt).requires_grad_(True)
    te = torch.randn(n, r, s["w"], generator=g).to(H.device(), dt).requires_grad_(True)

    if provider == "reference":

        def fn(cc, te):  # the condition repeated per replica; SiLU inside each adaLN module
            c = cc.repeat_interleave(r, dim=0).view(n, r, *cc.shape[1:]) + te[:, :, None]
            return tuple(F.silu(c) for _ in range(k))
    elif provider == "fastross":

        def fn(cc, te):  # once, read by all k projections (their gradients summed by autograd)
            return (silu_cond(cc, te),) * k
    else:

        def fn(cc, te):  # fastross's torch path: one broadcast add, SiLU inside each module
            c = cc[:, None] + te[:, :, None]
            return tuple(F.silu(c) for _ in range(k))

        if provider == "torch_bf16_compiled":
            fn = H.compiled(fn)
    return H.Case(lambda: fn(cc, te), [cc, te])


def main(argv=None) -> int:
    return H.memory_bound_main(__doc__.splitlines()[0], "adaln", SHAPES, cases, bytes_moved, argv)


if __name__ == "__main__":
    raise SystemExit(main())
