"""The MDS shard columns fastross writes and reads, and the metadata file beside them
(`read_meta`: the converter's whole report as a dict; `ShardMeta`: the typed facts training uses),
and the integrity facts a shard folder carries: the tokenizer's fingerprint, the VAE's latent
constants and each shard file's hash in index.json (`check_shard_file`).

Shards written before these existed are refused with a message to convert again: there is no
fallback that could guess which tokenizer or VAE scaling they were made with.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import xxhash

COLUMNS = {
    "id": "str",  # the record's id from the source JSON (or its line/position)
    "index": "int",  # position among the written samples: keys the sample's noise
    "input_ids": "ndarray:int32",  # text token ids; one `<image>` id stands for the whole image
    "labels": "ndarray:int32",  # input_ids with every non-assistant token set to -100
    "image": "bytes",  # the image file's bytes as read (empty for text-only samples)
    "length": "int",  # total tokens once the image expands: text + visual tokens
    "latent_mean": "bytes",  # VAE posterior mean, raw (C, 2g, 2g) of meta's latent_dtype; empty without
    "latent_std": "bytes",  # VAE posterior std, likewise
}
META_FILE = "fastross.json"  # conversion settings and counts, written beside the shards
SHARD_HASH = "xxh64"  # the hash MDSWriter records per shard file in index.json (streaming's name; xxhash's function)


class ShardCorruptError(ValueError):
    pass


def tokenizer_fingerprint(tokenizer) -> dict:
    """What identifies a tokenizer's ids: a hash of its whole vocabulary (added tokens included) and its special ids."""
    vocab = sorted(tokenizer.get_vocab().items())
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]
    special = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in sorted(tokenizer.special_tokens_map.items())
               if isinstance(tok, str)}
    return {"vocab_sha256": digest, "vocab_size": len(vocab), "special_ids": special}


def check_shard_file(folder: str | Path, shard: dict) -> str | None:
    """One index.json shard entry -> None when its raw file has the recorded size and hash, else what is wrong.

    Reads the whole file: call it once per shard, when the shard is first opened.
    """
    raw = shard["raw_data"]
    path = Path(folder) / raw["basename"]
    expected = (raw.get("hashes") or {}).get(SHARD_HASH)
    if expected is None:
        return f"{path}: index.json records no {SHARD_HASH} hash; convert the data again with fastross.data.convert"
    try:
        data = path.read_bytes()
    except OSError as e:
        return f"{path}: cannot be read ({e.strerror})"
    if len(data) != raw["bytes"]:
        return f"{path}: {len(data)} bytes, index.json records {raw['bytes']}"
    if xxhash.xxh64(data).hexdigest() != expected:
        return f"{path}: its {SHARD_HASH} hash differs from index.json's: the file is corrupt"
    return None


def corrupt_shards(folder: str | Path) -> list[tuple[range, str]]:
    """Check every shard file of `folder` against index.json: (the sample ids it holds, the problem) per bad one.
    An intact file whose own sample count differs from index.json's raises ShardCorruptError: the index is wrong."""
    index_path = Path(folder) / "index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path} is missing: {folder} is not a folder of MDS shards")
    bad, start = [], 0
    for shard in json.loads(index_path.read_text())["shards"]:
        problem = check_shard_file(folder, shard)
        if problem is not None:
            bad.append((range(start, start + shard["samples"]), problem))
        elif (held := _samples_held(folder, shard)) != shard["samples"]:
            # The file is intact but index.json is not: every later sample id would be off. Not skippable.
            raise ShardCorruptError(
                f"{Path(folder) / shard['raw_data']['basename']}: holds {held} samples, {index_path} records "
                f"{shard['samples']}: index.json was edited or belongs to other shards; convert the data again"
            )
        start += shard["samples"]
    return bad


def _samples_held(folder: str | Path, shard: dict) -> int:
    """The sample count an MDS shard file states in its first 4 bytes (little-endian uint32)."""
    with open(Path(folder) / shard["raw_data"]["basename"], "rb") as f:
        return int.from_bytes(f.read(4), "little")


def read_meta(shards: str | Path) -> dict:
    path = Path(shards) / META_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: {shards} was not written by `python -m fastross.data.convert`"
        )
    return json.loads(path.read_text())


@dataclass(frozen=True)
class ShardMeta:
    """The facts about a shard folder that training needs, typed (read from its fastross.json)."""

    template: str  # prompt template the converter used
    image_aspect: str  # "pad" (mean-colour square first) or "square"
    grid: int  # vision patch grid g: an image is g * g visual tokens
    image_token_id: int  # the `<image>` token id
    latents: bool  # the samples carry VAE latent moments
    latent_channels: int | None  # C of the stored moments (None without latents)
    latent_shift: float | None  # the encoding VAE's shift factor (None without latents)
    latent_scale: float | None  # the encoding VAE's scaling factor (None without latents)
    latent_dtype: str  # numpy dtype of the stored moments
    tokenizer: str  # the tokenizer folder the converter used (for messages)
    tokenizer_fingerprint: dict  # schema.tokenizer_fingerprint of that tokenizer

    @property
    def num_visual_tokens(self) -> int:
        return self.grid * self.grid

    @classmethod
    def read(cls, shards: str | Path) -> "ShardMeta":
        meta = read_meta(shards)
        try:
            return cls(**{f.name: meta[f.name] for f in fields(cls)})
        except KeyError as e:
            raise ValueError(
                f"{Path(shards) / META_FILE} has no {e.args[0]!r}: convert the data again with "
                "`python -m fastross.data.convert`"
            ) from None

    def decode_latent(self, raw: bytes) -> np.ndarray:
        """Stored latent moment bytes -> float32 array (C, 2g, 2g)."""
        side = 2 * self.grid
        return np.frombuffer(raw, dtype=self.latent_dtype).reshape(self.latent_channels, side, side).astype(np.float32)


LENGTHS_FILE = "lengths.npy"  # int32 total length (text + visual tokens) of every sample, in order
