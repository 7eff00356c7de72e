"""The MDS shard columns fastross writes and reads, and the metadata file beside them."""

from __future__ import annotations

import json
from pathlib import Path

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


def decode_latent(raw: bytes, meta: dict):
    """Stored latent moment bytes -> float32 array (C, 2g, 2g)."""
    import numpy as np

    side = 2 * meta["grid"]
    arr = np.frombuffer(raw, dtype=meta["latent_dtype"]).reshape(meta["latent_channels"], side, side)
    return arr.astype(np.float32)


LENGTHS_FILE = "lengths.npy"  # int32 total length (text + visual tokens) of every sample, in order
