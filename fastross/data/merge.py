"""Join the folders of a split conversion (`convert --part I/N`) into the data set one run would have written.

    python -m fastross.data.merge PART_DIR [PART_DIR ...] --out DIR [--overwrite]

The folders may be given in any order; they must be all N parts of one conversion, each once. The parts
must agree on every fact of their fastross.json that shapes or identifies a sample (template, aspect,
grid, tokenizer fingerprint, VAE constants, latent dtype, length and image limits, ...: every key but
the per-part counts and the folders' paths, which may differ between machines) and on the source
files' names and record count; a difference is refused, naming the part and the key.

Each part numbers its samples from 0. The merged set numbers them from 0 across the parts, as one run
does, so the `index` column (it keys a sample's noise, and the loader checks it against the sample's
position) is rewritten: every shard file is copied with its samples' index fields patched and its
xxh64 recomputed; every other byte is the part's. lengths.npy is the parts' concatenated, and
fastross.json the first part's facts with the counts summed and, per skip reason, the first five
examples in record order (what one run keeps). The part shards are checked against their recorded
hashes as they are read, and every part's fastross.json, index.json and lengths.npy against its manifest; the
merged folder gets its own manifest. The output is written to `.OUT.partial` and renamed when complete.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from fastross.data.convert import ConvertError, write_staged
from fastross.data.schema import (
    LENGTHS_FILE,
    META_FILE,
    SHARD_HASH,
    read_index,
    read_lengths,
    read_meta,
    write_manifest,
)
from fastross.data.shards import HASHES

PER_PART = ("read", "written", "skipped", "skipped_examples", "part", "record_range")  # summed or joined
PATHS = ("source", "tokenizer", "vision", "vae")  # where each machine found its inputs: not compared
EXAMPLES_PER_REASON = 5  # as convert.Report keeps


def part_order(metas: dict[Path, dict]) -> list[Path]:
    """The part folders sorted by part number; refuses a folder that is no part, a missing or repeated part."""
    parts = {}
    for folder, meta in metas.items():
        part = meta.get("part")
        if part is None:
            raise ConvertError(f"{folder / META_FILE} records no part: convert the data again with this fastross")
        i, n = part
        if i in parts:
            raise ConvertError(f"{parts[i]} and {folder} are both part {i}/{n}")
        parts[i] = folder
    n = next(iter(metas.values()))["part"][1]
    missing = sorted(set(range(n)) - parts.keys())
    if missing:
        raise ConvertError(f"the conversion has {n} parts; parts {missing} are not among the folders given")
    return [parts[i] for i in range(n)]


def agreeing_facts(meta: dict) -> dict:
    """What every part of one conversion must share: all but the per-part counts and the paths, plus the source
    files' names."""
    facts = {k: v for k, v in meta.items() if k not in PER_PART + PATHS}
    facts["source_names"] = [Path(p).name for p in meta["source"]]
    facts["parts"] = meta["part"][1]
    return facts


def check_parts(order: list[Path], metas: dict[Path, dict]) -> None:
    first = agreeing_facts(metas[order[0]])
    for folder in order[1:]:
        facts = agreeing_facts(metas[folder])
        for key in sorted(first.keys() | facts.keys()):
            if first.get(key) != facts.get(key):
                raise ConvertError(
                    f"{folder / META_FILE}: {key} is {facts.get(key)!r}, but part 0 ({order[0]}) has "
                    f"{first.get(key)!r}: the parts are not of one conversion"
                )
    stop = 0
    for folder in order:
        start, end = metas[folder]["record_range"]
        if start != stop:
            raise ConvertError(
                f"{folder}: records {start} .. {end - 1} do not follow the previous part's (up to {stop - 1})"
            )
        stop = end
    if stop != first["records"]:
        raise ConvertError(f"the parts convert records 0 .. {stop - 1} of {first['records']}")


def reindexed(data: bytes, shard: dict, first: int, offset: int, where: str) -> bytes:
    """A shard file's bytes with each sample's `index` raised by `offset`; its samples must carry first, first + 1,
    ... (their positions in the part)."""
    names, sizes = shard["column_names"], shard["column_sizes"]
    col = names.index("index")
    if shard["column_encodings"][col] != "int":
        raise ConvertError(f"{where}: the index column is {shard['column_encodings'][col]!r}, expected 'int'")
    var = [i for i, s in enumerate(sizes) if s is None]
    out = bytearray(data)
    n = int(np.frombuffer(out, np.uint32, 1)[0])
    begins = np.frombuffer(out, np.uint32, n, 4)
    for j, begin in enumerate(begins.tolist()):
        var_sizes = dict(zip(var, np.frombuffer(out, np.uint32, len(var), begin).tolist()))
        at = begin + 4 * len(var) + sum(var_sizes[i] if sizes[i] is None else sizes[i] for i in range(col))
        old = int(np.frombuffer(out, np.int64, 1, at)[0])
        if old != first + j:
            raise ConvertError(
                f"{where}: sample {j} carries index {old}, expected {first + j}: the part is inconsistent"
            )
        out[at : at + 8] = np.int64(old + offset).tobytes()
    return bytes(out)


