"""Build the length index (`lengths.npy`) of MDS shards that lack one.

    python -m fastross.data.index SHARDS

The converter writes the index itself; this reads every sample's `length` column once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fastross.data.schema import LENGTHS_FILE


def build(shards: str | Path) -> np.ndarray:
    from streaming import StreamingDataset

    ds = StreamingDataset(local=str(shards), shuffle=False, batch_size=1)
    lengths = np.empty(ds.num_samples, dtype=np.int32)
    for i in tqdm(range(ds.num_samples), desc="index", unit="sample"):
        lengths[i] = ds[i]["length"]
    np.save(Path(shards) / LENGTHS_FILE, lengths)
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
