"""Evaluate a fastross model on a LLaVA-format QA file: the bundled generator's held-out benchmark, or any other.

    python -m fastross.eval --model DIR --data FILE --out DIR [--images DIR] [--batch-size 32] [--limit N]
                            [--turns context|alone]

DIR is a run folder, a checkpoint or an export (fastross.generate.load). Every human turn of every record of FILE
is one question (greedy, fastross.generate.decode), scored against the gpt turn that follows it. `--turns context`
(the default) asks turn k after the record's turns 1..k-1 with their gold answers, as a multi-turn training sample
holds them; `--turns alone` asks each turn as if it were the record's only one (the image with it). A record may
carry `kind` (the group its metrics are reported under; default "vqa"), `type` (how it is scored: yesno, number,
colour, where, text, or a list of one per turn; default, per turn, yesno when the answer is yes or no, else text)
and, for MMVP-style pairs, `pair` (fastross.data.synth writes all of these).

Answers are parsed, never generated into a format: yes/no as VLMEvalKit's `YOrN_Extraction` does (the words of the
lower-cased answer with punctuation removed: "yes" without "no" is yes, "no" without "yes" is no, anything else
unknown); a number as the first number word or digits; a colour as the one colour named; a place as its row
(top/middle/bottom) and column (left/centre/right); text as VQA-style normalised exact match. An unknown answer is
wrong, and each group reports its unknown rate.

Writes OUT/summary.json (metrics by kind, `pope` over the three POPE settings, `overall`; `by_turn`, the metrics of
each turn number), OUT/items.jsonl (one line per question: its record's id and turn, the prediction, its parse, right
or wrong) and OUT/pope_answers.jsonl (yes/no questions only, one line
per question as POPE's and LLaVA's POPE scripts read it: question_id, prompt, text, answer, label, category).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from tqdm import tqdm

YES, NO, UNKNOWN = "yes", "no", "unknown"
TURNS = ("context", "alone")
TYPES = ("yesno", "number", "colour", "where", "text")
NUMBER_WORDS = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
)
COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "black", "white", "grey", "brown", "pink")
ROW_WORDS = {"top": "top", "upper": "top", "bottom": "bottom", "lower": "bottom", "middle": "middle"}
COL_WORDS = {"left": "left", "right": "right", "centre": "centre", "center": "centre"}
ARTICLES = {"a", "an", "the"}


def words(text: str) -> list[str]:
    """Lower-cased words with punctuation removed (a period between digits stays)."""
    return re.sub(r"(?!(?<=\d)\.(?=\d))[^\w\s]", " ", text.lower()).split()


def parse_yesno(text: str) -> str:
    """VLMEvalKit's rule (vlmeval/dataset/utils/yorn.py, YOrN_Extraction): yes, no or unknown."""
    w = set(words(text))
    if "yes" in w and "no" not in w:
        return YES
    if "no" in w and "yes" not in w:
        return NO
    return UNKNOWN


def parse_number(text: str) -> int | None:
    for w in words(text):
        if w.isdigit():
            return int(w)
        if w in NUMBER_WORDS:
            return NUMBER_WORDS.index(w)
    return None


def parse_colour(text: str) -> str | None:
    named = {w for w in words(text) if w in COLOURS}
    return named.pop() if len(named) == 1 else None


def parse_where(text: str) -> tuple[str, str] | None:
    """'At the top left.' -> (top, left); 'On the right' -> (middle, right); 'In the centre' -> (middle, centre)."""
    w = words(text)
    rows = {ROW_WORDS[x] for x in w if x in ROW_WORDS}
    cols = {COL_WORDS[x] for x in w if x in COL_WORDS}
    if len(rows) > 1 or len(cols) > 1 or not rows | cols:
        return None
    return (rows.pop() if rows else "middle", cols.pop() if cols else "centre")


def normalise_text(text: str) -> str:
    return " ".join(w for w in words(text) if w not in ARTICLES)


PARSERS = {
    "yesno": parse_yesno,
    "number": parse_number,
    "colour": parse_colour,
    "where": parse_where,
    "text": normalise_text,
}


def parse(kind: str, text: str):
    """An answer's parse for its type; None (or "unknown" for yes/no) when it cannot be read."""
    return PARSERS[kind](text)


def unknown(parsed) -> bool:
    return parsed is None or parsed == UNKNOWN or parsed == ""


def yesno_metrics(gold: list[str], pred: list[str]) -> dict:
    """POPE's metrics, "yes" the positive class; an unknown prediction is neither yes nor no (so wrong, never a
    false positive). hallucination = P(pred yes | gold no)."""
    n = len(gold)
    tp = sum(g == YES and p == YES for g, p in zip(gold, pred))
    fp = sum(g == NO and p == YES for g, p in zip(gold, pred))
    pos, neg = gold.count(YES), gold.count(NO)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / pos if pos else 0.0
    return {
        "n": n,
        "accuracy": sum(g == p for g, p in zip(gold, pred)) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": pred.count(YES) / n if n else 0.0,
        "hallucination": fp / neg if neg else 0.0,
        "unknown_rate": pred.count(UNKNOWN) / n if n else 0.0,
    }


