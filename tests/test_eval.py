"""fastross.eval: the answer parsers and metrics against hand-computed values, and the command line end to end on
the bundled held-out benchmark and on a plain LLaVA-format QA file."""

import json

import pytest

from fastross import eval as fe

Y, N, U = fe.YES, fe.NO, fe.UNKNOWN


@pytest.mark.parametrize(
    "text,want",
    [
        ("Yes.", Y),
        ("YES!", Y),
        ("No, there is not.", N),
        ("no", N),
        ("Yes, there is no doubt.", U),
        ("yes and no", U),
        ("", U),
        ("Nope.", U),
        ("The answer: yes", Y),
        ("There is a red circle.", U),
    ],
)
def test_yes_no_as_vlmevalkit(text, want):
    assert fe.parse_yesno(text) == want


def test_parsers():
    assert [fe.parse_number(t) for t in ("Two.", "There are 3 shapes.", "none", "Twelve")] == [2, 3, None, 12]
    assert [fe.parse_colour(t) for t in ("Red.", "It is blue", "red and blue", "dark")] == ["red", "blue", None, None]
    assert [
        fe.parse_where(t)
        for t in (
            "At the top left.",
            "On the right.",
            "In the centre.",
            "in the center",
            "At the bottom.",
            "top and bottom",
            "I do not know",
        )
    ] == [
        ("top", "left"),
        ("middle", "right"),
        ("middle", "centre"),
        ("middle", "centre"),
        ("bottom", "centre"),
        None,
        None,
    ]
    assert fe.normalise_text("A cup of coffee, on a saucer!") == "cup of coffee on saucer"
    assert fe.parse_number("3.5 apples") is None and fe.words("3.5 apples.") == ["3.5", "apples"]


def test_yes_no_metrics_by_hand():
    # gold Y Y N N N, predicted Y N Y Y unknown: TP 1, FP 2, FN 1; 3 answered yes; one of five right
    m = fe.yesno_metrics([Y, Y, N, N, N], [Y, N, Y, Y, U])
    want = {
        "n": 5,
        "accuracy": 0.2,
        "precision": 1 / 3,
        "recall": 0.5,
        "f1": 0.4,
        "yes_ratio": 0.6,
        "hallucination": 2 / 3,
        "unknown_rate": 0.2,
    }
    assert m.keys() == want.keys()
    for k in want:
        assert m[k] == pytest.approx(want[k], abs=1e-12), k
    none_yes = fe.yesno_metrics([Y, N], [N, N])
    assert none_yes["precision"] == none_yes["f1"] == none_yes["hallucination"] == 0.0 and none_yes["accuracy"] == 0.5


def test_count_and_pair_metrics_by_hand():
    m = fe.count_metrics([3, 2, 1, 0], [3, 1, None, 2])
    assert m == {"n": 4, "exact_match": 0.25, "mae": 1.0, "unknown_rate": 0.25}  # MAE (0 + 1 + 2) / 3 read
    p = fe.pair_accuracy({"a": [True, True], "b": [True, False], "c": [False, False], "d": [True]})
    assert p == {"pairs": 3, "pair_accuracy": pytest.approx(1 / 3)}


def test_summary_groups_by_kind():
    def row(kind, typ, answer, prediction, **extra):
        item = {"id": len(rows), "image": "x.png", "kind": kind, "type": typ, "question": "q", "answer": answer}
        rows.append(fe.score(item | extra, prediction))

    rows = []
    row("pope-random", "yesno", "Yes.", "Yes")
    row("pope-random", "yesno", "No.", "Yes, I think so")
    row("pope-popular", "yesno", "No.", "No.")
    row("count", "number", "Three.", "3")
    row("count", "number", "Two.", "Four")
    row("position", "where", "At the top left.", "top left")
    row("position", "yesno", "Yes.", "maybe")
    row("mmvp", "colour", "Red.", "Red.", pair="p1")
    row("mmvp", "colour", "Blue.", "Red.", pair="p1")
    row("mmvp", "number", "Two.", "Two.", pair="p2")
    row("mmvp", "number", "Three.", "three", pair="p2")
    s = fe.summarise(rows)
    assert s["pope-random"]["accuracy"] == 0.5 and s["pope-random"]["hallucination"] == 1.0
    assert s["pope"]["n"] == 3 and s["pope"]["accuracy"] == pytest.approx(2 / 3)
    assert (
        s["pope"]["precision"] == 0.5 and s["pope"]["recall"] == 1.0 and s["pope"]["yes_ratio"] == pytest.approx(2 / 3)
    )
    assert s["count"]["exact_match"] == 0.5 and s["count"]["mae"] == 1.0
    assert s["position"]["accuracy"] == 0.5 and s["position"]["unknown_rate"] == 0.5 and "f1" not in s["position"]
    assert s["mmvp"]["accuracy"] == 0.75 and s["mmvp"]["pairs"] == 2 and s["mmvp"]["pair_accuracy"] == 0.5
    assert s["overall"]["n"] == 11 and s["overall"]["accuracy"] == pytest.approx(7 / 11)


