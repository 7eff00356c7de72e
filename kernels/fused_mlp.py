"""The timestep-conditioned MLP branch, and the gated attention projection, fused.

    out = x + gate * (fc2(act(fc1(LN(x) * (1 + scale) + shift))))        FusedMLPBranch
    out = res + gate * (y @ W^T + b)                                      GatedLinear

act is tanh-GELU with hidden 4W (DiT blocks) or SiLU with hidden W (the MLP variant).

Design
------
Forward, three kernels, each one pass:
  1. ln_modulate: xm = LN(x) * (1 + scale) + shift            (shift, scale: adaLN chunk views)
  2. fc1 with epilogue "bias_act": h = xm W1^T + b1 (kept), a = act(h) (freed after fc2)
  3. fc2 with epilogue "gate_res": b = a W2^T + b2 (kept), out = x + gate * b
Saved for backward: x, the LN statistics (8 bytes per row), h and b, and views of the adaLN
output (which the projection's backward needs anyway). xm and a are recomputed in backward,
where recomputing is one cheap pass and storing them would cost 1 + 4 (DiT) rows of W each.
Backward:
  gate_backward:         d_b = dout * gate, d_gate = dout * b, db2 = colsum(d_b)
  act_grad epilogue:     dh = (d_b W2) * act'(h), a = act(h), db1 = colsum(dh)  (one matmul)
  cuBLAS:                dW2 = d_b^T a;  dW1 = dh^T xm (xm recomputed by ln_modulate);  d_xm = dh W1
  ln_modulate backward:  dx = dout + LN-backward(d_xm), dscale = d_xm * xhat, dshift = d_xm
The gated projection of the attention branch is the same "gate_res" epilogue on the proj
matmul, with gate_backward and two cuBLAS matmuls in backward.

Plan at the 7B shapes (M = 46656 tokens, W = 1024, hidden 4W, bf16; H100 790 TFLOP/s, 3 TB/s;
one (M, W) bf16 tensor = 95.6 MB):
  MLP matmul FLOPs: forward 2 x 2 M W 4W = 783 GFLOP, backward 1566 GFLOP -> 2.97 ms at peak.
  Bytes outside the matmuls' operands: forward ln_modulate 4 + fc1 epilogue 8 + fc2 epilogue 4
  = 16 x 95.6 MB (0.51 ms if exposed); backward ~26 x 95.6 MB (0.83 ms). Eager bf16 moves
  ~2x that and keeps LN out, (1 + scale), xm, h, act and b (12 rows of W) for backward; this
  keeps h and b (5 rows; x and the adaLN output are kept by both).
  Gated projection: forward 2 M W W = 98 GFLOP; backward 196 GFLOP; it keeps b (1 row).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import rows2d
from .linear_epilogue import act_ref, gate_backward, linear_epilogue
from .ln_modulate import ln_modulate_bwd, ln_modulate_fwd, ln_modulate_ref

# torch.library custom ops (opaque to torch.compile, with fake implementations), see ln_modulate.py.
# The forward ops return the tensors their backward needs (LN statistics, h, b) as extra outputs.


@torch.library.custom_op("fastross::fused_mlp_branch", mutates_args=())
def fused_mlp_branch_op(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    gate: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    act: str,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out shaped like x, LN mean (M,), LN rstd (M,), h (M, hidden), b (M, W)) with M the rows of x."""
    w = x.shape[-1]
    x2 = rows2d(x, w, "x")
    sh2, sc2, g2 = rows2d(shift, w, "shift"), rows2d(scale, w, "scale"), rows2d(gate, w, "gate")
    xm, mean, rstd = ln_modulate_fwd(x2, sh2, sc2, eps)
    h, a = linear_epilogue(xm, w1.t(), bias=b1, epilogue="bias_act", act=act)
    del xm
    b, out = linear_epilogue(a, w2.t(), bias=b2, epilogue="gate_res", aux=x2, gate=g2)
    return out.view(x.shape), mean, rstd, h, b


@fused_mlp_branch_op.register_fake
def _(x, shift, scale, gate, w1, b1, w2, b2, act, eps):
    m = x.numel() // x.shape[-1]
    stats = x.new_empty((m,), dtype=torch.float32)
    return (
        x.new_empty(x.shape),
        stats,
        torch.empty_like(stats),
        x.new_empty((m, w1.shape[0])),
        x.new_empty((m, x.shape[-1])),
    )


@torch.library.custom_op("fastross::fused_mlp_branch_bwd", mutates_args=())
def fused_mlp_branch_bwd_op(
    dout: torch.Tensor,
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    gate: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    h: torch.Tensor,
    b: torch.Tensor,
    act: str,
    eps: float,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]:
    """(dx, d_xm (= dshift), dscale, dgate, dw1, db1 fp32, dw2, db2 fp32); the first four shaped like x."""
    w = x.shape[-1]
    x2 = rows2d(x, w, "x")
    sh2, sc2, g2 = rows2d(shift, w, "shift"), rows2d(scale, w, "scale"), rows2d(gate, w, "gate")
    d2 = dout.reshape(x2.shape)
    d_b, d_gate, db2 = gate_backward(d2, g2, b)
    dh, a, db1 = linear_epilogue(d_b, w2, epilogue="act_grad", act=act, aux=h, col_sums=True)
    dw2 = d_b.t() @ a
    del a
    xm, _, _ = ln_modulate_fwd(x2, sh2, sc2, eps)  # recomputed: cheaper than keeping it
    dw1 = dh.t() @ xm
    del xm
    d_xm = dh @ w1
    dx, d_sc = ln_modulate_bwd(d_xm, x2, sc2, mean, rstd, dres=d2)
    return (dx.view(x.shape), d_xm.view(x.shape), d_sc.view(x.shape), d_gate.view(x.shape), dw1, db1, dw2, db2)


