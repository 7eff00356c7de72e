"""Nothing changed in a converted folder trains silently, and no record or image file ends a conversion or reaches
a decoder it should not (issue 19, items 2 to 6, the data parts).

- A converted folder is verified as a whole against its manifest (fastross.data.schema): an edit to fastross.json,
  index.json or lengths.npy is refused naming the file, a folder without a manifest is refused with how to redo it,
  and each sample's length is checked against lengths.npy as it is read.
- The tokenizer fingerprint covers what changes ids (normalizer, chat template, ...), not only the vocabulary.
- Images are opened only in the formats LLaVA data holds, sniffed from their bytes.
- A lone surrogate, deep nesting or a failure while writing one record is that record's counted skip.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from devtools.faults import shard_loader
from fastross.config import SourceConfig
from fastross.data import convert, images
from fastross.data.schema import (
    ShardCorruptError,
    ShardMeta,
    fingerprint_problem,
    read_meta,
    tokenizer_fingerprint,
    verify_folder,
    write_manifest,
)
from fastross.data.sources import check_shard_facts, open_source
from fastross.data.stream import StepStream
from fastross.demo import convert_args

ASK = [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "Shapes."}]


def text_rec(rid, text="Hi."):
    return {"id": rid, "conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": "Hello."}]}


def run_convert(tmp_path: Path, tiny_models: Path, source: Path, images_dir: Path | None = None, *extra: str):
    out = tmp_path / "out"
    return convert.main(
        convert_args(tiny_models, source, images_dir or tmp_path, out, "qwen2_ross", *extra, vae=False)
    ), out


@pytest.fixture
def shards(stage2_shards, tmp_path) -> Path:
    out = tmp_path / "shards"
    shutil.copytree(stage2_shards, out)
    return out


# 3. the folder as a whole --------------------------------------------------------------------------------------


def test_converted_folder_carries_a_manifest_that_verifies(shards):
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["version"] == 1 and sorted(manifest["sha256"]) == ["fastross.json", "index.json", "lengths.npy"]
    assert all(len(h) == 64 for h in manifest["sha256"].values())
    verify_folder(shards)  # no error
    assert read_meta(shards)["latent_scale"] == 0.3611


@pytest.mark.parametrize("edit", ["latent_scale", "latent_shift"])
def test_edited_vae_constant_is_refused_naming_fastross_json(shards, tiny_models, edit):
    from fastross import config

    text = (shards / "fastross.json").read_text()
    if edit == "latent_scale":
        edited = text.replace('"latent_scale": 0.3611', '"latent_scale": 3.611')
    else:
        edited = text.replace('"latent_shift": 0.1159', '"latent_shift": 9.1159')
    assert edited != text
    (shards / "fastross.json").write_text(edited)
    want = f"{shards / 'fastross.json'}: its sha256 differs from {shards / 'manifest.json'}'s"
    with pytest.raises(ShardCorruptError, match=want):
        open_source(SourceConfig(str(shards)))  # the trainer's loader
    with pytest.raises(ShardCorruptError, match=want):
        ShardMeta.read(shards)  # export, generate, eval
    cfg = config.load(
        None,
        [
            f"model.vision_path={tiny_models / 'vision'}",
            f"model.llm_path={tiny_models / 'llm'}",
            f"data.shards={shards}",
        ],
    )  # reads no shard file
    with pytest.raises(config.ConfigError, match=want):  # the trainer's entry point and --check, before any work
        check_shard_facts(cfg.data)


def test_flipped_length_bytes_are_refused_naming_lengths_npy(shards):
    data = bytearray((shards / "lengths.npy").read_bytes())
    data[-7] ^= 0xFF  # a high byte of the next-to-last length: that sample's length grows by millions
    (shards / "lengths.npy").write_bytes(bytes(data))
    with pytest.raises(ShardCorruptError, match=f"{shards / 'lengths.npy'}: its sha256 differs"):
        open_source(SourceConfig(str(shards)))
    from fastross.data.packing_report import main as plan_main

    with pytest.raises(ShardCorruptError, match="lengths.npy: its sha256 differs"):
        plan_main([str(shards), "--max-tokens", "4096", "--ranks", "1", "--global-batch", "4"])


def test_edited_index_json_and_folder_without_manifest_are_refused(shards):
    raw = json.loads((shards / "index.json").read_text())
    (shards / "index.json").write_text(json.dumps(raw, indent=1))  # the same facts, other bytes: still an edit
    with pytest.raises(ShardCorruptError, match=f"{shards / 'index.json'}: its sha256 differs"):
        open_source(SourceConfig(str(shards)))
    (shards / "manifest.json").unlink()
    with pytest.raises(ShardCorruptError, match=f"{shards / 'manifest.json'} is missing: .* convert it again"):
        open_source(SourceConfig(str(shards)))


def test_facts_only_folder_reads_its_meta_but_is_no_data_set(shards, tmp_path):
    """convert_checkpoint's RUN/data: fastross.json alone, listed alone; its facts read, training from it refused,
    and a manifest that drops a file the folder holds is refused for that file."""
    facts = tmp_path / "facts"
    facts.mkdir()
    shutil.copy(shards / "fastross.json", facts / "fastross.json")
    assert set(write_manifest(facts)["sha256"]) == {"fastross.json"}
    assert read_meta(facts) == read_meta(shards)
    with pytest.raises(ShardCorruptError, match=f"{facts / 'index.json'}: not listed in"):
        verify_folder(facts)
    manifest = json.loads((shards / "manifest.json").read_text())
    del manifest["sha256"]["lengths.npy"]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardCorruptError, match=f"{shards / 'lengths.npy'}: not listed in"):
        verify_folder(shards)
    write_manifest(shards)
    verify_folder(shards)


def test_invalid_json_files_are_named(shards):
    """Item 6: a fastross.json or index.json that is not UTF-8 JSON is an error naming it, even with a manifest
    that matches it (as one written by a broken tool would)."""
    from fastross.data.shards import MDSShards

    for name, data in (("fastross.json", b'{"grid": 2, "x": "\xff\xfe"}'), ("index.json", b'{"version": 2, "sh')):
        folder = shards.parent / f"bad_{name}"
        shutil.copytree(shards, folder)
        (folder / name).write_bytes(data)
        write_manifest(folder)
        why = "not UTF-8 text" if name == "fastross.json" else "not valid JSON"
        with pytest.raises(ShardCorruptError, match=f"{folder / name}: {why}"):
            open_source(SourceConfig(str(folder)))
        if name == "index.json":
            with pytest.raises(ShardCorruptError, match=f"{folder / name}: not valid JSON"):
                MDSShards(folder)  # the plain reader (no manifest asked) names it too


def test_length_that_disagrees_with_its_sample_stops_naming_it(shards):
    """Past the manifest (a length index written wrong and hashed as written): the step that reads the sample stops,
    naming it; planning alone used the wrong length."""
    lengths = np.load(shards / "lengths.npy")
    stream = StepStream(str(shards), 8, 0, 1, "none", 0, max_tokens=10**6, attn_tokens=1e4)
    ok = stream.read(3)
    assert ok["length"] == lengths[3]
    lengths[3] += 7
    np.save(shards / "lengths.npy", lengths)
    write_manifest(shards)
    stream = StepStream(str(shards), 8, 0, 1, "none", 0, max_tokens=10**6, attn_tokens=1e4)
    with pytest.raises(
        ShardCorruptError,
        match=rf"sample 3 of {shards} \(record '{ok['id']}'\): lengths.npy gives "
        rf"{lengths[3]} tokens, but the sample holds {lengths[3] - 7}",
    ):
        stream.step(0)  # step 0 of the converted order holds samples 0..7


def test_merged_folder_and_rebuilt_index_carry_manifests(shards):
    from fastross.data.index import build

    (shards / "lengths.npy").unlink()
    with pytest.raises(FileNotFoundError, match="lengths.npy is missing: .*manifest.json lists it; rebuild it"):
        verify_folder(shards)
    build(shards)  # from the shards that index.json covers; the manifest then covers the rebuilt file
    verify_folder(shards)


# 4. the tokenizer fingerprint --------------------------------------------------------------------------------


def test_fingerprint_covers_the_normalizer_and_chat_template(tokenizer):
    """The session's tokenizer with its normalizer, then its chat template, changed in place (what a changed
    tokenizer.json or chat_template.jinja loads as; loading copies would cost 11 s each here), then restored."""
    from tokenizers import normalizers

    fp = tokenizer_fingerprint(tokenizer)  # stable across loads: every training test compares it with the converter's
    assert fp["version"] == 2 and len(fp["sha256"]) == 64 and fp["vocab_size"] == len(tokenizer)
    text = "What Is Shown In The Picture? Shapes And Colours."
    ids, vocab = tokenizer(text)["input_ids"], tokenizer.get_vocab()
    backend, normalizer, template = (
        tokenizer.backend_tokenizer,
        tokenizer.backend_tokenizer.normalizer,
        tokenizer.chat_template,
    )
    try:
        backend.normalizer = normalizers.Lowercase()
        assert tokenizer.get_vocab() == vocab  # the vocabulary alone (fingerprint v1) cannot tell them apart
        assert tokenizer(text)["input_ids"] != ids
        changed = tokenizer_fingerprint(tokenizer)
        backend.normalizer = normalizer
        tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        templated = tokenizer_fingerprint(tokenizer)
    finally:
        backend.normalizer, tokenizer.chat_template = normalizer, template
    assert tokenizer(text)["input_ids"] == ids and tokenizer_fingerprint(tokenizer) == fp  # restored
    assert len({fp["sha256"], changed["sha256"], templated["sha256"]}) == 3
    msg = fingerprint_problem(fp, changed, "data.shards: S", "L")
    assert msg.startswith("data.shards: S was tokenised by another tokenizer than the one in L")
    assert msg.endswith("convert the data again with --tokenizer L")
    assert fingerprint_problem(fp, fp, "S", "L") is None


def test_old_fingerprint_gets_a_clear_message():
    ours = {"version": 2, "sha256": "ab" * 32, "vocab_size": 151647, "special_ids": {"eos_token": 151645}}
    old = {"vocab_sha256": "0123456789abcdef", "vocab_size": ours["vocab_size"], "special_ids": ours["special_ids"]}
    msg = fingerprint_problem(old, ours, "data.shards: S", "L")
    assert "records a tokenizer fingerprint of an older fastross" in msg and "convert the data again" in msg


# 2. image formats ------------------------------------------------------------------------------------------------


def _encoded(fmt: str, **kw) -> bytes:
    img = Image.new("RGB", (16, 12), (200, 30, 60))
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nnewpath 0 0 moveto 16 16 lineto stroke\nshowpage\n"
SVG = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16"><rect/></svg>'


def test_allowed_formats_decode_and_animated_gives_its_first_frame():
    for fmt in ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"):
        data = _encoded(fmt, **({"lossless": True} if fmt == "WEBP" else {}))
        assert images.sniff_format(data) == fmt
        img = images.decode(data)
        assert img.size == (16, 12) and img.mode == "RGB"
        if fmt != "JPEG":  # lossy; the others (GIF: a one-colour palette) hold the colour exactly
            assert img.getpixel((3, 3)) == (200, 30, 60), fmt
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    assert images.decode(buf.getvalue()).getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.parametrize(
    "name,data,found",
    [
        ("eps", EPS, "EPS/PostScript"),
        ("pdf", _encoded("PDF"), "PDF"),
        ("svg", SVG, "SVG/XML"),
        ("ico", _encoded("ICO"), "ICO"),
        ("garbage", b"\x01\x02\x03\x04hello", "unrecognised (first bytes 01 02 03 04 68 65 6c 6c)"),
    ],
)
def test_other_formats_are_bad_images_naming_the_format_before_pillow(name, data, found, monkeypatch):
    def never(*a, **k):
        raise AssertionError("Pillow was handed a format outside the allow-list")

    monkeypatch.setattr(images.Image, "open", never)
    with pytest.raises(
        images.ImageError,
        match=rf"format {__import__('re').escape(found)} is not one fastross "
        r"opens \(PNG, JPEG, GIF, BMP, TIFF, WEBP\)",
    ) as e:
        images.decode(data)
    assert e.value.reason == "bad_image"


def test_conversion_skips_exotic_formats_as_bad_image(tmp_path, tiny_models):
    root = tmp_path / "images"
    root.mkdir()
    (root / "ok.png").write_bytes(_encoded("PNG"))
    (root / "a.png").write_bytes(EPS)  # the name says PNG; the bytes decide
    (root / "b.pdf").write_bytes(_encoded("PDF"))
    (root / "c.svg").write_bytes(SVG)
    records = [
        {"id": i, "image": f, "conversations": ASK}
        for i, f in (("ok", "ok.png"), ("eps", "a.png"), ("pdf", "b.pdf"), ("svg", "c.svg"))
    ]
    src = tmp_path / "r.json"
    src.write_text(json.dumps(records))
    rc, out = run_convert(tmp_path, tiny_models, src, root)
    meta = read_meta(out)
    assert rc == 0 and meta["written"] == 1 and meta["skipped"] == {"bad_image": 3}
    examples = meta["skipped_examples"]["bad_image"]
    assert [e.split(":")[0] for e in examples] == ["r.json[1]", "r.json[2]", "r.json[3]"]
    assert "a.png: format EPS/PostScript is not one" in examples[0] and "format PDF" in examples[1]
    assert "format SVG/XML" in examples[2]


# 5. one record never ends a conversion ---------------------------------------------------------------------------


def test_lone_surrogates_and_deep_nesting_are_counted_skips(tmp_path, tiny_models):
    deep = '{"id": "deep", "conversations": ' + "[" * 100 + "]" * 100 + "}"
    deeper = "[" * 100000 + "]" * 100000  # past Python's recursion limit: RecursionError in json.loads
    lines = [
        json.dumps(text_rec("ok0")),
        '{"id": "\\ud800", "conversations": []}',
        deep,
        deeper,
        json.dumps(text_rec("surrogate_text", "Hi \ud800.")),
        json.dumps(text_rec("ok1")),
    ]
    src = tmp_path / "r.jsonl"
    src.write_text("\n".join(lines) + "\n")
    rc, out = run_convert(tmp_path, tiny_models, src)
    meta = read_meta(out)
    assert rc == 0 and meta["read"] == 6 and meta["written"] == 2 and meta["skipped"] == {"malformed": 4}
    ex = meta["skipped_examples"]["malformed"]
    assert ex == [
        "r.jsonl:2: a string holds a lone surrogate ('\\ud800' at 0)",
        "r.jsonl:3: nested deeper than 64 levels",
        "r.jsonl:4: nested deeper than 64 levels",
        "r.jsonl:5: a string holds a lone surrogate ('\\ud800' at 3)",
    ]

    # The same records in one JSON array: the deep ones are stepped over, the rest converted.
    arr = tmp_path / "a" / "r.json"
    arr.parent.mkdir()
    arr.write_text("[" + ",\n".join(lines) + "]")
    rc, out = run_convert(arr.parent, tiny_models, arr)
    meta = read_meta(out)
    assert rc == 0 and meta["written"] == 2 and meta["skipped"] == {"malformed": 4}
    assert [e.split(":")[0] for e in meta["skipped_examples"]["malformed"]] == [
        "r.json[1]",
        "r.json[2]",
        "r.json[3]",
        "r.json[4]",
    ]


def test_id_with_a_lone_surrogate_is_skipped_not_the_run(tmp_path, tiny_models):
    """The id reached the writer's encode (outside the record guard) and ended the conversion with rc 2."""
    records = [text_rec("a"), {**text_rec("x"), "id": "bad\ud800id"}, text_rec("b")]
    src = tmp_path / "r.json"
    src.write_text(json.dumps(records))  # json.dumps escapes it as \ud800
    rc, out = run_convert(tmp_path, tiny_models, src)
    meta = read_meta(out)
    assert rc == 0 and meta["written"] == 2 and meta["skipped"] == {"malformed": 1}
    assert meta["skipped_examples"]["malformed"][0].startswith("r.json[1]: a string holds a lone surrogate")


