"""A tiny, deterministic, fine-grained visual question-answering data set in LLaVA format.

fastross ships no real data. Its CPU demo and its tests still need a data set that looks
like the real thing (LLaVA-Pretrain captions for stage 1, LLaVA-Instruct style multi-turn
conversations with text-only records for stage 2, a held-out evaluation split) and whose
answers can be checked, so that a model that learns something can be told from one that
does not. This module draws one from a seed:

* "shapes" images: 96x96 RGB, a light grey background with a slight per-image tint and
  pixel noise, 1-3 shapes (circle, square, triangle) in red, green, blue or yellow, each in
  its own cell of a 3x3 grid (rows top/middle/bottom, columns left/centre/right). Every
  caption and answer is computed from the scene, so it is true of the image by
  construction; ``scenes.json`` keeps the ground truth.
* a few real photographs from ``skimage.data``, downscaled to at most 128 px on the long
  side and deliberately not square (stage 2 pads images to a square; this exercises it),
  with hand-written captions.
* text-only records (small arithmetic and word puzzles), about 15% of stage 2, as in
  LLaVA-665K.
* a held-out benchmark (``eval.json``, read by ``python -m fastross.eval``): per held-out image
  its one question of the training stream's kinds (existence, colour, count, position), POPE's
  three settings (a yes and a no each: random, popular = the data set's most frequent absent
  object, adversarial = the absent object that co-occurs most with the present ones), and an
  MMVP-style pair: a partner image ``mmvp_*.png`` drawn with the same background and noise
  but one attribute changed (a shape's colour, its cell, or one more shape), both asked the
  same question. Every item carries its ``kind``, its answer ``type`` (yesno, number, colour,
  where), and for MMVP its ``pair`` and ``attribute``.

Run ``python -m fastross.data.synth OUT [--seed 0] [--train 600] [--eval 500]``; it writes
``OUT/images/*.png``, ``OUT/stage1.json``, ``OUT/stage2.json``, ``OUT/eval.json`` and
``OUT/scenes.json``. Only ``random.Random`` and ``numpy.random.default_rng`` seeded from
``seed`` are used and PNGs are written with fixed options, so the same seed gives byte-identical
files and a different seed gives different data. The benchmark's questions and partners come
from a stream of their own, so the training records are those the generator wrote before it
had them. The defaults take a few seconds.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 96  # shapes images are SIZE x SIZE
GRID = 3
CELL = SIZE // GRID
PHOTO_MAX = 128  # photos' long side after downscaling
ROWS = ("top", "middle", "bottom")
COLS = ("left", "centre", "right")
SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 30),
    "blue": (30, 60, 220),
    "yellow": (230, 210, 20),
}
NUMBERS = ("Zero", "One", "Two", "Three", "Four", "Five", "Six", "Seven", "Eight", "Nine")
NOISE = 3  # per-pixel noise amplitude, added to the whole image

# (skimage.data function, crop box as fractions (left, top, right, bottom), caption).
# Square originals are cropped so that no photo is square.
PHOTOS = {
    "astronaut": (
        (0.0, 0.0, 1.0, 0.75),
        "A woman astronaut in an orange suit in front of a flag.",
    ),
    "chelsea": ((0.0, 0.0, 1.0, 1.0), "A tabby cat looking to the side."),
    "coffee": ((0.0, 0.0, 1.0, 1.0), "A cup of coffee on a saucer."),
    "rocket": ((0.0, 0.0, 1.0, 1.0), "A rocket on its launch pad."),
    "camera": ((0.0, 0.0, 0.75, 1.0), "A man with a camera on a tripod."),
    "cat": ((0.0, 0.0, 1.0, 1.0), "A tabby cat looking to the side."),
}
PHOTO_QUESTIONS = (
    "What is in this picture?",
    "What does this picture show?",
    "What can you see in the image?",
)
CAPTION_PROMPTS = (
    "Describe the image briefly.",
    "Give a short description of the image.",
    "Write a brief caption for this picture.",
    "Summarize the visual content of the image.",
    "What is shown in this image? Answer briefly.",
    "Provide a concise description of the picture.",
)
WORDS = (
    "cat",
    "dog",
    "sun",
    "tree",
    "book",
    "fish",
    "bird",
    "moon",
    "star",
    "cake",
    "lamp",
    "ship",
    "rain",
    "milk",
    "door",
    "frog",
    "kite",
    "ring",
    "shoe",
    "wolf",
)


# --- scenes ---------------------------------------------------------------------------


def make_scene(rng: random.Random) -> list[dict]:
    """1-3 shapes, each in a distinct grid cell, listed in reading order of their cells."""
    n = rng.randint(1, 3)
    cells = sorted(rng.sample(range(GRID * GRID), n))
    shapes = []
    for cell in cells:
        row, col = divmod(cell, GRID)
        size = rng.randint(9, 12)  # half-extent in pixels
        cx = col * CELL + CELL // 2 + rng.randint(-2, 2)
        cy = row * CELL + CELL // 2 + rng.randint(-2, 2)
        shapes.append(
            {
                "shape": rng.choice(SHAPES),
                "colour": rng.choice(sorted(COLOURS)),
                "row": ROWS[row],
                "col": COLS[col],
                "cx": cx,
                "cy": cy,
                "size": size,
            }
        )
    return shapes


def draw_scene(shapes: list[dict], rng: random.Random, nrng: np.random.Generator) -> Image.Image:
    """The scene on a light grey, slightly tinted background, with slight pixel noise."""
    grey = rng.randint(205, 230)
    tint = [rng.randint(-6, 6) for _ in range(3)]
    background = tuple(grey + t for t in tint)
    image = Image.new("RGB", (SIZE, SIZE), background)
    draw = ImageDraw.Draw(image)
    for s in shapes:
        cx, cy, r, fill = s["cx"], s["cy"], s["size"], COLOURS[s["colour"]]
        if s["shape"] == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif s["shape"] == "square":
            h = round(r * 0.85)
            draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
        else:  # triangle pointing up; (cx, cy) lies well inside it
            base = cy + round(r * 0.8)
            draw.polygon([(cx, cy - r), (cx - r, base), (cx + r, base)], fill=fill)
    pixels = np.asarray(image, dtype=np.int16)
    pixels = pixels + nrng.integers(-NOISE, NOISE + 1, size=pixels.shape, dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def where(s: dict) -> str:
    """Where a shape is, as a phrase: 'at the top left', 'on the right', 'in the centre'."""
    row, col = s["row"], s["col"]
    if row == "middle" and col == "centre":
        return "in the centre"
    if row == "middle":
        return f"on the {col}"
    if col == "centre":
        return f"at the {row}"
    return f"at the {row} {col}"


def name(s: dict) -> str:
    return f"{s['colour']} {s['shape']}"


def join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(shapes: list[dict]) -> str:
    """'A red circle at the top left and a blue square in the centre.'"""
    parts = [f"a {name(s)} {where(s)}" for s in shapes]
    text = join(parts)
    return text[0].upper() + text[1:] + "."


# --- questions ------------------------------------------------------------------------


def _unique(shapes: list[dict], key) -> list[dict]:
    """The shapes that no other shape of the scene shares key(shape) with."""
    keys = [key(s) for s in shapes]
    return [s for s, k in zip(shapes, keys) if keys.count(k) == 1]


def _plural(shape: str) -> str:
    return shape + "s"


def questions(shapes: list[dict], rng: random.Random) -> list[tuple[str, str, str]]:
    """One (kind, question, answer) per question kind that can be asked unambiguously.

    Kinds: existence, colour, count, relative (position of one shape to another) and
    absolute (position in the image). Every answer is computed from the scene.
    """
    out = []
    present = {(s["colour"], s["shape"]) for s in shapes}
    if rng.random() < 0.5:
        colour, shape = rng.choice(sorted(present))
    else:
        colour, shape = rng.choice(sorted({(c, k) for c in COLOURS for k in SHAPES} - present))
    answer = "Yes." if (colour, shape) in present else "No."
    out.append(("existence", f"Is there a {colour} {shape} in the image?", answer))

    by_kind = _unique(shapes, lambda s: s["shape"])
    if by_kind:
        s = rng.choice(by_kind)
        out.append(("colour", f"What colour is the {s['shape']}?", s["colour"].capitalize() + "."))

    if rng.random() < 0.5:
        out.append(("count", "How many shapes are there?", NUMBERS[len(shapes)] + "."))
    else:
        kind = rng.choice(SHAPES)
        n = sum(s["shape"] == kind for s in shapes)
        out.append(("count", f"How many {_plural(kind)} are there?", NUMBERS[n] + "."))

    named = _unique(shapes, name)
    pairs = []
    for a in named:
        for b in named:
            if a is b:
                continue
            if a["col"] != b["col"]:
                left = COLS.index(a["col"]) < COLS.index(b["col"])
                pairs.append((a, b, "to the left of", left))
                pairs.append((a, b, "to the right of", not left))
            if a["row"] != b["row"]:
                above = ROWS.index(a["row"]) < ROWS.index(b["row"])
                pairs.append((a, b, "above", above))
                pairs.append((a, b, "below", not above))
    if pairs:
        a, b, relation, truth = rng.choice(pairs)
        q = f"Is the {name(a)} {relation} the {name(b)}?"
        out.append(("relative", q, "Yes." if truth else "No."))

    if named:
        s = rng.choice(named)
        phrase = where(s)
        out.append(("absolute", f"Where is the {name(s)}?", phrase[0].upper() + phrase[1:] + "."))
    return out


def text_question(rng: random.Random) -> tuple[str, str]:
    """A text-only question: small arithmetic or a word puzzle."""
    kind = rng.randrange(5)
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    word = rng.choice(WORDS)
    if kind == 0:
        return f"What is {a} plus {b}?", f"{a + b}."
    if kind == 1:
        a, b = max(a, b), min(a, b)
        return f"What is {a} minus {b}?", f"{a - b}."
    if kind == 2:
        a, b = a % 10 + 1, b % 10 + 1
        return f"What is {a} times {b}?", f"{a * b}."
    if kind == 3:
        return f"Spell the word {word} backwards.", f"{word[::-1]}."
    return f"How many letters are in the word {word}?", f"{len(word)}."


def _conversation(turns: list[tuple[str, str]], image: bool) -> list[dict]:
    conv = []
    for i, (q, a) in enumerate(turns):
        conv.append({"from": "human", "value": ("<image>\n" + q) if image and i == 0 else q})
        conv.append({"from": "gpt", "value": a})
    return conv


# --- files ----------------------------------------------------------------------------


def save_png(image: Image.Image, path: Path) -> None:
    """PNG with fixed options and no metadata, so the bytes depend on the pixels only."""
    image.save(path, format="PNG", optimize=False, compress_level=6)


def load_photos() -> list[tuple[str, Image.Image, str]]:
    """(name, image, caption) for each skimage photo present, non-square, long side <= 128.

    ``cat`` is skipped where it is the same picture as ``chelsea`` (it is an alias).
    """
    from skimage import data

    out, seen = [], []
    for pname, (box, text) in PHOTOS.items():
        fn = getattr(data, pname, None)
        if fn is None:
            continue
        try:
            array = np.asarray(fn())
        except Exception:  # a data file that is not bundled and cannot be fetched
            continue
        if any(array.shape == s.shape and np.array_equal(array, s) for s in seen):
            continue
        seen.append(array)
        image = Image.fromarray(array).convert("RGB")
        w, h = image.size
        image = image.crop((round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h)))
        w, h = image.size
        scale = min(1.0, PHOTO_MAX / max(w, h))
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
        assert image.size[0] != image.size[1], f"photo {pname} is square"
        out.append((pname, image, text))
    return out


def _dump(obj, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


# --- the held-out benchmark -------------------------------------------------------------

OBJECTS = tuple((c, k) for c in sorted(COLOURS) for k in SHAPES)  # what POPE asks about: a coloured shape
POPE_KINDS = ("pope-random", "pope-popular", "pope-adversarial")
MMVP_ATTRIBUTES = ("colour", "position", "count")
# The legacy held-out question's kind (drawn with the training stream, one per image) -> the benchmark's kind.
LEGACY_KIND = {
    "existence": "existence",
    "colour": "colour",
    "count": "count",
    "relative": "position",
    "absolute": "position",
}


def answer_type(question: str, answer: str) -> str:
    """How an answer is scored (fastross.eval): yesno, number, colour or where."""
    if answer in ("Yes.", "No."):
        return "yesno"
    if question.startswith("How many"):
        return "number"
    if question.startswith("What colour"):
        return "colour"
    return "where"


def object_stats(scenes: list[dict]) -> tuple[dict, dict]:
    """Over a data set's scenes: how many images hold each object, and how many hold each pair of objects together."""
    freq = {o: 0 for o in OBJECTS}
    cooc = {(a, b): 0 for a in OBJECTS for b in OBJECTS}
    for scene in scenes:
        present = sorted({(s["colour"], s["shape"]) for s in scene["shapes"]})
        for a in present:
            freq[a] += 1
            for b in present:
                if a != b:
                    cooc[a, b] += 1
    return freq, cooc