@fused_mlp_branch_bwd_op.register_fake
def _(dout, x, shift, scale, gate, w1, w2, mean, rstd, h, b, act, eps):
    like = [x.new_empty(x.shape) for _ in range(4)]
    return (
        *like,
        w1.new_empty(w1.shape),
        w1.new_empty((w1.shape[0],), dtype=torch.float32),
        w2.new_empty(w2.shape),
        w2.new_empty((w2.shape[0],), dtype=torch.float32),
    )


def _mlp_setup(ctx, inputs, output):
    x, shift, scale, gate, w1, b1, w2, b2, act, eps = inputs
    _, mean, rstd, h, b = output
    ctx.save_for_backward(x, shift, scale, gate, w1, w2, mean, rstd, h, b)
    ctx.act, ctx.eps = act, eps
    ctx.shapes = (shift.shape, scale.shape, gate.shape, b1.dtype, b2.dtype)
    ctx.mark_non_differentiable(mean, rstd, h, b)
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the saved extras


def _mlp_backward(ctx, dout, *_extras):
    shs, scs, gs, b1_dtype, b2_dtype = ctx.shapes
    dx, d_xm, d_sc, d_gate, dw1, db1, dw2, db2 = fused_mlp_branch_bwd_op(dout, *ctx.saved_tensors, ctx.act, ctx.eps)
    return (
        dx,
        d_xm.reshape(shs),
        d_sc.reshape(scs),
        d_gate.reshape(gs),
        dw1,
        db1.to(b1_dtype),
        dw2,
        db2.to(b2_dtype),
        None,
        None,
    )


fused_mlp_branch_op.register_autograd(_mlp_backward, setup_context=_mlp_setup)


def fused_mlp_branch(x, shift, scale, gate, w1, b1, w2, b2, act: str = "gelu_tanh", eps: float = 1e-6):
    """x + gate * fc2(act(fc1(LN(x) * (1 + scale) + shift))) over the last dimension of x (.., W)."""
    return fused_mlp_branch_op(x, shift, scale, gate, w1, b1, w2, b2, act, eps)[0]


@torch.library.custom_op("fastross::gated_linear", mutates_args=())
def gated_linear_op(
    y: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, gate: torch.Tensor, res: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out shaped like res, b = y @ w^T + bias as (M, W)) for backward."""
    wd = w.shape[0]
    y2 = rows2d(y, y.shape[-1], "y")
    g2, r2 = rows2d(gate, wd, "gate"), rows2d(res, wd, "res")
    b, out = linear_epilogue(y2, w.t(), bias=bias, epilogue="gate_res", aux=r2, gate=g2)
    return out.view(res.shape), b


@gated_linear_op.register_fake
def _(y, w, bias, gate, res):
    return res.new_empty(res.shape), res.new_empty((res.numel() // w.shape[0], w.shape[0]))


@torch.library.custom_op("fastross::gated_linear_bwd", mutates_args=())
def gated_linear_bwd_op(
    dout: torch.Tensor, y: torch.Tensor, w: torch.Tensor, gate: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dy shaped like y, dw, dbias fp32, dgate shaped like gate); dres is dout itself."""
    y2 = rows2d(y, y.shape[-1], "y")
    d_b, d_gate, dbias = gate_backward(dout.reshape(b.shape), rows2d(gate, w.shape[0], "gate"), b)
    return (d_b @ w).view(y.shape), d_b.t() @ y2, dbias, d_gate.view(gate.shape)


@gated_linear_bwd_op.register_fake
def _(dout, y, w, gate, b):
    return (
        y.new_empty(y.shape),
        w.new_empty(w.shape),
        w.new_empty((w.shape[0],), dtype=torch.float32),
        gate.new_empty(gate.shape),
    )


def _gated_setup(ctx, inputs, output):
    y, w, bias, gate, _ = inputs
    ctx.save_for_backward(y, w, gate, output[1])
    ctx.bias_dtype = bias.dtype
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _gated_backward(ctx, dout, _db):
    dy, dw, dbias, d_gate = gated_linear_bwd_op(dout, *ctx.saved_tensors)
    return dy, dw, dbias.to(ctx.bias_dtype), d_gate, dout


gated_linear_op.register_autograd(_gated_backward, setup_context=_gated_setup)


def gated_linear(y, w, bias, gate, res):
    """res + gate * (y @ w^T + bias): the attention branch's output projection and gated residual."""
    return gated_linear_op(y, w, bias, gate, res)[0]


# ----------------------------------------------------------------------------- references


def fused_mlp_branch_ref(x, shift, scale, gate, w1, b1, w2, b2, act: str = "gelu_tanh", eps: float = 1e-6):
    xm = ln_modulate_ref(x, shift, scale, eps)
    return x + gate * F.linear(act_ref(F.linear(xm, w1, b1), act), w2, b2)


def gated_linear_ref(y, w, bias, gate, res):
    return res + gate * F.linear(y, w, bias)
