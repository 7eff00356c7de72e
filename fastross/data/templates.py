"""Prompt templates of ROSS_SPEC.md section 8: conversation -> token ids and labels.

Each template renders the conversation to one string and a list of supervised character spans; a token is
supervised when any of its characters lies in a supervised span (so the answer's first word, which the tokenizer
merges with the space before it, is supervised).

The reference's own templates (plain, qwen2_ross, vicuna_v1, llama3) are tokenised as the reference tokenises them
(`tokenizer_image_token`): the text is cut at `<image>`, each piece is encoded on its own with the tokenizer's
special tokens (a Llama tokenizer's BOS), the BOS of every piece but the first is dropped, and the pieces are joined
by the image token. A sentencepiece-style tokenizer thus puts a lone `▁` after the image, as LLaVA-1.5 was trained.
`hf` renders with the tokenizer's own chat template and encodes the whole string as it stands (the template writes
its own BOS), as `apply_chat_template(tokenize=True)` does.
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
VICUNA_SYSTEM = (  # the reference's conv_vicuna_v1: "user", where qwen2_ross says "human"
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAMA3_HEADER = "<|start_header_id|>{}<|end_header_id|>\n\n"
TEMPLATES = ("plain", "qwen2_ross", "vicuna_v1", "llama3", "hf", "chatml")
ALIASES = {"chatml": "hf"}  # the old name of `hf`, kept for the shards and commands that use it
# The tokens a template writes itself: each must be one token of the tokenizer, or the end of every answer would be
# text the model learns to spell out (or, for a marker the tokenizer splits, never learns to stop at).
MARKERS = {
    "qwen2_ross": ("<|im_end|>",),
    "vicuna_v1": ("</s>",),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
}


def canonical(template: str) -> str:
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
    return ALIASES.get(template, template)


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


def check_tokenizer(template: str, tokenizer, folder: str) -> None:
    """Refuse, before any record is read, a tokenizer that cannot end the template's turns (ValueError)."""
    name = canonical(template)
    for marker in MARKERS.get(name, ()):
        if len(tokenizer(marker, add_special_tokens=False).input_ids) != 1:
            raise ValueError(
                f"template {template}: the tokenizer in {folder} has no special token {marker!r} (it "
                f"encodes it as several tokens), so the end of each turn would not be learnt as one "
                f"token; choose the template of that LLM (or add {marker!r} as a special token)"
            )
    if name == "hf":
        if not tokenizer.chat_template:
            raise ValueError(
                f"template {template}: the tokenizer in {folder} has no chat template "
                "(tokenizer_config.json 'chat_template' or chat_template.jinja)"
            )
        answer = "Hello."
        try:
            head = _chat(tokenizer, [("user", "Hi.")], True)
            whole = _chat(tokenizer, [("user", "Hi."), ("assistant", answer)])
        except Exception as e:  # Jinja's errors, raise_exception's included, are no ValueError
            raise ValueError(
                f"template {template}: the chat template of the tokenizer in {folder} cannot render a "
                f"user turn and an answer: {type(e).__name__}: {e}"
            ) from None
        if not whole.startswith(head + answer):
            raise ValueError(
                f"template {template}: the chat template of the tokenizer in {folder} renders "
                f"{whole!r}, not its generation prompt {head!r} followed by the answer {answer!r}: a "
                "generated answer would not start where a trained one does"
            )
        marker = whole[len(head + answer) :].strip()
        ids = tokenizer(marker, add_special_tokens=False).input_ids
        if not ids or ids[0] not in set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values()):
            raise ValueError(
                f"template {template}: the chat template of the tokenizer in {folder} ends an "
                f"assistant turn with {marker!r}, which does not start with a special token of that "
                "tokenizer: the model would never learn where an answer ends"
            )


@dataclass
class Rendered:
    text: str
    spans: list[tuple[int, int]]  # supervised [start, end) character spans
    pieces: bool = True  # encode as the reference does: cut at <image>, each piece with the tokenizer's BOS


