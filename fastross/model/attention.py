"""LLM attention over packed sequences that never crosses a sample boundary.

Registered with transformers' AttentionInterface as `fastross_<backend>`, so the Hugging
Face decoder layers call it in place of their own attention. The micro-batch's boundaries
arrive as keyword arguments that Qwen2 passes through its layers untouched:
`fastross_cu_seqlens` (B + 1,) int32, `fastross_max_seqlen` (host int) and, for the sdpa
and flex backends, `fastross_mask` (see `build_mask`), built once per micro-batch.

Backends:
- flash:  flash-attn's varlen kernel (when the package is importable);
- varlen: PyTorch's `torch.nn.attention.varlen.varlen_attn` (FlashAttention inside PyTorch, GPU);
- flex:   FlexAttention with a document mask (forward and backward on GPU; forward only on CPU);
- sdpa:   PyTorch SDPA with a block-diagonal causal mask: works everywhere, the reference.
Qwen2's grouped KV heads are handled on every path.
"""

from __future__ import annotations

import importlib.util
import inspect

import torch
import torch.nn.functional as F

from fastross.config import AttentionConfig, choices

BACKENDS = choices(AttentionConfig, "backend")  # declared once, on the config field


def resolve(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"attention.backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend != "auto":
        return backend
    if device.type != "cuda":
        return "sdpa"
    return "flash" if importlib.util.find_spec("flash_attn") is not None else "varlen"


def block_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(T,) sample ids -> (T, T) bool: query i may see key j iff same sample and j <= i."""
    t = doc_ids.shape[0]
    causal = torch.ones(t, t, dtype=torch.bool, device=doc_ids.device).tril_()
    return causal & (doc_ids[:, None] == doc_ids[None, :])


def document_block_mask(doc_ids: torch.Tensor):
    """FlexAttention's BlockMask for causal attention within each packed sample."""
    from torch.nn.attention.flex_attention import create_block_mask

    def document_causal(b, h, qi, ki):
        return (doc_ids[qi] == doc_ids[ki]) & (ki <= qi)

    t = doc_ids.shape[0]
    return create_block_mask(document_causal, None, None, t, t, device=doc_ids.device)


def build_mask(backend: str, doc_ids: torch.Tensor):
    """The mask a backend needs, built once per micro-batch and shared by every layer (or None)."""
    if backend == "sdpa":
        return block_causal_mask(doc_ids)
    if backend == "flex":
        return document_block_mask(doc_ids)
    return None


def _sdpa(q, k, v, scaling, mask):
    # q (1, H, T, D), k/v (1, KVH, T, D); mask from block_causal_mask
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)


_compiled_flex = None


def _flex(q, k, v, scaling, block_mask):
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    fn = flex_attention
    if q.is_cuda:  # the fused kernel needs torch.compile; eager flex materialises the scores
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=True)
        fn = _compiled_flex
    return fn(q, k, v, block_mask=block_mask, scale=scaling, enable_gqa=True)


def varlen_adapter(fn):
    """Causal varlen attention on (T, H, D) tensors through `fn` (torch's `varlen_attn`), whichever signature it
    has: torch 2.10 takes `is_causal`, later releases `window_size` (-1, 0); `enable_gqa` came after 2.11, so
    without it grouped K/V heads are repeated to the query heads. The signature is read once, here, outside any
    compiled region."""
    params = inspect.signature(fn).parameters
    kw = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    gqa = "enable_gqa" in params
    if gqa:
        kw["enable_gqa"] = True

    def call(q, k, v, scaling, cu, max_len):
        if not gqa and k.shape[1] != q.shape[1]:
            k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
        return fn(q, k, v, cu, cu, max_len, max_len, scale=scaling, **kw)

    return call


def _varlen(attend, q, k, v, scaling, cu, max_len):
    # (1, H, T, D) -> (T, H, D) and back
    qt, kt, vt = (x[0].transpose(0, 1) for x in (q, k, v))
    return attend(qt, kt, vt, scaling, cu, max_len).transpose(0, 1)[None]


def _flash(q, k, v, scaling, cu, max_len):
    from flash_attn import flash_attn_varlen_func

    qt, kt, vt = (x[0].transpose(0, 1) for x in (q, k, v))
    out = flash_attn_varlen_func(qt, kt, vt, cu, cu, max_len, max_len, softmax_scale=scaling, causal=True)
    return out.transpose(0, 1)[None]


def make_forward(backend: str):
    if backend == "varlen":
        from torch.nn.attention.varlen import varlen_attn

        attend = varlen_adapter(varlen_attn)

    def forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if query.shape[0] != 1:
            raise ValueError("packed attention expects one packed sequence per micro-batch (batch size 1)")
        cu, max_len = kwargs.get("fastross_cu_seqlens"), kwargs.get("fastross_max_seqlen")
        mask = kwargs.get("fastross_mask")
        if cu is None or (backend in ("sdpa", "flex") and mask is None):
            raise ValueError(
                "packed attention needs fastross_cu_seqlens and fastross_mask: call the LLM through RossModel"
            )
        if backend == "sdpa":
            out = _sdpa(query, key, value, scaling, mask)
        elif backend == "flex":
            out = _flex(query, key, value, scaling, mask)
        elif backend == "varlen":
            out = _varlen(attend, query, key, value, scaling, cu, max_len)
        else:
            out = _flash(query, key, value, scaling, cu, max_len)
        return out.transpose(1, 2).contiguous(), None  # (1, T, H, D) as the HF layers expect

    return forward


def register() -> None:
    from transformers import AttentionInterface

    for name in BACKENDS[1:]:
        AttentionInterface.register(f"fastross_{name}", make_forward(name))
