"""The ROSS denoiser (ROSS_SPEC.md section 3): a DiT over one image's tokens, or a per-token MLP.

Both take noisy latent tokens x_t (n, R, N, 64), integer timesteps t (n, R) and the
condition (n, N, H), the LLM's normed hidden states at the image's visual tokens, and
predict eps (n, R, N, 64). The condition embedding is computed once per image and
broadcast over its R replicas.

Two implementations share every parameter (one state dict, switchable at any checkpoint),
and the one built decides which ops run (STYLE.md 9): every block holds a `DenoiserOps`, the
fastross.kernels operators or their `*_ref` twins (same signatures), fixed at construction,
and has a single forward. impl="torch" holds the refs, eager PyTorch with the maths of the
reference (the condition's SiLU computed once and shared by every adaLN projection, which
gives the same numbers as applying it inside each block); impl="triton" holds the kernels:
SiLU(c) once for all adaLN projections, LayerNorm + modulation fused, the MLP branch and the
attention output projection with their gated residuals fused into the matmul epilogues
(attention itself is PyTorch SDPA). The kernels are torch.library custom ops, so
`compile_blocks` can compile each block with either impl.

Precision (`model.denoiser.dtype`): `mp_policy` gives the denoiser its own FSDP2
MixedPrecisionPolicy whatever `train.dtype` is: fp32 (the reference; the default) or bf16
parameters and compute with fp32 gradient reduction. The loss stays fp32 either way.

Plan at the 7B shapes (16 images x 4 replicas x 729 tokens = 46656 rows, W 1024, H 3584, bf16;
H100 790 TFLOP/s, 3 TB/s): one DiT step (forward + backward) is 18.0 TFLOP of matmuls, 23 ms at
peak (per block forward: adaLN 0.59, qkv + proj 0.39, attention 0.14, MLP 0.78 TFLOP); the MLP
variant 5.3 TFLOP. Everything else is traffic over (rows, W) tensors of 95.6 MB each. Per DiT
block eager bf16 keeps ~35 such rows of W for backward; impl "triton" keeps ~18 (x, qkv, the
attention output, both branch outputs, x after attention, h = fc1's pre-activation, and the
adaLN output shared with the projection's backward), so its peak should sit near half of eager.
benchmarks/kernels/bench_denoiser.py measures both against the floor on a lent GPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy

from fastross.config import DenoiserConfig, choices
from fastross.kernels.adaln import adaln_chunks, silu_cond, silu_cond_ref
from fastross.kernels.fused_mlp import fused_mlp_branch, fused_mlp_branch_ref, gated_linear, gated_linear_ref
from fastross.kernels.ln_modulate import ln_modulate, ln_modulate_ref
from fastross.model import init

LN_EPS = 1e-6  # the blocks' and the final layer's LayerNorm


@dataclass(frozen=True)
class DenoiserOps:
    """The ops a denoiser runs, chosen once by impl; the kernels and their refs share signatures."""

    silu_cond: Callable  # (c_cond (n, N, W), t_emb (n, R, W)) -> SiLU(c) (n, R, N, W)
    ln_modulate: Callable  # (x, shift, scale, eps) -> LN(x) * (1 + scale) + shift
    gated_linear: Callable  # (y, w, bias, gate, res) -> res + gate * (y @ w^T + bias)
    mlp_branch: Callable  # (x, shift, scale, gate, w1, b1, w2, b2, act, eps) -> x + gate * fc2(act(fc1(LN-mod(x))))


IMPLS = choices(DenoiserConfig, "impl")  # model.denoiser.impl: declared once, on the config field
OPS = {  # by impl, "auto" resolved (resolve_impl); tests/kernels/test_denoiser_impl.py holds the keys to IMPLS
    "torch": DenoiserOps(silu_cond_ref, ln_modulate_ref, gated_linear_ref, fused_mlp_branch_ref),
    "triton": DenoiserOps(silu_cond, ln_modulate, gated_linear, fused_mlp_branch),
}


def resolve_impl(impl: str, device_type: str) -> str:
    """model.denoiser.impl for a model that runs on `device_type`: "auto" is the Triton kernels on CUDA and PyTorch
    elsewhere. Triton has no CPU backend: on CPU its kernels run only in the interpreter (TRITON_INTERPRET=1), which
    executes each program's block ops as numpy calls and is a correctness tool, not a fast path; the ladder's
    interpreted row (`python benchmarks/throughput.py`) measures what it costs. "torch" and "triton" are kept as
    asked (the kernel tests run "triton" in the interpreter)."""
    if impl not in IMPLS:
        raise ValueError(f"model.denoiser.impl must be one of {', '.join(map(repr, IMPLS))}, got {impl!r}")
    if impl != "auto":
        return impl
    return "triton" if device_type == "cuda" else "torch"


DTYPES = {"fp32": None, "bf16": torch.bfloat16}  # model.denoiser.dtype -> FSDP2 param_dtype (None: as stored)


def mp_policy(dtype: str) -> MixedPrecisionPolicy:
    """The denoiser's own FSDP2 policy for model.denoiser.dtype: parameters and compute in fp32 or bf16,
    gradients reduced in fp32, whatever train.dtype is."""
    return MixedPrecisionPolicy(param_dtype=DTYPES[dtype], reduce_dtype=torch.float32)


def compile_block(block: nn.Module, **compile_kw) -> nn.Module:
    """torch.compile one block in place (state dict unchanged), its rows dimension (n * R, which changes
    with the images in a micro-batch) marked dynamic so that varying n does not recompile. compile_kw go to
    torch.compile (e.g. backend=, fullgraph=).

    The block's `forward` becomes an instance attribute that marks the inputs (outside the compiled region,
    where marking is allowed) and calls the compiled bound method. Trade-off against torch.compile(block):
    no `_orig_mod.` in the state dict; but copy.deepcopy of a compiled block keeps calling the original
    block's forward, so copy before compiling. Blocks of one class share Dynamo's graph (their parameters
    are graph inputs), so depth does not multiply compile time."""
    compiled = torch.compile(block.forward, **compile_kw)

    def forward(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        # outside the compiled region: marks the inputs, then enters it
        torch._dynamo.maybe_mark_dynamic(x, 0)
        torch._dynamo.maybe_mark_dynamic(s, 0)
        return compiled(x, s)

    block.forward = forward
    return block


def compile_blocks(denoiser: Denoiser, **compile_kw) -> Denoiser:
    """Compile each block and the final layer one by one, in place (call before fully_shard, as torchtitan
    does). The embedders and SiLU(c) stay eager: they run once per step and are small."""
    for block in (*denoiser.blocks, denoiser.final):
        compile_block(block, **compile_kw)
    return denoiser


def sincos_2d(width: int, grid: int) -> torch.Tensor:
    """Fixed (grid * grid, width) embedding: first half encodes the column, last half the row."""
    quarter = width // 4
    omega = 10000.0 ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    pos = torch.arange(grid, dtype=torch.float64)
    col = pos.repeat(grid)  # row-major: token = row * grid + col
    row = pos.repeat_interleave(grid)

    def enc(p):
        a = p[:, None] * omega[None]
        return torch.cat([torch.sin(a), torch.cos(a)], dim=1)

    return torch.cat([enc(col), enc(row)], dim=1).float()


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of integer timesteps, cos half first."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_features(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=True)
        self.proj = nn.Linear(width, width)

    def core(self, x: torch.Tensor) -> torch.Tensor:
        """qkv and SDPA, before the output projection: (b, n, w) -> (b, n, w)."""
        b, n, w = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return y.transpose(1, 2).reshape(b, n, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.core(x))


class DiTBlock(nn.Module):
    def __init__(self, width: int, heads: int, ops: DenoiserOps):
        super().__init__()
        self.ops = ops
        self.attn = Attention(width, heads)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width))
        # ada[0] (the SiLU) is not called: s = SiLU(c) comes in, computed once for every block. It keeps
        # the state dict's names (ada.1.*) those of the reference's Sequential(SiLU, Linear).
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """x (b, N, W) and s = SiLU(c) (b, N, W) -> (b, N, W)."""
        ops = self.ops
        sh1, sc1, g1, sh2, sc2, g2 = adaln_chunks(s, self.ada[-1], 6)
        y = self.attn.core(ops.ln_modulate(x, sh1, sc1, LN_EPS))
        x = ops.gated_linear(y, self.attn.proj.weight, self.attn.proj.bias, g1, x)
        fc1, fc2 = self.mlp[0], self.mlp[2]
        return ops.mlp_branch(x, sh2, sc2, g2, fc1.weight, fc1.bias, fc2.weight, fc2.bias, "gelu_tanh", LN_EPS)


class MLPBlock(nn.Module):
    def __init__(self, width: int, ops: DenoiserOps):
        super().__init__()
        self.ops = ops
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))  # ada[0] unused, as in DiTBlock

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        sh, sc, g = adaln_chunks(s, self.ada[-1], 3)
        fc1, fc2 = self.mlp[0], self.mlp[2]
        return self.ops.mlp_branch(x, sh, sc, g, fc1.weight, fc1.bias, fc2.weight, fc2.bias, "silu", LN_EPS)


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_channels: int, ops: DenoiserOps):
        super().__init__()
        self.ops = ops
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))  # ada[0] unused, as in DiTBlock
        self.linear = nn.Linear(width, out_channels)

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """x, s (b, N, W) -> (b * N, C): flat rows, one addmm. A 3-D Linear computes the same addmm over the
        flattened rows and returns a view of it, and the denoiser's output must not be a view (FSDP2 hooks it)."""
        sh, sc = adaln_chunks(s, self.ada[-1], 2)
        return self.linear(self.ops.ln_modulate(x, sh, sc, LN_EPS).flatten(0, 1))


