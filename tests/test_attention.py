"""The varlen backend's call across torch releases' `varlen_attn` signatures, against the sdpa reference.

`varlen_attn` runs only on CUDA: on CPU, stand-ins with each release's signature (computed with SDPA per
sample, refusing what that release refuses) check what the adapter passes; the gpu test runs the real kernel."""

import pytest
import torch
import torch.nn.functional as F

from fastross.model.attention import _sdpa, _varlen, block_causal_mask, varlen_adapter

LENGTHS = [5, 9, 2]


def per_sample(q, k, v, cu, scale, causal, gqa):
    if k.shape[1] != q.shape[1] and not gqa:
        raise RuntimeError("this release's varlen_attn needs as many K/V heads as query heads")
    outs = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = (x[a:b].transpose(0, 1) for x in (q, k, v))
        outs.append(
            F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale, enable_gqa=gqa).transpose(0, 1)
        )
    return torch.cat(outs)


def torch_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, is_causal=False, return_aux=None, scale=None):
    return per_sample(query, key, value, cu_seq_q, scale, is_causal, gqa=False)


def torch_2_11(
    query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)
):
    return per_sample(query, key, value, cu_seq_q, scale, window_size == (-1, 0), gqa=False)


def torch_later(
    query,
    key,
    value,
    cu_seq_q,
    cu_seq_k,
    max_q,
    max_k,
    *,
    return_aux=None,
    scale=None,
    window_size=(-1, -1),
    enable_gqa=False,
):
    return per_sample(query, key, value, cu_seq_q, scale, window_size == (-1, 0), gqa=enable_gqa)


def inputs(heads, kv_heads, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    t = sum(LENGTHS)
    q, k, v = (torch.randn(1, h, t, 16, generator=g).to(device, dtype) for h in (heads, kv_heads, kv_heads))
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32, device=device)
    docs = torch.repeat_interleave(torch.arange(len(LENGTHS)), torch.tensor(LENGTHS)).to(device)
    return q, k, v, cu, block_causal_mask(docs)


@pytest.mark.parametrize("release", [torch_2_10, torch_2_11, torch_later])
@pytest.mark.parametrize("kv_heads", [4, 2])  # equal heads, and Qwen2's grouped K/V
def test_varlen_adapter_matches_sdpa_for_each_signature(release, kv_heads):
    q, k, v, cu, mask = inputs(4, kv_heads)
    out = _varlen(varlen_adapter(release), q, k, v, 0.3, cu, max(LENGTHS))
    torch.testing.assert_close(out, _sdpa(q, k, v, 0.3, mask), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_real_varlen_attn_matches_sdpa_on_cuda_bf16(kv_heads):
    from torch.nn.attention.varlen import varlen_attn

    q, k, v, cu, mask = inputs(4, kv_heads, "cuda", torch.bfloat16)
    out = _varlen(varlen_adapter(varlen_attn), q, k, v, 0.25, cu, max(LENGTHS))
    torch.testing.assert_close(out, _sdpa(q, k, v, 0.25, mask), rtol=2e-2, atol=2e-2)
