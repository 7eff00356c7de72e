"""The converter against hostile and odd input (issue 11): confinement to --images, images normalised to 8-bit
RGB by the one decode path, per-record failures, an --out that is never left half-written, and the shards'
integrity facts (tokenizer fingerprint, VAE constants, shard file hashes).

Expected pixels are computed here directly with numpy from the arrays the images were made from, never with the
product's decode.
"""

from __future__ import annotations

import io
import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from devtools.faults import IMAGE_MODES, expected_pixels, make_image, png, png_rgb16, rgb_image, shard_loader
from fastross.data import convert
from fastross.data.images import ImageSpec, preprocess
from fastross.data.schema import ShardMeta, check_shard_file, corrupt_shards, read_meta, write_manifest
from fastross.demo import convert_args

ASK = [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "Shapes."}]


def rec(rid: str, image: str | None):
    if image is None:
        return {"id": rid, "conversations": [{"from": "human", "value": "Hi."}, {"from": "gpt", "value": "Hello."}]}
    return {"id": rid, "image": image, "conversations": ASK}


def run(
    tmp_path: Path, tiny_models: Path, images: Path, records, *extra: str, out_name: str = "out", vae: bool = False
):
    src = tmp_path / f"{out_name}.json"
    src.write_text(json.dumps(records), encoding="utf-8")
    out = tmp_path / out_name
    return convert.main(convert_args(tiny_models, src, images, out, "qwen2_ross", *extra, vae=vae)), out


def samples(out: Path) -> list[dict]:
    from fastross.data.shards import MDSShards

    shards = MDSShards(out)
    return [shards.read(i) for i in range(len(shards))]


@pytest.fixture(scope="module")
def spec(tiny_models) -> ImageSpec:
    return ImageSpec.from_pretrained(str(tiny_models / "vision"))


# 1. confinement ------------------------------------------------------------------------


def test_paths_outside_images_are_skipped(tmp_path, tiny_models):
    root, outside = tmp_path / "images", tmp_path / "private"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.png").write_bytes(png(rgb_image(16, 16, 0)))
    (root / "ok.png").write_bytes(png(rgb_image(16, 16, 1)))
    os.symlink(outside / "secret.png", root / "link_out.png")
    os.symlink(root / "ok.png", root / "sub" / "link_in.png")
    os.symlink(outside, root / "dir_out")
    records = [
        rec("dotdot", "../private/secret.png"),
        rec("abs", str(outside / "secret.png")),
        rec("link_out", "link_out.png"),
        rec("dir_out", "dir_out/secret.png"),
        rec("sub_dotdot", "sub/../../private/secret.png"),
        rec("ok", "ok.png"),
        rec("link_in", "sub/link_in.png"),
        rec("dotdot_in", "sub/../ok.png"),
    ]
    rc, out = run(tmp_path, tiny_models, root, records)
    assert rc == 0
    meta = read_meta(out)
    assert meta["skipped"] == {"outside_images_root": 5} and meta["written"] == 3
    assert "outside --images" in meta["skipped_examples"]["outside_images_root"][0]
    secret = (outside / "secret.png").read_bytes()
    written = samples(out)
    assert [s["id"] for s in written] == ["ok", "link_in", "dotdot_in"]
    assert all(s["image"] != secret for s in written)

    rc, out = run(tmp_path, tiny_models, root, records, "--allow-outside-images", out_name="allowed")
    assert rc == 0 and read_meta(out)["written"] == 8
    assert sum(s["image"] == secret for s in samples(out)) == 5


def test_missing_images_folder_is_an_error(tmp_path, tiny_models, capsys):
    rc, out = run(tmp_path, tiny_models, tmp_path / "nowhere", [rec("a", None)])
    assert rc == 2 and not out.exists()
    assert f"--images {tmp_path / 'nowhere'} is not a folder" in capsys.readouterr().err


# 2. images -----------------------------------------------------------------------------