def count_metrics(gold: list[int], pred: list[int | None]) -> dict:
    """Exact match over all; MAE over the answers that hold a number (the unknown rate says how many do not)."""
    n = len(gold)
    read = [(g, p) for g, p in zip(gold, pred) if p is not None]
    return {
        "n": n,
        "exact_match": sum(g == p for g, p in zip(gold, pred)) / n if n else 0.0,
        "mae": sum(abs(g - p) for g, p in read) / len(read) if read else None,
        "unknown_rate": (n - len(read)) / n if n else 0.0,
    }


def pair_accuracy(pairs: dict[str, list[bool]]) -> dict:
    """MMVP: a pair counts only when both of its questions are right."""
    whole = [v for v in pairs.values() if len(v) == 2]
    return {"pairs": len(whole), "pair_accuracy": sum(all(v) for v in whole) / len(whole) if whole else 0.0}


def score(item: dict, prediction: str) -> dict:
    """One question's row of items.jsonl: the prediction, its parse and whether it is right."""
    gold, got = parse(item["type"], item["answer"]), parse(item["type"], prediction)
    return {
        **{k: item[k] for k in ("id", "turn", "image", "kind", "type", "question", "answer") if k in item},
        **({"pair": item["pair"]} if "pair" in item else {}),
        "prediction": prediction,
        "parsed": got,
        "gold": gold,
        "unknown": unknown(got),
        "correct": not unknown(got) and got == gold,
    }


def group(rs: list[dict]) -> dict:
    """The metrics of some rows of items.jsonl: n, accuracy and unknown rate, and those of their answer types."""
    out = {
        "n": len(rs),
        "accuracy": sum(r["correct"] for r in rs) / len(rs),
        "unknown_rate": sum(r["unknown"] for r in rs) / len(rs),
    }
    yn = [r for r in rs if r["type"] == "yesno"]
    if yn and len(yn) == len(rs):
        out |= yesno_metrics([r["gold"] for r in yn], [r["parsed"] for r in yn])
    num = [r for r in rs if r["type"] == "number"]
    if num:
        c = count_metrics([r["gold"] for r in num], [r["parsed"] for r in num])
        out |= {"exact_match": c["exact_match"], "mae": c["mae"]}
    pairs: dict[str, list[bool]] = {}
    for r in rs:
        if "pair" in r:
            pairs.setdefault(r["pair"], []).append(r["correct"])
    if pairs:
        out |= pair_accuracy(pairs)
    return out


def summarise(rows: list[dict]) -> dict:
    """Metrics by kind (and `pope`, the three POPE settings together, and `overall`) from items.jsonl's rows."""
    kinds = sorted({r["kind"] for r in rows})
    summary = {k: group([r for r in rows if r["kind"] == k]) for k in kinds}
    pope = [r for r in rows if r["kind"].startswith("pope-")]
    if pope:
        summary["pope"] = group(pope)
    summary["overall"] = group(rows)
    return summary


def by_turn(rows: list[dict]) -> dict:
    """Metrics per turn number ("1", "2", ...): how the first questions of the records fare against the later."""
    turns = sorted({r.get("turn", 1) for r in rows})
    return {str(t): group([r for r in rows if r.get("turn", 1) == t]) for t in turns}


