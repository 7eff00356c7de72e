"""Tiny Llama-family tokenizer folders, built offline, that behave as the real ones do at the joints that matter.

    python -m devtools.tiny_tokenizers OUT

OUT/llama   a Llama-2 / Vicuna-style LlamaTokenizerFast: a byte-fallback BPE with sentencepiece's `▁` word marker,
            <unk> <s> </s>, a BOS added to every encoding, `legacy: false` (no `▁` is added to text that follows a
            special token), as lmsys/vicuna-7b-v1.5 ships it
OUT/llama3  a Llama-3-style byte-level BPE with <|begin_of_text|> (added to every encoding), <|end_of_text|>,
            <|start_header_id|>, <|end_header_id|>, <|eot_id|> and Llama-3-Instruct's chat template

Both hold `<image>` as a special token. The BPE merges are trained in memory on a few hundred words, so the
vocabularies are small; what the templates depend on (the word marker, the byte fallback for `\\n`, the BOS, the
special tokens splitting the text, the non-legacy joint after `</s>`) is the real tokenizers' own code.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

IMAGE_TOKEN = "<image>"
# Words for the merges: the system prompts and the kind of answers the tests use. The role names stay out, so that,
# as in Llama's vocabulary, "▁USER" (a round tokenised alone, as the reference does) takes one token more than the
# "USER" that follows `</s>`: the reference's off-by-one adjustment for non-legacy tokenizers counts on it.
CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "What colour is the square? Red. And the circle? Green. How many shapes are there? Two shapes, a circle.",
    "Describe the picture. A photo of something at the top left of the image.",
    "user assistant system Hello there. Spell the word lamp backwards. pmal. And cat? tac.",
    "Pick a or b. Now the other one. What is shown? Shapes. Say hi. Hi. What is this? A picture.",
    "red green blue yellow circle square triangle left right top bottom centre shape the a an of in on",
]
LLAMA3_CHAT_TEMPLATE = (  # Meta-Llama-3-8B-Instruct's
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def _trained(pre_tokenizer, vocab_size: int, **trainer_kwargs) -> tuple[dict, list]:
    """(vocab, merges) of a BPE trained on CORPUS behind `pre_tokenizer`."""
    from tokenizers import Tokenizer, models, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizer
    tk.train_from_iterator(
        CORPUS * 4, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, **trainer_kwargs)
    )
    model = json.loads(tk.to_str())["model"]
    return model["vocab"], [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]


def build_llama_tokenizer():
    """A Vicuna-style LlamaTokenizerFast (non-legacy), with `<image>` added as a special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaTokenizerFast

    learned, merges = _trained(pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True), 400)
    # sentencepiece's layout: <unk> <s> </s>, the 256 byte pieces, then the learned pieces
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for piece in sorted(learned, key=learned.get):
        vocab.setdefault(piece, len(vocab))
    backend = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    # transformers' LlamaConverter for legacy=False: no normaliser, `▁` prepended to the first section only
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(content=" ", left=1)]
    )
    tok = LlamaTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        legacy=False,
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=4096,
    )
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tok


def build_llama3_tokenizer():
    """A Llama-3-style byte-level BPE tokenizer with its special tokens and chat template, plus `<image>`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    vocab, merges = _trained(byte_level, 500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab, merges))
    backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(LLAMA3_SPECIAL)
    bos = backend.token_to_id("<|begin_of_text|>")
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)],
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", model_max_length=8192
    )
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tok.chat_template = LLAMA3_CHAT_TEMPLATE
    return tok


def write(out: str | Path) -> Path:
    out = Path(out)
    build_llama_tokenizer().save_pretrained(out / "llama")
    build_llama3_tokenizer().save_pretrained(out / "llama3")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="folder to write llama/ and llama3/ into")
    out = write(p.parse_args().out)
    print(f"tiny_tokenizers: wrote {out}/llama, {out}/llama3")


if __name__ == "__main__":
    main()