def test_bad_data_is_named(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "r7", "image": "a.png", "conversations": [{"from": "human", "value": "q"}]}]))
    with pytest.raises(ValueError, match="record 0 \\(r7\\)"):
        fe.read_items(bad)
    two = [
        {
            "id": "r8",
            "image": ["a.png", "b.png"],
            "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
        }
    ]
    bad.write_text(json.dumps(two))
    with pytest.raises(ValueError, match="record 0 \\(r8\\): 'image' must be one file name"):
        fe.read_items(bad)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        fe.read_items(tmp_path / "nope.json")
    turns = [
        {"from": "human", "value": "q"},
        {"from": "gpt", "value": "a"},
        {"from": "gpt", "value": "b"},
        {"from": "human", "value": "c"},
    ]
    bad.write_text(json.dumps([{"id": "r9", "conversations": turns}]))
    with pytest.raises(ValueError, match="record 0 \\(r9\\): turn 2 is from 'gpt', not human"):
        fe.read_items(bad)
    bad.write_text(json.dumps([{"id": "r10", "type": ["yesno"], "conversations": turns[:2] * 2}]))
    with pytest.raises(ValueError, match="record 0 \\(r10\\): 'type' lists 1 types for 2 turns"):
        fe.read_items(bad)


@pytest.mark.slow
def test_cli_on_the_benchmark_and_a_plain_file(run_dir, synth_data, tmp_path, capsys):
    """The held-out benchmark's first questions (legacy kinds, the three POPE settings, MMVP pairs): the predictions
    are the generator's, the summary is the metrics of items.jsonl, the POPE file holds the yes/no questions."""
    from fastross.generate import Sampling, answer, load

    limit = 40
    out = tmp_path / "out"
    assert (
        fe.main(
            [
                "--model",
                str(run_dir),
                "--data",
                str(synth_data / "eval.json"),
                "--out",
                str(out),
                "--limit",
                str(limit),
                "--batch-size",
                "16",
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    rows = [json.loads(x) for x in (out / "items.jsonl").read_text().splitlines()]
    assert len(rows) == limit
    kinds = {r["kind"] for r in rows}
    assert {"pope-random", "pope-popular", "pope-adversarial", "mmvp"} <= kinds and len(kinds) >= 6
    summary = json.loads((out / "summary.json").read_text())
    assert summary["questions"] == limit
    for r in rows:  # JSON turned the parsed tuples into lists
        for k in ("parsed", "gold"):
            r[k] = tuple(r[k]) if isinstance(r[k], list) else r[k]
    assert summary["metrics"] == json.loads(json.dumps(fe.summarise(rows)))
    for kind in kinds | {"pope", "overall"}:
        assert f"eval: {kind} " in printed
    pope = [json.loads(x) for x in (out / "pope_answers.jsonl").read_text().splitlines()]
    yn = [r for r in rows if r["type"] == "yesno"]
    assert [p["question_id"] for p in pope] == list(range(len(yn)))
    assert [(p["text"], p["label"], p["category"]) for p in pope] == [
        (r["prediction"], r["gold"], r["kind"]) for r in yn
    ]

    loaded = load(run_dir)
    items = fe.read_items(synth_data / "eval.json")[:3]
    want = answer(loaded, [(it["prompt"], synth_data / "images" / it["image"]) for it in items], Sampling(4))
    assert [r["prediction"] for r in rows[:3]] == want

    # a plain LLaVA-format file: no kind, no type (inferred), one text-only record
    plain = tmp_path / "qa.jsonl"
    recs = [
        {
            "id": "p1",
            "image": "photo_coffee.png",
            "conversations": [
                {"from": "human", "value": "What is shown?\n<image>"},
                {"from": "gpt", "value": "A cup of coffee."},
            ],
        },
        {
            "id": "p2",
            "image": "shapes_00001.png",
            "conversations": [
                {"from": "human", "value": "<image>\nIs there a shape?"},
                {"from": "gpt", "value": "Yes"},
            ],
        },
        {
            "id": "p3",
            "conversations": [{"from": "human", "value": "What is 2 plus 3?"}, {"from": "gpt", "value": "5."}],
        },
        {
            "id": "p4",
            "image": "shapes_00002.png",
            "conversations": [  # every turn asked, the second in context
                {"from": "human", "value": "<image>\nHow many shapes are there?"},
                {"from": "gpt", "value": "Two."},
                {"from": "human", "value": "Is there a red circle?"},
                {"from": "gpt", "value": "No."},
            ],
        },
    ]
    plain.write_text("".join(json.dumps(r) + "\n" for r in recs))
    s = fe.evaluate(run_dir, plain, tmp_path / "plain", images=synth_data / "images", max_new_tokens=4)
    rows = [json.loads(x) for x in (tmp_path / "plain" / "items.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["type"], r["turn"]) for r in rows] == [
        ("vqa", "text", 1),
        ("vqa", "yesno", 1),
        ("vqa", "text", 1),
        ("vqa", "text", 1),
        ("vqa", "yesno", 2),
    ]
    assert s["metrics"]["vqa"]["n"] == 5 and {t: v["n"] for t, v in s["by_turn"].items()} == {"1": 4, "2": 1}
    conv = recs[3]["conversations"]
    want = answer(
        loaded,
        [(conv[2]["value"], synth_data / "images" / "shapes_00002.png", [(conv[0]["value"], conv[1]["value"])])],
        Sampling(4),
    )
    assert rows[4]["prediction"] == want[0]


MULTI = [  # two records of several turns and one of one; the fake model's reply to each question, right or wrong
    {
        "id": "r1",
        "image": "shapes_00001.png",
        "kind": "shapes",
        "conversations": [
            {"from": "human", "value": "<image>\nIs there a red circle in the image?"},
            {"from": "gpt", "value": "Yes."},
            {"from": "human", "value": "What colour is the square?"},
            {"from": "gpt", "value": "Blue."},
            {"from": "human", "value": "How many shapes are there?"},
            {"from": "gpt", "value": "Two."},
        ],
        "type": ["yesno", "colour", "number"],
    },
    {
        "id": "r2",
        "conversations": [
            {"from": "human", "value": "What is 2 plus 3?"},
            {"from": "gpt", "value": "5."},
            {"from": "human", "value": "And 4 plus 4?"},
            {"from": "gpt", "value": "8."},
        ],
    },
    {
        "id": "r3",
        "image": "shapes_00002.png",
        "conversations": [
            {"from": "human", "value": "Is there a blue square?\n<image>"},
            {"from": "gpt", "value": "No"},
        ],
    },
]
REPLIES = {
    "Is there a red circle in the image?": "Yes",
    "What colour is the square?": "Red.",
    "How many shapes are there?": "two",
    "What is 2 plus 3?": "5",
    "And 4 plus 4?": "9.",
    "Is there a blue square?": "No.",
}


def test_every_turn_scored_with_context_or_alone(tiny_models, synth_data, tmp_path, monkeypatch):
    """Every turn of a multi-turn record is asked and scored, counted per turn in summary.json's by_turn; with
    --turns context turn k's prompt is the training sample's tokens before answer k (turns 1..k-1 with their gold
    answers before it), with --turns alone it is the one-turn prompt; the image goes with the first turn."""
    from fastross import generate
    from fastross.data import templates
    from fastross.data.images import ImageSpec

    tok = templates.load_tokenizer(str(tiny_models / "llm"))
    loaded = generate.Loaded(
        None,
        tok,
        "qwen2_ross",
        "pad",
        ImageSpec.from_pretrained(str(tiny_models / "vision")),
        tok.convert_tokens_to_ids(templates.IMAGE_TOKEN),
        tmp_path / "fake",
    )
    asked = []

    def fake_decode(model, prompts, image_token_id, sampling, eos, pad):
        out = []
        for p in prompts:
            text = tok.decode(p.input_ids)
            asked.append((text, p.pixel_values is not None, p.input_ids))
            question = text.rsplit("USER: ", 1)[1].removesuffix(" ASSISTANT:")
            question = question.replace(templates.IMAGE_TOKEN, "").strip()
            out.append(tok(REPLIES[question], add_special_tokens=False).input_ids + [eos])
        return out

    monkeypatch.setattr(generate, "load", lambda path, device: loaded)
    monkeypatch.setattr(generate, "decode", fake_decode)
    data = tmp_path / "multi.json"
    data.write_text(json.dumps(MULTI))
    items = fe.read_items(data)
    assert [(it["id"], it["turn"], it["type"]) for it in items] == [
        ("r1", 1, "yesno"),
        ("r1", 2, "colour"),
        ("r1", 3, "number"),
        ("r2", 1, "text"),
        ("r2", 2, "text"),
        ("r3", 1, "yesno"),
    ]
    assert items[2]["history"] == [
        ("<image>\nIs there a red circle in the image?", "Yes."),
        ("What colour is the square?", "Blue."),
    ]

    for mode in fe.TURNS:
        asked.clear()
        s = fe.evaluate("fake", data, tmp_path / mode, images=synth_data / "images", turns=mode)
        assert s["questions"] == 6 and s["turns"] == mode
        # right: r1 turns 1 and 3, r2 turn 1, r3; wrong: r1 turn 2 (Red, not Blue), r2 turn 2 (9, not 8)
        assert {t: (v["n"], v["accuracy"]) for t, v in s["by_turn"].items()} == {
            "1": (3, 1.0),
            "2": (2, 0.0),
            "3": (1, 1.0),
        }
        assert s["metrics"]["overall"]["n"] == 6 and s["metrics"]["overall"]["accuracy"] == pytest.approx(4 / 6)
        rows = [json.loads(x) for x in (tmp_path / mode / "items.jsonl").read_text().splitlines()]
        assert [(r["id"], r["turn"], r["correct"]) for r in rows] == [
            ("r1", 1, True),
            ("r1", 2, False),
            ("r1", 3, True),
            ("r2", 1, True),
            ("r2", 2, False),
            ("r3", 1, True),
        ]
        assert json.loads((tmp_path / mode / "summary.json").read_text())["by_turn"] == s["by_turn"]
        assert [image for _, image, _ in asked] == [True, True, True, False, False, True]
        assert all(text.count(templates.IMAGE_TOKEN) == image for text, image, _ in asked)
        users = [text.count("USER: ") for text, _, _ in asked]
        assert users == ([1, 2, 3, 1, 2, 1] if mode == "context" else [1] * 6)

    # turn 3 in context: exactly the two-answer training sample's tokens before its third answer
    conv = MULTI[0]["conversations"]
    ids, labels = templates.tokenize(templates.render("qwen2_ross", conv, True, tok), tok)
    runs = [i for i in range(len(labels)) if labels[i] != templates.IGNORE and labels[i - 1] == templates.IGNORE]
    assert len(runs) == 3
    assert generate.prompt_ids(loaded, conv[4]["value"], True, items[2]["history"]) == ids[: runs[2]].tolist()
    assert tok.decode(ids[: runs[2]]).endswith("Blue.<|im_end|>USER: How many shapes are there? ASSISTANT:")
    # alone (the last run above): the one-turn prompt, the image placed before the question
    one = [{"from": "human", "value": "<image>\nHow many shapes are there?"}, {"from": "gpt", "value": "Two."}]
    ids1, labels1 = templates.tokenize(templates.render("qwen2_ross", one, True, tok), tok)
    assert asked[2][2] == ids1[: list(labels1 != templates.IGNORE).index(True)].tolist()
    with pytest.raises(ValueError, match="turns must be one of"):
        fe.evaluate("fake", data, tmp_path / "x", images=synth_data / "images", turns="first")