def test_odd_images_decode_to_what_a_direct_computation_gives(tmp_path, tiny_models, spec):
    """16-bit scaled (not clipped), palette/LA/CMYK/RGBA converted, 1-3 px sides read channels-last."""
    root = tmp_path / "images"
    root.mkdir()
    g16 = (np.arange(20 * 24, dtype=np.uint32).reshape(20, 24) * 137 % 65536).astype(np.uint16)
    g8 = (g16 >> 8).astype(np.uint8)
    rgb16 = np.random.default_rng(7).integers(0, 65536, (9, 11, 3)).astype(">u2")
    rgba = np.random.default_rng(3).integers(0, 256, (12, 10, 4), dtype=np.uint8)
    la = np.random.default_rng(4).integers(0, 256, (9, 14, 2), dtype=np.uint8)
    cmyk = np.random.default_rng(5).integers(0, 256, (10, 10, 4), dtype=np.uint8)
    pal = np.random.default_rng(6).integers(0, 4, (11, 13), dtype=np.uint8)
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [9, 99, 199]], dtype=np.uint8)
    p_img = Image.fromarray(pal, "P")
    p_img.putpalette(colours.tobytes())
    buf = io.BytesIO()
    p_img.save(buf, "PNG", transparency=2)
    cmyk_buf = io.BytesIO()
    Image.fromarray(cmyk, "CMYK").save(cmyk_buf, "JPEG", quality=100)
    thin = {f"thin{h}x{w}": rgb_image(h, w, 10 + h * 7 + w) for h, w in [(1, 40), (2, 33), (3, 21), (40, 2)]}
    files = {
        "g16.png": (png(g16), np.repeat(g8[..., None], 3, axis=2)),
        "rgb16.png": (png_rgb16(rgb16), (rgb16 >> 8).astype(np.uint8)),
        "rgba.png": (png(rgba, "RGBA"), rgba[..., :3]),
        "la.png": (png(la, "LA"), np.repeat(la[..., :1], 3, axis=2)),
        "pal.png": (buf.getvalue(), colours[pal]),
        # Pillow's CMYK -> RGB, (255 - K) - C (255 - K) / 255 in its rounding, from the decoded JPEG's CMYK values.
        "cmyk.jpg": (cmyk_buf.getvalue(), None),
        **{f"{k}.png": (png(v), v) for k, v in thin.items()},
    }
    for name, (data, _) in files.items():
        (root / name).write_bytes(data)
    decoded_cmyk = np.asarray(Image.open(io.BytesIO(files["cmyk.jpg"][0]))).astype(np.int32)
    nk = 255 - decoded_cmyk[..., 3:]
    t = decoded_cmyk[..., :3] * nk + 128
    files["cmyk.jpg"] = (files["cmyk.jpg"][0], np.clip(nk - (((t >> 8) + t) >> 8), 0, 255).astype(np.uint8))
    records = [rec(name, name) for name in files]
    rc, out = run(tmp_path, tiny_models, root, records, "--image-aspect", "square", "--min-image-side", "1")
    assert rc == 0 and read_meta(out)["written"] == len(files)
    for s in samples(out):
        data, rgb = files[s["id"]]
        assert s["image"] == data
        got = preprocess(s["image"], spec, "square")
        assert torch.equal(got, expected_pixels(rgb, spec)), s["id"]
    cmyk_jpeg = files["cmyk.jpg"][0]  # the torchvision backend leaves CMYK JPEG to Pillow's conversion
    assert torch.equal(preprocess(cmyk_jpeg, spec, "square", "torchvision"), preprocess(cmyk_jpeg, spec, "square"))
    # The 16-bit gradient is not saturated: the old RGB convert clipped it to 99% white.
    assert (g8 == 255).mean() < 0.01

    # The processor itself, given the channel axis, agrees on the thin images (it guesses wrong without it).
    from transformers import SiglipImageProcessor

    proc = SiglipImageProcessor.from_pretrained(str(tiny_models / "vision"))
    for name, rgb in thin.items():
        ref = proc(images=rgb, input_data_format="channels_last", return_tensors="pt")["pixel_values"][0]
        assert torch.equal(preprocess(files[f"{name}.png"][0], spec, "square"), ref), name


