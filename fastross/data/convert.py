"""LLaVA-format JSON/JSONL + an image folder -> MosaicML MDS shards for fastross.

    python -m fastross.data.convert --json FILE --images DIR --tokenizer DIR \\
        --template plain|qwen2_ross|chatml --vision DIR [--vae DIR] --out DIR

Each record is tokenised with the stage's template (ROSS_SPEC.md section 8), every
non-assistant token masked in the labels, and written with its image bytes, its total
length (text + visual tokens) and, with --vae, the VAE posterior's mean and std of the image
exactly as the vision tower will see it. Every record is accounted for: a record that cannot
be used is skipped and counted by reason (`written + skipped == read`), the counts printed and
written to OUT/fastross.json; --strict stops at the first one instead, naming it.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from fastross.data import templates
from fastross.data.images import ImageSpec, latent_moments, preprocess_pil
from fastross.data.schema import COLUMNS, LENGTHS_FILE, META_FILE
from fastross.data.shards import MDSWriter

SKIP_REASONS = (
    "malformed", "missing_image", "bad_image", "placeholder_without_image",
    "image_without_placeholder", "extra_placeholders", "no_supervised_tokens", "too_long",
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


def read_records(path: Path):
    """Yield (record id for messages, record or a Skip) from a JSON array or a JSONL file."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        for line_no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                yield f"{path.name}:{line_no}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{path.name}:{line_no}", Skip("malformed", f"invalid JSON: {e.msg}")
        return
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConvertError(
            f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); JSON Lines files must end in .jsonl"
        ) from None
    if not isinstance(records, list):
        raise ConvertError(f"{path}: expected a JSON array of records, got {type(records).__name__}")
    for i, rec in enumerate(records):
        yield f"{path.name}[{i}]", rec


