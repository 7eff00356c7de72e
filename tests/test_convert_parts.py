"""Conversion at scale: several --json files, the VAE's batches on --device, `--part I/N` and the merge.

The reference is always the one-part conversion of the same files: a merged 2-part conversion must be
that data set byte for byte (samples, lengths.npy, fastross.json), so training reads the same samples.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fastross.data import convert, merge
from fastross.data.schema import LENGTHS_FILE, META_FILE, ShardMeta, read_meta, write_manifest
from fastross.data.shards import MDSShards
from fastross.data.stream import StepStream


def write_sources(synth_data: Path, folder: Path) -> list[Path]:
    """a.json (6 records) and b.jsonl (9 records): bundled stage-2 records, a text-only one and bad ones, so that
    the 2-part split (records 0-6 | 7-14) falls inside b.jsonl and each part skips some."""
    good = json.loads((synth_data / "stage2.json").read_text())[:11]
    text = {"id": "text", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi."}]}
    missing = {**good[0], "id": "missing", "image": "nope.png"}
    a = good[:1] + [missing] + good[1:4] + [text]
    lines = [json.dumps(r) for r in good[4:7]] + ['{"id": "cut", "conv'] + [json.dumps(r) for r in good[7:8]]
    lines += [json.dumps({**good[8], "id": "missing2", "image": "gone.png"})] + [json.dumps(r) for r in good[8:11]]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.json").write_text(json.dumps(a))
    (folder / "b.jsonl").write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n")  # a blank line too
    return [folder / "a.json", folder / "b.jsonl"]


def args(tiny_models: Path, synth_data: Path, sources: list[Path], out: Path, *extra: str) -> list[str]:
    return [
        "--json",
        *map(str, sources),
        "--images",
        str(synth_data / "images"),
        "--tokenizer",
        str(tiny_models / "llm"),
        "--vision",
        str(tiny_models / "vision"),
        "--template",
        "qwen2_ross",
        "--vae",
        str(tiny_models / "vae"),
        "--device",
        "cpu",
        "--out",
        str(out),
        "--quiet",
        *extra,
    ]


@pytest.fixture(scope="module")
def converted(tiny_models, synth_data, tmp_path_factory) -> dict[str, Path]:
    """The one-part conversion (images encoded one at a time), its two parts and their merge. One Converter runs
    all three (its models loaded once: the slow part); each run takes its own parsed arguments."""
    tmp = tmp_path_factory.mktemp("parts")
    sources = write_sources(synth_data, tmp / "src")
    conv = None
    out = {"sources": tmp / "src", "merged": tmp / "merged"}
    for name, extra in (("one", ()), ("part0", ("--part", "0/2")), ("part1", ("--part", "1/2"))):
        a = convert.parse_args(
            args(tiny_models, synth_data, sources, tmp / name, "--vae-batch", "1", "--shard-size", "40000", *extra)
        )  # several shards per part
        conv = conv or convert.Converter(a)
        conv.a = a
        report = conv.run()
        assert report.written + sum(report.skipped.values()) == report.read
        out[name] = tmp / name
    assert merge.main([str(out["part1"]), str(out["part0"]), "--out", str(out["merged"])]) == 0  # any order
    return out


def raw_samples(folder: Path) -> list[bytes]:
    shards = MDSShards(folder)
    return [shards.readers[s].raw(i) for s in range(len(shards.readers)) for i in range(shards.readers[s].samples)]


def test_several_json_files_are_one_sequence(converted, synth_data):
    meta = read_meta(converted["one"])
    assert meta["records"] == 15 and meta["read"] == 15 and meta["written"] == 12
    assert meta["skipped"] == {"missing_image": 2, "malformed": 1}
    assert [Path(p).name for p in meta["source"]] == ["a.json", "b.jsonl"]
    # A skip names its file and its record there: a.json's position, b.jsonl's line (line 3 is blank).
    assert [e.split(": ")[0] for e in meta["skipped_examples"]["missing_image"]] == ["a.json[1]", "b.jsonl:7"]
    assert meta["skipped_examples"]["malformed"][0].startswith("b.jsonl:5: invalid JSON")
    ids = [MDSShards(converted["one"]).read(i)["id"] for i in range(12)]
    good = [r["id"] for r in json.loads((synth_data / "stage2.json").read_text())[:11]]
    assert ids == good[:4] + ["text"] + good[4:]


def test_parts_split_the_records_contiguously(converted):
    metas = [read_meta(converted[f"part{i}"]) for i in range(2)]
    assert [m["part"] for m in metas] == [[0, 2], [1, 2]]
    assert [m["record_range"] for m in metas] == [[0, 7], [7, 15]]
    assert [m["read"] for m in metas] == [7, 8]
    assert metas[0]["skipped"] == {"missing_image": 1} and metas[1]["skipped"] == {"malformed": 1, "missing_image": 1}
    assert [MDSShards(converted[f"part{i}"]).read(0)["index"] for i in range(2)] == [0, 0]  # each numbers from 0
    assert len(json.loads((converted["part1"] / "index.json").read_text())["shards"]) > 1


def test_merged_parts_are_the_one_part_conversion(converted):
    one, merged = converted["one"], converted["merged"]
    assert raw_samples(merged) == raw_samples(one)  # every column's bytes, `index` included, in the same order
    np.testing.assert_array_equal(np.load(merged / LENGTHS_FILE), np.load(one / LENGTHS_FILE))
    assert np.load(merged / LENGTHS_FILE).dtype == np.int32
    assert read_meta(merged) == read_meta(one)  # counts summed, examples as one run keeps them
    from fastross.data.schema import corrupt_shards

    assert corrupt_shards(merged) == []  # the rewritten shards' hashes are recorded
    # What training reads: the same steps (plans over lengths.npy) with the same samples.
    streams = [StepStream(str(d), 4, 0, 1, True, 7, max_tokens=4096, attn_tokens=0.0) for d in (one, merged)]
    for step in range(3):
        a, b = (s.step(step) for s in streams)
        np.testing.assert_array_equal(a.ids, b.ids)
        assert a.tokens == b.tokens
        for mb_a, mb_b in zip(a.micro_batches, b.micro_batches, strict=True):
            for x, y in zip(mb_a, mb_b, strict=True):
                assert x["index"] == y["index"] and x["id"] == y["id"]
                assert x["latent_mean"] == y["latent_mean"] and x["image"] == y["image"]
                np.testing.assert_array_equal(x["labels"], y["labels"])


def test_vae_batches_match_one_at_a_time(converted, tiny_models, synth_data, tmp_path, monkeypatch):
    batched, sizes, encode = tmp_path / "b", [], convert.Converter.encode
    monkeypatch.setattr(
        convert.Converter, "encode", lambda self, samples: sizes.append(len(samples)) or encode(self, samples)
    )
    assert (
        convert.main(args(tiny_models, synth_data, sorted(converted["sources"].iterdir()), batched, "--vae-batch", "4"))
        == 0
    )
    assert sizes == [4, 4, 3]  # the VAE's forwards: 11 images
    meta = ShardMeta.read(batched)
    a, b = MDSShards(converted["one"]), MDSShards(batched)
    assert len(a) == len(b) == 12
    images = 0
    for i in range(12):
        x, y = a.read(i), b.read(i)
        assert x["image"] == y["image"] and x["id"] == y["id"]
        if not x["image"]:
            continue
        images += 1
        assert len(y["latent_mean"]) == len(y["latent_std"]) == 16 * (2 * 8) ** 2 * 4  # C x 2g x 2g float32 each
        for key in ("latent_mean", "latent_std"):
            np.testing.assert_allclose(meta.decode_latent(y[key]), meta.decode_latent(x[key]), rtol=1e-4, atol=1e-5)
    assert images == 11


def test_merge_refuses_parts_of_other_conversions(converted, tmp_path, capsys):
    part0, part1 = converted["part0"], converted["part1"]
    out = tmp_path / "m"
    assert merge.main([str(part0), "--out", str(out)]) == 2
    assert "parts [1] are not among the folders given" in capsys.readouterr().err
    assert merge.main([str(part0), str(part0), "--out", str(out)]) == 2
    assert f"{part0}: given more than once" in capsys.readouterr().err
    again = tmp_path / "again"
    shutil.copytree(part0, again)
    assert merge.main([str(part0), str(again), "--out", str(out)]) == 2
    assert f"{part0} and {again} are both part 0/2" in capsys.readouterr().err

    other = tmp_path / "other"
    shutil.copytree(part1, other)
    meta = read_meta(other)
    meta["latent_scale"] = 0.5
    (other / META_FILE).write_text(json.dumps(meta))
    assert merge.main([str(part0), str(other), "--out", str(out)]) == 2  # the edit is caught (tests/test_datatrust.py)
    assert f"{other / META_FILE}: its sha256 differs from {other / 'manifest.json'}'s" in capsys.readouterr().err
    write_manifest(other)  # a part of another conversion: a manifest of its own
    assert merge.main([str(part0), str(other), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{other / META_FILE}: latent_scale is 0.5, but part 0 ({part0}) has" in err
    meta["latent_scale"] = read_meta(part0)["latent_scale"]
    meta["tokenizer_fingerprint"] = {**meta["tokenizer_fingerprint"], "sha256": "0" * 64}
    (other / META_FILE).write_text(json.dumps(meta))
    write_manifest(other)
    assert merge.main([str(part0), str(other), "--out", str(out)]) == 2
    assert "tokenizer_fingerprint" in capsys.readouterr().err
    assert not out.exists()


def test_part_and_device_arguments(tiny_models, synth_data, tmp_path, capsys):
    for bad in ("2/2", "1", "a/b", "0/0"):
        with pytest.raises(SystemExit):
            convert.parse_args(
                [
                    "--json",
                    "x",
                    "--images",
                    "i",
                    "--tokenizer",
                    "t",
                    "--template",
                    "plain",
                    "--vision",
                    "v",
                    "--out",
                    "o",
                    "--part",
                    bad,
                ]
            )
        assert "--part" in capsys.readouterr().err
    assert [convert.part_range(10, i, 3) for i in range(3)] == [(0, 3), (3, 6), (6, 10)]
    assert [convert.part_range(2, i, 3) for i in range(3)] == [(0, 0), (0, 1), (1, 2)]  # more parts than records
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(convert.ConvertError, match="--device cuda: no CUDA device"):
            convert.resolve_device("cuda")
    with pytest.raises(convert.ConvertError, match="--device tpu7: "):
        convert.resolve_device("tpu7")
    assert convert.resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