def test_small_large_truncated_images_skipped_with_reasons(tmp_path, tiny_models):
    root = tmp_path / "images"
    root.mkdir()
    good = png(rgb_image(20, 20, 1))
    (root / "good.png").write_bytes(good)
    (root / "one.png").write_bytes(png(rgb_image(1, 1, 2)))
    (root / "seven.png").write_bytes(png(rgb_image(7, 30, 3)))
    (root / "big.png").write_bytes(png(rgb_image(40, 40, 4)))
    (root / "cut.png").write_bytes(png(rgb_image(30, 30, 5))[:-200])
    (root / "float.tif").write_bytes(_tiff_f())
    records = [
        rec("one", "one.png"),
        rec("good", "good.png"),
        rec("seven", "seven.png"),
        rec("big", "big.png"),
        rec("cut", "cut.png"),
        rec("float", "float.tif"),
        rec("text", None),
    ]
    rc, out = run(tmp_path, tiny_models, root, records, "--max-image-pixels", "1000")
    assert rc == 0
    meta = read_meta(out)
    assert meta["skipped"] == {"image_too_small": 2, "image_too_large": 1, "bad_image": 2}
    assert meta["written"] == 2 and [s["id"] for s in samples(out)] == ["good", "text"]
    ex = meta["skipped_examples"]
    assert ex["image_too_small"][0] == "out.json[0]: one.png: 1x1 pixels, a side below 8"
    assert ex["image_too_large"][0] == "out.json[3]: big.png: 40x40 pixels, more than 1000"
    assert ex["bad_image"][0].startswith("out.json[4]: cut.png: cannot be decoded")
    assert "mode F" in ex["bad_image"][1]


def _tiff_f() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ones((10, 10), dtype=np.float32), "F").save(buf, "TIFF")
    return buf.getvalue()


