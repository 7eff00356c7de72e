"""LLaVA-format JSON/JSONL + an image folder -> MosaicML MDS shards for fastross.

    python -m fastross.data.convert --json FILE [FILE ...] --images DIR --tokenizer DIR \
        --template plain|qwen2_ross|vicuna_v1|llama3|hf --vision DIR [--vae DIR [--device cuda] [--vae-batch 16]] \
        [--part I/N] [--reference-labels] --out DIR

Each record is tokenised with the stage's template (ROSS_SPEC.md section 8), every
non-assistant token masked in the labels, and written with its image bytes, its total
length (text + visual tokens) and, with --vae, the VAE posterior's mean and std of the image
exactly as the vision tower will see it. Every record is accounted for: a record that cannot
be used is skipped and counted by reason (`written + skipped == read`), the counts printed and
written to OUT/fastross.json; --strict stops at the first one instead, naming it.

Untrusted input stays in its place: an image path must resolve (symlinks followed) inside
--images, or the record is skipped as `outside_images_root` (--allow-outside-images turns this
off). Everything that touches one record, the image decode, the processor and the VAE included,
is handled per record, so one bad record never ends a conversion. The shards are written to a
sibling folder `.OUT.partial` and moved to OUT only when complete: an interrupted or --strict run
leaves OUT as it was, and the same command starts over (--overwrite replaces a finished OUT).

At scale: several --json files are one sequence of records, numbered from 0 across the files in order.
The VAE encodes --vae-batch images per forward on --device. `--part I/N` converts only the I-th
contiguous 1/N of that sequence (separate processes or machines, each its own --out), and
`python -m fastross.data.merge` joins the parts into the data set one run would have written.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fastross.data import templates
from fastross.data.images import ImageError, ImageSpec, decode, latent_moments, preprocess, preprocess_pil
from fastross.data.progress import progress
from fastross.data.schema import COLUMNS, LENGTHS_FILE, META_FILE, SHARD_HASH, tokenizer_fingerprint, write_manifest
from fastross.data.shards import MDSWriter
from fastross.towers import TowerError, read_tower

SKIP_REASONS = (
    "malformed",
    "missing_image",
    "outside_images_root",
    "bad_image",
    "image_too_small",
    "image_too_large",
    "image_mismatch",
    "placeholder_without_image",
    "image_without_placeholder",
    "extra_placeholders",
    "no_supervised_tokens",
    "template_mismatch",
    "too_long",
    "vae_error",
    "record_error",
)


class ConvertError(RuntimeError):
    pass


@dataclass
class Skip(Exception):
    reason: str
    detail: str


@dataclass
class Report:
    read: int = 0
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=lambda: defaultdict(list))

    def skip(self, rid: str, s: Skip) -> None:
        self.skipped[s.reason] += 1
        if len(self.examples[s.reason]) < 5:
            self.examples[s.reason].append(f"{rid}: {s.detail}")

    def summary(self) -> str:
        parts = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())) or "none"
        return f"convert: read {self.read}, written {self.written}, skipped {sum(self.skipped.values())} ({parts})"


MAX_JSON_DEPTH = 64  # a record nested deeper than this is malformed (LLaVA's are 4 deep: record, list, turn, value)


def read_text(path: Path) -> str:
    """A --json file's text; one that is not UTF-8 is a ConvertError naming it."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConvertError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None


