"""Build the length index (`lengths.npy`) of MDS shards that lack one.

    python -m fastross.data.index SHARDS

The converter writes the index itself. For other shards this reads every sample's `length`
column: natively from the shard files when they are uncompressed (fastross._native, which
never decodes images or token arrays), else through fastross.data.shards' reader with a progress bar.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from fastross.data.progress import progress
from fastross.data.schema import (
    INDEX_FILE,
    LENGTHS_FILE,
    MANIFEST_FILE,
    META_FILE,
    parse_json,
    verified_bytes,
    write_manifest,
)
from fastross.data.shards import MDSShards

try:  # the native twin; absent only when the package was not built (as fastross.data.packing_planner's NATIVE)
    from fastross import _native
except ImportError:
    _native = None


def native_layout(shards: Path, column: str = "length"):
    """(files, num_var, num_var_before, fixed_before) for the native reader, or None if it cannot read them."""
    index = parse_json(shards / INDEX_FILE)
    files, layout = [], None
    for shard in index["shards"]:
        if shard.get("compression") or shard.get("format") != "mds" or column not in shard["column_names"]:
            return None
        c = shard["column_names"].index(column)
        sizes = shard["column_sizes"]
        if shard["column_encodings"][c] != "int" or sizes[c] != 8:
            return None
        this = (sum(s is None for s in sizes), sum(s is None for s in sizes[:c]), sum(s or 0 for s in sizes[:c]))
        if layout not in (None, this):
            return None
        layout = this
        files.append(str(shards / shard["raw_data"]["basename"]))
    return (files, *layout) if layout else None


def build(shards: str | Path) -> np.ndarray:
    """lengths.npy from the shards. In a folder with a manifest, index.json and fastross.json are verified against
    it first and the manifest then covers the new lengths.npy (the shards it is read from are covered by
    index.json's hashes)."""
    shards = Path(shards)
    manifest = (shards / MANIFEST_FILE).is_file()
    if manifest:
        for name in (INDEX_FILE, META_FILE):
            verified_bytes(shards, name)
    layout = native_layout(shards)
    if layout is not None and _native is not None:
        lengths = _native.read_mds_int_column(*layout).astype(np.int32)
    else:
        ds = MDSShards(shards)
        lengths = np.empty(len(ds), dtype=np.int32)
        for i in progress(range(len(ds)), desc="index", unit="sample"):
            lengths[i] = ds.read(i)["length"]
    np.save(shards / LENGTHS_FILE, lengths)
    if manifest:
        write_manifest(shards)
    return lengths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards")
    a = p.parse_args(argv)
    lengths = build(a.shards)
    print(f"index: {len(lengths)} samples, {int(lengths.sum())} tokens -> {Path(a.shards) / LENGTHS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
