"""Prompt templates of ROSS_SPEC.md section 8: conversation -> token ids and labels.

Each template renders the conversation to one string and a list of supervised character
spans; the string is tokenised once, whole, exactly as the reference does, and a token is
supervised when any of its characters lies in a supervised span (so the answer's first
word, which BPE merges with the space before it, is supervised).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IMAGE_TOKEN = "<image>"
IGNORE = -100
ROSS_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
TEMPLATES = ("plain", "qwen2_ross", "chatml")


class TemplateError(ValueError):
    """The record cannot be rendered: `reason` is a short code the converter counts by."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def load_tokenizer(path: str):
    """The tokenizer of a local Hugging Face folder; it must hold the `<image>` token."""
    from transformers import AutoTokenizer
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()  # transformers 4.57.6 warns about a Mistral regex on any local folder
    try:
        tok = AutoTokenizer.from_pretrained(path)
    finally:
        logging.set_verbosity(level)
    if IMAGE_TOKEN not in tok.get_vocab():
        raise ValueError(f"the tokenizer in {path} has no {IMAGE_TOKEN!r} token: add it as a special token")
    return tok


@dataclass
class Rendered:
    text: str
    spans: list[tuple[int, int]]  # supervised [start, end) character spans


def normalise_turns(conversations, has_image: bool) -> list[tuple[str, str]]:
    """LLaVA turns -> [(role, text)] with role user/assistant, the `<image>` moved to the front.

    A conversation that starts with an assistant turn drops that turn.
    """
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
    turns = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in roles:
            raise TemplateError("malformed", f"turn {i} is not {{'from': human|gpt, 'value': str}}")
        turns.append((roles[turn["from"]], turn["value"]))
    while turns and turns[0][0] == "assistant":
        turns.pop(0)
    if len(turns) < 2:
        raise TemplateError("malformed", "no user turn followed by an assistant turn")
    for i, (role, _) in enumerate(turns):
        if role != ("user" if i % 2 == 0 else "assistant"):
            raise TemplateError("malformed", f"turns do not alternate user/assistant at turn {i}")
    count = sum(v.count(IMAGE_TOKEN) for _, v in turns)
    if has_image and count != 1:
        reason = "image_without_placeholder" if count == 0 else "extra_placeholders"
        raise TemplateError(reason, f"record has an image but {count} '{IMAGE_TOKEN}' placeholders (need exactly 1)")
    if not has_image and count:
        raise TemplateError("placeholder_without_image", f"'{IMAGE_TOKEN}' placeholder without an image")
    if has_image:  # as the reference: only the message that held the placeholder is stripped
        turns = [(r, v.replace(IMAGE_TOKEN, "").strip()) if IMAGE_TOKEN in v else (r, v) for r, v in turns]
        turns[0] = ("user", IMAGE_TOKEN + "\n" + turns[0][1])
    return turns


def render_plain(turns) -> Rendered:
    # plain: <image> + caption + "\n"; the caption is the first assistant turn.
    prefix = IMAGE_TOKEN if turns[0][1].startswith(IMAGE_TOKEN) else ""
    caption = turns[1][1]
    text = prefix + caption + "\n"
    return Rendered(text, [(len(prefix), len(text))])


def render_qwen2_ross(turns) -> Rendered:
    text, spans = ROSS_SYSTEM + " ", []
    for role, value in turns:
        if role == "user":
            text += "USER: " + value + " " + "ASSISTANT: "
        else:
            start = len(text)
            text += value + "<|im_end|>"
            spans.append((start, len(text)))
    return Rendered(text, spans)


def render_chatml(turns, tokenizer) -> Rendered:
    messages = [{"role": r, "content": v} for r, v in turns]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans, cursor = [], 0
    for i, (role, value) in enumerate(turns):
        at = -1
        if role == "assistant":
            # The answer starts right after the generation prompt: a bare search could match
            # inside the template's own markup first (an answer "a" in "<|im_start|>assistant").
            head = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            if len(head) >= cursor and text.startswith(head) and text.startswith(value, len(head)):
                at = len(head)
        if at < 0:
            at = text.find(value, cursor)
        if at < 0:
            raise TemplateError("malformed", "the tokenizer's chat template does not contain a message verbatim")
        cursor = at + len(value)
        if role == "assistant":
            end = text.find("<|im_end|>", cursor)
            end = cursor if end < 0 else end + len("<|im_end|>")
            spans.append((at, end))
            cursor = end
    return Rendered(text, spans)


def render(template: str, conversations, has_image: bool, tokenizer=None) -> Rendered:
    turns = normalise_turns(conversations, has_image)
    if template == "plain":
        return render_plain(turns)
    if template == "qwen2_ross":
        return render_qwen2_ross(turns)
    if template == "chatml":
        return render_chatml(turns, tokenizer)
    raise ValueError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")


def tokenize(rendered: Rendered, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """-> (input_ids, labels) int32; labels are IGNORE outside the supervised spans."""
    enc = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int32)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    supervised = np.zeros(len(ids), dtype=bool)
    for s, e in rendered.spans:
        supervised |= (offsets[:, 0] < e) & (offsets[:, 1] > s)
    labels = np.where(supervised, ids, IGNORE).astype(np.int32)
    return ids, labels
