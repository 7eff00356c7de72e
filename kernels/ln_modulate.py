"""LayerNorm without affine parameters fused with adaLN modulation: y = LN(x) * (1 + scale) + shift.

Design
------
One program normalises BLOCK_M whole rows (the row's statistics need all of it; W <= 8192 fits
a tile). Statistics are kept in fp32 and saved (8 bytes per row) so that backward never
re-reduces x for them. `shift` and `scale` are read through their row stride: they are the
chunks of the adaLN projection's output (a (rows, k * W) tensor), consumed as views with no
copy and no extra pass.

Backward, with g = dy * (1 + scale) and xhat = (x - mean) * rstd:
    dx     = rstd * (g - mean(g) - xhat * mean(g * xhat))   (+ an optional residual gradient)
    dscale = dy * xhat
    dshift = dy                                              (returned as is: no pass at all)
Only x, the statistics and the scale view are kept for backward; y is recomputed by callers
that need it again (fused_mlp recomputes it for fc1's weight gradient instead of storing it).

Plan at the 7B shapes (M = 16 x 4 x 729 = 46656 rows, W = 1024, bf16; one (M, W) tensor is
95.6 MB; H100 ~3 TB/s): no matmul FLOPs; ~10 flops per element (0.5 GFLOP) against
  forward:  reads x, shift, scale, writes y          = 4 x 95.6 MB -> 127 us at 3 TB/s
  backward: reads dy, x, scale (+ residual grad), writes dx, dscale = 5-6 x 95.6 MB -> 160-190 us
Purely memory-bound; the target is >= 70 % of the copy bandwidth measured in the same run.
Eager PyTorch spends ~3x the bytes: layer_norm, then (1 + scale) materialised, a mul and an add,
each a pass, and it keeps LN's output and (1 + scale) alive for backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import check_device, elementwise_target, row_block, rows2d, to_dtype


@triton.jit
def _ln_mod_fwd_kernel(
    x_ptr,  # (M, W) input rows, row stride stride_x
    sh_ptr,  # (M, W) shift, row stride stride_sh (a view into the adaLN output)
    sc_ptr,  # (M, W) scale, row stride stride_sc
    y_ptr,  # (M, W) output, contiguous
    mean_ptr,  # (M,) fp32 row means (written)
    rstd_ptr,  # (M,) fp32 row 1 / sqrt(var + eps) (written)
    M,
    W,
    stride_x,
    stride_sh,
    stride_sc,
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_W)
    rmask = rows < M
    mask = rmask[:, None] & (cols < W)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / W
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / W + eps)
    sh = tl.load(sh_ptr + r64 * stride_sh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    sc = tl.load(sc_ptr + r64 * stride_sc + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * (1.0 + sc) + sh
    tl.store(y_ptr + r64 * W + cols[None, :], to_dtype(y, y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=rmask)
    tl.store(rstd_ptr + rows, rstd, mask=rmask)


@triton.jit
def _ln_mod_bwd_kernel(
    dy_ptr,  # (M, W) gradient of y, contiguous
    x_ptr,  # (M, W) input rows, row stride stride_x
    sc_ptr,  # (M, W) scale, row stride stride_sc
    mean_ptr,  # (M,) fp32 saved means
    rstd_ptr,  # (M,) fp32 saved rstd
    dres_ptr,  # (M, W) gradient added to dx (a residual's), contiguous; unused unless HAS_DRES
    dx_ptr,  # (M, W) output: gradient of x, contiguous
    dsc_ptr,  # (M, W) output: gradient of scale, contiguous
    M,
    W,
    stride_x,
    stride_sc,
    HAS_DRES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_W)
    rmask = rows < M
    mask = rmask[:, None] & (cols < W)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    dense = r64 * W + cols[None, :]
    dy = tl.load(dy_ptr + dense, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + r64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    sc = tl.load(sc_ptr + r64 * stride_sc + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0)
    rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
    xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    g = dy * (1.0 + sc)
    c1 = tl.sum(g * xhat, axis=1) / W
    c2 = tl.sum(g, axis=1) / W
    dx = (g - c2[:, None] - xhat * c1[:, None]) * rstd[:, None]
    if HAS_DRES:
        dx += tl.load(dres_ptr + dense, mask=mask, other=0.0).to(tl.float32)
    tl.store(dx_ptr + dense, to_dtype(dx, dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dsc_ptr + dense, to_dtype(dy * xhat, dsc_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers


def ln_modulate_fwd(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float):
    """x (M, W) with unit column stride, shift/scale (M, W) views -> (y (M, W) contiguous, mean, rstd)."""
    m, w = x.shape
    if shift.shape != (m, w) or scale.shape != (m, w):
        raise ValueError(f"x {tuple(x.shape)}, shift {tuple(shift.shape)}, scale {tuple(scale.shape)} differ")
    if x.stride(1) != 1 or shift.stride(1) != 1 or scale.stride(1) != 1:
        raise ValueError("ln_modulate needs unit column strides (rows may be strided)")
    check_device(x, shift, scale)
    y = torch.empty(m, w, device=x.device, dtype=x.dtype)
    mean = torch.empty(m, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    bm, bw = row_block(w, elementwise_target())
    _ln_mod_fwd_kernel[(triton.cdiv(m, bm),)](
        x,
        shift,
        scale,
        y,
        mean,
        rstd,
        m,
        w,
        x.stride(0),
        shift.stride(0),
        scale.stride(0),
        eps,
        BLOCK_M=bm,
        BLOCK_W=bw,
        num_warps=4 if bw <= 1024 else 8,
    )
    return y, mean, rstd


def ln_modulate_bwd(dy, x, scale, mean, rstd, dres=None):
    """Gradients (dx, dscale) of ln_modulate_fwd; dres, when given, is added to dx. dshift is dy itself."""
    m, w = x.shape
    dy = dy.contiguous()
    if dres is not None:
        dres = dres.contiguous()
    dx = torch.empty(m, w, device=x.device, dtype=x.dtype)
    dsc = torch.empty(m, w, device=x.device, dtype=scale.dtype)
    bm, bw = row_block(w, elementwise_target())
    _ln_mod_bwd_kernel[(triton.cdiv(m, bm),)](
        dy,
        x,
        scale,
        mean,
        rstd,
        dres if dres is not None else dy,
        dx,
        dsc,
        m,
        w,
        x.stride(0),
        scale.stride(0),
        HAS_DRES=dres is not None,
        BLOCK_M=bm,
        BLOCK_W=bw,
        num_warps=4 if bw <= 1024 else 8,
    )
    return dx, dsc


# ----------------------------------------------------------------------------- operators
# torch.library custom ops (not an autograd.Function): torch.compile treats them as opaque calls
# with a fake (shape-only) implementation, so a compiled block can hold them, also under the
# Triton interpreter. The forward op returns what backward needs (the statistics) as extra,
# non-differentiable outputs; the backward op is a custom op too, so AOTAutograd can trace the
# backward formula without entering a Triton launch.


@torch.library.custom_op("fastross::ln_modulate", mutates_args=())
def ln_modulate_op(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y shaped like x, row means, row rstd) with the statistics shaped x.shape[:-1], fp32."""
    w = x.shape[-1]
    y, mean, rstd = ln_modulate_fwd(rows2d(x, w, "x"), rows2d(shift, w, "shift"), rows2d(scale, w, "scale"), eps)
    return y.view(x.shape), mean.view(x.shape[:-1]), rstd.view(x.shape[:-1])


