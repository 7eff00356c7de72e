"""The vicuna_v1, llama3 and hf templates, and qwen2_ross's --reference-labels, through the converter.

The expected token ids and labels are the reference ROSS code's (ross/train/train.py: preprocess_v1,
preprocess_llama3, preprocess_qwen_2; ross/mm_utils.py: tokenizer_image_token), re-expressed below step by step:
each round is tokenised on its own and masked by counting tokens, with the reference's off-by-one adjustments. That
is a different algorithm from fastross's (character spans over one encoding), so agreeing is a real check; each
reference computation also asserts that it hit no "tokenization mismatch" (which would mask the whole sample).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fastross.data import convert

IGNORE = -100
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ROSS_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


def h(value):
    return {"from": "human", "value": value}


def g(value):
    return {"from": "gpt", "value": value}


RECORDS = [
    {
        "id": "multi",
        "image": "a.png",
        "conversations": [h("What colour is the square?\n<image>"), g("Red."), h("And the circle?"), g("Green.")],
    },
    {"id": "later", "image": "a.png", "conversations": [h("Hi."), g("Hello."), h("<image> What is this?"), g("3")]},
    {"id": "text", "conversations": [h("Spell lamp backwards."), g("pmal."), h("And cat?"), g("tac.")]},
    {"id": "gptfirst", "image": "a.png", "conversations": [g("Hello there."), h("<image>"), g("A photo.")]},
]


# The reference, re-expressed -----------------------------------------------------------------------------------


def ref_move_image(conv: list[dict]) -> list[tuple[str, str]]:
    """preprocess_multimodal, then "skip the first one if it is not from human"."""
    turns = [
        (
            t["from"],
            ("<image>\n" + t["value"].replace("<image>", "").strip()).strip()
            if "<image>" in t["value"]
            else t["value"],
        )
        for t in conv
    ]
    return turns[1:] if turns[0][0] != "human" else turns


def ref_tokens(text: str, tok, image_id: int) -> list[int]:
    """tokenizer_image_token: each <image>-separated chunk encoded with the tokenizer's defaults; the first chunk's
    leading BOS kept once, the first token of every later chunk dropped; the chunks joined by the image id."""
    chunks = [tok(c).input_ids for c in text.split("<image>")]
    bos = 1 if chunks[0] and chunks[0][0] == tok.bos_token_id else 0
    out = chunks[0][:1] if bos else []
    for i, c in enumerate(chunks):
        if i:
            out.append(image_id)
        out += c[bos:]
    return out


def ref_labels(
    ids,
    text: str,
    end: str,
    split_at: str,
    tok,
    image_id: int,
    first: int,
    minus: int,
    step: int,
    common_prefix: bool = False,
    keep_previous_end: bool = False,
    last: int = 0,
) -> np.ndarray:
    """The reference's round counting: split the prompt at `end`, then each round at `split_at`; mask `first` leading
    tokens and each round's instruction (its own token count minus `minus`, or, for qwen_2, the tokens it shares
    with the round); advance by the round's token count; rounds after the first are shifted by `step` (the BOS or
    end token that tokenising a round on its own adds or misses); finally everything after the last round is masked
    and the count must reach len(ids) - `last`."""
    target = np.array(ids)
    target[:first] = IGNORE
    cur = first
    for i, rnd in enumerate(text.split(end)):
        parts = rnd.split(split_at)
        if rnd == "" or len(parts) != 2:
            break
        r_ids, i_ids = ref_tokens(rnd, tok, image_id), ref_tokens(parts[0] + split_at, tok, image_id)
        if common_prefix:
            n_instr = next((k for k, (a, b) in enumerate(zip(r_ids, i_ids)) if a != b), min(len(r_ids), len(i_ids)))
        else:
            n_instr = len(i_ids) - minus
        n_round = len(r_ids)
        if i:
            n_round, n_instr = n_round + step, n_instr + step
        target[cur + (1 if keep_previous_end and i else 0) : cur + n_instr] = IGNORE
        cur += n_round
    target[cur:] = IGNORE
    assert cur == len(ids) - last, f"the reference would mask this sample whole: {cur} vs {len(ids) - last}"
    return target


def ref_vicuna(conv, tok, image_id):
    """conv_vicuna_v1 (SeparatorStyle.TWO, sep " ", sep2 "</s>") and preprocess_v1."""
    text = VICUNA_SYSTEM + " "
    for i, (who, value) in enumerate(ref_move_image(conv)):
        text += ("USER" if who == "human" else "ASSISTANT") + ": " + value + (" ", "</s>")[i % 2]
    ids = ref_tokens(text, tok, image_id)
    step = 0 if tok.legacy else -1
    return text, ids, ref_labels(ids, text, "</s>", " ASSISTANT: ", tok, image_id, first=1, minus=2, step=step)


def ref_llama3(conv, tok, image_id):
    """conv_llava_llama_3 (SeparatorStyle.LLAMA_3, no system, sep2 "<|eot_conversation|>") and preprocess_llama3."""
    text = ""
    for who, value in ref_move_image(conv):
        role = "user" if who == "human" else "assistant"
        text += f"<|start_header_id|>{role}<|end_header_id|>\n\n{value}<|eot_id|>"
        text += "<|eot_conversation|>" if role == "assistant" else ""
    ids = ref_tokens(text.replace("<|eot_conversation|>", ""), tok, image_id)
    split_at = "<|start_header_id|>assistant<|end_header_id|>\n\n"
    labels = ref_labels(ids, text, "<|eot_conversation|>", split_at, tok, image_id, first=0, minus=0, step=-1)
    return text.replace("<|eot_conversation|>", ""), ids, labels


def ref_qwen2(conv, tok, image_id):
    """conv_qwen_2 (SeparatorStyle.TWO, sep " ", sep2 "<|im_end|>") and preprocess_qwen_2 (tokenizer.legacy set
    False by the reference's train())."""
    text = ROSS_SYSTEM + " "
    for i, (who, value) in enumerate(ref_move_image(conv)):
        text += ("USER" if who == "human" else "ASSISTANT") + ": " + value + (" ", "<|im_end|>")[i % 2]
    ids = ref_tokens(text, tok, image_id)
    return (
        text,
        ids,
        ref_labels(
            ids,
            text,
            "<|im_end|>",
            " ASSISTANT: ",
            tok,
            image_id,
            first=0,
            minus=0,
            step=1,
            common_prefix=True,
            keep_previous_end=True,
            last=1,
        ),
    )


# helpers -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(synth_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("template_images")
    shutil.copy(sorted((synth_data / "images").glob("shapes_*.png"))[0], out / "a.png")
    return out


def run(tmp_path, tiny_models, images, tokenizer_dir, template, records, *extra):
    tmp_path.mkdir(parents=True, exist_ok=True)
    src, out = tmp_path / "data.json", tmp_path / "out"
    src.write_text(json.dumps(records))
    rc = convert.main(
        [
            "--json",
            str(src),
            "--images",
            str(images),
            "--tokenizer",
            str(tokenizer_dir),
            "--vision",
            str(tiny_models / "vision"),
            "--template",
            template,
            "--out",
            str(out),
            "--quiet",
            *extra,
        ]
    )
    return rc, out


def read(out: Path) -> list[dict]:
    from fastross.data.shards import MDSShards

    shards = MDSShards(out)
    return [shards.read(i) for i in range(len(shards))]


def assert_reference(tmp_path, tiny_models, images, folder, template, reference, records=RECORDS, extra=(), tok=None):
    from fastross.data.templates import load_tokenizer

    tok = tok or load_tokenizer(str(folder))
    image_id = tok.convert_tokens_to_ids("<image>")
    rc, out = run(tmp_path, tiny_models, images, folder, template, records, *extra)
    assert rc == 0
    samples = read(out)
    assert [s["id"] for s in samples] == [r["id"] for r in records]
    texts = []
    for s, r in zip(samples, records):
        text, ids, labels = reference(r["conversations"], tok, image_id)
        assert np.asarray(s["input_ids"]).tolist() == ids, r["id"]
        assert np.asarray(s["labels"]).tolist() == labels.tolist(), r["id"]
        assert (np.asarray(s["labels"]) != IGNORE).any(), r["id"]
        texts.append(text)
    return tok, samples, texts


def supervised_text(tok, sample) -> list[str]:
    """The supervised tokens as runs of text, special tokens spelled out."""
    ids, labels = np.asarray(sample["input_ids"]), np.asarray(sample["labels"])
    runs, cur = [], []
    for i, lab in zip(ids.tolist(), labels.tolist()):
        if lab == IGNORE and cur:
            runs.append(cur)
            cur = []
        elif lab != IGNORE:
            cur.append(i)
    return [tok.convert_tokens_to_string(tok.convert_ids_to_tokens(r)) for r in runs + ([cur] if cur else [])]


# vicuna_v1 -----------------------------------------------------------------------------------------------------


def test_vicuna_v1_round_trip_is_the_references(tmp_path, tiny_models, images, llama_tokenizers):
    tok, samples, texts = assert_reference(
        tmp_path, tiny_models, images, llama_tokenizers / "llama", "vicuna_v1", ref_vicuna
    )
    # the separators, written out by hand
    assert texts[0] == (
        VICUNA_SYSTEM + " USER: <image>\nWhat colour is the square? ASSISTANT: Red.</s>"
        "USER: And the circle? ASSISTANT: Green.</s>"
    )
    assert texts[1].endswith(" USER: Hi. ASSISTANT: Hello.</s>USER: <image>\nWhat is this? ASSISTANT: 3</s>")
    assert texts[3] == VICUNA_SYSTEM + " USER: <image> ASSISTANT: A photo.</s>"  # a bare placeholder keeps no "\n"
    ids = [np.asarray(s["input_ids"]).tolist() for s in samples]
    image_id, space = tok.convert_tokens_to_ids("<image>"), tok.convert_tokens_to_ids("▁")
    assert all(i[0] == tok.bos_token_id and i.count(tok.bos_token_id) == 1 for i in ids)
    # LLaVA-1.5's lone "▁" after the image: the chunk after <image> is encoded on its own, with its word marker
    at = ids[0].index(image_id)
    assert ids[0][at + 1 : at + 3] == [space, tok.convert_tokens_to_ids("<0x0A>")]
    # the joint after </s> is non-legacy ("USER", not "▁USER"), and the answers and each </s> are what is learnt
    assert supervised_text(tok, samples[0]) == ["Red.</s>", "Green.</s>"]
    assert supervised_text(tok, samples[1]) == ["Hello.</s>", "3</s>"]  # "3" with its lone "▁" (decoded away)
    last_end = len(ids[1]) - 1
    assert ids[1][last_end - 2 :] == [space, tok.convert_tokens_to_ids("<0x33>"), tok.eos_token_id]
    assert np.asarray(samples[1]["labels"])[last_end - 2 :].tolist() == ids[1][last_end - 2 :]


def test_vicuna_v1_marker_missing_is_an_error(tmp_path, tiny_models, images, llama_tokenizers, capsys):
    rc, out = run(tmp_path, tiny_models, images, tiny_models / "llm", "vicuna_v1", RECORDS)
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert "template vicuna_v1" in err and "'</s>'" in err and str(tiny_models / "llm") in err
    rc, _ = run(tmp_path, tiny_models, images, llama_tokenizers / "llama", "qwen2_ross", RECORDS)
    err = capsys.readouterr().err
    assert rc == 2 and "'<|im_end|>'" in err and str(llama_tokenizers / "llama") in err


# llama3 --------------------------------------------------------------------------------------------------------


def test_llama3_round_trip_is_the_references(tmp_path, tiny_models, images, llama_tokenizers, capsys):
    tok, samples, texts = assert_reference(
        tmp_path, tiny_models, images, llama_tokenizers / "llama3", "llama3", ref_llama3
    )
    assert texts[0] == (
        "<|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat colour is the square?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nRed.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd the circle?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nGreen.<|eot_id|>"
    )
    assert all(np.asarray(s["input_ids"])[0] == tok.bos_token_id for s in samples)
    assert supervised_text(tok, samples[0]) == ["Red.<|eot_id|>", "Green.<|eot_id|>"]
    assert supervised_text(tok, samples[2]) == ["pmal.<|eot_id|>", "tac.<|eot_id|>"]
    rc, _ = run(tmp_path / "x", tiny_models, images, llama_tokenizers / "llama", "llama3", RECORDS)
    err = capsys.readouterr().err
    assert rc == 2 and "template llama3" in err and "'<|start_header_id|>'" in err


# hf ------------------------------------------------------------------------------------------------------------


def test_hf_llama3_chat_template_by_prefixes(tmp_path, tiny_models, images, llama_tokenizers):
    """Llama-3-Instruct's own template trims each message: the answers are not verbatim in the text, and one-letter
    answers occur in its markup; the spans still follow from rendering the conversation prefix by prefix."""
    from fastross.data.templates import load_tokenizer

    records = [
        {
            "id": "trim",
            "image": "a.png",
            "conversations": [h("<image>\nWhat colour is the square?"), g("  Red. "), h("Pick a or b."), g("a")],
        }
    ]
    folder = llama_tokenizers / "llama3"
    rc, out = run(tmp_path, tiny_models, images, folder, "hf", records)
    assert rc == 0
    tok = load_tokenizer(str(folder))
    (s,) = read(out)
    text = (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat colour is the square?"
        "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nRed.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nPick a or b.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\na<|eot_id|>"
    )
    assert np.asarray(s["input_ids"]).tolist() == tok(text, add_special_tokens=False).input_ids
    assert supervised_text(tok, s) == ["Red.<|eot_id|>", "a<|eot_id|>"]
    n_sup = len(tok("Red.<|eot_id|>a<|eot_id|>", add_special_tokens=False).input_ids)
    assert int((np.asarray(s["labels"]) != IGNORE).sum()) == n_sup


def test_hf_without_an_end_of_turn_token_is_an_error(tmp_path, tiny_models, images, llama_tokenizers, capsys):
    from fastross.data.templates import load_tokenizer

    folder = tmp_path / "plain_chat"
    tok = load_tokenizer(str(llama_tokenizers / "llama"))
    rc, _ = run(tmp_path, tiny_models, images, llama_tokenizers / "llama", "hf", RECORDS)
    assert rc == 2 and "no chat template" in capsys.readouterr().err
    tok.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    tok.save_pretrained(folder)
    rc, _ = run(tmp_path, tiny_models, images, folder, "chatml", RECORDS)
    err = capsys.readouterr().err
    assert rc == 2 and "template chatml" in err and str(folder) in err and "generation prompt" in err
    tok.chat_template = "{{ raise_exception('a system message first') }}"
    tok.save_pretrained(folder)
    rc, _ = run(tmp_path, tiny_models, images, folder, "hf", RECORDS)
    err = capsys.readouterr().err
    assert rc == 2 and "cannot render" in err and "a system message first" in err
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    tok.save_pretrained(folder)
    rc, _ = run(tmp_path, tiny_models, images, folder, "hf", RECORDS)
    err = capsys.readouterr().err
    assert rc == 2 and "ends an assistant turn with ''" in err and "never learn where an answer ends" in err


def test_hf_template_that_rewrites_earlier_turns_is_a_counted_skip(
    tmp_path, tiny_models, images, llama_tokenizers, capsys
):
    """A template that renders a turn one way while it is the last and another once a turn follows (as templates
    that drop earlier reasoning do) has no stable span for it: such records are skipped and counted, by reason."""
    from fastross.data.schema import read_meta
    from fastross.data.templates import load_tokenizer

    folder = tmp_path / "rewrites"
    tok = load_tokenizer(str(llama_tokenizers / "llama3"))
    tok.chat_template = tok.chat_template.replace(
        "message['content'] | trim",
        "(message['content'] | upper if message['role'] == 'assistant' and not loop.last else message['content'])",
    )
    tok.save_pretrained(folder)
    rc, out = run(tmp_path, tiny_models, images, folder, "hf", RECORDS)
    assert rc == 0
    meta = read_meta(out)
    assert meta["written"] == 1 and meta["skipped"] == {"template_mismatch": 3}
    assert "turn 1" in meta["skipped_examples"]["template_mismatch"][0]
    assert [s["id"] for s in read(out)] == ["gptfirst"]  # the one record with a single answer


# plain with a Llama tokenizer (LLaVA-1.5's stage 1) ------------------------------------------------------------


def test_plain_vicuna_is_the_references(tmp_path, tiny_models, images, llama_tokenizers):
    """preprocess_plain: "<image>" + caption + "\n", the question dropped; masked: the tokens of "<image>" alone
    (the BOS and the image)."""

    def ref_plain(conv, tok, image_id):
        text = "<image>" + conv[1]["value"] + "\n"
        ids = ref_tokens(text, tok, image_id)
        labels = np.array(ids)
        labels[: len(ref_tokens("<image>", tok, image_id))] = IGNORE
        return text, ids, labels

    records = [
        {"id": f"cap{i}", "image": "a.png", "conversations": [h(q), g(c)]}
        for i, (q, c) in enumerate(
            [("<image>\nDescribe the picture.", "A red square at the top left."), ("Describe.<image>", "3 circles.")]
        )
    ]
    tok, samples, _ = assert_reference(
        tmp_path, tiny_models, images, llama_tokenizers / "llama", "plain", ref_plain, records=records
    )
    assert [np.asarray(s["input_ids"])[:2].tolist() for s in samples] == [
        [tok.bos_token_id, tok.convert_tokens_to_ids("<image>")]
    ] * 2


# qwen2_ross --reference-labels ---------------------------------------------------------------------------------


def test_qwen2_reference_labels_are_the_references(tmp_path, tiny_models, images, tokenizer):
    tok, samples, _ = assert_reference(
        tmp_path,
        tiny_models,
        images,
        tiny_models / "llm",
        "qwen2_ross",
        ref_qwen2,
        extra=["--reference-labels"],
        tok=tokenizer,
    )
    from fastross.data.schema import read_meta

    assert read_meta(tmp_path / "out")["reference_labels"] is True
    # without the flag, fastross differs exactly there: the conversation's last <|im_end|> is supervised
    rc, out = run(tmp_path / "ours", tiny_models, images, tiny_models / "llm", "qwen2_ross", RECORDS)
    assert rc == 0 and read_meta(out)["reference_labels"] is False
    end = tok.convert_tokens_to_ids("<|im_end|>")
    for theirs, ours in zip(samples, read(out)):
        a, b = np.asarray(theirs["labels"]), np.asarray(ours["labels"])
        assert np.array_equal(theirs["input_ids"], ours["input_ids"])
        last_end = int(np.flatnonzero(np.asarray(ours["input_ids"]) == end)[-1])
        assert np.flatnonzero(a != b).tolist() == [last_end] and b[last_end] == end and a[last_end] == IGNORE
