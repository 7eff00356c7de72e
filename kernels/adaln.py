"""The adaLN conditioning input: s = SiLU(c_cond[i, j] + t_emb[i, r]), once for every adaLN projection.

Design
------
In the ROSS denoiser the condition c is per token: c[i, r, j] = c_embed(cond)[i, j] (once per
image) + t_embed(t)[i, r] (once per replica). Every block's adaLN projection, and the final
layer's, starts with SiLU(c). The reference code builds c by repeating the condition for each
replica and applies SiLU inside every block's `ada` module (depth + 1 passes over (M, W)).
Here one kernel reads the per-image condition embedding once, broadcasts the replica's
timestep embedding in registers, applies SiLU, and writes s (n, R, N, W) once; s is shared by
all the projections (each a plain cuBLAS Linear, s @ W_ada^T + b, whose (M, kW) output is
split into shift / scale / gate chunks that the fused kernels read through their row stride,
never copied). Backward reduces over the broadcast axes inside the kernel: dc_cond[i, j] sums
over the R replicas in registers; dt_emb[i, r] sums over tokens as fp32 partials per program,
finished by a small deterministic torch sum (no atomics).

Plan at the 7B shapes (n = 16, R = 4, N = 729, W = 1024, bf16): c_cond is 23.9 MB, s 95.6 MB.
  forward:  reads c_cond once (23.9 MB), writes s (95.6 MB): 40 us at 3 TB/s.
  backward: reads ds (95.6 MB) and c_cond, writes dc_cond (23.9 MB):  48 us.
Eager: a broadcast add (95.6 MB written), then SiLU per block: 4 x (read + write 95.6 MB).
The adaLN projections themselves (2 M W kW = 0.59 TFLOP per DiT block at k = 6) are matmul-
bound and go to cuBLAS unchanged; the condition embedding c_embed (2 n N H W = 85 GFLOP) runs
once per image, not once per replica (4x less than the reference recipe).
Known cost left: autograd's backward of the chunk split concatenates the chunk gradients
into one (M, kW) tensor (one extra write); avoiding it needs the whole block in one
operator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import check_device, elementwise_target, row_block, to_dtype


@triton.jit
def _silu_cond_fwd_kernel(
    cc_ptr,  # (n, N, W) condition embedding, contiguous
    te_ptr,  # (n, R, W) timestep embedding, contiguous
    s_ptr,  # (n, R, N, W) output SiLU(cc + te), contiguous
    R,
    N,
    W,
    BLOCK_T: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    img = tl.program_id(0)
    tok = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_W)
    cmask = cols < W
    mask = (tok < N)[:, None] & cmask[None, :]
    tile = tok.to(tl.int64)[:, None] * W + cols[None, :]
    cc = tl.load(cc_ptr + img.to(tl.int64) * N * W + tile, mask=mask, other=0.0).to(tl.float32)
    for r in range(R):
        row = img.to(tl.int64) * R + r
        te = tl.load(te_ptr + row * W + cols, mask=cmask, other=0.0).to(tl.float32)
        z = cc + te[None, :]
        s = z * tl.sigmoid(z)
        tl.store(s_ptr + row * N * W + tile, to_dtype(s, s_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_cond_bwd_kernel(
    ds_ptr,  # (n, R, N, W) gradient of s, contiguous
    cc_ptr,  # (n, N, W) condition embedding
    te_ptr,  # (n, R, W) timestep embedding
    dcc_ptr,  # (n, N, W) output gradient of cc
    dte_part_ptr,  # (n, R, NUM_BLOCKS, W) fp32 partial token sums of the gradient of te
    R,
    N,
    W,
    NUM_BLOCKS,
    BLOCK_T: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    img = tl.program_id(0)
    blk = tl.program_id(1)
    tok = blk * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_W)
    cmask = cols < W
    mask = (tok < N)[:, None] & cmask[None, :]
    tile = tok.to(tl.int64)[:, None] * W + cols[None, :]
    cc = tl.load(cc_ptr + img.to(tl.int64) * N * W + tile, mask=mask, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_T, BLOCK_W), dtype=tl.float32)
    for r in range(R):
        row = img.to(tl.int64) * R + r
        te = tl.load(te_ptr + row * W + cols, mask=cmask, other=0.0).to(tl.float32)
        z = cc + te[None, :]
        sig = tl.sigmoid(z)
        ds = tl.load(ds_ptr + row * N * W + tile, mask=mask, other=0.0).to(tl.float32)
        dz = tl.where(mask, ds * sig * (1.0 + z * (1.0 - sig)), 0.0)
        acc += dz
        tl.store(dte_part_ptr + (row * NUM_BLOCKS + blk) * W + cols, tl.sum(dz, axis=0), mask=cmask)
    tl.store(dcc_ptr + img.to(tl.int64) * N * W + tile, to_dtype(acc, dcc_ptr.dtype.element_ty), mask=mask)


def _blocks(w: int) -> tuple[int, int]:
    return row_block(w, elementwise_target())


def _check(cc: torch.Tensor, te: torch.Tensor) -> None:
    if cc.dim() != 3 or te.dim() != 3 or cc.shape[0] != te.shape[0] or cc.shape[2] != te.shape[2]:
        raise ValueError(f"c_cond must be (n, N, W) and t_emb (n, R, W), got {tuple(cc.shape)}, {tuple(te.shape)}")


# torch.library custom ops (opaque to torch.compile, with fake implementations), see ln_modulate.py.
@torch.library.custom_op("fastross::silu_cond", mutates_args=())
def silu_cond_op(cc: torch.Tensor, te: torch.Tensor) -> torch.Tensor:
    _check(cc, te)
    check_device(cc, te)
    cc, te = cc.contiguous(), te.contiguous()
    n, tokens, w = cc.shape
    r = te.shape[1]
    s = torch.empty(n, r, tokens, w, device=cc.device, dtype=torch.promote_types(cc.dtype, te.dtype))
    bt, bw = _blocks(w)
    _silu_cond_fwd_kernel[(n, triton.cdiv(tokens, bt))](cc, te, s, r, tokens, w, BLOCK_T=bt, BLOCK_W=bw)
    return s


@silu_cond_op.register_fake
def _(cc, te):
    _check(cc, te)
    return cc.new_empty(
        (cc.shape[0], te.shape[1], cc.shape[1], cc.shape[2]), dtype=torch.promote_types(cc.dtype, te.dtype)
    )


@torch.library.custom_op("fastross::silu_cond_bwd", mutates_args=())
def silu_cond_bwd_op(ds: torch.Tensor, cc: torch.Tensor, te: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cc, te = cc.contiguous(), te.contiguous()
    n, tokens, w = cc.shape
    r = te.shape[1]
    bt, bw = _blocks(w)
    nb = triton.cdiv(tokens, bt)
    dcc = torch.empty_like(cc)
    part = torch.empty(n, r, nb, w, device=cc.device, dtype=torch.float32)
    _silu_cond_bwd_kernel[(n, nb)](ds.contiguous(), cc, te, dcc, part, r, tokens, w, nb, BLOCK_T=bt, BLOCK_W=bw)
    return dcc, part.sum(dim=2).to(te.dtype)


@silu_cond_bwd_op.register_fake
def _(ds, cc, te):
    return cc.new_empty(cc.shape), te.new_empty(te.shape)


def _silu_cond_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _silu_cond_backward(ctx, ds):
    return silu_cond_bwd_op(ds, *ctx.saved_tensors)


silu_cond_op.register_autograd(_silu_cond_backward, setup_context=_silu_cond_setup)


def silu_cond(c_cond: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
    """SiLU(c_cond[:, None] + t_emb[:, :, None]): (n, N, W) and (n, R, W) -> (n, R, N, W)."""
    return silu_cond_op(c_cond, t_emb)


def silu_cond_ref(c_cond: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
    return F.silu(c_cond[:, None] + t_emb[:, :, None])


def adaln_chunks(s: torch.Tensor, linear: torch.nn.Linear, k: int) -> tuple[torch.Tensor, ...]:
    """The adaLN projection Linear(W -> kW) of s = SiLU(c), split into k (.., W) views (no copies)."""
    return F.linear(s, linear.weight, linear.bias).chunk(k, dim=-1)
