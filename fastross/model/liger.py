"""Liger's kernels in a Hugging Face Qwen2 or Llama LLM, swapped in module by module (`model.liger_kernels`).

Liger's own `apply_liger_kernel_to_qwen2` refuses transformers < 5, which mosaicml-streaming's pin keeps us on,
so fastross swaps the modules itself:
- every RMSNorm (each layer's two and the final one) -> `LigerRMSNorm` (Llama casting: normalise in fp32, cast,
  then scale by the weight, as Qwen2RMSNorm and LlamaRMSNorm do);
- every MLP -> `LigerSwiGLUMLP` (SiLU(gate) * up fused in one kernel, then down);
- `apply_rotary_pos_emb` of the modeling module -> Liger's RoPE kernel. transformers calls it as a module-level
  function, so this one swap is process-wide, as Liger's own patch is; the kernel computes what the HF
  function computes (tests/test_liger.py), so other models in the process are not changed in meaning.

The new modules take over the old ones' Parameters and Linear submodules, so the state dict (names, shapes,
tensors) is exactly the one the checkpoint holds, and the swap works on the meta device too.

Liger's kernels are autograd.Functions around Triton launches, which Dynamo cannot trace under the CPU
interpreter; `train.compile` keeps them out of the compiled regions (`torch.compiler.disable`), so a compiled
decoder layer graph-breaks around them. In Triton's CPU interpreter RoPE runs, RMSNorm and SwiGLU do not
(CPU_AND_GPU.md): their numerics are checked by the GPU tests of tests/test_liger.py.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

SUPPORTED = ("qwen2", "llama")  # transformers model_type values whose modules are swapped


def _modeling(model_type: str):
    return importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")


def _norm(old: nn.Module) -> nn.Module:
    from liger_kernel.transformers.rms_norm import LigerRMSNorm

    with torch.device("meta"):  # its own ones(hidden) weight is replaced at once: allocate nothing
        new = LigerRMSNorm(old.weight.shape[0], eps=old.variance_epsilon, casting_mode="llama", in_place=False)
    new.weight = old.weight
    new.forward = torch.compiler.disable(new.forward)
    return new


def _mlp(old: nn.Module, config) -> nn.Module:
    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP

    with torch.device("meta"):
        new = LigerSwiGLUMLP(config, intermediate_size=old.gate_proj.out_features)
    new.gate_proj, new.up_proj, new.down_proj = old.gate_proj, old.up_proj, old.down_proj
    new.forward = torch.compiler.disable(new.forward)
    return new


def apply(llm: nn.Module) -> dict[str, int]:
    """Swap Liger's modules into `llm` (a *ForCausalLM) in place; returns how many of each were swapped."""
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    model_type = llm.config.model_type
    if model_type not in SUPPORTED:
        raise ValueError(
            f"model.liger_kernels: the LLM is a {model_type!r} model; fastross swaps Liger's kernels into "
            f"{', '.join(SUPPORTED)} only. Set model.liger_kernels=false."
        )
    if llm.config.hidden_act not in ("silu", "swish"):
        raise ValueError(f"model.liger_kernels: SwiGLU needs hidden_act silu, the LLM has {llm.config.hidden_act!r}")
    counts = {"rms_norm": 0, "swiglu": 0}
    for layer in llm.model.layers:
        layer.input_layernorm = _norm(layer.input_layernorm)
        layer.post_attention_layernorm = _norm(layer.post_attention_layernorm)
        layer.mlp = _mlp(layer.mlp, llm.config)
        counts["rms_norm"] += 2
        counts["swiglu"] += 1
    llm.model.norm = _norm(llm.model.norm)
    counts["rms_norm"] += 1
    _modeling(model_type).apply_rotary_pos_emb = torch.compiler.disable(liger_rotary_pos_emb)
    counts["rope"] = 1
    return counts