def test_vae_failure_is_the_records_own(tmp_path, tiny_models, spec, monkeypatch):
    """A VAE that raises on one image, and one that gives NaN for another: those two records skipped, the rest
    written with the latents a direct encode of each image gives."""
    from diffusers import AutoencoderKL

    root = tmp_path / "images"
    root.mkdir()
    arrays = {f"i{k}.png": rgb_image(16, 16, 20 + k) for k in range(5)}
    arrays["raise.png"] = np.full((16, 16, 3), 7, np.uint8)
    arrays["nan.png"] = np.full((16, 16, 3), 9, np.uint8)
    for name, a in arrays.items():
        (root / name).write_bytes(png(a))
    marks = {name: expected_pixels(arrays[name], spec)[0, 0, 0].item() for name in ("raise.png", "nan.png")}
    real = convert.latent_moments

    def flaky(vae, pix, grid, spec):
        firsts = pix[:, 0, 0, 0].tolist()
        if marks["raise.png"] in firsts:
            raise RuntimeError("out of memory (simulated)")
        mean, std = real(vae, pix, grid, spec)
        for i, f in enumerate(firsts):
            if f == marks["nan.png"]:
                mean[i, 0, 0, 0] = float("nan")
        return mean, std

    monkeypatch.setattr(convert, "latent_moments", flaky)
    names = ["i0.png", "raise.png", "i1.png", "nan.png", "i2.png", "i3.png", "i4.png"]
    rc, out = run(
        tmp_path,
        tiny_models,
        root,
        [rec(n, n) for n in names],
        "--image-aspect",
        "square",
        "--vae-batch",
        "4",
        vae=True,
    )
    assert rc == 0
    meta = read_meta(out)
    assert meta["skipped"] == {"vae_error": 2} and meta["written"] == 5
    assert meta["skipped_examples"]["vae_error"] == [
        "out.json[1]: RuntimeError: out of memory (simulated)",
        "out.json[3]: non-finite latent moments in float32",
    ]
    vae = AutoencoderKL.from_pretrained(str(tiny_models / "vae"), torch_dtype=torch.float32).eval()
    shard_meta = ShardMeta.read(out)
    for s in samples(out):
        mean, std = real(vae, expected_pixels(arrays[s["id"]], spec)[None], shard_meta.grid, spec)
        # Within fp32 reordering: the survivors were encoded in batches of other sizes than one.
        np.testing.assert_allclose(shard_meta.decode_latent(s["latent_mean"]), mean[0].numpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(shard_meta.decode_latent(s["latent_std"]), std[0].numpy(), rtol=0, atol=1e-5)
    assert [s["index"] for s in samples(out)] == list(range(5))


def test_out_is_never_half_written(tmp_path, tiny_models, capsys):
    root = tmp_path / "images"
    root.mkdir()
    (root / "a.png").write_bytes(png(rgb_image(16, 16, 1)))
    good = [rec("a", "a.png"), rec("t", None)]
    bad = good + [rec("missing", "nope.png")]
    out = tmp_path / "out"
    stage = tmp_path / ".out.partial"

    rc, _ = run(tmp_path, tiny_models, root, bad, "--strict")
    err = capsys.readouterr().err
    assert rc == 2 and "out.json[2]: missing_image" in err
    assert not out.exists() and not stage.exists()

    stage.mkdir()  # what a killed run leaves: the same command starts over
    (stage / "shard.00000.mds").write_bytes(b"half")
    rc, _ = run(tmp_path, tiny_models, root, good)
    assert rc == 0 and not stage.exists() and read_meta(out)["written"] == 2
    first = {p.name: p.read_bytes() for p in out.iterdir()}

    rc, _ = run(tmp_path, tiny_models, root, bad)
    assert rc == 2 and "pass --overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    rc, _ = run(tmp_path, tiny_models, root, bad, "--overwrite", "--strict")  # fails: the old output stays
    assert rc == 2 and {p.name: p.read_bytes() for p in out.iterdir()} == first
    rc, _ = run(tmp_path, tiny_models, root, bad, "--overwrite")
    assert rc == 0 and read_meta(out)["read"] == 3 and read_meta(out)["written"] == 2 and not stage.exists()

    other = tmp_path / "home"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    rc, _ = run(tmp_path, tiny_models, root, good, "--overwrite", out_name="home")
    assert rc == 2 and "holds no fastross.json" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "mine"


# 3. integrity --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def many_shards(tiny_models, tmp_path_factory) -> Path:
    """24 text samples in shards of about 4 KB each (several shard files)."""
    tmp = tmp_path_factory.mktemp("many")
    records = [
        {
            "id": f"t{i}",
            "conversations": [
                {"from": "human", "value": f"Count to {i}."},
                {"from": "gpt", "value": " ".join(map(str, range(i + 20)))},
            ],
        }
        for i in range(24)
    ]
    rc, out = run(tmp, tiny_models, tmp, records, "--shard-size", "4096")
    assert rc == 0
    return out


def test_corrupt_shard_is_named_or_skipped(many_shards, tmp_path, spec):
    import shutil

    from fastross.data.schema import ShardCorruptError

    shards = tmp_path / "shards"
    shutil.copytree(many_shards, shards)
    index = json.loads((shards / "index.json").read_text())["shards"]
    assert len(index) >= 3 and all(check_shard_file(shards, s) is None for s in index)
    assert corrupt_shards(shards) == []
    victim = shards / index[1]["raw_data"]["basename"]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit in a token
    victim.write_bytes(bytes(data))
    first = index[0]["samples"]
    bad = corrupt_shards(shards)
    assert bad == [
        (
            range(first, first + index[1]["samples"]),
            f"{victim}: its xxh64 hash differs from index.json's: the file is corrupt",
        )
    ]

    with pytest.raises(ShardCorruptError, match=f"{victim}: its xxh64 hash differs.*data.corrupt_shards=skip"):
        shard_loader(shards, spec, "error")
    skipping = shard_loader(shards, spec, "skip")
    kept = 24 - index[1]["samples"]
    assert skipping.stream.steps_per_epoch == kept // 4
    order = np.concatenate([skipping.stream.epoch_order(e) for e in range(3)])
    assert len(order) == 3 * kept and not set(order.tolist()) & set(bad[0][0])
    read = [
        s["id"]
        for i in range(skipping.stream.steps_per_epoch)
        for mb in skipping.stream.step(i).micro_batches
        for s in mb
    ]
    assert len(read) == 4 * (kept // 4) and all(int(r[1:]) not in bad[0][0] for r in read)
    # What the trainer says at start about it (Loader.notes), and what the ranks compare (skipped_samples)
    assert skipping.skipped_samples == index[1]["samples"]
    assert skipping.notes()[0] == f"skipped a corrupt shard ({index[1]['samples']} samples): {bad[0][1]}"

    victim.write_bytes(bytes(data[:-10]))  # truncated
    assert corrupt_shards(shards)[0][1] == f"{victim}: {len(data) - 10} bytes, index.json records {len(data)}"
    raw = json.loads((shards / "index.json").read_text())
    for s in raw["shards"]:
        s["raw_data"]["hashes"] = {}
    (shards / "index.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="index.json: its sha256 differs from .*manifest.json.s"):
        corrupt_shards(shards)  # the edit itself is caught first (tests/test_datatrust.py) ...
    write_manifest(shards)  # ... and, with the manifest rewritten to match, the missing hash
    assert "records no xxh64 hash; convert the data again" in corrupt_shards(shards)[0][1]


def test_deleted_shard_is_skipped_and_an_edited_index_refused(many_shards, tmp_path, spec):
    """Found by benchmarks/faults.py: a deleted shard file ended data.corrupt_shards=skip with FileNotFoundError,
    and an index.json whose sample count was edited passed the hash check (it shifts every later sample id)."""
    import shutil

    from fastross.data.schema import ShardCorruptError

    index = json.loads((many_shards / "index.json").read_text())["shards"]
    gone = tmp_path / "gone"
    shutil.copytree(many_shards, gone)
    (gone / index[1]["raw_data"]["basename"]).unlink()
    with pytest.raises(ShardCorruptError, match=f"{gone / index[1]['raw_data']['basename']}: cannot be read"):
        shard_loader(gone, spec, "error")
    skipping = shard_loader(gone, spec, "skip")
    read = [
        s["id"]
        for i in range(skipping.stream.steps_per_epoch)
        for mb in skipping.stream.step(i).micro_batches
        for s in mb
    ]
    first = index[0]["samples"]
    kept = 24 - index[1]["samples"]
    assert len(read) == 4 * (kept // 4) and not {int(r[1:]) for r in read} & set(
        range(first, first + index[1]["samples"])
    )

    edited = tmp_path / "edited"
    shutil.copytree(many_shards, edited)
    raw = json.loads((edited / "index.json").read_text())
    raw["shards"][1]["samples"] -= 1
    (edited / "index.json").write_text(json.dumps(raw))
    write_manifest(edited)  # past the manifest (tests/test_datatrust.py): the sample count is checked on its own
    for mode in ("error", "skip"):  # not skippable: the index itself is wrong
        with pytest.raises(
            ShardCorruptError,
            match=f"{edited / index[1]['raw_data']['basename']}: holds "
            f"{index[1]['samples']} samples, .*index.json records "
            f"{index[1]['samples'] - 1}",
        ):
            shard_loader(edited, spec, mode)


def test_full_disk_during_conversion_names_the_folder(tmp_path, tiny_models, capsys, monkeypatch):
    """Found by benchmarks/faults.py: ENOSPC while writing a shard ended the converter with a traceback that named
    no path. Now: an error naming the folder being written, --out untouched, the same command then works."""
    import errno

    root = tmp_path / "images"
    root.mkdir()
    records = [rec(f"t{i}", None) for i in range(3)]
    real = Path.write_bytes

    def full(path, data):
        if path.parent.name == ".out.partial":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    rc, out = run(tmp_path, tiny_models, root, records)
    assert rc == 2 and not out.exists() and not (tmp_path / ".out.partial").exists()
    assert (
        f"convert: error: writing the shards into {tmp_path / '.out.partial'} failed ([Errno 28] No space left "
        f"on device); {out} is as it was"
    ) in capsys.readouterr().err
    monkeypatch.undo()
    rc, out = run(tmp_path, tiny_models, root, records)
    assert rc == 0 and read_meta(out)["written"] == 3


def test_old_shards_are_refused(many_shards, tmp_path):
    import shutil

    shards = tmp_path / "old"
    shutil.copytree(many_shards, shards)
    meta = json.loads((shards / "fastross.json").read_text())
    del meta["tokenizer_fingerprint"]
    (shards / "fastross.json").write_text(json.dumps(meta))
    write_manifest(shards)  # as an older converter wrote it, but with a manifest
    with pytest.raises(ValueError, match="has no 'tokenizer_fingerprint': convert the data again"):
        ShardMeta.read(shards)


@pytest.fixture
def world_of_one(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def trainer_config(tiny_models, shards, tmp_path, *overrides):
    from fastross import config

    return config.load(
        None,
        [
            f"model.vision_path={tiny_models / 'vision'}",
            f"model.llm_path={tiny_models / 'llm'}",
            f"data.shards={shards}",
            "data.global_batch=4",
            "data.workers=0",
            f"train.run_dir={tmp_path / 'run'}",
            "train.dtype=fp32",
            "model.fused_ce=false",
            *overrides,
        ],
    )


def test_trainer_refuses_another_tokenizer_or_vae(tiny_models, stage2_shards, tmp_path):
    import shutil

    from fastross.config import ConfigError
    from fastross.data.templates import load_tokenizer
    from fastross.distributed import World
    from fastross.train import Trainer

    world = World(0, 1, 0, torch.device("cpu"))
    llm = tmp_path / "llm"
    shutil.copytree(tiny_models / "llm", llm)
    tok = load_tokenizer(str(llm))
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(str(llm))
    with pytest.raises(ConfigError) as e:
        Trainer(trainer_config(tiny_models, stage2_shards, tmp_path, f"model.llm_path={llm}"), world)
    msg = str(e.value)
    assert msg.startswith(
        f"data.shards: {stage2_shards} was tokenised by another tokenizer than the one in {llm} (fingerprint "
    )
    assert "vocabulary 151647" in msg and ", 151648, " in msg and msg.endswith(f"--tokenizer {llm}")

    vae = tmp_path / "vae"
    shutil.copytree(tiny_models / "vae", vae)
    cfg = json.loads((vae / "config.json").read_text())
    cfg["scaling_factor"] = 0.5
    (vae / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ConfigError,
        match=r"made by a VAE with \(channels, shift, scale\) \(16, 0.1159, 0.3611\), "
        rf"but model.vae_path {vae} has \(16, 0.1159, 0.5\)",
    ):
        Trainer(trainer_config(tiny_models, stage2_shards, tmp_path, f"model.vae_path={vae}"), world)


def test_trainer_uses_the_shards_latent_constants(tiny_models, stage2_shards, tmp_path, world_of_one, capsys):
    from fastross.distributed import World
    from fastross.train import Trainer

    cfg = trainer_config(
        tiny_models, stage2_shards, tmp_path, "model.latent_scale=0.9", "model.latent_shift=0.0", "data.max_tokens=100"
    )
    trainer = Trainer(cfg, World(0, 1, 0, torch.device("cpu")))
    assert (trainer.model.latent_shift, trainer.model.latent_scale) == (0.1159, 0.3611)
    lengths = np.load(stage2_shards / "lengths.npy")
    too_long = int((lengths > 100).sum())
    assert 0 < too_long < len(lengths)
    assert (
        f"train: {too_long} of {len(lengths)} samples are longer than data.max_tokens=100: each is planned alone"
        in capsys.readouterr().out
    )


# 4. property tests (hypothesis): odd images and odd JSON --------------------------------

from hypothesis import (  # noqa: E402
    HealthCheck,
    event,
    given,
    settings,
    strategies as st,  # noqa: E402
)

PROPERTY = settings(
    max_examples=40,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


def odd_image(draw) -> tuple[bytes, np.ndarray, bool]:
    """An image file's bytes, the 8-bit RGB pixels a direct computation gives for them, and whether it was cut."""
    mode = draw(st.sampled_from(IMAGE_MODES))
    h, w = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    data, rgb = make_image(mode, h, w, draw(st.integers(0, 2**32 - 1)), transparency=draw(st.booleans()))
    cut = draw(st.booleans())
    if cut:
        data = data[: draw(st.integers(0, len(data) - 1))]  # truncated: skipped, or decodes to the whole image
    return data, rgb, cut


TEXT = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40) | st.sampled_from(
    ["", "<image>", "<image>\n<image>", "x" * 30000, "\u202e\u0000\ufeff", "<|im_end|>", "<|im_start|>user"]
)
ROLE = st.sampled_from(["human", "gpt", "system", "user", "assistant", "", "GPT", "\u4eba"])
TURN = st.one_of(
    st.fixed_dictionaries({"from": ROLE, "value": TEXT}),
    st.fixed_dictionaries({"from": ROLE}),
    st.fixed_dictionaries({"value": TEXT}),
    st.fixed_dictionaries({"from": ROLE, "value": st.integers() | st.none() | st.lists(st.integers(), max_size=2)}),
    st.just("not a turn"),
)


@st.composite
def plausible_turns(draw, image: bool):
    """Alternating human/gpt turns with odd text, the placeholder in the first human turn when there is an image."""
    turns = []
    for _ in range(draw(st.integers(1, 3))):
        turns += [{"from": "human", "value": draw(TEXT)}, {"from": "gpt", "value": draw(TEXT)}]
    if image:
        turns[0]["value"] = "<image>\n" + turns[0]["value"].replace("<image>", "")
    return turns


@st.composite
def odd_record(draw, i: int):
    """(record, image file bytes and expected pixels or None) with image name im{i}.png when it has a file."""
    image_kind = draw(st.sampled_from(["file", "file", "file", "none", "missing", "escape", "not_str"]))
    kind = draw(st.sampled_from(["plausible"] * 4 + ["odd", "empty", "absent", "not_a_list"]))
    conversations = {
        "plausible": lambda: draw(plausible_turns(image_kind != "none")),
        "odd": lambda: draw(st.lists(TURN, max_size=5)),
        "empty": list,
        "absent": lambda: None,
        "not_a_list": lambda: "text",
    }[kind]()
    rec = {"conversations": conversations} if conversations is not None else {}
    if draw(st.booleans()):
        rec["id"] = f"r{i}"
    image = None
    if image_kind == "file":
        image = odd_image(draw)
        rec["image"] = f"im{i}.png"
    elif image_kind == "missing":
        rec["image"] = f"gone{i}.png"
    elif image_kind == "escape":
        rec["image"] = draw(st.sampled_from(["../outside.png", "/etc/hostname", "sub/../../outside.png"]))
    elif image_kind == "not_str":
        rec["image"] = draw(st.integers() | st.lists(st.just("im0.png"), max_size=2) | st.just({}))
    if draw(st.integers(0, 9)) == 7:  # not 0 or 9: hypothesis favours the bounds
        return draw(st.sampled_from([[], "record", 7, None])), None
    return rec, image


@pytest.fixture(scope="module")
def prop_converter(tiny_models, tmp_path_factory):
    """One converter reused by every example (loading the tokenizer is the slow part)."""
    root = tmp_path_factory.mktemp("prop")
    (root / "images").mkdir()
    (root / "outside.png").write_bytes(png(rgb_image(16, 16, 0)))
    extra = ("--image-aspect", "square", "--max-length", "4000")
    a = convert.parse_args(convert_args(tiny_models, "-", root / "images", "-", "qwen2_ross", *extra, vae=False))
    return convert.Converter(a), root


EXAMPLES = itertools.count()


def convert_example(prop_converter, records: list, images: dict[int, bytes], example: int):
    conv, root = prop_converter
    folder = root / "images" / f"ex{example}"
    folder.mkdir()
    for i, data in images.items():
        (folder / f"im{i}.png").write_bytes(data)
    for r in records:
        if isinstance(r, dict) and isinstance(r.get("image"), str) and not r["image"].startswith(("/", "..", "sub")):
            r["image"] = f"ex{example}/{r['image']}"
    src = root / f"ex{example}.json"
    src.write_text(json.dumps(records), encoding="utf-8")
    conv.a.json, conv.a.out = [str(src)], str(root / f"out{example}")
    return conv.run(), Path(conv.a.out), src.name


@given(st.data())
@PROPERTY
def test_property_odd_images(prop_converter, spec, data):
    """Well-formed records with odd images: every whole image of sides >= 8 px is written with the pixels of the
    direct computation (whatever its mode or bit depth); the others are skipped as bad or too small."""
    n = data.draw(st.integers(1, 6))
    drawn = [odd_image(data.draw) for _ in range(n)]
    records = [rec(f"r{i}", f"im{i}.png") for i in range(n)]
    report, out, _ = convert_example(prop_converter, records, {i: d[0] for i, d in enumerate(drawn)}, next(EXAMPLES))
    assert report.read == n and report.written + sum(report.skipped.values()) == n
    assert set(report.skipped) <= {"bad_image", "image_too_small"}
    written = {s["id"]: s for s in samples(out)}
    for i, (raw, rgb, cut) in enumerate(drawn):
        if min(rgb.shape[:2]) >= 8 and not cut:
            assert f"r{i}" in written, report.examples
        if f"r{i}" in written:
            assert min(rgb.shape[:2]) >= 8 and written[f"r{i}"]["image"] == raw
            assert torch.equal(preprocess(raw, spec, "square"), expected_pixels(rgb, spec)), f"r{i}"
            event("an image written")


@given(st.data())
@PROPERTY
def test_property_odd_records(prop_converter, spec, data):
    """Odd JSON and odd images together: nothing crashes, written + skipped == read, a written image's pixels equal
    the direct computation, nothing from outside --images is stored, and images below 8 px are never written."""
    n = data.draw(st.integers(1, 8))
    drawn = [data.draw(odd_record(i)) for i in range(n)]
    records = [r for r, _ in drawn]
    images = {i: img[0] for i, (_, img) in enumerate(drawn) if img is not None}
    report, out, name = convert_example(prop_converter, records, images, next(EXAMPLES))
    assert report.read == n and report.written + sum(report.skipped.values()) == n
    assert set(report.skipped) <= set(convert.SKIP_REASONS)
    meta = read_meta(out)
    assert (meta["read"], meta["written"]) == (n, report.written)
    outside = png(rgb_image(16, 16, 0))
    for s in samples(out):
        i = int(s["id"][1:]) if s["id"].startswith("r") else int(s["id"][len(name) + 1 : -1])
        assert s["image"] != outside
        if s["image"]:
            rgb = drawn[i][1][1]
            assert min(rgb.shape[:2]) >= 8, s["id"]
            assert torch.equal(preprocess(s["image"], spec, "square"), expected_pixels(rgb, spec)), s["id"]
            event("an image written")
    for reason in report.skipped:
        event(f"skipped: {reason}")
