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


class FusedLinearCrossEntropy(nn.Module):
    def __init__(self):
        super().__init__()
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        self.loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="sum", accum_dtype=torch.float32)

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor) -> torch.Tensor:
        return self.loss(weight, hidden, targets, bias).float()


def build(fused: bool) -> nn.Module:
    return FusedLinearCrossEntropy() if fused else LinearCrossEntropy()