class Converter:
    def __init__(self, a):
        self.a = a
        self.tokenizer = templates.load_tokenizer(a.tokenizer)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(templates.IMAGE_TOKEN)
        self.image_spec = ImageSpec.from_pretrained(a.vision)
        vcfg = json.loads((Path(a.vision) / "config.json").read_text())
        vcfg = vcfg.get("vision_config", vcfg)
        self.grid = vcfg["image_size"] // vcfg["patch_size"]
        self.num_visual = self.grid * self.grid
        self.aspect = a.image_aspect if a.image_aspect != "auto" else ("square" if a.template == "plain" else "pad")
        self.vae = None
        if a.vae:
            from diffusers import AutoencoderKL

            self.vae = AutoencoderKL.from_pretrained(a.vae, torch_dtype=torch.float32).eval()
        self.latent_dtype = np.dtype(a.latent_dtype)

    def prepare(self, rid: str, rec) -> dict:
        """One record -> a sample dict (without latents), or raise Skip."""
        if isinstance(rec, Skip):
            raise rec
        if not isinstance(rec, dict) or not isinstance(rec.get("conversations"), list):
            raise Skip("malformed", "not an object with a 'conversations' list")
        image = rec.get("image")
        if image is not None and not isinstance(image, str):
            raise Skip("malformed", "'image' must be one relative path (multi-image records are not supported)")
        try:
            rendered = templates.render(self.a.template, rec["conversations"], bool(image), self.tokenizer)
        except templates.TemplateError as e:
            raise Skip(e.reason, str(e)) from None
        ids, labels = templates.tokenize(rendered, self.tokenizer)
        if not (labels != templates.IGNORE).any():
            raise Skip("no_supervised_tokens", "no assistant token survives the template")
        data, pil = b"", None
        if image:
            path = Path(self.a.images) / image
            if not path.is_file():
                raise Skip("missing_image", f"{path} does not exist")
            data = path.read_bytes()
            try:
                pil = Image.open(io.BytesIO(data))
                pil.load()
            except Exception as e:  # PIL raises many types for broken files
                raise Skip("bad_image", f"{path} cannot be decoded ({type(e).__name__}: {e})") from None
        length = len(ids) + (self.num_visual - 1 if image else 0)
        if length > self.a.max_length:
            raise Skip("too_long", f"{length} tokens > --max-length {self.a.max_length}")
        rid_out = str(rec.get("id", rid))
        return {"id": rid_out, "input_ids": ids, "labels": labels, "image": data, "length": length, "_pil": pil}

    def latents(self, samples: list[dict]) -> None:
        with_image = [s for s in samples if s["_pil"] is not None]
        if self.vae is not None and with_image:
            pix = torch.stack([preprocess_pil(s["_pil"], self.image_spec, self.aspect) for s in with_image])
            mean, std = latent_moments(self.vae, pix, self.grid)
            for s, m, d in zip(with_image, mean.numpy(), std.numpy()):
                s["latent_mean"] = m.astype(self.latent_dtype).tobytes()
                s["latent_std"] = d.astype(self.latent_dtype).tobytes()
        for s in samples:
            s.setdefault("latent_mean", b"")
            s.setdefault("latent_std", b"")

    def run(self) -> Report:
        a, report = self.a, Report()
        out = Path(a.out)
        if out.exists() and any(out.iterdir()):
            raise ConvertError(f"{out} is not empty: choose a new --out folder")
        pending: list[dict] = []
        lengths: list[int] = []

        def flush(writer):
            self.latents(pending)
            for s in pending:
                s.pop("_pil")
                s["index"] = report.written
                writer.write(s)
                lengths.append(s["length"])
                report.written += 1
            pending.clear()

        with MDSWriter(out, COLUMNS, size_limit=a.shard_size) as writer:
            for rid, rec in tqdm(read_records(Path(a.json)), desc="convert", unit="rec", disable=a.quiet):
                report.read += 1
                try:
                    pending.append(self.prepare(rid, rec))
                except Skip as s:
                    if a.strict:
                        raise ConvertError(f"{a.json}: record {rid}: {s.reason}: {s.detail}") from None
                    report.skip(rid, s)
                if sum(p["_pil"] is not None for p in pending) >= a.vae_batch:
                    flush(writer)
            flush(writer)
        assert report.written + sum(report.skipped.values()) == report.read
        np.save(out / LENGTHS_FILE, np.asarray(lengths, dtype=np.int32))
        meta = {
            "source": str(a.json), "template": a.template, "image_aspect": self.aspect,
            "grid": self.grid, "num_visual_tokens": self.num_visual, "image_token_id": self.image_token_id,
            "tokenizer": str(a.tokenizer), "vision": str(a.vision), "vae": str(a.vae) if a.vae else None,
            "latents": self.vae is not None,
            "latent_channels": int(self.vae.config.latent_channels) if self.vae is not None else None,
            "latent_dtype": self.latent_dtype.name, "max_length": a.max_length,
            "read": report.read, "written": report.written,
            "skipped": dict(report.skipped), "skipped_examples": dict(report.examples),
        }
        (out / META_FILE).write_text(json.dumps(meta, indent=2))
        return report


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True, help="LLaVA-format .json (array) or .jsonl")
    p.add_argument("--images", required=True, help="folder the records' 'image' paths are relative to")
    p.add_argument("--tokenizer", required=True, help="local Hugging Face folder with the tokenizer (the LLM's)")
    p.add_argument("--template", required=True, choices=templates.TEMPLATES)
    p.add_argument("--vision", required=True, help="the vision tower's folder (image processor, patch grid)")
    p.add_argument("--vae", default=None, help="AutoencoderKL folder: store latent moments with each sample")
    p.add_argument("--out", required=True, help="new folder for the MDS shards")
    p.add_argument("--max-length", type=int, default=8192, help="skip samples longer than this (visual tokens counted)")
    p.add_argument("--image-aspect", default="auto", choices=("auto", "pad", "square"),
                   help="auto: square for plain (stage 1), pad for the others (stage 2)")
    p.add_argument("--latent-dtype", default="float32", choices=("float32", "float16"))
    p.add_argument("--vae-batch", type=int, default=16, help="images per VAE forward")
    p.add_argument("--shard-size", type=int, default=1 << 26, help="bytes per MDS shard")
    p.add_argument("--strict", action="store_true", help="stop at the first unusable record, naming it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
