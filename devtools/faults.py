"""What the fault campaign (benchmarks/faults.py) and the fault tests share: launching and killing torchrun runs,
comparing runs bit for bit, corrupting files, code-running pickle payloads, odd images and fuzzed records.

Nothing here is used by training or conversion: it is the adversary's toolbox, kept in devtools/ (beside the
package, never installed) so that the benchmark runs from a fresh clone and the tests import the same code instead
of a copy.
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import struct
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# A metrics record's measured fields (fastross/metrics.py), which differ from run to run; the rest must match.
MEASURED = frozenset(
    {
        "samples_per_s",
        "tokens_per_s_per_rank",
        "model_tflops_per_rank",
        "mfu",
        "step_s",
        "host_peak_rss_gib",
        "data_wait_s",
        "compute_s",
        "ckpt_blocked_s",
    }
)

# ---------------------------------------------------------------- torchrun runs


def write_config(
    path: Path, models: Path, shards: Path, run_dir: Path, workers: int = 2, denoiser: dict | None = None, **train
) -> Path:
    """The tests' tiny recipe: a 1-block denoiser, global batch 8, micro-batches of <= 256 tokens, fp32.
    denoiser: keys that replace model.denoiser's; train: keys of train."""
    import yaml

    cfg = {
        "model": {
            "vision_path": str(models / "vision"),
            "llm_path": str(models / "llm"),
            "denoiser": {"kind": "dit", "depth": 1, "width": 32, "heads": 4, "replicas": 4, **(denoiser or {})},
            "fused_ce": False,  # slow in Triton's CPU interpreter; tests/test_golden.py runs it on 2 ranks
        },
        "data": {"shards": str(shards), "global_batch": 8, "max_tokens": 256, "workers": workers},
        "optim": {"lr_projector": 1e-3, "lr_denoiser": 1e-3, "lr_llm": 1e-3, "warmup_ratio": 0.0},
        "train": {
            "trainable": ["projector", "llm", "denoiser"],
            "dtype": "fp32",
            "log_every": 1,
            "run_dir": str(run_dir),
            **train,
        },
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def shard_loader(shards: Path, spec, corrupt_shards: str = "error"):
    """The trainer's data path over SHARDS on one rank (global batch 4, no loader workers), as the corrupt-shard
    trials and tests read it; spec: the tower's fastross.data.images.ImageSpec."""
    import torch

    from fastross.config import DataConfig
    from fastross.data.loader import Loader

    cfg = DataConfig(shards=str(shards), global_batch=4, corrupt_shards=corrupt_shards, workers=0)
    kw = dict(rank=0, world=1, attn_tokens=1e4, image=spec, latent_channels=16, replicas=1, seed=0)
    return Loader(cfg, **kw, device=torch.device("cpu"))


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (torchrun's workers start sessions of their own: a process group kill misses them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launched run: torchrun and every process below it, as a power cut or the OOM killer would."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


# ---------------------------------------------------------------- comparing runs bit for bit


def read_checkpoint(path: Path, tmp: Path | None = None) -> dict:
    """A DCP checkpoint as {part: {key: value}} (part model, optim), read by fastross.checkpoint_read.read_state:
    tensors, and the optimizer's param_groups entries as vetted plain values; nothing in it is unpickled unchecked."""
    from fastross.checkpoint_read import read_state

    out: dict[str, dict] = {}
    for fqn, v in read_state(path, None).items():
        part, _, key = fqn.partition(".")
        out.setdefault(part, {})[key] = v
    return out


def flatten(d, prefix: str = "") -> dict:
    out = {}
    items = d.items() if isinstance(d, dict) else enumerate(d) if isinstance(d, list) else None
    if items is None:
        return {prefix: d}
    for k, v in items:
        out.update(flatten(v, f"{prefix}{k}."))
    return out


def checkpoint_differences(a: Path, b: Path, tmp: Path | None = None) -> list[str]:
    """What differs between two checkpoints: every model and optimizer tensor, trainer.json and the RNG files."""
    import torch

    sa, sb = read_checkpoint(a), read_checkpoint(b)
    diffs = []
    for part in ("model", "optim"):
        fa, fb = sa.get(part, {}), sb.get(part, {})
        if fa.keys() != fb.keys():
            diffs.append(f"{b.name} {part}: keys differ ({sorted(fa.keys() ^ fb.keys())[:3]})")
            continue
        for k in fa:
            same = torch.equal(fa[k], fb[k]) if isinstance(fa[k], torch.Tensor) else fa[k] == fb[k]
            if not same:
                diffs.append(f"{b.name} {part}.{k}")
    for f in sorted(p.name for p in a.iterdir() if p.name == "trainer.json" or p.name.startswith("rng_rank")):
        if not (b / f).is_file() or (a / f).read_bytes() != (b / f).read_bytes():
            diffs.append(f"{b.name}/{f}")
    return diffs


def run_differences(ref: Path, got: Path, tmp: Path) -> list[str]:
    """What differs between a run and the uninterrupted reference: each step's metrics record (measured times
    aside) and every checkpoint both keep, bit for bit. Empty when the run is exact."""
    diffs = []
    rm, gm = metrics(ref), metrics(got)
    if [m["step"] for m in rm] != [m["step"] for m in gm]:
        diffs.append(f"metrics steps {[m['step'] for m in gm]}, the reference has {[m['step'] for m in rm]}")
    for a, b in zip(rm, gm):
        for key in sorted((a.keys() | b.keys()) - MEASURED):
            if a.get(key) != b.get(key):
                diffs.append(f"step {a['step']} {key}: {b.get(key)!r}, the reference has {a.get(key)!r}")
    ref_ckpts = {p.name for p in (Path(ref) / "checkpoints").glob("step_*")}
    got_ckpts = {p.name for p in (Path(got) / "checkpoints").glob("step_*")}
    if ref_ckpts != got_ckpts:
        diffs.append(f"checkpoints {sorted(got_ckpts)}, the reference keeps {sorted(ref_ckpts)}")
    for name in sorted(ref_ckpts & got_ckpts):
        diffs += checkpoint_differences(Path(ref) / "checkpoints" / name, Path(got) / "checkpoints" / name, tmp)
    return diffs


# ---------------------------------------------------------------- corrupting files, hostile pickles


def flip_bytes(path: Path, n: int = 64, seed: int = 0, at: range | None = None) -> None:
    """XOR n bytes of the file with 0xFF, at seeded positions (within `at` when given)."""
    data = bytearray(Path(path).read_bytes())
    where = at if at is not None else range(len(data))
    for i in random.Random(seed).sample(list(where), min(n, len(where))):
        data[i] ^= 0xFF
    Path(path).write_bytes(bytes(data))


def field_bytes(shards: Path, sample_id: int, field: str) -> tuple[Path, range]:
    """Where one sample's field (its raw encoded bytes) sits in its shard file: (file, byte range)."""
    from fastross.data.shards import MDSShards

    raw = MDSShards(shards).read(sample_id)[field]
    raw = raw.tobytes() if hasattr(raw, "tobytes") else raw
    hits = [(f, f.read_bytes().find(raw)) for f in sorted(Path(shards).glob("*.mds"))]
    hits = [(f, at) for f, at in hits if at >= 0 and f.read_bytes().count(raw) == 1]
    if len(hits) != 1 or not raw:
        raise ValueError(f"sample {sample_id}'s {field} bytes are not unique in {shards}")
    f, at = hits[0]
    return f, range(at, at + len(raw))


class RunsCode:
    """Unpickling this calls exec(), which creates `marker`: what a crafted `.metadata` or `rng_rank0.pt` could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


# ---------------------------------------------------------------- odd images, with the pixels they must give

IMAGE_MODES = ("L", "RGB", "RGBA", "LA", "P", "I;16", "RGB;16", "1", "CMYK")


def png(array: np.ndarray, mode: str | None = None, **save) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    (Image.fromarray(array, mode) if mode else Image.fromarray(array)).save(buf, "PNG", **save)
    return buf.getvalue()


def png_rgb16(a: np.ndarray) -> bytes:
    """A 16-bit RGB PNG written by hand (Pillow cannot write one): (H, W, 3) big-endian uint16."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    h, w, _ = a.shape
    rows = b"".join(b"\x00" + a[y].tobytes() for y in range(h))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def rgb_image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_image(mode: str, h: int, w: int, seed: int, transparency: bool = False) -> tuple[bytes, np.ndarray]:
    """An image file of `mode` and the 8-bit RGB pixels a direct numpy computation gives for it (16-bit scaled by
    >> 8, palette looked up, alpha dropped, CMYK by Pillow's integer formula from the decoded JPEG's values)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    if mode == "I;16":
        a = rng.integers(0, 65536, (h, w), dtype=np.uint16)
        Image.fromarray(a).save(buf, "PNG")
        return buf.getvalue(), np.repeat((a >> 8).astype(np.uint8)[..., None], 3, axis=2)
    if mode == "RGB;16":
        a = rng.integers(0, 65536, (h, w, 3)).astype(">u2")
        return png_rgb16(a), (a >> 8).astype(np.uint8)
    if mode == "1":
        a = rng.integers(0, 2, (h, w)).astype(bool)
        Image.fromarray(a).save(buf, "PNG")
        return buf.getvalue(), np.repeat((a * 255).astype(np.uint8)[..., None], 3, axis=2)
    if mode == "P":
        a = rng.integers(0, 16, (h, w), dtype=np.uint8)
        palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
        img = Image.fromarray(a, "P")
        img.putpalette(palette.tobytes())
        img.save(buf, "PNG", **({"transparency": 3} if transparency else {}))
        return buf.getvalue(), palette[a]
    if mode == "CMYK":
        Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "CMYK").save(buf, "JPEG", quality=95)
        c = np.asarray(Image.open(io.BytesIO(buf.getvalue()))).astype(np.int32)
        nk = 255 - c[..., 3:]
        t = c[..., :3] * nk + 128
        return buf.getvalue(), np.clip(nk - (((t >> 8) + t) >> 8), 0, 255).astype(np.uint8)
    channels = {"L": 1, "RGB": 3, "RGBA": 4, "LA": 2}[mode]
    a = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    Image.fromarray(a[..., 0] if channels == 1 else a, mode).save(buf, "PNG")
    return buf.getvalue(), a[..., :3] if channels >= 3 else np.repeat(a[..., :1], 3, axis=2)


def expected_pixels(rgb: np.ndarray, spec):
    """8-bit RGB (H, W, 3) -> what the vision tower must see, for aspect "square": PIL resize, then the table."""
    from PIL import Image

    from fastross.data.images import normalise

    img = Image.fromarray(rgb, "RGB").resize((spec.width, spec.height), resample=spec.resample)
    return normalise(np.asarray(img).transpose(2, 0, 1), spec)


# ---------------------------------------------------------------- fuzzed converter records

VALID, INVALID, EITHER = "valid", "invalid", "either"  # what a record must become: written, skipped, or either
ODD_TEXT = [
    "",
    "<image>",
    "<|im_end|>",
    "<|im_start|>user",
    "\u202e\u0000\ufeff",
    "\u4eba\u5de5 \U0001f600",
    "x" * 30000,
    "a\nb\tc",
    "null",
    '{"from": "gpt"}',
]


@dataclass
class Fuzzed:
    record: object  # what goes into the JSON array, of any type
    expect: str  # VALID, INVALID or EITHER
    kind: str  # what was done to it, for the report
    rgb: np.ndarray | None = None  # a VALID image record's 8-bit RGB pixels, computed directly
    image: str | None = None  # the image file's name under the images folder
    data: bytes | None = None  # its bytes
    raw: str | None = None  # the record's JSON text where json.dumps(record) cannot make it (one line, for JSONL)

    def text(self) -> str:
        return self.raw if self.raw is not None else json.dumps(self.record)


def _words(r: random.Random, n: int) -> str:
    return " ".join(r.choice(["red", "square", "left", "Über", "日本", "émoji", "3.14", "--", "<b>"]) for _ in range(n))


def _conversation(r: random.Random, image: bool) -> list[dict]:
    turns = []
    for _ in range(r.randint(1, 2)):
        turns += [
            {"from": "human", "value": _words(r, r.randint(1, 12))},
            {"from": "gpt", "value": _words(r, r.randint(1, 12))},
        ]
    if image:
        turns[0]["value"] = "<image>\n" + turns[0]["value"]
    return turns


# The kinds drawn (repeats weigh them): the record-level ones, then JSON-level families and exotic image formats.
BASE_KINDS = (
    "text",
    "image",
    "image",
    "image",
    "not_a_dict",
    "no_conversations",
    "conv_not_list",
    "turn_missing_key",
    "value_wrong_type",
    "image_wrong_type",
    "odd_text",
    "odd_role",
    "truncated",
    "not_an_image",
    "zero_bytes",
    "tiny",
    "missing_file",
    "escape",
)
KINDS = BASE_KINDS + ("lone_surrogate", "deep_nesting", "wrong_types", "duplicate_keys", "exotic", "exotic")


def fuzz_records(n: int, seed: int, images: Path, start: int = 0, kinds: tuple = KINDS) -> list[Fuzzed]:
    """n records of mixed kinds, their image files written into `images`: valid ones (plain text, or a whole
    image of any mode with sides >= 8 px) that must be written, broken ones that must be skipped (malformed JSON
    values, missing keys, wrong types, broken/tiny/absent images, paths leading out), and odd ones that may be
    either (odd roles, empty or huge strings, truncated images that may still decode whole)."""
    r = random.Random(seed)
    out = []
    for i in range(start, start + n):
        rid = f"f{i}"
        kind = r.choice(kinds)
        fz = _fuzzed(r, rid, kind, images)
        out.append(fz)
    return out


def _fuzzed(r: random.Random, rid: str, kind: str, images: Path) -> Fuzzed:
    if kind == "text":
        return Fuzzed({"id": rid, "conversations": _conversation(r, False)}, VALID, kind)
    if kind in ("image", "truncated", "tiny"):
        mode = r.choice(IMAGE_MODES)
        h, w = (r.randint(1, 7), r.randint(1, 24)) if kind == "tiny" else (r.randint(8, 40), r.randint(8, 40))
        if kind == "tiny" and r.random() < 0.5:
            h, w = w, h
        data, rgb = make_image(mode, h, w, r.randrange(2**32), transparency=r.random() < 0.5)
        if kind == "truncated":
            data = data[: r.randrange(len(data))]
        name = f"{rid}.{'jpg' if mode == 'CMYK' else 'png'}"
        (images / name).write_bytes(data)
        rec = {"id": rid, "image": name, "conversations": _conversation(r, True)}
        expect = {"image": VALID, "truncated": EITHER, "tiny": INVALID}[kind]
        return Fuzzed(rec, expect, f"{kind}:{mode}:{h}x{w}", rgb if expect != INVALID else None, name, data)
    if kind in ("not_an_image", "zero_bytes"):
        name = f"{rid}.png"
        (images / name).write_bytes(b"" if kind == "zero_bytes" else "not an image \u2603".encode() * r.randint(1, 50))
        return Fuzzed({"id": rid, "image": name, "conversations": _conversation(r, True)}, INVALID, kind, image=name)
    if kind == "missing_file":
        return Fuzzed({"id": rid, "image": f"gone_{rid}.png", "conversations": _conversation(r, True)}, INVALID, kind)
    if kind == "escape":
        path = r.choice(
            ["../outside.png", "/etc/hostname", "sub/../../outside.png", str(images.parent / "outside.png")]
        )
        return Fuzzed({"id": rid, "image": path, "conversations": _conversation(r, True)}, INVALID, kind)
    if kind in JSON_FAMILIES:
        return _json_family(r, rid, kind)
    if kind == "exotic":
        fmt = r.choice(sorted(EXOTIC))
        data, rgb, expect = make_exotic(fmt, r.randint(8, 40), r.randint(8, 40), r.randrange(2**32))
        name = f"{rid}.{EXOTIC[fmt]}"
        (images / name).write_bytes(data)
        rec = {"id": rid, "image": name, "conversations": _conversation(r, True)}
        return Fuzzed(rec, expect, f"exotic:{fmt}", rgb if expect == VALID else None, name, data)
    if kind == "not_a_dict":
        return Fuzzed(r.choice([[], "record", 7, None, 2.5, [{"from": "human"}]]), INVALID, kind)
    if kind == "no_conversations":
        return Fuzzed(r.choice([{"id": rid}, {"id": rid, "conversation": _conversation(r, False)}, {}]), INVALID, kind)
    if kind == "conv_not_list":
        return Fuzzed({"id": rid, "conversations": r.choice(["text", 3, {"from": "human"}, None])}, INVALID, kind)
    conv = _conversation(r, False)
    if kind == "turn_missing_key":
        del conv[-1][r.choice(["from", "value"])]
        return Fuzzed({"id": rid, "conversations": conv}, INVALID, kind)
    if kind == "value_wrong_type":
        conv[r.randrange(len(conv))]["value"] = r.choice([7, None, ["a"], {"v": 1}, 1.5, True])
        return Fuzzed({"id": rid, "conversations": conv}, INVALID, kind)
    if kind == "image_wrong_type":
        rec = {"id": rid, "image": r.choice([7, ["a.png"], {"p": 1}, True]), "conversations": _conversation(r, True)}
        return Fuzzed(rec, INVALID, kind)
    if kind == "odd_text":
        conv[r.randrange(len(conv))]["value"] = r.choice(ODD_TEXT)
        return Fuzzed({"id": rid, "conversations": conv}, EITHER, kind)
    conv[r.randrange(len(conv))]["from"] = r.choice(["system", "user", "assistant", "", "GPT", "\u4eba"])
    return Fuzzed({"id": rid, "conversations": conv}, EITHER, kind)


# ---------------------------------------------------------------- payloads planted in checkpoints (issue 19)

PAYLOAD_FILE = "__payload.distcp"  # where a planted bytes item's pickle is written, beside DCP's own files


class Returns:
    """Unpickling this creates `marker` and then evaluates to `value` (a Python expression): a payload that hands the
    reader what it expected (a learning rate, a tensor), so that the run goes on and nothing looks wrong."""

    def __init__(self, marker: Path, value: str = "None"):
        self.marker, self.value = marker, value

    def __reduce__(self):
        return eval, (f"__import__('pathlib').Path({str(self.marker)!r}).write_text('pwned') and ({self.value})",)


def replace_file(path: Path, data: bytes) -> None:
    """Write `data` as a new file at `path` (a hard link to a shared copy is broken, not written through)."""
    path = Path(path)
    path.unlink(missing_ok=True)
    path.write_bytes(data)


def linked_copy(src: Path, dst: Path, link_over: int = 1 << 20) -> Path:
    """A copy of a run or checkpoint folder whose files over `link_over` bytes are hard links (the DCP shards: read
    only, replaced as a whole by `replace_file`), the others real copies (metrics.jsonl is appended to)."""
    import shutil

    def copy(s, d):
        return os.link(s, d) if os.path.getsize(s) > link_over else shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=copy)
    return Path(dst)


def _read_item(ckpt: Path, info):
    import torch

    with open(Path(ckpt) / info.relative_path, "rb") as f:
        f.seek(info.offset)
        return torch.load(io.BytesIO(f.read(info.length)), weights_only=True)


def _tensor_expr(t) -> str:
    return (
        f"__import__('torch').tensor({t.flatten().tolist()!r}, dtype=__import__('torch').{str(t.dtype)[6:]})"
        f".reshape({tuple(t.shape)!r})"
    )


def plant_bytes_item(ckpt: Path, marker: Path, kind: str) -> str:
    """Point one item of a checkpoint's `.metadata` at a pickle that runs code, keeping `.metadata` to DCP's own
    classes, and rewrite the manifest to match. kind: "param_group" (an optimizer param_groups value, the payload
    returning its value), "model" (a model tensor declared as bytes, the payload returning the tensor) or
    "extra_model" (a new bytes entry under model.). Returns the key."""
    import pickle

    import torch
    from torch.distributed.checkpoint import metadata as m
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    from fastross import checkpoint

    ckpt = Path(ckpt)
    md = checkpoint.read_metadata(ckpt / ".metadata")
    sd = md.state_dict_metadata
    if kind == "param_group":
        key = sorted(
            k
            for k, v in sd.items()
            if k.startswith("optim.param_groups.") and k.endswith(".lr") and isinstance(v, m.BytesStorageMetadata)
        )[0]
        value = repr(float(_read_item(ckpt, md.storage_data[m.MetadataIndex(key)])))
    elif kind == "model":
        key = min(
            (
                k
                for k, v in sd.items()
                if k.startswith("model.") and isinstance(v, m.TensorStorageMetadata) and len(v.chunks) == 1
            ),
            key=lambda k: (sd[k].size.numel(), k),
        )
        chunk = sd[key].chunks[0]
        old = m.MetadataIndex(key, chunk.offsets, 0)
        info = md.storage_data.pop(old)
        value = _tensor_expr(_read_item(ckpt, info))
        sd[key] = m.BytesStorageMetadata()
    elif kind == "extra_model":
        key, value = "model.payload", "None"
        sd[key] = m.BytesStorageMetadata()
        if isinstance(md.planner_data, dict):  # DCP's flattened key -> path in the nested state dict
            md.planner_data[key] = ("model", "payload")
    else:
        raise ValueError(f"plant_bytes_item: unknown kind {kind!r}")
    buf = io.BytesIO()
    torch.save(Returns(marker, value), buf)
    replace_file(ckpt / PAYLOAD_FILE, buf.getvalue())
    md.storage_data[m.MetadataIndex(key)] = _StorageInfo(PAYLOAD_FILE, 0, len(buf.getvalue()))
    replace_file(ckpt / ".metadata", pickle.dumps(md))
    checkpoint.write_manifest(ckpt)
    return key


def plant_file(ckpt: Path, name: str, marker: Path) -> None:
    """A checkpoint file replaced by a payload (`.metadata` and trainer.json as a bare pickle, rng_rank0.pt as a
    torch.save), the manifest rewritten to match: integrity is not authorship."""
    import pickle

    import torch

    from fastross import checkpoint

    if name == "rng_rank0.pt":
        buf = io.BytesIO()
        torch.save({"torch": RunsCode(marker)}, buf)
        data = buf.getvalue()
    else:
        data = pickle.dumps(RunsCode(marker))
    replace_file(Path(ckpt) / name, data)
    checkpoint.write_manifest(Path(ckpt))


def yaml_tag(marker: Path) -> str:
    """A YAML line whose tag runs code under yaml.load/unsafe_load/full_load (safe_load refuses it)."""
    return f"payload: !!python/object/apply:exec [\"open({str(marker)!r}, 'w').write('pwned')\"]\n"


def plant_yaml(path: Path, marker: Path, manifest: bool = True) -> None:
    """Append a code-running tag to a YAML file (a checkpoint's config.yaml: its manifest rewritten to match)."""
    from fastross import checkpoint

    path = Path(path)
    replace_file(path, path.read_bytes() + yaml_tag(marker).encode())
    if manifest and (path.parent / checkpoint.MANIFEST).is_file():
        checkpoint.write_manifest(path.parent)


def plant_reference(folder: Path, marker: Path) -> Path:
    """A reference ROSS stage-1 folder whose mm_projector.bin is a torch.save holding a payload."""
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"model.mm_projector.0.weight": Returns(marker, "0")}, folder / "mm_projector.bin")
    return folder


# ---------------------------------------------------------------- judging an entry point's answer to a tampered file

CAUGHT, RECOVERED, SILENT, UNNAMED = "caught", "recovered", "silent", "refused without naming the file"


def judge(rc: int, said: str, names: list[str], same) -> str:
    """What an entry point did with a tampered file: CAUGHT (it failed, and what it said names the file), RECOVERED
    (it succeeded, and `same()` -- its result equals the untampered run's), else SILENT (it succeeded with another
    result) or UNNAMED (it failed without naming the file). Judged on the exit and the file's name only, not on
    the wording."""
    if rc != 0:
        return CAUGHT if any(n in said for n in names) else UNNAMED
    return RECOVERED if same() else SILENT


# ---------------------------------------------------------------- JSON-level families and exotic image formats

JSON_FAMILIES = ("lone_surrogate", "deep_nesting", "wrong_types", "duplicate_keys")
DEEP = 100_000  # nesting depth of a deep_nesting record: past any recursive parser's stack


def _json_family(r: random.Random, rid: str, kind: str) -> Fuzzed:
    """A record only its JSON text can hold: a lone surrogate (in the id: it cannot be written as UTF-8, so skipped;
    in a value: either), nesting DEEP levels deep (skipped), wrong JSON types in a turn (skipped) or duplicate keys
    (JSON's last one wins: either)."""
    conv = _conversation(r, False)
    if kind == "lone_surrogate":
        if r.random() < 0.5:
            return Fuzzed(
                {"id": rid + r.choice(["\ud800", "\udfff", "\udc80x"]), "conversations": conv},
                INVALID,
                "lone_surrogate:id",
            )
        conv[r.randrange(len(conv))]["value"] += r.choice(["\ud800", "\udbff", "\udc00"])
        return Fuzzed({"id": rid, "conversations": conv}, EITHER, "lone_surrogate:value")
    if kind == "deep_nesting":
        where = r.choice(["conversations", "value"])
        deep = "[" * DEEP + "]" * DEEP
        if where == "conversations":
            raw = f'{{"id": {json.dumps(rid)}, "conversations": {deep}}}'
        else:
            raw = f'{{"id": {json.dumps(rid)}, "conversations": [{{"from": "human", "value": {deep}}}]}}'
        return Fuzzed({"id": rid, "conversations": f"<{DEEP} levels>"}, INVALID, f"deep_nesting:{where}", raw=raw)
    if kind == "wrong_types":
        turn = conv[r.randrange(len(conv))]
        how = r.choice(["from", "turn", "conversations_dict", "id"])
        if how == "from":
            turn["from"] = r.choice([7, None, ["human"], {"human": 1}, False])
        elif how == "turn":
            conv[r.randrange(len(conv))] = r.choice(["human: hi", 3, None, [["from", "human"]]])
        elif how == "conversations_dict":
            return Fuzzed(
                {"id": rid, "conversations": {str(k): t for k, t in enumerate(conv)}},
                INVALID,
                "wrong_types:conversations_dict",
            )
        else:
            bad_id = r.choice([["a"], {"id": rid}])  # no string form a sample could be keyed by
            return Fuzzed({"id": bad_id, "conversations": conv}, INVALID, "wrong_types:id")
        return Fuzzed({"id": rid, "conversations": conv}, INVALID, f"wrong_types:{how}")
    # duplicate_keys: the parsed record is the last value of each key (json.loads, like most parsers)
    first = _conversation(r, False)
    if r.random() < 0.5:
        raw = f'{{"id": {json.dumps(rid)}, "conversations": {json.dumps(first)}, "conversations": {json.dumps(conv)}}}'
    else:
        raw = f'{{"id": "other_{rid}", "conversations": {json.dumps(conv)}, "id": {json.dumps(rid)}}}'
    return Fuzzed({"id": rid, "conversations": conv}, EITHER, "duplicate_keys", raw=raw)


# format -> file suffix. Formats outside LLaVA's (PNG, JPEG, WebP, GIF, BMP, TIFF) must be skipped; an animated
# file's first frame is its image; 16-bit TIFF is scaled as 16-bit PNG is (>> 8); float TIFF may go either way.
EXOTIC = {
    "EPS": "eps",
    "PDF": "pdf",
    "SVG": "svg",
    "ICO": "ico",
    "GIF_animated": "gif",
    "WEBP_animated": "webp",
    "APNG": "png",
    "TIFF16": "tif",
    "TIFF_float": "tif",
}


def make_exotic(fmt: str, h: int, w: int, seed: int) -> tuple[bytes, np.ndarray | None, str]:
    """(file bytes, the 8-bit RGB pixels its image must give or None, VALID / INVALID / EITHER), made with Pillow
    and numpy here (no downloads)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    if fmt == "SVG":
        return (
            (
                f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}"><rect width="{w}" height="{h}" '
                f'fill="#{rgb[0, 0, 0]:02x}{rgb[0, 0, 1]:02x}{rgb[0, 0, 2]:02x}"/></svg>'
            ).encode(),
            None,
            INVALID,
        )
    if fmt in ("EPS", "PDF", "ICO"):
        Image.fromarray(rgb, "RGB").save(buf, fmt, **({"sizes": [(w, h)]} if fmt == "ICO" else {}))
        return buf.getvalue(), None, INVALID
    if fmt == "GIF_animated":
        palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
        frames = []
        for _ in range(3):
            f = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "P")
            f.putpalette(palette.tobytes())
            frames.append(f)
        frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], optimize=False, duration=50, loop=0)
        return buf.getvalue(), palette[np.asarray(frames[0])], VALID
    if fmt in ("WEBP_animated", "APNG"):
        frames = [Image.fromarray(rgb, "RGB")] + [
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(2)
        ]
        kind, extra = ("WEBP", {"lossless": True}) if fmt == "WEBP_animated" else ("PNG", {})
        frames[0].save(buf, kind, save_all=True, append_images=frames[1:], duration=50, loop=0, **extra)
        return buf.getvalue(), rgb, VALID
    if fmt == "TIFF16":
        a = rng.integers(0, 65536, (h, w), dtype=np.uint16)
        Image.fromarray(a).save(buf, "TIFF")
        return buf.getvalue(), np.repeat((a >> 8).astype(np.uint8)[..., None], 3, axis=2), VALID
    if fmt == "TIFF_float":
        Image.fromarray(rng.random((h, w), dtype=np.float32) * 255, "F").save(buf, "TIFF")
        return buf.getvalue(), None, EITHER
    raise ValueError(f"make_exotic: unknown format {fmt!r}")
