"""The demo's parts that run in seconds: the corpus tokenizer make_tiny trains for the tiny LLM, and the answers
block (the majority-answer baseline, the questions shown)."""

import json

import pytest

from fastross import demo
from fastross.data import templates
from fastross.demo.make_tiny import build_corpus_tokenizer, corpus_texts, make_tiny


@pytest.fixture(scope="module")
def corpus_tokenizer(synth_data):
    return build_corpus_tokenizer(corpus_texts([synth_data / "stage1.json", synth_data / "stage2.json"]), 1024)


def test_corpus_tokenizer(corpus_tokenizer, synth_data, tmp_path):
    tok = corpus_tokenizer
    # every merge the corpus offers: it stops below 1024; a smaller --vocab is met exactly
    assert 400 < len(tok) < 1024 and tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    texts = corpus_texts([synth_data / "stage1.json", synth_data / "stage2.json"])
    assert len(build_corpus_tokenizer(texts, 300)) == 300
    templates.check_tokenizer("qwen2_ross", tok, "corpus")  # <|im_end|> is one token
    for special in ("<|im_end|>", "<image>", "<|endoftext|>", "<|im_start|>"):
        assert len(tok(special, add_special_tokens=False).input_ids) == 1, special
    record = json.loads((synth_data / "stage2.json").read_text())[0]
    rendered = templates.render("qwen2_ross", record["conversations"], "image" in record, tok)
    ids, labels = templates.tokenize(rendered, tok)
    assert tok.decode(ids) == rendered.text  # byte-level: nothing lost
    # the template's frame merges into words: the system prompt takes far fewer tokens than its 162 characters
    assert len(tok(templates.ROSS_SYSTEM, add_special_tokens=False).input_ids) <= 30
    assert [tok.decode([i]) for i in tok("USER: ASSISTANT:", add_special_tokens=False).input_ids] == [
        "USER",
        ":",
        " ASSISTANT",
        ":",
    ]
    # answers merge with the space the template puts before them, so a prompt ending at "ASSISTANT:" asks for them
    for word in (" Yes", " No", " Red", " At"):
        assert tok.decode(tok(word + ".", add_special_tokens=False).input_ids[:1]) == word
    again = build_corpus_tokenizer(texts, 1024)
    assert again.get_vocab() == tok.get_vocab()
    with pytest.raises(ValueError, match="at least 260"):
        build_corpus_tokenizer(["a b"], 259)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": 1}]))
    with pytest.raises(ValueError, match="bad.json: record 0 has no 'conversations'"):
        corpus_texts([bad])


def test_make_tiny_with_the_corpus_tokenizer(corpus_tokenizer, tmp_path):
    from transformers import AutoConfig

    out = make_tiny(tmp_path / "models", tokenizer=corpus_tokenizer)
    assert AutoConfig.from_pretrained(out / "llm").vocab_size == (len(corpus_tokenizer) + 63) // 64 * 64
    tok = templates.load_tokenizer(str(out / "llm"))
    assert tok.get_vocab() == corpus_tokenizer.get_vocab() and tok.eos_token_id == corpus_tokenizer.eos_token_id


def row(kind, typ, gold, correct, question="q"):
    return {
        "kind": kind,
        "type": typ,
        "gold": gold,
        "correct": correct,
        "question": question,
        "image": "x.png",
        "answer": str(gold),
        "prediction": "p",
    }


def test_majority_baseline_and_the_answers_shown():
    rows = [
        row("pope", "yesno", "yes", True),
        row("pope", "yesno", "no", False),
        row("pope", "yesno", "yes", True),
        row("count", "number", 2, False),
        row("count", "number", 2, True),
        row("count", "number", 3, False),
        row("where", "where", ["top", "left"], False),
        row("where", "where", ["top", "right"], False),
    ]
    # yes 2 of 3, two 2 of 3, a place 1 of 2: (2 + 2 + 1) / 8
    assert demo.majority_baseline(rows) == pytest.approx(5 / 8)
    shown = demo.show_answers(rows, 4)  # one of each kind in turn, then the second of each
    assert len(shown) == 4 and all(x.startswith("demo:   x.png  q") for x in shown)
    assert [x.split()[-1] for x in shown] == ["right", "wrong", "wrong", "wrong"]
