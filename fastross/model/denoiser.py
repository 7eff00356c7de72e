"""The ROSS denoiser (ROSS_SPEC.md section 3): a DiT over one image's tokens, or a per-token MLP.

Both take noisy latent tokens x_t (n, R, N, 64), integer timesteps t (n, R) and the
condition (n, N, H), the LLM's normed hidden states at the image's visual tokens, and
predict eps (n, R, N, 64). The condition embedding is computed once per image and
broadcast over its R replicas.

Two implementations share every parameter (one state dict, switchable at any checkpoint):
impl="torch" is eager PyTorch, the reference; impl="triton" runs the same maths through
fastross.kernels: SiLU(c) once for all adaLN projections, LayerNorm + modulation fused, the
MLP branch and the attention output projection with their gated residuals fused into the
matmul epilogues (attention itself is PyTorch SDPA).

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

import torch
import torch.nn.functional as F
from torch import nn

from fastross.kernels.adaln import adaln_chunks, silu_cond
from fastross.kernels.fused_mlp import fused_mlp_branch, gated_linear
from fastross.kernels.ln_modulate import ln_modulate
from fastross.model import init

LN_EPS = 1e-6  # the blocks' and the final layer's LayerNorm


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


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
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = Attention(width, heads)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c).chunk(6, dim=-1)
        w = x.shape[-1]
        x = x + g1 * self.attn(modulate(F.layer_norm(x, (w,), eps=LN_EPS), sh1, sc1))
        return x + g2 * self.mlp(modulate(F.layer_norm(x, (w,), eps=LN_EPS), sh2, sc2))

    def forward_fused(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """The same block through fastross.kernels; s = SiLU(c), shared by every block."""
        sh1, sc1, g1, sh2, sc2, g2 = adaln_chunks(s, self.ada[-1], 6)
        y = self.attn.core(ln_modulate(x, sh1, sc1, LN_EPS))
        x = gated_linear(y, self.attn.proj.weight, self.attn.proj.bias, g1, x)
        fc1, fc2 = self.mlp[0], self.mlp[2]
        return fused_mlp_branch(x, sh2, sc2, g2, fc1.weight, fc1.bias, fc2.weight, fc2.bias, "gelu_tanh", LN_EPS)


class MLPBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        sh, sc, g = self.ada(c).chunk(3, dim=-1)
        return x + g * self.mlp(modulate(F.layer_norm(x, (x.shape[-1],), eps=LN_EPS), sh, sc))

    def forward_fused(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        sh, sc, g = adaln_chunks(s, self.ada[-1], 3)
        fc1, fc2 = self.mlp[0], self.mlp[2]
        return fused_mlp_branch(x, sh, sc, g, fc1.weight, fc1.bias, fc2.weight, fc2.bias, "silu", LN_EPS)


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        sh, sc = self.ada(c).chunk(2, dim=-1)
        return self.linear(modulate(F.layer_norm(x, (x.shape[-1],), eps=LN_EPS), sh, sc))

    def forward_fused(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        sh, sc = adaln_chunks(s, self.ada[-1], 2)
        return self.linear(ln_modulate(x, sh, sc, LN_EPS))


class Denoiser(nn.Module):
    """kind="dit": adaLN-Zero DiT blocks with attention over one image; kind="mlp": per-token blocks."""

    def __init__(self, kind: str, cond_width: int, width: int, depth: int, heads: int, grid: int, channels: int = 64,
                 impl: str = "torch"):
        super().__init__()
        if kind not in ("dit", "mlp"):
            raise ValueError(f"model.denoiser.kind must be 'dit' or 'mlp', got {kind!r}")
        if impl not in ("torch", "triton"):
            raise ValueError(f"model.denoiser.impl must be 'torch' or 'triton', got {impl!r}")
        self.kind = kind
        self.impl = impl
        self.x_embed = nn.Linear(channels, width)
        self.t_embed = TimestepEmbedder(width)
        self.c_embed = nn.Sequential(nn.SiLU(), nn.Linear(cond_width, width))
        if kind == "dit":
            self.blocks = nn.ModuleList(DiTBlock(width, heads) for _ in range(depth))
            self.register_buffer("pos_embed", sincos_2d(width, grid), persistent=False)
        else:
            self.blocks = nn.ModuleList(MLPBlock(width) for _ in range(depth))
            self.pos_embed = None
        self.final = FinalLayer(width, channels)
        self.reset_parameters()

    def init_rules(self) -> dict[str, init.Rule]:
        """Each parameter's init: xavier_uniform weights and zero biases, normal(0.02) for the timestep MLP,
        zeros for every adaLN output projection and the final Linear (adaLN-Zero)."""
        zero = [blk.ada[-1] for blk in self.blocks] + [self.final.ada[-1], self.final.linear]
        t_mlp = [self.t_embed.mlp[0], self.t_embed.mlp[2]]
        rules = {}
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                weight = init.zeros if any(m is z for z in zero) else (
                    init.normal(0.02) if any(m is t for t in t_mlp) else init.xavier_uniform)
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
        """x_t (n, R, N, C), t (n, R), cond (n, N, H) -> predicted eps (n * R, N, C), replica-major per image."""
        n, r, tokens, ch = x_t.shape
        dtype = self.x_embed.weight.dtype
        x = self.x_embed(x_t.to(dtype))
        if self.pos_embed is not None:
            x = x + self.pos_embed.to(dtype)
        x = x.reshape(n * r, tokens, -1)
        if self.impl == "triton":
            s = silu_cond(self.c_embed(cond.to(dtype)), self.t_embed(t))  # SiLU(c) (n, R, N, W), cond once per image
            s = s.view(n * r, tokens, -1)
            for blk in self.blocks:
                x = blk.forward_fused(x, s)
            return self.final.forward_fused(x, s)
        c = self.c_embed(cond.to(dtype))[:, None] + self.t_embed(t)[:, :, None]  # (n, R, N, W), cond once per image
        c = c.reshape(n * r, tokens, -1)
        for blk in self.blocks:
            x = blk(x, c)
        return self.final(x, c)  # not reshaped here: FSDP2 warns about modules that return views