def test_id_of_no_string_form_is_skipped(tmp_path, tiny_models):
    """A list or object id was written as its Python repr ("['a']"); an integer id is kept as its digits."""
    records = [
        text_rec("a"),
        {**text_rec("x"), "id": ["a"]},
        {**text_rec("y"), "id": {"id": "y"}},
        {**text_rec("z"), "id": None},
        {**text_rec("t"), "id": True},
        {**text_rec("n"), "id": 7},
    ]
    src = tmp_path / "r.json"
    src.write_text(json.dumps(records))
    rc, out = run_convert(tmp_path, tiny_models, src)
    meta = read_meta(out)
    assert rc == 0 and meta["written"] == 2 and meta["skipped"] == {"malformed": 4}
    assert meta["skipped_examples"]["malformed"] == [
        "r.json[1]: its id is a list, not a string or an integer",
        "r.json[2]: its id is a dict, not a string or an integer",
        "r.json[3]: its id is a NoneType, not a string or an integer",
        "r.json[4]: its id is a bool, not a string or an integer",
    ]
    from fastross.data.shards import MDSShards

    shards = MDSShards(out)
    assert sorted(shards.read(k)["id"] for k in range(len(shards))) == ["7", "a"]


def test_a_failure_while_writing_one_record_is_its_skip(tmp_path, tiny_models, monkeypatch):
    from fastross.data.shards import MDSShards, MDSWriter

    real = MDSWriter.write

    def write(self, sample):
        if sample["id"] == "w1":
            raise ValueError("cannot encode this one")
        return real(self, sample)

    monkeypatch.setattr(MDSWriter, "write", write)
    src = tmp_path / "r.json"
    src.write_text(json.dumps([text_rec(f"w{i}") for i in range(4)]))
    rc, out = run_convert(tmp_path, tiny_models, src)
    meta = read_meta(out)
    assert rc == 0 and (meta["read"], meta["written"]) == (4, 3) and meta["skipped"] == {"record_error": 1}
    assert meta["skipped_examples"]["record_error"] == [
        "r.json[1]: writing it failed (ValueError: cannot encode this one)"
    ]
    shards = MDSShards(out)
    got = [shards.read(i) for i in range(len(shards))]
    assert [s["id"] for s in got] == ["w0", "w2", "w3"] and [s["index"] for s in got] == [0, 1, 2]
    assert np.load(out / "lengths.npy").tolist() == [s["length"] for s in got]
    verify_folder(out)


def test_json_with_bad_utf8_is_named(tmp_path, tiny_models, capsys):
    for name in ("r.json", "r.jsonl"):
        src = tmp_path / name
        data = b'[{"id": "caf\xe9"}]' if name == "r.json" else b'{"id": "caf\xe9"}\n'
        src.write_bytes(data)
        rc, _ = run_convert(tmp_path, tiny_models, src)
        err = capsys.readouterr().err
        assert rc == 2 and f"convert: error: {src}: not UTF-8 text (byte {data.index(0xE9)}: " in err, err


def test_loader_refuses_an_edited_folder(shards, tiny_models):
    """The trainer's data path (fastross.data.loader) verifies before it plans a step."""
    from fastross.data.images import ImageSpec

    spec = ImageSpec.from_pretrained(str(tiny_models / "vision"))
    data = bytearray((shards / "index.json").read_bytes())
    data[data.index(b'"samples": ') + 11] ^= 0x01  # a sample count's first digit
    (shards / "index.json").write_bytes(bytes(data))
    with pytest.raises(ShardCorruptError, match="index.json: its sha256 differs"):
        shard_loader(shards, spec)
