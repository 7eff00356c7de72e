"""The whole ROSS denoiser step (forward + backward), reference recipe -> fastross, at the 7B shapes.

    python benchmarks/kernels/bench_denoiser.py [--shapes 7b_dit,7b_mlp] [--providers ...] [--modes ...]
    python benchmarks/kernels/bench_denoiser.py --smoke          # tiny shape, CPU interpreter, code paths only

Shapes: 16 images x 4 replicas x 729 tokens (27 x 27), W = 1024, condition width 3584 (Qwen2-7B),
64 folded latent channels; `7b_dit` is the reference default (3 DiT blocks, 16 heads), `7b_mlp`
the MLP variant (3 per-token blocks of width 1024).

Providers:
  reference            fp32 eager with TF32 matmuls allowed, the condition repeated for every
                       replica (c_embed on 4x the tokens), attention materialised per head (SDPA's
                       math backend) -- the reference recipe's denoiser
  torch_bf16           fastross.model.denoiser impl "torch" in bf16, eager
  torch_bf16_compiled  the same under torch.compile
  fastross             impl "triton" in bf16 (fastross.kernels; attention through SDPA)

Matmul floor: the step's matmul FLOPs (the model's, condition once per image; attention's QK^T
and PV included; backward twice forward but no input gradient for x_embed) divided by the bf16
matmul rate measured on this device in this run. Ends with

    denoiser: vs_reference R1 vs_bf16 R2 vs_compiled R3 of_floor F mem_vs_bf16 M

for the full step at the first shape (printed as soon as that shape is done, and again last):
R = provider time / fastross time, F = floor / fastross time, M = fastross peak memory /
torch_bf16 peak memory (both above parameters and inputs).
"""

from __future__ import annotations

import contextlib
import math

import torch

import _harness as H
from fastross.model.denoiser import Denoiser

SHAPES = {
    "7b_dit": dict(kind="dit", n=16, r=4, grid=27, width=1024, cond=3584, ch=64, depth=3, heads=16),
    "7b_mlp": dict(kind="mlp", n=16, r=4, grid=27, width=1024, cond=3584, ch=64, depth=3, heads=16),
    "smoke": dict(kind="dit", n=2, r=2, grid=3, width=32, cond=48, ch=16, depth=1, heads=4),
}


def matmul_flops(shape: str, mode: str) -> float:
    s = SHAPES[shape]
    n, r, tokens, w, h, c, depth = s["n"], s["r"], s["grid"] ** 2, s["width"], s["cond"], s["ch"], s["depth"]
    m = n * r * tokens
    fwd = 2 * m * c * w + 2 * n * r * (256 * w + w * w) + 2 * n * tokens * h * w  # x, t, condition (once per image)
    if s["kind"] == "dit":
        attn = 2 * 2 * (n * r) * tokens * tokens * w  # QK^T and PV over all heads
        fwd += depth * (2 * m * w * 6 * w + 2 * m * w * 3 * w + attn + 2 * m * w * w + 2 * 2 * m * w * 4 * w)
    else:
        fwd += depth * (2 * m * w * 3 * w + 2 * 2 * m * w * w)
    fwd += 2 * m * w * 2 * w + 2 * m * w * c  # final layer
    bwd = 2 * fwd - 2 * m * c * w  # no input gradient for x_t
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


def build(shape: str, seed: int = 0, impl: str = "torch") -> Denoiser:
    s = SHAPES[shape]
    torch.manual_seed(seed)
    d = Denoiser(s["kind"], s["cond"], s["width"], s["depth"], s["heads"], s["grid"], channels=s["ch"], impl=impl)
    with torch.no_grad():  # open the adaLN-Zero gates: a trained denoiser, not an all-zero one
        for p in d.parameters():
            if torch.count_nonzero(p) == 0:
                p.normal_(0, 0.02)
    return d.to(H.device())


def cases(shape: str, provider: str) -> H.Case:
    s = SHAPES[shape]
    dev = H.device()
    n, r, tokens = s["n"], s["r"], s["grid"] ** 2
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(n, r, tokens, s["ch"], generator=g).to(dev)
    t = torch.randint(0, 1000, (n, r), generator=g).to(dev)
    cond = torch.randn(n, tokens, s["cond"], generator=g).to(dev)
    model = build(shape, impl="triton" if provider == "fastross" else "torch")  # same seed: the same parameters
    if provider == "reference":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        cond = cond.requires_grad_(True)

        def fwd():  # every replica carries its own copy of the condition, as the reference code does
            with sdpa_kernel(SDPBackend.MATH) if s["kind"] == "dit" else contextlib.nullcontext():
                return model(x_t.view(n * r, 1, tokens, -1), t.view(n * r, 1), cond.repeat_interleave(r, dim=0))

        return H.Case(fwd, [cond, *model.parameters()])
    model = model.bfloat16()
    cond = cond.bfloat16().requires_grad_(True)
    run = H.compiled(model) if provider == "torch_bf16_compiled" else model
    return H.Case(lambda: run(x_t, t, cond), [cond, *model.parameters()])


def main(argv=None) -> int:
    args = H.parse_args(__doc__.splitlines()[0], [k for k in SHAPES if k != "smoke"], argv)
    torch.backends.cuda.matmul.allow_tf32 = True  # the reference provider's TF32; bf16 providers are unaffected
    torch.backends.cudnn.allow_tf32 = True
    first = args.shapes[0]

    def summary(rep: H.Report, shape: str) -> None:
        if shape != first:
            return

        def row(provider):
            return rep.find(shape, provider, "full") or {"ms": math.nan, "peak_mib": math.nan}

        fast = row("fastross")["ms"]
        floor = matmul_flops(shape, "full") / (rep.rows[0]["matmul_tflops"] * 1e12) * 1e3
        print(
            f"denoiser: vs_reference {row('reference')['ms'] / fast:.2f} vs_bf16 {row('torch_bf16')['ms'] / fast:.2f} "
            f"vs_compiled {row('torch_bf16_compiled')['ms'] / fast:.2f} of_floor {floor / fast:.2f} "
            f"mem_vs_bf16 {row('fastross')['peak_mib'] / row('torch_bf16')['peak_mib']:.2f}",
            flush=True,
        )

    rep = H.run_all(args, "denoiser", cases, matmul_flops, after_shape=summary)
    summary(rep, first)  # again, as the last line
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
