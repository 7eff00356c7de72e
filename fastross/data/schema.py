"""The MDS shard columns fastross writes and reads, and the metadata file beside them
(`read_meta`: the converter's whole report as a dict; `ShardMeta`: the typed facts training uses)."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

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
    latent_dtype: str  # numpy dtype of the stored moments

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