def pope_negatives(present: set, freq: dict, cooc: dict, rng: random.Random) -> dict[str, tuple[str, str]]:
    """One absent object per POPE setting: random (uniform), popular (the data set's most frequent absent object),
    adversarial (the absent object that co-occurs most often with the present ones); ties by name."""
    absent = [o for o in OBJECTS if o not in present]
    return {
        "pope-random": rng.choice(absent),
        "pope-popular": min(absent, key=lambda o: (-freq[o], o)),
        "pope-adversarial": min(absent, key=lambda o: (-sum(cooc[p, o] for p in present), o)),
    }


def _place(s: dict, cell: int) -> dict:
    """Shape s moved to a grid cell, keeping its offset from its cell's centre."""
    row, col = divmod(cell, GRID)
    old_row, old_col = ROWS.index(s["row"]), COLS.index(s["col"])
    dx = s["cx"] - (old_col * CELL + CELL // 2)
    dy = s["cy"] - (old_row * CELL + CELL // 2)
    return {
        **s,
        "row": ROWS[row],
        "col": COLS[col],
        "cx": col * CELL + CELL // 2 + dx,
        "cy": row * CELL + CELL // 2 + dy,
    }


def _cell(s: dict) -> int:
    return ROWS.index(s["row"]) * GRID + COLS.index(s["col"])


def mmvp_variant(shapes: list[dict], want: str, rng: random.Random) -> tuple[str, list[dict], str]:
    """(attribute, the scene with one attribute changed, the question whose answer it changes).

    colour: one shape (the only one of its kind) recoloured; position: one shape (the only one of its name) moved to
    an empty cell; count: a shape added in an empty cell. `want` is tried first, then the others in order.
    """
    by_kind, named = _unique(shapes, lambda s: s["shape"]), _unique(shapes, name)
    empty = [c for c in range(GRID * GRID) if c not in {_cell(s) for s in shapes}]
    for attribute in (want, *[a for a in MMVP_ATTRIBUTES if a != want]):
        if attribute == "colour" and by_kind:
            s = rng.choice(by_kind)
            new = rng.choice([c for c in sorted(COLOURS) if c != s["colour"]])
            return (
                attribute,
                [{**x, "colour": new} if x is s else x for x in shapes],
                f"What colour is the {s['shape']}?",
            )
        if attribute == "position" and named and empty:
            s = rng.choice(named)
            moved = [_place(x, rng.choice(empty)) if x is s else x for x in shapes]
            return attribute, sorted(moved, key=_cell), f"Where is the {name(s)}?"
        if attribute == "count" and empty:
            extra = _place(
                {
                    "shape": rng.choice(SHAPES),
                    "colour": rng.choice(sorted(COLOURS)),
                    "row": ROWS[1],
                    "col": COLS[1],
                    "cx": CELL + CELL // 2,
                    "cy": CELL + CELL // 2,
                    "size": rng.randint(9, 12),
                },
                rng.choice(empty),
            )
            return attribute, sorted([*shapes, extra], key=_cell), "How many shapes are there?"
    raise ValueError(f"no attribute of {shapes} can be changed")


def truth(question: str, shapes: list[dict]) -> str:
    """The answer to one of the benchmark's questions about a scene."""
    if question == "How many shapes are there?":
        return NUMBERS[len(shapes)] + "."
    if question.startswith("What colour is the "):
        kind = question.removeprefix("What colour is the ").rstrip("?")
        return next(s["colour"] for s in shapes if s["shape"] == kind).capitalize() + "."
    if question.startswith("Where is the "):
        what = question.removeprefix("Where is the ").rstrip("?")
        phrase = where(next(s for s in shapes if name(s) == what))
        return phrase[0].upper() + phrase[1:] + "."
    colour, shape = question.removeprefix("Is there a ").removesuffix(" in the image?").split()
    return "Yes." if any(s["colour"] == colour and s["shape"] == shape for s in shapes) else "No."


def _item(id_: str, image: str, kind: str, q: str, a: str, **extra) -> dict:
    return {
        "id": id_,
        "image": image,
        "kind": kind,
        "type": answer_type(q, a),
        **extra,
        "conversations": _conversation([(q, a)], True),
    }


def benchmark(
    held: list[tuple[str, list[dict], tuple]], scenes: list[dict], images: Path, seed: int
) -> tuple[list[dict], list[dict]]:
    """The held-out images' POPE questions and MMVP pairs (the partner images written under `images`), and the
    partners' scenes. Drawn from their own stream, so that the training records do not depend on them."""
    rng = random.Random(f"fastross-heldout-{seed}")
    freq, cooc = object_stats(scenes)
    items, partners = [], []
    for k, (file, shapes, state) in enumerate(held):
        stem = file[:-4]
        present = {(s["colour"], s["shape"]) for s in shapes}
        for kind, (colour, shape) in pope_negatives(present, freq, cooc, rng).items():
            yes = rng.choice(sorted(present))
            for j, (c, sh) in enumerate((yes, (colour, shape))):
                q = f"Is there a {c} {sh} in the image?"
                items.append(_item(f"{kind}_{stem}_{j}", file, kind, q, truth(q, shapes), object=f"{c} {sh}"))
        attribute, changed, q = mmvp_variant(shapes, MMVP_ATTRIBUTES[k % len(MMVP_ATTRIBUTES)], rng)
        partner = f"mmvp_{stem}.png"
        r, n = random.Random(), np.random.default_rng()
        r.setstate(state[0])
        n.bit_generator.state = state[1]
        save_png(draw_scene(changed, r, n), images / partner)  # the same background and noise: one attribute differs
        partners.append({"image": partner, "shapes": changed})
        for side, img, sc in (("a", file, shapes), ("b", partner, changed)):
            items.append(
                _item(f"mmvp_{stem}_{side}", img, "mmvp", q, truth(q, sc), pair=f"mmvp_{stem}", attribute=attribute)
            )
    return items, partners


# --- the data set ---------------------------------------------------------------------


def write_dataset(out, seed: int = 0, n_train: int = 600, n_eval: int = 500) -> dict:
    """Write the data set under `out`; returns the counts written."""
    out = Path(out)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)

    scenes, stage1, stage2, evals, held = [], [], [], [], []
    for i in range(1, n_train + n_eval + 1):
        file = f"shapes_{i:05d}.png"
        shapes = make_scene(rng)
        state = (rng.getstate(), nrng.bit_generator.state)  # an MMVP partner is drawn from the same state
        save_png(draw_scene(shapes, rng, nrng), images / file)
        scenes.append({"image": file, "shapes": shapes})
        asked = questions(shapes, rng)
        stem = file[:-4]
        if i <= n_train:
            prompt = rng.choice(CAPTION_PROMPTS)
            stage1.append(
                {
                    "id": f"s1_{stem}",
                    "image": file,
                    "conversations": _conversation([(prompt, caption(shapes))], True),
                }
            )
            picked = rng.sample(asked, rng.randint(1, min(3, len(asked))))
            stage2.append(
                {
                    "id": f"s2_{stem}",
                    "image": file,
                    "conversations": _conversation([(q, a) for _, q, a in picked], True),
                }
            )
        else:  # held out: one question, kinds taken in turn where the scene allows
            kinds = ("existence", "colour", "count", "relative", "absolute")
            want = kinds[(i - n_train - 1) % len(kinds)]
            match = [t for t in asked if t[0] == want] or [rng.choice(asked)]
            kind, q, a = match[0]
            evals.append(_item(f"eval_{stem}", file, LEGACY_KIND[kind], q, a))
            held.append((file, shapes, state))

    photos = load_photos()
    for pname, image, text in photos:
        file = f"photo_{pname}.png"
        save_png(image, images / file)
        prompt = rng.choice(CAPTION_PROMPTS)
        stage1.append(
            {"id": f"s1_photo_{pname}", "image": file, "conversations": _conversation([(prompt, text)], True)}
        )
        stage2.append(
            {
                "id": f"s2_photo_{pname}",
                "image": file,
                "conversations": _conversation([(rng.choice(PHOTO_QUESTIONS), text)], True),
            }
        )

    n_text = round(len(stage2) * 15 / 85)  # ~15% of stage 2 is text-only
    for j in range(1, n_text + 1):
        turns = [text_question(rng) for _ in range(rng.randint(1, 2))]
        stage2.append({"id": f"s2_text_{j:05d}", "conversations": _conversation(turns, False)})
    rng.shuffle(stage2)

    bench, partners = benchmark(held, scenes, images, seed)
    evals += bench

    _dump(stage1, out / "stage1.json")
    _dump(stage2, out / "stage2.json")
    _dump(evals, out / "eval.json")
    _dump(scenes + partners, out / "scenes.json")
    return {
        "images": len(scenes) + len(partners) + len(photos),
        "shapes_images": len(scenes),
        "mmvp_pairs": len(partners),
        "photos": len(photos),
        "stage1": len(stage1),
        "stage2": len(stage2),
        "text_only": n_text,
        "eval": len(held),
        "eval_items": len(evals),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(
        prog="python -m fastross.data.synth",
        description="Write the bundled synthetic LLaVA-format VQA data set.",
    )
    p.add_argument("out", help="output folder (images/ and the JSON files go there)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, default=600, help="training shapes images")
    p.add_argument("--eval", type=int, default=500, help="held-out shapes images (each with an MMVP partner)")
    args = p.parse_args(argv)
    if args.train < 0 or args.eval < 0:
        p.error("--train and --eval must be >= 0")
    counts = write_dataset(args.out, args.seed, args.train, args.eval)
    print(
        f"synth: {counts['images']} images ({counts['shapes_images']} shapes, "
        f"{counts['photos']} photos, {counts['mmvp_pairs']} MMVP partners), stage1 {counts['stage1']}, "
        f"stage2 {counts['stage2']} ({counts['text_only']} text-only), eval {counts['eval']} images "
        f"({counts['eval_items']} questions) -> {args.out}"
    )
    return counts


if __name__ == "__main__":
    main()
