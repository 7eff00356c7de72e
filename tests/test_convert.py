"""Tests of fastross.data.convert and the templates of ROSS_SPEC.md section 8.

Expected token ids come from texts written out by hand here from the spec, never from the
product's template code; shards are read back with streaming.StreamingDataset.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastross.data import convert
from fastross.data.schema import ShardMeta, read_meta
from fastross.demo import convert_args

IGNORE = -100
END = "<|im_end|>"
SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
NUM_VISUAL = 64  # tiny SigLIP: 64 px / 8 px patches = 8 x 8 tokens


# helpers -------------------------------------------------------------------------------


def h(value):
    return {"from": "human", "value": value}


def g(value):
    return {"from": "gpt", "value": value}


@pytest.fixture(scope="module")
def images(synth_data, tmp_path_factory) -> Path:
    """A folder of four distinct real images (copied from the synthetic set) plus a broken one."""
    src = (
        sorted((synth_data / "images").glob("shapes_*.png"))[:2]
        + sorted((synth_data / "images").glob("photo_*.png"))[:2]
    )
    assert len(src) == 4
    out = tmp_path_factory.mktemp("images")
    for i, p in enumerate(src):
        shutil.copy(p, out / f"img{i}.png")
    (out / "garbage.png").write_bytes(b"this is not a png at all" * 10)
    sizes = {Image.open(out / f"img{i}.png").size for i in range(4)}
    assert len({(out / f"img{i}.png").read_bytes() for i in range(4)}) == 4, sizes
    return out


def run_convert(
    tmp_path: Path,
    tiny_models: Path,
    images: Path,
    records,
    template: str,
    *extra: str,
    name: str = "data.json",
    out_name: str = "out",
    jsonl_text: str | None = None,
):
    src = tmp_path / name
    if jsonl_text is not None:
        src.write_text(jsonl_text, encoding="utf-8")
    else:
        src.write_text(json.dumps(records), encoding="utf-8")
    out = tmp_path / out_name
    return convert.main(convert_args(tiny_models, src, images, out, template, *extra, vae=False)), out


def read_samples(out: Path) -> list[dict]:
    from streaming import StreamingDataset

    ds = StreamingDataset(local=str(out), shuffle=False, batch_size=1)
    return [ds[i] for i in range(ds.num_samples)]


def supervised_runs(ids: np.ndarray, labels: np.ndarray) -> list[list[int]]:
    """Maximal runs of consecutive supervised tokens."""
    runs, cur = [], []
    for i, lab in zip(ids.tolist(), labels.tolist()):
        if lab == IGNORE:
            if cur:
                runs.append(cur)
            cur = []
        else:
            cur.append(i)
    if cur:
        runs.append(cur)
    return runs


def enc(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def check_labels(sample, tokenizer, expected_text: str, expected_runs: list[str]):
    ids, labels = np.asarray(sample["input_ids"]), np.asarray(sample["labels"])
    assert ids.dtype == np.int32 and labels.dtype == np.int32
    assert ids.tolist() == enc(tokenizer, expected_text), (
        f"{sample['id']}: ids decode to {tokenizer.decode(ids)!r}, expected {expected_text!r}"
    )
    assert ids.shape == labels.shape
    sup = labels != IGNORE
    assert (labels[sup] == ids[sup]).all()
    runs = supervised_runs(ids, labels)
    assert [tokenizer.decode(r) for r in runs] == expected_runs, sample["id"]
    assert runs == [enc(tokenizer, r) for r in expected_runs], sample["id"]
    assert int(sup.sum()) == sum(len(enc(tokenizer, r)) for r in expected_runs)


# 1. qwen2_ross round trip --------------------------------------------------------------

QWEN_RECORDS = [
    {
        "id": "multi",
        "image": "img0.png",
        "conversations": [
            h("<image>\nWhat colour is the square?"),
            g("Red."),
            h("And the circle?"),
            g("Green."),
        ],
    },
    {
        "id": "moved",
        "image": "img1.png",
        "conversations": [
            h("How many shapes are there?\n<image>"),
            g("Two."),
        ],
    },
    {
        "id": "text",
        "conversations": [
            h("Spell the word lamp backwards."),
            g("pmal."),
            h("And cat?"),
            g("tac."),
        ],
    },
    {
        "id": "gptfirst",
        "image": "img2.png",
        "conversations": [
            g("Hello there."),
            h("<image>\nDescribe the picture."),
            g("A photo of something."),
        ],
    },
    {
        "id": "later",
        "image": "img3.png",
        "conversations": [
            h("Hi."),
            g("Hello."),
            h("<image>\nWhat is this?"),
            g("A picture."),
        ],
    },
]
# (expected text, supervised runs as decoded text, has image) for each record, from the spec.
QWEN_EXPECTED = [
    (
        SYSTEM
        + " USER: <image>\nWhat colour is the square? ASSISTANT: Red."
        + END
        + "USER: And the circle? ASSISTANT: Green."
        + END,
        [" Red." + END, " Green." + END],
        "img0.png",
    ),
    (SYSTEM + " USER: <image>\nHow many shapes are there? ASSISTANT: Two." + END, [" Two." + END], "img1.png"),
    (
        SYSTEM
        + " USER: Spell the word lamp backwards. ASSISTANT: pmal."
        + END
        + "USER: And cat? ASSISTANT: tac."
        + END,
        [" pmal." + END, " tac." + END],
        None,
    ),
    (
        SYSTEM + " USER: <image>\nDescribe the picture. ASSISTANT: A photo of something." + END,
        [" A photo of something." + END],
        "img2.png",
    ),
    # the placeholder moves to the front of the message that held it, not to the first message
    (
        SYSTEM + " USER: Hi. ASSISTANT: Hello." + END + "USER: <image>\nWhat is this? ASSISTANT: A picture." + END,
        [" Hello." + END, " A picture." + END],
        "img3.png",
    ),
]


def test_qwen2_ross_round_trip(tmp_path, tiny_models, images, tokenizer, capsys):
    rc, out = run_convert(
        tmp_path, tiny_models, images, QWEN_RECORDS, "qwen2_ross", "--vae", str(tiny_models / "vae"), "--vae-batch", "2"
    )
    assert rc == 0, capsys.readouterr().err
    assert "convert: read 5, written 5, skipped 0 (none)" in capsys.readouterr().out
    meta = read_meta(out)
    assert meta["read"] == 5 and meta["written"] == 5 and meta["skipped"] == {}
    assert meta["template"] == "qwen2_ross" and meta["image_aspect"] == "pad"
    assert meta["latents"] is True and meta["latent_channels"] == 16 and meta["latent_dtype"] == "float32"
    assert meta["grid"] == 8 and meta["num_visual_tokens"] == NUM_VISUAL
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert meta["image_token_id"] == image_id

    samples = read_samples(out)
    assert [s["id"] for s in samples] == [r["id"] for r in QWEN_RECORDS]
    assert [s["index"] for s in samples] == list(range(5))
    moments = []
    for s, (text, runs, image) in zip(samples, QWEN_EXPECTED):
        check_labels(s, tokenizer, text, runs)
        ids = np.asarray(s["input_ids"])
        if image is None:
            assert s["length"] == len(ids)
            assert (ids == image_id).sum() == 0
            assert s["image"] == b"" and s["latent_mean"] == b"" and s["latent_std"] == b""
            continue
        assert (ids == image_id).sum() == 1
        assert s["length"] == len(ids) - 1 + NUM_VISUAL
        assert s["image"] == (images / image).read_bytes()
        typed = ShardMeta.read(out)
        mean, std = typed.decode_latent(s["latent_mean"]), typed.decode_latent(s["latent_std"])
        for arr in (mean, std):
            assert arr.shape == (16, 16, 16) and arr.dtype == np.float32 and np.isfinite(arr).all()
        assert (std > 0).all()
        moments.append((image, mean, std))

    # Each stored latent is that image's own, whatever VAE batch it was computed in.
    import torch
    from diffusers import AutoencoderKL

    from fastross.data.images import ImageSpec, latent_moments, preprocess_pil

    vae = AutoencoderKL.from_pretrained(str(tiny_models / "vae"), torch_dtype=torch.float32).eval()
    spec = ImageSpec.from_pretrained(str(tiny_models / "vision"))
    with torch.no_grad():
        for image, mean, std in moments:
            pix = preprocess_pil(Image.open(images / image), spec, "pad")[None]
            m, d = latent_moments(vae, pix, 8, spec)
            np.testing.assert_allclose(mean, m[0].numpy(), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(std, d[0].numpy(), rtol=1e-4, atol=1e-5)
    assert not np.allclose(moments[0][1], moments[1][1])


# 2. plain round trip -------------------------------------------------------------------


def test_plain_round_trip(tmp_path, tiny_models, images, tokenizer, capsys):
    captions = ["A red square at the top left.", "Two circles, one blue and one green.", "A photo."]
    records = [
        {"id": f"cap{i}", "image": f"img{i}.png", "conversations": [h("<image>\nDescribe the image briefly."), g(c)]}
        for i, c in enumerate(captions)
    ]
    records[1]["conversations"][0] = h("Describe the image briefly.\n<image>")  # placeholder moved
    rc, out = run_convert(tmp_path, tiny_models, images, records, "plain")
    assert rc == 0, capsys.readouterr().err
    meta = read_meta(out)
    assert meta["template"] == "plain" and meta["image_aspect"] == "square"
    assert meta["latents"] is False and meta["written"] == 3
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    samples = read_samples(out)
    assert [s["id"] for s in samples] == ["cap0", "cap1", "cap2"]
    for i, (s, c) in enumerate(zip(samples, captions)):
        check_labels(s, tokenizer, "<image>" + c + "\n", [c + "\n"])
        ids, labels = np.asarray(s["input_ids"]), np.asarray(s["labels"])
        assert ids[0] == image_id and labels[0] == IGNORE
        assert (labels[1:] == ids[1:]).all()
        assert s["length"] == len(ids) - 1 + NUM_VISUAL
        assert s["index"] == i
        assert s["image"] == (images / f"img{i}.png").read_bytes()
        assert s["latent_mean"] == b"" and s["latent_std"] == b""


# 3. chatml -----------------------------------------------------------------------------


def test_chatml_uses_the_tokenizers_template(tmp_path, tiny_models, images, tokenizer, capsys):
    records = [
        {
            "id": "img",
            "image": "img0.png",
            "conversations": [
                h("What colour is the square?\n<image>"),
                g("Red."),
                h("And the circle?"),
                g("Green."),
            ],
        },
        # One-letter answers also occur inside the template's own markup ("<|im_start|>assistant").
        {"id": "choice", "conversations": [h("Pick a or b."), g("a"), h("Now the other one."), g("b")]},
    ]
    messages = [
        [
            {"role": "user", "content": "<image>\nWhat colour is the square?"},
            {"role": "assistant", "content": "Red."},
            {"role": "user", "content": "And the circle?"},
            {"role": "assistant", "content": "Green."},
        ],
        [
            {"role": "user", "content": "Pick a or b."},
            {"role": "assistant", "content": "a"},
            {"role": "user", "content": "Now the other one."},
            {"role": "assistant", "content": "b"},
        ],
    ]
    rc, out = run_convert(tmp_path, tiny_models, images, records, "chatml")
    assert rc == 0, capsys.readouterr().err
    samples = read_samples(out)
    assert [s["id"] for s in samples] == ["img", "choice"]
    for s, msgs in zip(samples, messages):
        text = tokenizer.apply_chat_template(msgs, tokenize=False)
        assert text.startswith("<|im_start|>user\n")
        answers = [m["content"] + END for m in msgs if m["role"] == "assistant"]
        check_labels(s, tokenizer, text, answers)
    assert samples[0]["length"] == len(samples[0]["input_ids"]) - 1 + NUM_VISUAL
    assert samples[1]["length"] == len(samples[1]["input_ids"])


# 4. bad records ------------------------------------------------------------------------

GOOD_IMG = [h("<image>\nWhat is shown?"), g("Shapes.")]
BAD_RECORDS = [
    {"id": "ok0", "image": "img0.png", "conversations": GOOD_IMG},  # 0
    {"id": "missing", "image": "nope.png", "conversations": GOOD_IMG},  # 1 missing_image
    {"id": "broken", "image": "garbage.png", "conversations": GOOD_IMG},  # 2 bad_image
    "just a string",  # 3 malformed
    {"id": "noconv", "image": "img0.png"},  # 4 malformed
    {"id": "roles", "conversations": [{"from": "system", "value": "x"}, g("y")]},  # 5 malformed
    {"id": "twohuman", "conversations": [h("a?"), h("b?"), g("c.")]},  # 6 malformed
    {"id": "ok1", "conversations": [h("Say hi."), g("Hi.")]},  # 7
    {"id": "noimage", "conversations": GOOD_IMG},  # 8 placeholder_without_image
    {"id": "noplace", "image": "img1.png", "conversations": [h("What?"), g("Shapes.")]},  # 9 image_without_placeholder
    {
        "id": "two",
        "image": "img1.png",
        "conversations": [h("<image>\nWhat?"), g("Shapes."), h("<image> again?"), g("Yes.")],
    },  # 10 extra_placeholders
    {"id": "gptonly", "conversations": [g("I talk alone."), g("Still me.")]},  # 11 malformed
    {"id": "long", "conversations": [h("Repeat."), g("word " * 300)]},  # 12 too_long
    {"id": "multi", "image": ["img0.png", "img1.png"], "conversations": GOOD_IMG},  # 13 malformed
    {"id": "ok2", "image": "img2.png", "conversations": GOOD_IMG},  # 14
]
BAD_SKIPPED = {
    "missing_image": 1,
    "bad_image": 1,
    "malformed": 6,
    "placeholder_without_image": 1,
    "image_without_placeholder": 1,
    "extra_placeholders": 1,
    "too_long": 1,
}


def test_bad_records_skipped_and_counted(tmp_path, tiny_models, images, tokenizer, capsys):
    rc, out = run_convert(
        tmp_path, tiny_models, images, BAD_RECORDS, "qwen2_ross", "--max-length", "200", name="bad.json"
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert sum(BAD_SKIPPED.values()) + 3 == len(BAD_RECORDS)
    parts = ", ".join(f"{k} {v}" for k, v in sorted(BAD_SKIPPED.items()))
    assert f"convert: read 15, written 3, skipped 12 ({parts})" in captured.out
    for reason in BAD_SKIPPED:
        assert f"  {reason}: e.g. bad.json[" in captured.out
    meta = read_meta(out)
    assert meta["read"] == 15 and meta["written"] == 3 and meta["skipped"] == BAD_SKIPPED
    assert meta["written"] + sum(meta["skipped"].values()) == meta["read"]
    ex = meta["skipped_examples"]
    assert ex["missing_image"] == [ex["missing_image"][0]] and ex["missing_image"][0].startswith("bad.json[1]: ")
    assert ex["bad_image"][0].startswith("bad.json[2]: ")
    assert [e.split(":")[0] for e in ex["malformed"]] == [
        "bad.json[3]",
        "bad.json[4]",
        "bad.json[5]",
        "bad.json[6]",
        "bad.json[11]",
    ]  # at most 5 examples kept per reason
    assert ex["too_long"][0].startswith("bad.json[12]: ")
    assert ex["placeholder_without_image"][0].startswith("bad.json[8]: ")
    assert ex["image_without_placeholder"][0].startswith("bad.json[9]: ")
    assert ex["extra_placeholders"][0].startswith("bad.json[10]: ")

    samples = read_samples(out)
    assert [s["id"] for s in samples] == ["ok0", "ok1", "ok2"]
    assert [s["index"] for s in samples] == [0, 1, 2]
    assert all(s["length"] <= 200 for s in samples)
    assert samples[0]["image"] == (images / "img0.png").read_bytes()
    assert samples[2]["image"] == (images / "img2.png").read_bytes()
    check_labels(samples[1], tokenizer, SYSTEM + " USER: Say hi. ASSISTANT: Hi." + END, [" Hi." + END])


def test_max_length_counts_visual_tokens(tmp_path, tiny_models, images, tokenizer, capsys):
    text = SYSTEM + " USER: <image>\nWhat is shown? ASSISTANT: Shapes." + END
    total = len(enc(tokenizer, text)) - 1 + NUM_VISUAL
    records = [{"id": "a", "image": "img0.png", "conversations": GOOD_IMG}]
    rc, out = run_convert(
        tmp_path, tiny_models, images, records, "qwen2_ross", "--max-length", str(total), out_name="fits"
    )
    assert rc == 0 and read_meta(out)["written"] == 1
    rc, out = run_convert(
        tmp_path, tiny_models, images, records, "qwen2_ross", "--max-length", str(total - 1), out_name="over"
    )
    assert rc == 0
    meta = read_meta(out)
    assert meta["written"] == 0 and meta["skipped"] == {"too_long": 1}
    assert f"{total} tokens > --max-length {total - 1}" in meta["skipped_examples"]["too_long"][0]


def test_jsonl_invalid_line_is_malformed(tmp_path, tiny_models, images, capsys):
    lines = [
        json.dumps({"id": "j0", "image": "img0.png", "conversations": GOOD_IMG}),
        '{"id": "j1", "conversations": [',
        "",
        json.dumps({"id": "j2", "conversations": [h("Say hi."), g("Hi.")]}),
        json.dumps({"id": "j3", "image": "img1.png", "conversations": GOOD_IMG}),
    ]
    rc, out = run_convert(
        tmp_path, tiny_models, images, None, "qwen2_ross", name="data.jsonl", jsonl_text="\n".join(lines) + "\n"
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "convert: read 4, written 3, skipped 1 (malformed 1)" in captured.out
    meta = read_meta(out)
    assert meta["skipped"] == {"malformed": 1}
    assert meta["skipped_examples"]["malformed"][0].startswith("data.jsonl:2: invalid JSON")
    samples = read_samples(out)
    assert [s["id"] for s in samples] == ["j0", "j2", "j3"]
    assert [s["index"] for s in samples] == [0, 1, 2]


# 5. --strict ---------------------------------------------------------------------------


def test_strict_stops_at_first_bad_record(tmp_path, tiny_models, images, capsys):
    records = [
        {"id": "ok0", "image": "img0.png", "conversations": GOOD_IMG},
        {"id": "ok1", "conversations": [h("Say hi."), g("Hi.")]},
        {"id": "ok2", "image": "img1.png", "conversations": GOOD_IMG},
        {"id": "missing", "image": "nope.png", "conversations": GOOD_IMG},
        {"id": "two", "image": "img1.png", "conversations": [h("<image><image>\nWhat?"), g("Shapes.")]},
    ]
    rc, _ = run_convert(tmp_path, tiny_models, images, records, "qwen2_ross", "--strict", name="strict.json")
    err = capsys.readouterr().err
    assert rc != 0
    assert "strict.json[3]" in err and "missing_image" in err and "nope.png" in err
    assert "strict.json[4]" not in err and "extra_placeholders" not in err

    rc, _ = run_convert(
        tmp_path,
        tiny_models,
        images,
        records[:3] + records[4:],
        "qwen2_ross",
        "--strict",
        name="strict2.json",
        out_name="out2",
    )
    err = capsys.readouterr().err
    assert rc != 0 and "strict2.json[3]" in err and "extra_placeholders" in err

    rc, out = run_convert(
        tmp_path, tiny_models, images, records[:3], "qwen2_ross", "--strict", name="strict3.json", out_name="out3"
    )
    assert rc == 0 and read_meta(out)["written"] == 3


# 6. existing output --------------------------------------------------------------------


def test_non_empty_out_folder_is_an_error(tmp_path, tiny_models, images, capsys):
    records = [{"id": "ok1", "conversations": [h("Say hi."), g("Hi.")]}]
    (tmp_path / "out").mkdir()  # an existing but empty folder is fine
    rc, out = run_convert(tmp_path, tiny_models, images, records, "qwen2_ross")
    assert rc == 0, capsys.readouterr().err
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    rc, out = run_convert(tmp_path, tiny_models, images, records, "qwen2_ross")
    err = capsys.readouterr().err
    assert rc != 0
    assert str(out) in err and "not empty" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