def check_value(value, depth: int = 1) -> None:
    """Raise Skip("malformed") for a parsed record nested deeper than MAX_JSON_DEPTH or holding a string (key or
    value) with a lone surrogate (JSON's "\\ud800" escapes parse, but no UTF-8 writer can store them)."""
    if depth > MAX_JSON_DEPTH:
        raise Skip("malformed", f"nested deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise Skip("malformed", f"a string holds a lone surrogate ({value[e.start]!r} at {e.start})") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            check_value(k, depth + 1)
            check_value(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            check_value(v, depth + 1)


def parse_record(text: str):
    """One record's JSON text -> the record, or a Skip: invalid JSON, too deep, lone surrogates."""
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as e:
        return Skip("malformed", f"invalid JSON: {e.msg}")
    except RecursionError:
        return Skip("malformed", f"nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        check_value(rec)
    except Skip as s:
        return s
    except RecursionError:  # not reached below MAX_JSON_DEPTH; kept so that no record can end the run
        return Skip("malformed", f"nested deeper than {MAX_JSON_DEPTH} levels")
    return rec


def _value_end(text: str, at: int) -> int:
    """The end of the JSON value starting at `at` (an object or array), by matching brackets outside strings: how a
    record too deep for Python's parser is stepped over."""
    depth, i, n = 0, at, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise ValueError("unterminated value")


def load_array(path: Path) -> list:
    """A JSON file's array of records, each parsed on its own (a record or a Skip): the whole file is read (JSON
    arrays cannot be streamed), but a record nested too deep or holding a lone surrogate is that record's skip."""
    text = read_text(path)
    decoder, ws = json.JSONDecoder(), " \t\n\r"

    def bad(at: int, msg: str):
        line = text.count("\n", 0, at) + 1
        return ConvertError(
            f"{path}: not valid JSON (line {line}, column {at - text.rfind(chr(10), 0, at)}: {msg}); "
            "JSON Lines files must end in .jsonl"
        )

    i = len(text) - len(text.lstrip(ws))
    if i == len(text) or text[i] != "[":
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise bad(e.pos, e.msg) from None
        except RecursionError:
            raise ConvertError(f"{path}: nested too deeply to be an array of records") from None
        raise ConvertError(f"{path}: expected a JSON array of records, got {type(value).__name__}")
    records, i = [], i + 1
    while True:
        while i < len(text) and text[i] in ws:
            i += 1
        if i < len(text) and text[i] == "]" and not records:
            i += 1
            break
        try:
            rec, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise bad(e.pos, e.msg) from None
        except RecursionError:
            try:
                end = _value_end(text, i)
            except ValueError:
                raise bad(i, "unterminated value") from None
            records.append(Skip("malformed", f"nested deeper than {MAX_JSON_DEPTH} levels"))
        else:
            try:
                check_value(rec)
                records.append(rec)
            except Skip as s:
                records.append(s)
        i = end
        while i < len(text) and text[i] in ws:
            i += 1
        if i < len(text) and text[i] == ",":
            i += 1
            continue
        if i < len(text) and text[i] == "]":
            i += 1
            break
        raise bad(i, "expected ',' or ']'")
    if text[i:].strip(ws):
        raise bad(i, "extra data")
    return records


def jsonl_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of a JSONL file's records: its non-blank lines."""
    return [(no, line) for no, line in enumerate(read_text(path).splitlines(), 1) if line.strip()]


def count_records(path: Path) -> int:
    return len(jsonl_lines(path)) if path.suffix == ".jsonl" else len(load_array(path))


def read_records(path: Path, label: str, start: int = 0, stop: int | None = None):
    """Yield (record id for messages, record or a Skip) for the file's records start .. stop - 1.

    Records are numbered from 0 in file order (a JSONL file's blank lines are not records); only those
    in the range are parsed. `label` names the file in the record ids: `label[i]`, or `label:line` for JSONL.
    """
    if path.suffix == ".jsonl":
        for line_no, line in jsonl_lines(path)[start:stop]:
            yield f"{label}:{line_no}", parse_record(line)
        return
    records = load_array(path)
    for i in range(start, len(records) if stop is None else min(stop, len(records))):
        yield f"{label}[{i}]", records[i]


@dataclass
class Sources:
    """The --json files as one sequence of records, numbered from 0 across the files in the order given."""

    paths: list[Path]
    labels: list[str]  # how record ids name each file: its name, or its path where two files share a name
    counts: list[int]  # records per file

    @classmethod
    def open(cls, paths: list[str]) -> Sources:
        paths = [Path(p) for p in paths]
        for p in paths:
            if not p.is_file():
                raise ConvertError(f"--json {p} does not exist")
        names = [p.name for p in paths]
        labels = [p.name if names.count(p.name) == 1 else str(p) for p in paths]
        return cls(paths, labels, [count_records(p) for p in paths])

    @property
    def total(self) -> int:
        return sum(self.counts)

    def read(self, start: int, stop: int):
        """Yield (record id, record or Skip) for the records numbered start .. stop - 1 across the files."""
        first = 0
        for path, label, count in zip(self.paths, self.labels, self.counts):
            lo, hi = max(start - first, 0), min(stop - first, count)
            if lo < hi:
                yield from read_records(path, label, lo, hi)
            first += count


def parse_part(text: str) -> tuple[int, int]:
    """`I/N` -> (I, N): part I (0 .. N - 1) of a conversion split into N."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--part {text!r}: expected I/N, e.g. 0/4 (parts count from 0)") from None
    if not (n >= 1 and 0 <= i < n):
        raise argparse.ArgumentTypeError(f"--part {text!r}: I must be in 0 .. N - 1 and N at least 1")
    return i, n


def part_range(total: int, part: int, parts: int) -> tuple[int, int]:
    """The contiguous records [start, stop) part `part` of `parts` converts: concatenated in part order they are
    all `total` records in order, so merging the parts keeps the one-part conversion's order."""
    return total * part // parts, total * (part + 1) // parts


def resolve_device(name: str | None) -> torch.device:
    """--device, or cuda when a GPU is present, else cpu; a named device that is not there is an error."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise ConvertError(f"--device {name}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConvertError(f"--device {name}: no CUDA device is available (use --device cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConvertError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA devices")
    return device


def write_staged(out: Path, overwrite: bool, write) -> None:
    """Call write(stage) on a new sibling folder `.OUT.partial` and move it to `out` only when it returns: an
    interrupted or failed write leaves `out` as it was. A finished `out` is replaced only with `overwrite`, and
    only if it holds fastross.json (a folder this package wrote)."""
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConvertError(f"{out} is not empty: choose a new --out folder, or pass --overwrite to replace it")
        if not (out / META_FILE).is_file():
            raise ConvertError(f"{out} holds no {META_FILE}: --overwrite replaces only a folder the converter wrote")
    stage = out.parent / f".{out.name}.partial"
    if stage.exists():  # an interrupted run's: start over
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    try:
        write(stage)
    except OSError as e:  # a full disk, a lost mount: the folder being written is named, OUT is as it was
        shutil.rmtree(stage, ignore_errors=True)
        raise ConvertError(
            f"writing the shards into {stage} failed ({e}); {out} is as it was: free space and "
            "run the same command again"
        ) from e
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    stage.rename(out)


def load_vae(path: str, device: torch.device):
    """The AutoencoderKL in fp32 on `device`. On a GPU TF32 convolutions are turned off (this process only) so
    that the moments are fp32's on any device: parts converted on a CPU and on a GPU then agree within fp32's
    rounding."""
    from diffusers import AutoencoderKL

    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return AutoencoderKL.from_pretrained(path, torch_dtype=torch.float32).eval().to(device)


class Converter:
    def __init__(self, a):
        self.a = a
        self.images = Path(a.images).resolve()
        if not self.images.is_dir():
            raise ConvertError(f"--images {a.images} is not a folder")
        self.tokenizer = templates.load_tokenizer(a.tokenizer)
        templates.check_tokenizer(a.template, self.tokenizer, a.tokenizer)
        if a.reference_labels and templates.canonical(a.template) == "hf":
            raise ConvertError(
                f"--reference-labels: the reference has no template {a.template} (the tokenizer's "
                "own chat template); it applies to plain, qwen2_ross, vicuna_v1 and llama3"
            )
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(templates.IMAGE_TOKEN)
        self.fingerprint = tokenizer_fingerprint(self.tokenizer)  # once: it sorts and serialises the whole vocabulary
        try:
            tower = read_tower(a.vision)
        except TowerError as e:
            raise ConvertError(f"--vision: {e}") from None
        self.image_spec = ImageSpec.from_pretrained(a.vision)
        self.grid, self.num_visual = tower.grid, tower.num_tokens
        self.aspect = a.image_aspect if a.image_aspect != "auto" else ("square" if a.template == "plain" else "pad")
        self.vae, self.device = None, resolve_device(a.device)
        if a.vae:
            self.vae = load_vae(a.vae, self.device)
        self.latent_dtype = np.dtype(a.latent_dtype)

    def prepare(self, rid: str, rec) -> dict:
        """One record -> a sample dict (without latents), or raise Skip."""
        if isinstance(rec, Skip):
            raise rec
        if not isinstance(rec, dict) or not isinstance(rec.get("conversations"), list):
            raise Skip("malformed", "not an object with a 'conversations' list")
        rid_in = rec.get("id", rid)
        if not isinstance(rid_in, (str, int)) or isinstance(rid_in, bool):  # a list or object has no one string form
            raise Skip("malformed", f"its id is a {type(rid_in).__name__}, not a string or an integer")
        image = rec.get("image")
        if image is not None and not isinstance(image, str):
            raise Skip("malformed", "'image' must be one relative path (multi-image records are not supported)")
        try:
            rendered = templates.render(
                self.a.template, rec["conversations"], bool(image), self.tokenizer, self.a.reference_labels
            )
        except templates.TemplateError as e:
            raise Skip(e.reason, str(e)) from None
        ids, labels = templates.tokenize(rendered, self.tokenizer)
        if not (labels != templates.IGNORE).any():
            raise Skip("no_supervised_tokens", "no assistant token survives the template")
        data, pixels = b"", None
        if image:
            data = self.read_image(image)
            try:
                checked = preprocess_pil(
                    decode(data, min_side=self.a.min_image_side, max_pixels=self.a.max_image_pixels),
                    self.image_spec,
                    self.aspect,
                )
            except ImageError as e:
                raise Skip(e.reason, f"{image}: {e}") from None
            # What the loader will compute from the stored bytes must be what was checked here.
            pixels = preprocess(data, self.image_spec, self.aspect)
            if not torch.equal(pixels, checked):
                raise Skip("image_mismatch", f"{image}: the stored bytes decode to other pixels than those checked")
        length = len(ids) + (self.num_visual - 1 if image else 0)
        if length > self.a.max_length:
            raise Skip("too_long", f"{length} tokens > --max-length {self.a.max_length}")
        rid_out = str(rid_in)
        try:
            rid_out.encode("utf-8")
        except UnicodeEncodeError:
            raise Skip("malformed", "its id holds a lone surrogate") from None
        return {
            "id": rid_out,
            "input_ids": ids,
            "labels": labels,
            "image": data,
            "length": length,
            "_pixels": pixels,
            "_rid": rid,
        }

    def read_image(self, image: str) -> bytes:
        """The bytes of a record's image, confined to --images unless --allow-outside-images."""
        path = self.images / image  # an absolute `image` replaces the root here, and is caught below
        resolved = path.resolve()
        if not self.a.allow_outside_images and not resolved.is_relative_to(self.images):
            raise Skip("outside_images_root", f"{image!r} resolves to {resolved}, outside --images {self.images}")
        if not resolved.is_file():
            raise Skip("missing_image", f"{path} does not exist")
        return resolved.read_bytes()

    def latents(self, samples: list[dict]) -> list[tuple[dict, Skip]]:
        """Add latent moment bytes to `samples`; the samples whose VAE encode failed come back with a Skip."""
        with_image = [s for s in samples if s["_pixels"] is not None]
        failed = []
        if self.vae is not None and with_image:
            try:
                moments = self.encode(with_image)
            except Exception:  # find the record(s) at fault: one at a time
                moments = []
                for s in with_image:
                    try:
                        moments += self.encode([s])
                    except Exception as e:
                        failed.append((s, Skip("vae_error", f"{type(e).__name__}: {e}")))
                        moments.append(None)
            for s, md in zip(with_image, moments):
                if md is None:
                    continue
                mean, std = (x.astype(self.latent_dtype) for x in md)  # checked as stored: fp16 may overflow
                if not (np.isfinite(mean).all() and np.isfinite(std).all()):
                    failed.append((s, Skip("vae_error", f"non-finite latent moments in {self.latent_dtype.name}")))
                    continue
                s["latent_mean"], s["latent_std"] = mean.tobytes(), std.tobytes()
        for s in samples:
            s.setdefault("latent_mean", b"")
            s.setdefault("latent_std", b"")
        return failed

    def encode(self, samples: list[dict]) -> list[tuple[np.ndarray, np.ndarray]]:
        """One VAE forward on --device for the batch; the moments come back to the host in fp32."""
        pixels = torch.stack([s["_pixels"] for s in samples]).to(self.device)
        mean, std = latent_moments(self.vae, pixels, self.grid, self.image_spec)
        return list(zip(mean.cpu().numpy(), std.cpu().numpy()))

    def run(self) -> Report:
        """Convert this run's records of --json into --out. The sources are opened here, not in __init__: one
        Converter (its models loaded once) may convert several inputs."""
        report = Report()
        self.sources = Sources.open(self.a.json)
        self.part, self.parts = self.a.part
        self.records = part_range(self.sources.total, self.part, self.parts)
        write_staged(Path(self.a.out), self.a.overwrite, lambda stage: self.write(stage, report))
        return report

    def write(self, out: Path, report: Report) -> None:
        a = self.a
        pending: list[dict] = []
        lengths: list[int] = []

        def skip(rid: str, s: Skip) -> None:
            if a.strict:
                raise ConvertError(f"record {rid}: {s.reason}: {s.detail}")
            report.skip(rid, s)

        def flush(writer):
            failed = self.latents(pending)
            for s, why in failed:
                skip(s["_rid"], why)
            dropped = {id(s) for s, _ in failed}
            for s in (p for p in pending if id(p) not in dropped):
                rid = s.pop("_rid")
                del s["_pixels"]
                s["index"] = report.written
                try:  # encoding a sample is its own: the writer keeps nothing of a sample it could not encode
                    writer.write(s)
                except OSError:  # writing a shard file (a full disk): the run's, handled by write_staged
                    raise
                except Exception as e:
                    skip(rid, Skip("record_error", f"writing it failed ({type(e).__name__}: {e})"))
                    continue
                lengths.append(s["length"])
                report.written += 1
            pending.clear()

        with MDSWriter(out, COLUMNS, size_limit=a.shard_size, hashes=[SHARD_HASH]) as writer:
            start, stop = self.records
            desc = "convert" if self.parts == 1 else f"convert part {self.part}/{self.parts}"
            for rid, rec in progress(
                self.sources.read(start, stop),
                total=stop - start,
                desc=desc,
                unit="rec",
                disable=a.quiet,
                every=a.progress_every,
            ):
                report.read += 1
                try:
                    pending.append(self.prepare(rid, rec))
                except Skip as s:
                    skip(rid, s)
                except Exception as e:  # anything else one record triggers is that record's, never the run's
                    skip(rid, Skip("record_error", f"{type(e).__name__}: {e}"))
                if sum(p["_pixels"] is not None for p in pending) >= a.vae_batch:
                    flush(writer)
            flush(writer)
        assert report.written + sum(report.skipped.values()) == report.read
        np.save(out / LENGTHS_FILE, np.asarray(lengths, dtype=np.int32))
        vae = self.vae.config if self.vae is not None else None
        meta = {
            "source": [str(p) for p in self.sources.paths],
            "records": self.sources.total,
            "part": [self.part, self.parts],
            "record_range": list(self.records),
            "template": a.template,
            "reference_labels": a.reference_labels,
            "image_aspect": self.aspect,
            "grid": self.grid,
            "num_visual_tokens": self.num_visual,
            "image_token_id": self.image_token_id,
            "tokenizer": str(a.tokenizer),
            "tokenizer_fingerprint": self.fingerprint,
            "vision": str(a.vision),
            "vae": str(a.vae) if a.vae else None,
            "latents": vae is not None,
            "latent_channels": int(vae.latent_channels) if vae is not None else None,
            "latent_shift": float(vae.shift_factor or 0.0) if vae is not None else None,
            "latent_scale": float(vae.scaling_factor) if vae is not None else None,
            "latent_dtype": self.latent_dtype.name,
            "max_length": a.max_length,
            "shard_hash": SHARD_HASH,
            "min_image_side": a.min_image_side,
            "max_image_pixels": a.max_image_pixels,
            "read": report.read,
            "written": report.written,
            "skipped": dict(report.skipped),
            "skipped_examples": dict(report.examples),
        }
        (out / META_FILE).write_text(json.dumps(meta, indent=2))
        write_manifest(out)  # last: it covers fastross.json, index.json and lengths.npy


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--json",
        required=True,
        nargs="+",
        action="extend",
        help="LLaVA-format .json (array) or .jsonl; several files (or --json again) are converted as one "
        "sequence of records, in the order given",
    )
    p.add_argument("--images", required=True, help="folder the records' 'image' paths are relative to")
    p.add_argument("--tokenizer", required=True, help="local Hugging Face folder with the tokenizer (the LLM's)")
    p.add_argument("--template", required=True, choices=templates.TEMPLATES)
    p.add_argument(
        "--reference-labels",
        action="store_true",
        help="the reference ROSS code's labels exactly, where fastross's differ on purpose (qwen2_ross: "
        "the conversation's last <|im_end|> unsupervised); for parity studies",
    )
    p.add_argument("--vision", required=True, help="the vision tower's folder (image processor, patch grid)")
    p.add_argument("--vae", default=None, help="AutoencoderKL folder: store latent moments with each sample")
    p.add_argument("--out", required=True, help="new folder for the MDS shards")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it holds a finished conversion")
    p.add_argument(
        "--allow-outside-images",
        action="store_true",
        help="let image paths resolve outside --images (absolute paths, '..', symlinks leading out)",
    )
    p.add_argument("--min-image-side", type=int, default=8, help="skip images with a side below this many pixels")
    p.add_argument(
        "--max-image-pixels",
        type=int,
        default=1 << 26,
        help="skip images of more pixels than this (checked from the header, before decoding)",
    )
    p.add_argument("--max-length", type=int, default=8192, help="skip samples longer than this (visual tokens counted)")
    p.add_argument(
        "--image-aspect",
        default="auto",
        choices=("auto", "pad", "square"),
        help="auto: square for plain (stage 1), pad for the others (stage 2)",
    )
    p.add_argument("--latent-dtype", default="float32", choices=("float32", "float16"))
    p.add_argument("--vae-batch", type=int, default=16, help="images per VAE forward")
    p.add_argument("--device", default=None, help="where the VAE encodes (default: cuda when present, else cpu)")
    p.add_argument(
        "--part",
        type=parse_part,
        default=(0, 1),
        metavar="I/N",
        help="convert only part I (0 .. N-1) of N: a contiguous 1/N of the records, for separate processes "
        "or machines; join the parts' --out folders with `python -m fastross.data.merge`",
    )
    p.add_argument("--shard-size", type=int, default=1 << 26, help="bytes per MDS shard")
    p.add_argument("--strict", action="store_true", help="stop at the first unusable record, naming it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--progress-every",
        type=int,
        default=0,
        metavar="N",
        help="when stderr is not a terminal (a log), a plain progress line every N records instead of a "
        "bar (default 0: ten lines per conversion)",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        report = Converter(a).run()
    except (ConvertError, FileNotFoundError, ValueError) as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    for reason, ex in report.examples.items():
        print(f"  {reason}: e.g. {ex[0]}")
    print(f"convert: wrote {report.written} samples to {a.out} (report in {Path(a.out) / META_FILE})")
    if a.part[1] > 1:
        print(
            f"convert: this is part {a.part[0]}/{a.part[1]}: join all {a.part[1]} parts' folders with "
            "`python -m fastross.data.merge PART_DIR... --out DIR`"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