@ln_modulate_op.register_fake
def _(x, shift, scale, eps):
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return x.new_empty(x.shape), stats, torch.empty_like(stats)


@torch.library.custom_op("fastross::ln_modulate_bwd", mutates_args=())
def ln_modulate_bwd_op(
    dy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx shaped like x, dscale shaped like scale); dshift is dy itself."""
    w = x.shape[-1]
    x2, sc2 = rows2d(x, w, "x"), rows2d(scale, w, "scale")
    dx, dsc = ln_modulate_bwd(dy.reshape(x2.shape), x2, sc2, mean.reshape(-1), rstd.reshape(-1))
    return dx.view(x.shape), dsc.view(scale.shape)


@ln_modulate_bwd_op.register_fake
def _(dy, x, scale, mean, rstd):
    return x.new_empty(x.shape), scale.new_empty(scale.shape)


def _ln_modulate_setup(ctx, inputs, output):
    x, shift, scale, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, scale, mean, rstd)
    ctx.shift_shape = shift.shape
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the statistics


def _ln_modulate_backward(ctx, dy, _dmean, _drstd):
    x, scale, mean, rstd = ctx.saved_tensors
    dx, dsc = ln_modulate_bwd_op(dy, x, scale, mean, rstd)
    return dx, dy.reshape(ctx.shift_shape) if ctx.needs_input_grad[1] else None, dsc, None


ln_modulate_op.register_autograd(_ln_modulate_backward, setup_context=_ln_modulate_setup)


def ln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LN(x) (no affine) * (1 + scale) + shift over the last dimension; shift, scale shaped like x."""
    return ln_modulate_op(x, shift, scale, eps)[0]


def ln_modulate_ref(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=eps) * (1 + scale) + shift
