"""Tests of fastross.data.synth: determinism, well-formed records, answers true of the pixels."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastross.data import synth

N_TRAIN, N_EVAL = 40, 12
RGB = {
    "red": (220, 30, 30),
    "green": (30, 180, 30),
    "blue": (30, 60, 220),
    "yellow": (230, 210, 20),
}
NUMBER = {"Zero": 0, "One": 1, "Two": 2, "Three": 3, "Four": 4}
FILES = ("stage1.json", "stage2.json", "eval.json", "scenes.json")


def load(out: Path, name: str):
    return json.loads((out / name).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    counts = synth.write_dataset(out, seed=0, n_train=N_TRAIN, n_eval=N_EVAL)
    return out, counts


def snapshot(out: Path) -> dict[str, bytes]:
    files = {name: (out / name).read_bytes() for name in FILES}
    for path in sorted((out / "images").iterdir()):
        files["images/" + path.name] = path.read_bytes()
    return files


# (1) determinism --------------------------------------------------------------------


def test_same_seed_identical_different_seed_differs(data, tmp_path):
    out, _ = data
    again = tmp_path / "again"
    other = tmp_path / "other"
    synth.write_dataset(again, seed=0, n_train=N_TRAIN, n_eval=N_EVAL)
    synth.write_dataset(other, seed=1, n_train=N_TRAIN, n_eval=N_EVAL)
    a, b, c = snapshot(out), snapshot(again), snapshot(other)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name] == b[name], f"{name} differs between two runs with the same seed"
    for name in FILES:
        assert a[name] != c[name], f"{name} is the same for seeds 0 and 1"
    shapes = [n for n in a if n.startswith("images/shapes_")]
    assert sum(a[n] != c.get(n) for n in shapes) > len(shapes) // 2


def test_cli_prints_summary(tmp_path, capsys):
    counts = synth.main([str(tmp_path / "cli"), "--seed", "3", "--train", "5", "--eval", "2"])
    line = capsys.readouterr().out.strip()
    assert len(line.splitlines()) == 1
    assert counts["shapes_images"] == 7 and counts["eval"] == 2
    for key in ("images", "stage1", "stage2", "text_only", "eval"):
        assert str(counts[key]) in line
    assert (tmp_path / "cli" / "images" / "shapes_00007.png").exists()


# (2) well-formed records ----------------------------------------------------------------


def check_record(record: dict, images: Path) -> None:
    conv = record["conversations"]
    assert conv and len(conv) % 2 == 0, record["id"]
    for i, turn in enumerate(conv):
        assert set(turn) == {"from", "value"}
        assert turn["from"] == ("human" if i % 2 == 0 else "gpt"), record["id"]
        assert isinstance(turn["value"], str) and turn["value"].strip()
    text = "".join(t["value"] for t in conv)
    if "image" in record:
        assert (images / record["image"]).is_file(), record["image"]
        assert conv[0]["value"].startswith("<image>\n"), record["id"]
        assert text.count("<image>") == 1, record["id"]
    else:
        assert "<image>" not in text, record["id"]


def test_records_well_formed(data):
    out, counts = data
    images = out / "images"
    stage1, stage2, evals = (load(out, n) for n in ("stage1.json", "stage2.json", "eval.json"))
    ids = [r["id"] for r in stage1 + stage2 + evals]
    assert len(ids) == len(set(ids)), "record ids are not unique"
    for record in stage1 + stage2 + evals:
        check_record(record, images)
    for record in stage1 + evals:
        assert "image" in record and len(record["conversations"]) == 2
    text_only = [r for r in stage2 if "image" not in r]
    assert len(text_only) == counts["text_only"]
    assert 0.10 <= len(text_only) / len(stage2) <= 0.20
    assert any(len(r["conversations"]) > 2 for r in stage2 if "image" in r), "no multi-turn"
    # one captioning record per training image, photos included
    train_files = {r["image"] for r in stage2 if "image" in r}
    assert [r["image"] for r in stage1] and {r["image"] for r in stage1} == train_files
    assert len(stage1) == N_TRAIN + counts["photos"]
    assert counts["photos"] >= 5 and counts["eval"] == N_EVAL
    assert len(load(out, "scenes.json")) == N_TRAIN + 2 * N_EVAL  # each held-out image has an MMVP partner
    assert len(list(images.iterdir())) == counts["images"] == N_TRAIN + 2 * N_EVAL + counts["photos"]


def test_text_only_answers(data):
    out, _ = data
    ops = {"plus": int.__add__, "minus": int.__sub__, "times": int.__mul__}
    for record in load(out, "stage2.json"):
        if "image" in record:
            continue
        conv = record["conversations"]
        for q, a in zip(conv[::2], conv[1::2]):
            q, a = q["value"], a["value"]
            if m := re.fullmatch(r"What is (\d+) (plus|minus|times) (\d+)\?", q):
                assert a == f"{ops[m[2]](int(m[1]), int(m[3]))}."
            elif m := re.fullmatch(r"Spell the word (\w+) backwards\.", q):
                assert a == f"{m[1][::-1]}."
            elif m := re.fullmatch(r"How many letters are in the word (\w+)\?", q):
                assert a == f"{len(m[1])}."
            else:
                pytest.fail(f"unexpected text-only question {q!r}")


# (3) answers are true of the image ------------------------------------------------------


def test_shape_centres_have_their_colour(data):
    out, _ = data
    cell = 96 // 3
    for scene in load(out, "scenes.json"):
        image = Image.open(out / "images" / scene["image"])
        assert image.mode == "RGB" and image.size == (96, 96)
        pixels = np.asarray(image, dtype=int)
        used = set()
        for s in scene["shapes"]:
            got = pixels[s["cy"], s["cx"]]
            assert np.abs(got - RGB[s["colour"]]).max() <= 12, (scene["image"], s, got)
            r, c = s["cy"] // cell, s["cx"] // cell
            assert (("top", "middle", "bottom")[r], ("left", "centre", "right")[c]) == (
                s["row"],
                s["col"],
            )
            used.add((r, c))
        assert len(used) == len(scene["shapes"]), "two shapes share a cell"
        for r in range(3):  # empty cells are grey at their centre
            for c in range(3):
                if (r, c) not in used:
                    p = pixels[r * cell + cell // 2, c * cell + cell // 2]
                    assert p.min() > 170 and p.max() - p.min() < 30, (scene["image"], r, c, p)


def position(answer: str) -> tuple[str, str]:
    words = answer.lower()
    row = next((w for w in ("top", "bottom") if w in words), "middle")
    col = next((w for w in ("left", "right") if w in words), "centre")
    return row, col


def check_answer(q: str, a: str, shapes: list[dict]) -> str:
    """Assert that answer a to question q is true of the scene; returns the question kind."""
    q = q.removeprefix("<image>\n")
    named = lambda colour, shape: [  # noqa: E731
        s for s in shapes if s["colour"] == colour and s["shape"] == shape
    ]
    if m := re.fullmatch(r"Is there a (\w+) (\w+) in the image\?", q):
        assert a == ("Yes." if named(m[1], m[2]) else "No."), q
        return "existence"
    if m := re.fullmatch(r"What colour is the (\w+)\?", q):
        match = [s for s in shapes if s["shape"] == m[1]]
        assert len(match) == 1, f"ambiguous: {q}"
        assert a == match[0]["colour"].capitalize() + ".", q
        return "colour"
    if q == "How many shapes are there?":
        assert NUMBER[a.rstrip(".")] == len(shapes), q
        return "count"
    if m := re.fullmatch(r"How many (\w+)s are there\?", q):
        assert NUMBER[a.rstrip(".")] == sum(s["shape"] == m[1] for s in shapes), q
        return "count"
    rel = r"Is the (\w+) (\w+) (to the left of|to the right of|above|below) the (\w+) (\w+)\?"
    if m := re.fullmatch(rel, q):
        first, second = named(m[1], m[2]), named(m[4], m[5])
        assert len(first) == 1 and len(second) == 1, f"ambiguous: {q}"
        x, y = first[0], second[0]
        if m[3] in ("to the left of", "to the right of"):
            assert x["cx"] // 32 != y["cx"] // 32, f"same column: {q}"
            truth = (x["cx"] < y["cx"]) == (m[3] == "to the left of")
        else:
            assert x["cy"] // 32 != y["cy"] // 32, f"same row: {q}"
            truth = (x["cy"] < y["cy"]) == (m[3] == "above")
        assert a == ("Yes." if truth else "No."), q
        return "relative"
    if m := re.fullmatch(r"Where is the (\w+) (\w+)\?", q):
        match = named(m[1], m[2])
        assert len(match) == 1, f"ambiguous: {q}"
        s = match[0]
        rows, cols = ("top", "middle", "bottom"), ("left", "centre", "right")
        assert position(a) == (rows[s["cy"] // 32], cols[s["cx"] // 32]), (q, a)
        return "absolute"
    pytest.fail(f"unexpected question {q!r}")


def test_answers_true_of_scene(data):
    out, _ = data
    scenes = {s["image"]: s["shapes"] for s in load(out, "scenes.json")}
    kinds = set()
    for name in ("stage2.json", "eval.json"):
        for record in load(out, name):
            if not record.get("image", "").startswith("shapes_"):
                continue
            conv = record["conversations"]
            for q, a in zip(conv[::2], conv[1::2]):
                kinds.add(check_answer(q["value"], a["value"], scenes[record["image"]]))
    assert kinds == {"existence", "colour", "count", "relative", "absolute"}


def test_captions_name_every_shape(data):
    out, _ = data
    scenes = {s["image"]: s["shapes"] for s in load(out, "scenes.json")}
    for record in load(out, "stage1.json"):
        text = record["conversations"][1]["value"]
        if record["image"].startswith("shapes_"):
            shapes = scenes[record["image"]]
            assert text.count(" and ") == (len(shapes) > 1)
            for s in shapes:
                assert f"{s['colour']} {s['shape']}" in text, (text, s)
        else:
            assert text.endswith(".") and len(text.split()) >= 4


# (4) eval held out ----------------------------------------------------------------------


def test_eval_images_disjoint_from_training(data):
    out, counts = data
    train = {r["image"] for n in ("stage1.json", "stage2.json") for r in load(out, n) if "image" in r}
    evals = {r["image"] for r in load(out, "eval.json")}
    held = {f for f in evals if f.startswith("shapes_")}
    assert len(held) == N_EVAL == counts["eval"] and len(evals - held) == counts["mmvp_pairs"] == N_EVAL
    assert not train & evals
    train_bytes = {(out / "images" / f).read_bytes() for f in train}
    assert not any((out / "images" / f).read_bytes() in train_bytes for f in evals)


def test_held_out_set_is_500_images_by_default(tmp_path):
    import inspect

    assert inspect.signature(synth.write_dataset).parameters["n_eval"].default >= 500
    counts = synth.main([str(tmp_path / "d"), "--train", "0"])  # the CLI's default too (no training images: quick)
    assert counts["eval"] >= 500 and counts["mmvp_pairs"] == counts["eval"]


def test_pope_negatives_by_hand():
    scene = lambda *objs: {"shapes": [{"colour": c, "shape": k} for c, k in objs]}  # noqa: E731
    rb, gc, bs, yt = ("red", "circle"), ("green", "circle"), ("blue", "square"), ("yellow", "triangle")
    scenes = [scene(rb, gc), scene(rb, gc, bs), scene(gc, bs), scene(yt), scene(yt, bs)]
    freq, cooc = synth.object_stats(scenes)
    assert (freq[gc], freq[bs], freq[rb], freq[yt]) == (3, 3, 2, 2)
    assert (cooc[rb, gc], cooc[gc, rb], cooc[gc, bs], cooc[yt, bs], cooc[rb, yt]) == (2, 2, 2, 1, 0)
    import random

    neg = synth.pope_negatives({rb}, freq, cooc, random.Random(0))
    # popular: green circle and blue square are the most frequent (3 each); ties by name -> ("blue", "square")
    assert neg["pope-popular"] == bs
    # adversarial: with the red circle, green circle co-occurs twice, blue square once
    assert neg["pope-adversarial"] == gc
    assert neg["pope-random"] != rb
    assert synth.pope_negatives({yt}, freq, cooc, random.Random(0))["pope-adversarial"] == bs


def test_benchmark_items(data):
    """Per held-out image: a yes and a no per POPE setting, with the setting's negative; an MMVP pair of images that
    differ in one attribute only (pixels included), whose answers to the same question differ."""
    out, _ = data
    all_scenes = load(out, "scenes.json")
    scenes = {s["image"]: s["shapes"] for s in all_scenes}
    freq, cooc = synth.object_stats([s for s in all_scenes if s["image"].startswith("shapes_")])
    items = load(out, "eval.json")
    by_image = {}
    for it in items:
        by_image.setdefault(it["image"], []).append(it)
        q, a = it["conversations"][0]["value"], it["conversations"][1]["value"]
        check_answer(q, a, scenes[it["image"]])
        assert it["type"] == synth.answer_type(q.removeprefix("<image>\n"), a)
    held = [f for f in by_image if f.startswith("shapes_")]
    for f in held:
        present = {(s["colour"], s["shape"]) for s in scenes[f]}
        for kind in synth.POPE_KINDS:
            pope = [it for it in by_image[f] if it["kind"] == kind]
            assert [it["conversations"][1]["value"] for it in pope] == ["Yes.", "No."], (f, kind)
            neg = tuple(pope[1]["object"].split())
            absent = [o for o in synth.OBJECTS if o not in present]
            if kind == "pope-popular":
                assert freq[neg] == max(freq[o] for o in absent)
            if kind == "pope-adversarial":
                score = lambda o: sum(cooc[p, o] for p in present)  # noqa: E731, B023 (used in this iteration only)
                assert score(neg) == max(score(o) for o in absent)
    pairs = {}
    for it in items:
        if it["kind"] == "mmvp":
            pairs.setdefault(it["pair"], []).append(it)
    assert len(pairs) == len(held) and {len(p) for p in pairs.values()} == {2}
    attributes = set()
    for a, b in pairs.values():
        assert a["conversations"][0] == b["conversations"][0] and a["conversations"][1] != b["conversations"][1]
        sa, sb = scenes[a["image"]], scenes[b["image"]]
        gone, new = [x for x in sa if x not in sb], [y for y in sb if y not in sa]
        if a["attribute"] == "count":
            assert not gone and len(new) == 1
        else:
            assert len(gone) == len(new) == 1
            x, y = gone[0], new[0]
            keys = {k for k in x if x[k] != y[k]}
            if a["attribute"] == "colour":
                assert keys == {"colour"}
            else:  # moved to another cell, in the same row or column or not
                assert keys - {"cx", "cy"} in ({"row"}, {"col"}, {"row", "col"}), keys
        attributes.add(a["attribute"])
        # the images differ only inside the cells of the shapes that changed
        pa = np.asarray(Image.open(out / "images" / a["image"]), dtype=int)
        pb = np.asarray(Image.open(out / "images" / b["image"]), dtype=int)
        cells = {(s["cy"] // 32, s["cx"] // 32) for s in [*sa, *sb] if s not in sa or s not in sb}
        diff = np.argwhere((pa != pb).any(-1))
        assert len(diff) > 0 and all((r // 32, c // 32) in cells for r, c in diff), a["pair"]
    assert attributes == set(synth.MMVP_ATTRIBUTES)


# (5) photos -----------------------------------------------------------------------------


def test_photos_non_square(data):
    out, counts = data
    photos = sorted((out / "images").glob("photo_*.png"))
    assert len(photos) == counts["photos"] >= 5
    names = {p.stem.removeprefix("photo_") for p in photos}
    assert {"astronaut", "chelsea", "coffee", "rocket", "camera"} <= names
    for path in photos:
        image = Image.open(path)
        w, h = image.size
        assert image.mode == "RGB", path.name
        assert w != h and max(w, h) <= 128, (path.name, image.size)
