"""model.liger_kernels: the right modules are swapped, nothing in the state dict moves, and the kernels compute
what the Hugging Face modules compute.

In Triton's CPU interpreter Liger's RoPE runs and is checked here; its RMSNorm and SwiGLU do not run there
(CPU_AND_GPU.md), so their numerics are GPU tests (run by benchmarks/gpu_check.sh).
"""

import pytest
import torch
from transformers.models.qwen2 import modeling_qwen2

from fastross.config import DenoiserConfig, ModelConfig
from fastross.model import liger
from fastross.model.ross import RossModel


@pytest.fixture
def restore_rope(monkeypatch):
    """liger.apply swaps transformers' module-level RoPE function: put it back after the test."""
    monkeypatch.setattr(modeling_qwen2, "apply_rotary_pos_emb", modeling_qwen2.apply_rotary_pos_emb)


def cfg(tiny_models, **kw):
    return ModelConfig(
        vision_path=str(tiny_models / "vision"),
        llm_path=str(tiny_models / "llm"),
        fused_ce=False,
        denoiser=DenoiserConfig(kind="dit", depth=1, width=32, heads=4),
        **kw,
    )


def test_modules_are_swapped_and_the_state_dict_is_unchanged(tiny_models, restore_rope):
    torch.manual_seed(0)
    plain = RossModel(cfg(tiny_models))
    torch.manual_seed(0)
    swapped = RossModel(cfg(tiny_models, liger_kernels=True))
    layers = swapped.llm.model.layers
    assert [
        type(m).__name__
        for m in (layers[0].input_layernorm, layers[0].post_attention_layernorm, layers[0].mlp, swapped.llm.model.norm)
    ] == ["LigerRMSNorm", "LigerRMSNorm", "LigerSwiGLUMLP", "LigerRMSNorm"]
    assert all(type(layer.mlp).__name__ == "LigerSwiGLUMLP" for layer in layers)
    assert modeling_qwen2.apply_rotary_pos_emb is not restore_rope  # the modeling module's RoPE is Liger's
    a, b = plain.state_dict(), swapped.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the new modules hold the old parameters, not copies: the optimizer and FSDP see the same tensors
    assert layers[0].mlp.gate_proj.weight.shape == plain.llm.model.layers[0].mlp.gate_proj.weight.shape
    norm_eps = plain.llm.model.norm.variance_epsilon
    assert swapped.llm.model.norm.variance_epsilon == norm_eps and swapped.llm.model.norm.casting_mode == "llama"


def test_other_models_are_refused(tiny_models):
    from transformers import AutoModelForCausalLM, GPT2Config

    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(ValueError, match="model.liger_kernels: the LLM is a 'gpt2' model"):
        liger.apply(gpt2)


def packed_rope_inputs(dtype):
    from transformers import AutoConfig

    g = torch.Generator().manual_seed(0)
    config = AutoConfig.for_model("qwen2", hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    rotary = modeling_qwen2.Qwen2RotaryEmbedding(config)
    position_ids = torch.cat([torch.arange(n) for n in (7, 19, 4)])[None]  # three packed samples
    q = torch.randn(1, 4, 30, 16, generator=g, dtype=dtype)
    k = torch.randn(1, 2, 30, 16, generator=g, dtype=dtype)
    cos, sin = rotary(q, position_ids)
    return q, k, cos, sin


def rope_outputs(q, k, cos, sin):
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    outs = []
    for fn in (modeling_qwen2.apply_rotary_pos_emb, liger_rotary_pos_emb):
        qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
        rq, rk = fn(qq, kk, cos, sin)
        (rq.float().square().sum() * 0.5 + (rk.float() * 3).sum()).backward()
        outs.append([rq.detach().float(), rk.detach().float(), qq.grad.float(), kk.grad.float()])
    return outs


def test_liger_rope_equals_hf_rope_fp32():
    """Packed positions (restarting per sample), grouped KV heads, forward and backward."""
    want, got = rope_outputs(*packed_rope_inputs(torch.float32))
    for a, b in zip(want, got):  # the same multiply-adds in fp32
        assert (b - a).abs().max().item() <= 1e-6 * a.abs().max().item()


@pytest.mark.gpu
def test_liger_rope_equals_hf_rope_bf16_on_gpu():
    """In the CPU interpreter Liger's bf16 RoPE returns NaN (docs/DEVELOPING.md), so bf16 is checked on a GPU."""
    want, got = rope_outputs(*(t.cuda() for t in packed_rope_inputs(torch.bfloat16)))
    for a, b in zip(want, got):  # one bf16 rounding (2^-8 relative) of each output, in another order
        assert (b - a).abs().max().item() <= 2**-7 * a.abs().max().item()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_liger_rmsnorm_and_swiglu_equal_hf_on_gpu(dtype):
    from transformers import AutoConfig

    torch.manual_seed(0)
    config = AutoConfig.for_model("qwen2", hidden_size=896, intermediate_size=4864, hidden_act="silu")
    x = torch.randn(3, 517, 896, device="cuda", dtype=dtype)
    for make, swap in (
        (lambda: modeling_qwen2.Qwen2RMSNorm(896, eps=1e-6), liger._norm),
        (lambda: modeling_qwen2.Qwen2MLP(config), lambda m: liger._mlp(m, config)),
    ):
        ref = make().to("cuda", dtype)
        with torch.no_grad():
            for p in ref.parameters():
                p.normal_(1.0 if p.ndim == 1 else 0.0, 0.02)
        new = swap(ref)  # shares ref's parameters
        outs = []
        for m in (ref, new):
            xx = x.clone().requires_grad_()
            y = m(xx)
            m.zero_grad()
            y.float().sin().sum().backward()
            outs.append([y.detach().float(), xx.grad.float()] + [p.grad.float() for p in m.parameters()])
        # STYLE.md's bf16 rule, simplified: within 2^-7 of the output's scale in bf16, 1e-5 in fp32
        tol = 1e-5 if dtype == torch.float32 else 2**-7
        for want, got in zip(*outs):
            assert (got - want).abs().max().item() <= tol * want.abs().max().item() + 1e-6