def read_items(path: str | Path) -> list[dict]:
    """A LLaVA-format JSON (a list) or JSONL file -> one item per question: every human turn with the gpt turn that
    answers it, numbered `turn` 1, 2, ... within its record, with the record's earlier turns as `history`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data {path} does not exist")
    text = path.read_text(encoding="utf-8")
    records = (
        json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x.strip()]
    )
    items = []
    for n, r in enumerate(records):
        conv = r.get("conversations") if isinstance(r, dict) else None
        if not conv or len(conv) < 2 or not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in conv):
            rid = r.get("id", "no id") if isinstance(r, dict) else repr(r)[:40]
            raise ValueError(
                f"{path}: record {n} ({rid}) has no "
                "conversations [{'from': 'human', 'value': ...}, {'from': 'gpt', 'value': ...}, ...]"
            )
        rid = r.get("id", n)
        for k, t in enumerate(conv):
            want = ("human", "user") if k % 2 == 0 else ("gpt", "assistant")
            if t.get("from", want[0]) not in want:
                raise ValueError(
                    f"{path}: record {n} ({rid}): turn {k} is from {t.get('from')!r}, not {want[0]}: "
                    "the turns must alternate human, gpt"
                )
        if r.get("image") is not None and not isinstance(r["image"], str):
            raise ValueError(
                f"{path}: record {n} ({rid}): 'image' must be one file name "
                f"(got {type(r['image']).__name__}); one image per question"
            )
        pairs = [(conv[k]["value"], conv[k + 1]["value"]) for k in range(0, len(conv) - 1, 2)]
        types = r.get("type")
        if isinstance(types, list) and len(types) != len(pairs):
            raise ValueError(f"{path}: record {n} ({rid}): 'type' lists {len(types)} types for {len(pairs)} turns")
        for k, (question, answer) in enumerate(pairs):
            typ = types[k] if isinstance(types, list) else types
            typ = typ or ("yesno" if parse_yesno(answer) != UNKNOWN and len(words(answer)) == 1 else "text")
            if typ not in TYPES:
                raise ValueError(f"{path}: record {n} ({rid}): type {typ!r} is not one of {', '.join(TYPES)}")
            items.append(
                {
                    "id": rid,
                    "turn": k + 1,
                    "image": r.get("image"),
                    "kind": r.get("kind", "vqa"),
                    "type": typ,
                    "question": question.replace("<image>", "").strip(),
                    "prompt": question,
                    "answer": answer,
                    "history": pairs[:k],
                    **({"pair": r["pair"]} if "pair" in r else {}),
                }
            )
    return items


def pope_line(row: dict, n: int) -> dict:
    """One line of the POPE-format answer file (POPE's evaluate.py reads `answer`, LLaVA's eval_pope.py `text`)."""
    return {
        "question_id": n,
        "id": row["id"],
        "image": row["image"],
        "prompt": row["question"],
        "text": row["prediction"],
        "answer": row["prediction"],
        "label": row["gold"],
        "category": row["kind"],
    }


def evaluate(
    model_dir: str | Path,
    data: str | Path,
    out: str | Path,
    images: str | Path | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 16,
    limit: int = 0,
    device: str = "cpu",
    turns: str = "context",
) -> dict:
    """Ask every question of DATA; turns: "context" asks each turn after its record's earlier turns (their gold
    answers), "alone" asks it as the record's only turn."""
    # Here, not at the top: the model side (torch, the model, its kernels) only once a model is asked; the parsers
    # and metrics above import without it (tests/test_eval.py, scripts that score an answer file).
    from fastross.generate import Sampling, answer, load

    if turns not in TURNS:
        raise ValueError(f"turns must be one of {', '.join(TURNS)}, got {turns!r}")
    items = read_items(data)[: limit or None]
    root = (
        Path(images)
        if images
        else (Path(data).parent / "images" if (Path(data).parent / "images").is_dir() else Path(data).parent)
    )
    for it in items:
        if it["image"] and not (root / it["image"]).is_file():
            raise FileNotFoundError(
                f"{data}: record {it['id']}: image {root / it['image']} does not exist (--images names the folder)"
            )
    loaded = load(model_dir, device)
    sampling = Sampling(max_new_tokens=max_new_tokens)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tqdm(total=len(items), desc="eval", unit="q", file=sys.stderr, disable=None) as bar:
        for i in range(0, len(items), batch_size):
            chunk = items[i : i + batch_size]
            got = answer(
                loaded,
                [
                    (
                        it["prompt"],
                        root / it["image"] if it["image"] else None,
                        it["history"] if turns == "context" else (),
                    )
                    for it in chunk
                ],
                sampling,
            )
            rows += [score(it, g) for it, g in zip(chunk, got)]
            bar.update(len(chunk))
    summary = {
        "model": str(loaded.source),
        "data": str(data),
        "questions": len(rows),
        "turns": turns,
        "metrics": summarise(rows),
        "by_turn": by_turn(rows),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    with open(out / "items.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(out / "pope_answers.jsonl", "w") as f:
        f.writelines(json.dumps(pope_line(r, n)) + "\n" for n, r in enumerate(r for r in rows if r["type"] == "yesno"))
    return summary


def main(argv: list[str] | None = None) -> int:
    import torch  # the default --device only: the module imports without torch (see `evaluate`)

    p = argparse.ArgumentParser(
        prog="python -m fastross.eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="run folder, checkpoint or fastross.export folder")
    p.add_argument(
        "--data", required=True, help="LLaVA-format QA file (JSON list or JSONL), e.g. the synth's eval.json"
    )
    p.add_argument("--out", required=True, help="folder for summary.json, items.jsonl and pope_answers.jsonl")
    p.add_argument("--images", help="image folder (default: DATA's folder's images/, else DATA's folder)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--limit", type=int, default=0, help="only the first N questions (0: all)")
    p.add_argument(
        "--turns",
        choices=TURNS,
        default="context",
        help="context: each turn asked after its record's earlier turns and their gold answers; "
        "alone: each turn asked as if it were the record's first",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    s = evaluate(a.model, a.data, a.out, a.images, a.batch_size, a.max_new_tokens, a.limit, a.device, a.turns)
    m = s["metrics"]
    for kind, v in m.items():
        extra = "".join(
            f" {k} {v[k]:.3f}"
            for k in ("f1", "hallucination", "yes_ratio", "exact_match", "mae", "pair_accuracy")
            if v.get(k) is not None
        )
        print(f"eval: {kind:<17} n {v['n']:>5} accuracy {v['accuracy']:.3f} unknown {v['unknown_rate']:.3f}{extra}")
    if len(s["by_turn"]) > 1:
        for turn, v in s["by_turn"].items():
            print(
                f"eval: turn {turn:<12} n {v['n']:>5} accuracy {v['accuracy']:.3f} unknown {v['unknown_rate']:.3f}"
                f" ({s['turns']})"
            )
    print(f"eval: wrote {Path(a.out) / 'summary.json'}, items.jsonl, pope_answers.jsonl")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
