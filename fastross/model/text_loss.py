"""The text loss: next-token cross-entropy summed over the supervised positions (ROSS_SPEC.md section 5).

Two modules with one signature, `(hidden (K, H), weight (V, H), bias, targets (K,)) -> fp32 sum`, chosen once
when the model is built (`model.fused_ce`):
- `LinearCrossEntropy`, the reference: logits (K, V) are materialised, upcast to fp32, and reduced by F.cross_entropy.
  At the 7B shapes (K ~ 8k supervised tokens of a 16k micro-batch, V = 152064) that is 2.4 GB of bf16 logits,
  4.9 GB as fp32, plus their gradient.
- `FusedLinearCrossEntropy`: Liger's fused linear cross-entropy. It walks the rows in chunks, computes each
  chunk's logits, loss and gradients in one go and keeps only the gradients of hidden and weight, so the
  full-vocabulary logits never exist. The weight's gradient is accumulated in fp32 across chunks
  (`accum_dtype`), as the reference's single matmul accumulates it.

Liger's kernel forms the gradients of hidden and weight during the forward; in backward its Function multiplies them
by the incoming gradient with a Triton kernel launched once per row of the weight (V = 152064 programs), unless
that gradient is exactly 1. Ours never is (the loss is divided by the global token count), and in Triton's CPU
interpreter those launches took minutes per backward. `_PrecomputedGrads` therefore takes the gradients out of
Liger with an incoming gradient of 1, and scales them itself with one torch multiply (in place, as Liger does).

The caller passes the LLM's `lm_head.weight` from inside `RossModel.forward`, the FSDP2 root's forward, where the
root's parameters (lm_head among them) are unsharded: the kernel sees the whole weight, and its gradient flows
back into FSDP's reduce-scatter like any other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100  # targets that add nothing (the dummy entry of a micro-batch without supervised tokens)


class LinearCrossEntropy(nn.Module):
    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, weight, bias).float()
        return F.cross_entropy(logits, targets, reduction="sum", ignore_index=IGNORE)


class _PrecomputedGrads(torch.autograd.Function):
    """Runs `loss_fn` (Liger's, which forms its gradients in forward) and takes those gradients out at once with an
    incoming gradient of 1; backward scales them by the real incoming gradient. Like Liger's, its backward runs once."""

    @staticmethod
    def forward(ctx, loss_fn, hidden, weight, bias, targets):
        leaves = [x.detach().requires_grad_(x.requires_grad) if x is not None else None for x in (hidden, weight, bias)]
        wanted = [x for x in leaves if x is not None and x.requires_grad]
        with torch.enable_grad():
            loss = loss_fn(leaves[1], leaves[0], targets, leaves[2])
            grads = iter(torch.autograd.grad(loss, wanted) if wanted else ())
        ctx.has = [x is not None and x.requires_grad for x in leaves]
        ctx.save_for_backward(*[next(grads) if has else None for has in ctx.has])
        return loss.detach()

    @staticmethod
    def backward(ctx, grad_out):
        scaled = [g.mul_(grad_out.to(g.dtype)) if g is not None else None for g in ctx.saved_tensors]
        return (None, *scaled, None)


class FusedLinearCrossEntropy(nn.Module):
    def __init__(self):
        super().__init__()
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        self.loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="sum", accum_dtype=torch.float32)

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor) -> torch.Tensor:
        return _PrecomputedGrads.apply(self.loss, hidden, weight, bias, targets).float()


def build(fused: bool) -> nn.Module:
    return FusedLinearCrossEntropy() if fused else LinearCrossEntropy()