def copy_shards(order: list[Path], stage: Path) -> None:
    """Every part's shard files into `stage`, renumbered and reindexed, and the merged index.json."""
    shards, offset = [], 0
    for folder in order:
        index = read_index(folder)  # verified against the part's manifest, as its fastross.json and lengths.npy are
        first = 0
        for shard in index["shards"]:
            raw = shard["raw_data"]
            path = folder / raw["basename"]
            data = path.read_bytes()
            if len(data) != raw["bytes"] or HASHES[SHARD_HASH](data) != (raw.get("hashes") or {}).get(SHARD_HASH):
                raise ConvertError(
                    f"{path}: its size or {SHARD_HASH} differs from {folder / 'index.json'}: the part is corrupt"
                )
            data = reindexed(data, shard, first, offset, str(path)) if offset else data
            name = f"shard.{len(shards):05}.mds"
            (stage / name).write_bytes(data)
            hashes = {h: HASHES[h](data) for h in (raw.get("hashes") or {})}
            shards.append({**shard, "raw_data": {**raw, "basename": name, "hashes": hashes}})
            first += shard["samples"]
        offset += first
    (stage / "index.json").write_text(json.dumps({"version": 2, "shards": shards}, sort_keys=True))


def merged_meta(order: list[Path], metas: dict[Path, dict]) -> dict:
    """Part 0's fastross.json with the counts summed over the parts, as one run over all records writes it."""
    meta = dict(metas[order[0]])
    skipped, examples = Counter(), {}
    for folder in order:
        m = metas[folder]
        skipped.update(m["skipped"])
        for reason, ex in m["skipped_examples"].items():
            examples.setdefault(reason, []).extend(ex)
    meta.update(
        read=sum(metas[f]["read"] for f in order),
        written=sum(metas[f]["written"] for f in order),
        part=[0, 1],
        record_range=[0, meta["records"]],
        skipped=dict(skipped),
        skipped_examples={r: ex[:EXAMPLES_PER_REASON] for r, ex in examples.items()},
    )
    return meta


def merge(parts: list[str | Path], out: str | Path, overwrite: bool = False) -> dict:
    """Merge the part folders into `out`; returns the merged fastross.json."""
    folders = [Path(p) for p in parts]
    repeated = sorted({str(f) for f in folders if folders.count(f) > 1})
    if repeated:
        raise ConvertError(f"{', '.join(repeated)}: given more than once")
    metas = {f: read_meta(f) for f in folders}
    order = part_order(metas)
    check_parts(order, metas)
    lengths = [read_lengths(f) for f in order]
    for folder, n in zip(order, lengths):
        if len(n) != metas[folder]["written"]:
            raise ConvertError(
                f"{folder / LENGTHS_FILE}: {len(n)} lengths, but the part wrote {metas[folder]['written']}"
            )
    meta = merged_meta(order, metas)

    def write(stage: Path) -> None:
        copy_shards(order, stage)
        np.save(stage / LENGTHS_FILE, np.concatenate(lengths).astype(np.int32))
        (stage / META_FILE).write_text(json.dumps(meta, indent=2))
        write_manifest(stage)  # last: it covers the merged fastross.json, index.json and lengths.npy

    write_staged(Path(out), overwrite, write)
    return meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("parts", nargs="+", help="the --out folders of `convert --part I/N`, all N of them, in any order")
    p.add_argument("--out", required=True, help="new folder for the merged data set")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it holds a finished conversion")
    a = p.parse_args(argv)
    try:
        meta = merge(a.parts, a.out, a.overwrite)
    except (ConvertError, FileNotFoundError, ValueError) as e:
        print(f"merge: error: {e}", file=sys.stderr)
        return 2
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(meta["skipped"].items())) or "none"
    print(
        f"merge: {len(a.parts)} parts, read {meta['read']}, written {meta['written']}, "
        f"skipped {sum(meta['skipped'].values())} ({reasons}) -> {a.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