class Denoiser(nn.Module):
    """kind="dit": adaLN-Zero DiT blocks with attention over one image; kind="mlp": per-token blocks."""

    def __init__(
        self,
        kind: str,
        cond_width: int,
        width: int,
        depth: int,
        heads: int,
        grid: int,
        channels: int = 64,
        impl: str = "torch",
        dtype: str = "fp32",
        repeat_cond: bool = False,
    ):
        """repeat_cond: the reference's way, the condition repeated per replica and embedded R times
        (model.denoiser.repeat_cond; the same numbers, more work)."""
        super().__init__()
        self.repeat_cond = repeat_cond
        if kind not in ("dit", "mlp"):
            raise ValueError(f"model.denoiser.kind must be 'dit' or 'mlp', got {kind!r}")
        if impl not in OPS:  # resolve_impl turns "auto" into one of them (fastross.build.resolve, before any build)
            how = ": resolve it for the device first (fastross.build)" if impl in IMPLS else ""
            raise ValueError(f"model.denoiser.impl must be one of {', '.join(map(repr, OPS))}, got {impl!r}{how}")
        self.kind = kind
        self.impl = impl  # a record of what was built; nothing branches on it
        self.ops = ops = OPS[impl]
        if dtype not in DTYPES:
            raise ValueError(f"model.denoiser.dtype must be one of {', '.join(map(repr, DTYPES))}, got {dtype!r}")
        self.precision = dtype  # model.denoiser.dtype: applied by mp_policy when the model is sharded
        self.x_embed = nn.Linear(channels, width)
        self.t_embed = TimestepEmbedder(width)
        self.c_embed = nn.Sequential(nn.SiLU(), nn.Linear(cond_width, width))
        if kind == "dit":
            self.blocks = nn.ModuleList(DiTBlock(width, heads, ops) for _ in range(depth))
            self.register_buffer("pos_embed", sincos_2d(width, grid), persistent=False)
        else:
            self.blocks = nn.ModuleList(MLPBlock(width, ops) for _ in range(depth))
            self.pos_embed = None
        self.final = FinalLayer(width, channels, ops)
        self.reset_parameters()

    def init_rules(self) -> dict[str, init.Rule]:
        """Each parameter's init: xavier_uniform weights and zero biases, normal(0.02) for the timestep MLP,
        zeros for every adaLN output projection and the final Linear (adaLN-Zero)."""
        zero = [blk.ada[-1] for blk in self.blocks] + [self.final.ada[-1], self.final.linear]
        t_mlp = [self.t_embed.mlp[0], self.t_embed.mlp[2]]
        rules = {}
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                weight = (
                    init.zeros
                    if any(m is z for z in zero)
                    else (init.normal(0.02) if any(m is t for t in t_mlp) else init.xavier_uniform)
                )
                rules[f"{name}.weight"], rules[f"{name}.bias"] = weight, init.zeros
        return rules

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None, prefix: str = "") -> None:
        """seed None: torch's global RNG; else fastross.model.init's keyed draws for this module at `prefix`."""
        init.apply_rules(self, self.init_rules(), seed, prefix)
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        if self.pos_embed is not None:
            self.pos_embed.copy_(sincos_2d(self.pos_embed.shape[1], int(math.isqrt(self.pos_embed.shape[0]))))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x_t (n, R, N, C), t (n, R), cond (n, N, H) -> predicted eps as rows (n * R * N, C): image, then replica,
        then token (view it as (n, R, N, C)). Flat rows because FSDP2 hooks this module's output, and it must not be a
        view (a view's in-place change would drop the hook; torch warns at every step)."""
        n, r, tokens, ch = x_t.shape
        dtype = self.x_embed.weight.dtype
        x = self.x_embed(x_t.to(dtype))
        if self.pos_embed is not None:
            x = x + self.pos_embed.to(dtype)
        x = x.reshape(n * r, tokens, -1)
        if self.repeat_cond:  # the reference: (n * R, N, H) conditions, each embedded
            c = self.c_embed(cond.to(dtype).repeat_interleave(r, dim=0))
            s = F.silu(c + self.t_embed(t).reshape(n * r, 1, -1))
        else:  # SiLU(c) (n, R, N, W), the condition embedded once per image
            s = self.ops.silu_cond(self.c_embed(cond.to(dtype)), self.t_embed(t)).reshape(n * r, tokens, -1)
        for blk in self.blocks:
            x = blk(x, s)
        return self.final(x, s)  # (n * R * N, C), not a view (FinalLayer)
