"""The converted folders a run trains from (`data.shards`, or `data.sources` mixed by weight), opened.

A source is a local folder or a URL (fastross.data.remote). Opening one verifies its fastross.json, index.json
and lengths.npy against its manifest (fastross.data.schema; a folder without one is refused), then reads them;
a local one also has every shard file hash-checked (a remote's shards are checked as they are
downloaded). All sources of a run must agree on what the model needs from them, field by field of ShardMeta:
the tokenizer, the image grid and token, the image preprocessing, the latents and the template; a mismatch is
refused naming both sources and the field.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from fastross.config import ConfigError, DataConfig, SourceConfig, data_sources, parse_size
from fastross.data.remote import RemoteShards, is_remote
from fastross.data.schema import (
    LENGTHS_FILE,
    META_FILE,
    ShardMeta,
    corrupt_shards,
    read_index,
    read_lengths,
    read_meta,
    verify_folder,
)
from fastross.data.shards import MDSShards

# ShardMeta fields that may differ between mixed sources: the tokenizer folder's path (its fingerprint must agree).
MAY_DIFFER = ("tokenizer",)


@dataclass
class Source:
    name: str  # the folder or URL as configured (for messages)
    weight: float  # relative share of every global batch (data.sources' weight)
    folder: Path  # where index.json, fastross.json and lengths.npy are: the folder, or the remote's cache folder
    remote: bool
    reader: MDSShards
    lengths: np.ndarray  # total tokens of every sample, in the source's own numbering
    shard_samples: np.ndarray  # samples per shard file, in index.json's order
    shard_bytes: np.ndarray  # bytes of each shard file
    corrupt: list[tuple[range, str]]  # shard files whose hash differs from index.json's (local sources only)
    meta: ShardMeta

    @property
    def exclude(self) -> np.ndarray | None:
        """Sample ids of the corrupt shards (left out under data.corrupt_shards=skip)."""
        return np.concatenate([np.arange(r.start, r.stop) for r, _ in self.corrupt]) if self.corrupt else None


def load_lengths(folder: str | Path, name: str | None = None) -> np.ndarray:
    """The folder's lengths.npy, verified against its manifest (fastross.data.schema)."""
    path = Path(folder) / LENGTHS_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: build it with `python -m fastross.data.index {name or folder}` (the converter "
            "writes it)"
        )
    return read_lengths(folder)


def check_shard_facts(d: DataConfig) -> None:
    """What the local sources' fastross.json and lengths.npy say against data.*, checked before any work starts (the
    trainer, right after fastross.config.load; --check; fastross.convert_checkpoint): each file verified against its
    folder's manifest first (an edited one is refused, named), data.global_batch within the samples, data.max_tokens
    room for an image sample. Remote sources, and folders without fastross.json, are the loader's to check (it names
    what is missing). Raises ConfigError."""
    local = [s.shards for s in data_sources(d) if not is_remote(s.shards)]
    metas = {}
    for p in local:
        if (Path(p) / META_FILE).is_file():
            try:
                metas[p] = read_meta(p)
            except (ValueError, OSError) as e:
                raise ConfigError(f"data: {e}") from None
    try:
        counts = [len(read_lengths(p)) for p in local if p in metas and (Path(p) / LENGTHS_FILE).is_file()]
    except (ValueError, OSError) as e:
        raise ConfigError(f"data: {e}") from None
    if len(counts) == len(data_sources(d)) and d.global_batch > sum(counts):
        raise ConfigError(
            f"data.global_batch={d.global_batch} is larger than {', '.join(local)}'s {sum(counts)} samples"
        )
    for p, meta in metas.items():
        visual = meta.get("num_visual_tokens", 0)
        if d.max_tokens < visual + 1:
            raise ConfigError(
                f"data.max_tokens={d.max_tokens} holds no image sample: one image is {visual} visual "
                f"tokens, plus at least one text token ({p})"
            )


def open_source(cfg: SourceConfig, cache_dir: str = "", cache_limit: str | int = 0, check: bool = True) -> Source:
    """check: hash-check every shard file of a local folder now (the trainer's loader; not for quick tools)."""
    remote = is_remote(cfg.shards)
    if remote:
        mirror = RemoteShards(cfg.shards, cache_dir, parse_size(cache_limit))  # the length index first
        folder = mirror.local
    else:
        folder = Path(cfg.shards)
    verify_folder(folder)  # fastross.json, index.json and lengths.npy against its manifest, before any is used
    reader = MDSShards(folder, remote=mirror) if remote else MDSShards(folder)
    # Before the length index is compared with the shards: a shard whose header disagrees with index.json is named
    corrupt = corrupt_shards(folder) if check and not remote else []
    lengths = load_lengths(folder, cfg.shards)
    if len(reader) != len(lengths):
        raise ValueError(
            f"{cfg.shards}: {LENGTHS_FILE} lists {len(lengths)} samples but the shards hold "
            f"{len(reader)}: rebuild it with `python -m fastross.data.index {cfg.shards}`"
        )
    shards = read_index(folder)["shards"]
    return Source(
        cfg.shards,
        cfg.weight,
        folder,
        remote,
        reader,
        lengths,
        np.array([s["samples"] for s in shards], np.int64),
        np.array([s["raw_data"]["bytes"] for s in shards], np.int64),
        corrupt,
        ShardMeta.read(folder),
    )


def open_sources(d: DataConfig, check: bool = True) -> list[Source]:
    """data.sources (or data.shards alone), opened, their metadata agreeing."""
    sources = [open_source(s, d.cache_dir, d.cache_limit, check) for s in data_sources(d)]
    check_agree(sources)
    return sources


def check_agree(sources: list[Source]) -> None:
    """Refuse sources that disagree on anything the model or the collator takes from ShardMeta."""
    first = sources[0]
    for other in sources[1:]:
        for f in fields(ShardMeta):
            a, b = getattr(first.meta, f.name), getattr(other.meta, f.name)
            if f.name not in MAY_DIFFER and a != b:
                raise ConfigError(
                    f"data.sources: {first.name} and {other.name} disagree on {f.name} ({a!r} vs {b!r}): "
                    "every source must be converted with the same tokenizer, vision tower, VAE and template"
                )


def meta_folder(d: DataConfig) -> Path:
    """A local folder holding the run's data facts (fastross.json): the first source's, fetched if remote."""
    first = data_sources(d)[0]
    if is_remote(first.shards):
        return RemoteShards(first.shards, d.cache_dir, parse_size(d.cache_limit)).local
    return Path(first.shards)