def normalise_turns(conversations, has_image: bool) -> list[tuple[str, str]]:
    """LLaVA turns -> [(role, text)] with role user/assistant, the `<image>` moved to the front of its message.

    As the reference's preprocess_multimodal: the message that holds the placeholder loses it, is stripped, and
    becomes `<image>\\n` + what is left (just `<image>` when nothing is); the other messages are kept as they are.
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
    return [
        (r, (IMAGE_TOKEN + "\n" + v.replace(IMAGE_TOKEN, "").strip()).strip() if IMAGE_TOKEN in v else v)
        for r, v in turns
    ]


def render_plain(turns) -> Rendered:
    # plain: <image> + caption + "\n"; the caption is the first assistant turn.
    if any(IMAGE_TOKEN in v for _, v in turns[1:]):
        raise TemplateError("malformed", f"template plain takes the '{IMAGE_TOKEN}' in the first message only")
    prefix = IMAGE_TOKEN if turns[0][1].startswith(IMAGE_TOKEN) else ""
    caption = turns[1][1]
    text = prefix + caption + "\n"
    return Rendered(text, [(len(prefix), len(text))])


def render_separated(turns, system: str, end: str, with_space: bool, last_end: bool = True) -> Rendered:
    """qwen2_ross and vicuna_v1 (the reference's SeparatorStyle.TWO): system, then per round
    "USER: " + question + " " + "ASSISTANT: " + answer + end. Supervised: each answer and its `end`.

    The space before the answer usually merges with its first word. Where the tokenizer keeps it apart (Llama: a
    digit), vicuna_v1's reference masks `len(tokens("... ASSISTANT: ")) - 2` tokens, which leaves that space
    supervised (`with_space`); qwen2_ross's masks the tokens its instruction shares with the round, the space
    included. `last_end=False` leaves the last `end` unsupervised."""
    text, spans = system + " ", []
    for role, value in turns:
        if role == "user":
            text += "USER: " + value + " " + "ASSISTANT:"
        else:
            start = len(text) + (0 if with_space else 1)
            text += " " + value + end
            spans.append((start, len(text)))
    if not last_end and spans:
        spans[-1] = (spans[-1][0], spans[-1][1] - len(end))
    return Rendered(text, spans)


def render_llama3(turns) -> Rendered:
    """The reference's conv_llava_llama_3 (no system message): a header per turn, each turn ended by <|eot_id|>.
    Supervised: each answer and its <|eot_id|>."""
    text, spans = "", []
    for role, value in turns:
        text += LLAMA3_HEADER.format(role)
        start = len(text)
        text += value + "<|eot_id|>"
        if role == "assistant":
            spans.append((start, len(text)))
    return Rendered(text, spans)


def _chat(tokenizer, turns, generation_prompt: bool = False) -> str:
    messages = [{"role": r, "content": v} for r, v in turns]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def render_hf(turns, tokenizer) -> Rendered:
    """The tokenizer's chat template. Each assistant turn is found by rendering prefixes of the conversation: the
    turn is what rendering turns[:k+1] adds to turns[:k] with its generation prompt, whatever markup the template
    uses; it is supervised up to the whitespace the template puts after it (ChatML's newline after <|im_end|>)."""
    text = _chat(tokenizer, turns)
    spans = []
    for k, (role, _) in enumerate(turns):
        if role != "assistant":
            continue
        head, upto = _chat(tokenizer, turns[:k], True), _chat(tokenizer, turns[: k + 1]).rstrip()
        if not (text.startswith(head) and text.startswith(upto) and len(upto) > len(head)):
            raise TemplateError(
                "template_mismatch",
                f"the tokenizer's chat template renders turn {k} differently "
                "once later turns follow (or its generation prompt is not how an answer starts)",
            )
        spans.append((len(head), len(upto)))
    return Rendered(text, spans, pieces=False)


def render(template: str, conversations, has_image: bool, tokenizer=None, reference_labels: bool = False) -> Rendered:
    """`reference_labels`: the reference's labels where fastross's differ on purpose (ROSS_SPEC.md section 8,
    intended difference 3: qwen2_ross's last <|im_end|> unsupervised)."""
    name = canonical(template)
    turns = normalise_turns(conversations, has_image)
    if name == "plain":
        return render_plain(turns)
    if name == "qwen2_ross":
        return render_separated(turns, ROSS_SYSTEM, "<|im_end|>", False, last_end=not reference_labels)
    if name == "vicuna_v1":
        return render_separated(turns, VICUNA_SYSTEM, "</s>", True)
    if name == "llama3":
        return render_llama3(turns)
    return render_hf(turns, tokenizer)


def _encode(text: str, tokenizer, special: bool) -> tuple[list[int], np.ndarray]:
    enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    return list(enc["input_ids"]), np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)


def encode(rendered: Rendered, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """-> (token ids, their [start, end) character offsets in rendered.text)."""
    if not rendered.pieces:
        ids, offsets = _encode(rendered.text, tokenizer, False)
        return np.asarray(ids, dtype=np.int32), offsets
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    ids, offsets, at = [], [], 0
    for k, piece in enumerate(rendered.text.split(IMAGE_TOKEN)):
        p_ids, p_off = _encode(piece, tokenizer, True)
        if k == 0:
            has_bos = bool(p_ids) and p_ids[0] == tokenizer.bos_token_id
        else:
            ids.append(image_id)
            offsets.append(np.array([[at - len(IMAGE_TOKEN), at]]))
            if has_bos:  # as the reference: every piece after the first loses its first token, the BOS
                p_ids, p_off = p_ids[1:], p_off[1:]
        ids += p_ids
        offsets.append(p_off + at)
        at += len(piece) + len(IMAGE_TOKEN)
    return np.asarray(ids, dtype=np.int32), np.concatenate(offsets)


def tokenize(rendered: Rendered, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """-> (input_ids, labels) int32; labels are IGNORE outside the supervised spans and at the image token."""
    ids, offsets = encode(rendered, tokenizer)
    supervised = np.zeros(len(ids), dtype=bool)
    for s, e in rendered.spans:
        supervised |= (offsets[:, 0] < e) & (offsets[:, 1] > s)
    supervised &= ids != tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    labels = np.where(supervised, ids, IGNORE).astype(np.int32)
    return ids, labels
