"""The text loss: next-token cross-entropy summed over the supervised positions (ROSS_SPEC.md section 5).

Two modules with one signature, `(hidden (K, H), weight (V, H), bias, targets (K,)) -> fp32 sum`, chosen once
when the model is built (`model.fused_ce`):
- `LinearCrossEntropy`, the reference: logits (K, V) are materialised, upcast to fp32, and reduced by F.cross_entropy.
  At the 7B shapes (K ~ 8k supervised tokens of a 16k micro-batch, V = 152064) that is 2.4 GB of bf16 logits,
  4.9 GB as fp32, plus their gradient.
- `FusedLinearCrossEntropy`: fused linear cross-entropy. It walks the rows in chunks, computes each chunk's
  logits, loss and gradients in one go and keeps only the gradients of hidden and weight, so the
  full-vocabulary logits never exist. The weight's gradient is accumulated in fp32 across chunks, as the
  reference's single matmul accumulates it. On CUDA it is Liger's Triton kernel (`accum_dtype` fp32); elsewhere
  the same algorithm in torch (`chunked_linear_cross_entropy`): Liger has no CPU path, and its kernel in Triton's
  interpreter walks one row per program, 35x slower than plain CE at the tiny model's shapes
  (`python benchmarks/text_loss.py`), while the torch chunks run at the matmuls' speed.

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
    def forward(
        self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
    ) -> torch.Tensor:
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


CHUNK_ELEMENTS = 1 << 24  # logits per chunk of the torch path: 64 MB in fp32 (110 rows at the 152k vocabulary)


def chunked_linear_cross_entropy(
    weight: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """sum over rows of CE(hidden @ weight^T + bias, targets), with the gradients formed chunk by chunk in forward.

    Liger's signature and algorithm in torch: each chunk's logits are made in fp32, reduced to the loss, and turned at
    once into d logits = softmax - onehot, which gives the chunk's d hidden and adds to d weight (fp32); then they are
    freed. The returned loss's backward hands those gradients on unscaled: wrap it in `_PrecomputedGrads`, which
    takes them out with an incoming gradient of 1 and scales them by the real one.
    """
    rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
    loss = hidden.new_zeros((), dtype=torch.float32)
    d_hidden = torch.zeros_like(hidden) if hidden.requires_grad else None
    d_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
    d_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and bias.requires_grad else None
    with torch.no_grad():
        for start in range(0, hidden.shape[0], rows):
            h, t = hidden[start : start + rows], targets[start : start + rows]
            logits = F.linear(h, weight, bias).float()
            kept = t != IGNORE
            safe = torch.where(kept, t, 0)
            lse = torch.logsumexp(logits, dim=-1)
            loss += ((lse - logits.gather(1, safe[:, None])[:, 0]) * kept).sum()
            d_logits = logits.sub_(lse[:, None]).exp_()  # softmax, in the logits' memory
            d_logits[torch.arange(len(t)), safe] -= 1.0
            d_logits *= kept[:, None]
            if d_hidden is not None:
                d_hidden[start : start + rows] = (d_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if d_weight is not None:
                d_weight.addmm_(d_logits.t(), h.float())
            if d_bias is not None:
                d_bias += d_logits.sum(dim=0)
    return _GradsGiven.apply(loss, hidden, weight, bias, d_hidden, d_weight, d_bias)


class _GradsGiven(torch.autograd.Function):
    """The loss, whose backward gives the precomputed gradients of (hidden, weight, bias) times the incoming one."""

    @staticmethod
    def forward(ctx, loss, hidden, weight, bias, d_hidden, d_weight, d_bias):
        ctx.dtypes = [x.dtype if x is not None else None for x in (hidden, weight, bias)]
        ctx.save_for_backward(d_hidden, d_weight, d_bias)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_out):
        grads = [g * grad_out if g is not None else None for g in ctx.saved_tensors]
        grads = [g.to(dt) if g is not None else None for g, dt in zip(grads, ctx.dtypes)]
        return (None, *grads, None, None, None)


class FusedLinearCrossEntropy(nn.Module):
    """backend "auto": Liger's kernel on CUDA tensors, `chunked_linear_cross_entropy` elsewhere; "liger" or "torch"
    force one (tests and benchmarks/text_loss.py compare them)."""

    def __init__(self, backend: str = "auto"):
        super().__init__()
        if backend not in ("auto", "liger", "torch"):
            raise ValueError(f"FusedLinearCrossEntropy backend must be 'auto', 'liger' or 'torch', got {backend!r}")
        self.backend = backend
        self._liger = None

    def liger(self):
        if self._liger is None:
            from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

            self._liger = LigerFusedLinearCrossEntropyLoss(
                ignore_index=IGNORE, reduction="sum", accum_dtype=torch.float32
            )
        return self._liger

    def forward(
        self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
    ) -> torch.Tensor:
        use_liger = self.backend == "liger" or (self.backend == "auto" and hidden.device.type == "cuda")
        loss_fn = self.liger() if use_liger else chunked_linear_cross_entropy
        return _PrecomputedGrads.apply(loss_fn, hidden, weight, bias, targets).float()


def build(fused: bool) -> nn.Module:
    return FusedLinearCrossEntropy() if fused else LinearCrossEntropy()
