"""Architecture presets of the paper's models: published config.json values, no weights.

Tools that need only shapes (fastross.flops, fastross.memory_plan, fastross.load_footprint) use a model
folder's own config.json when it exists and these otherwise; `arch_folders` writes a preset into a
temporary folder so the ordinary builders (RossModel(meta=True)) read it like any model folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
from pathlib import Path

# Only what shapes the model; the rest are transformers' / diffusers' defaults.
QWEN2_7B = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-06,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
}
VICUNA_7B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
}
SIGLIP_SO400M_384 = {
    "model_type": "siglip_vision_model",
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "image_size": 384,
    "patch_size": 14,
    "hidden_act": "gelu_pytorch_tanh",
}
# openai/clip-vit-large-patch14-336's vision tower (LLaVA-1.5's): 24 x 24 = 576 patch tokens plus its class token.
CLIP_L14_336 = {
    "model_type": "clip_vision_model",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "layer_norm_eps": 1e-05,
}
FLUX_VAE = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "sample_size": 1024,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "norm_num_groups": 32,
    "act_fn": "silu",
}
LLMS = {"qwen2-7b": QWEN2_7B, "vicuna-7b": VICUNA_7B}
VISION = {"siglip-so400m-384": SIGLIP_SO400M_384, "clip-l14-336": CLIP_L14_336}
VAES = {"flux-vae": FLUX_VAE}


def pick(path: str, presets: dict[str, dict]) -> tuple[str, dict]:
    """The preset whose family (its name's first word) occurs in the folder name (e.g. /models/qwen2-7b-instruct
    -> qwen2-7b); the first preset when none does."""
    base = Path(path).name.lower()
    for name, arch in presets.items():
        if name.split("-")[0] in base:
            return name, arch
    return next(iter(presets.items()))


@contextlib.contextmanager
def arch_folders(model_cfg):
    """model_cfg (fastross.config.ModelConfig) with every model folder that lacks a config.json replaced by a
    temporary folder holding a preset's; yields (model config, {role: "folder" or "preset <name>"})."""
    sources = {}
    changes = {}
    with tempfile.TemporaryDirectory(prefix="fastross-arch-") as tmp:
        for role, key, presets, fname in (
            ("llm", "llm_path", LLMS, "config.json"),
            ("vision", "vision_path", VISION, "config.json"),
            ("vae", "vae_path", VAES, "config.json"),
        ):
            path = getattr(model_cfg, key)
            if role == "vae" and not path:
                continue
            if path and (Path(path) / fname).is_file():
                sources[role] = f"folder {path}"
                continue
            name, arch = pick(path, presets)
            folder = Path(tmp) / role
            folder.mkdir()
            (folder / fname).write_text(json.dumps(arch))
            changes[key] = str(folder)
            sources[role] = f"preset {name}"
        yield dataclasses.replace(model_cfg, **changes), sources
