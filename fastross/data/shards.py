"""Random access to local MDS shards by sample id, safe to open from any number of processes.

Why not `streaming.StreamingDataset` here: in mosaicml-streaming 0.13 every StreamingDataset
registers its local folder in POSIX shared memory (`streaming.base.shared.prefix.get_shm_prefix`):
it scans for the first free integer prefix N, then the process that believes it is the local
leader creates `/dev/shm/{N:06d}_locals` (plus barriers, locks and more shared memory). Processes
that are not one torch.distributed group (loader workers, or several jobs on one machine) each
act as a leader, find the same free N and race to create the same name: the loser fails with
`FileExistsError: '/000017_locals'`, and a killed process leaves the names behind in /dev/shm.

fastross needs none of that machinery: every rank computes its own plan and reads its own samples
by global id from shards already on local disk. So this reads the shards with streaming's own
per-shard reader (`streaming.base.format.reader_from_json`, the class StreamingDataset uses
underneath), which only opens the shard file for each read: no shared memory, no lock files,
nothing to race or leak. The trade-off: no remote download, no compressed shards (the converter
writes neither; decompress shards made elsewhere first).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


class MDSShards:
    def __init__(self, folder: str | Path):
        from streaming.base.format import reader_from_json

        self.folder = Path(folder)
        index_path = self.folder / "index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"{index_path} is missing: {folder} is not a folder of MDS shards")
        index = json.loads(index_path.read_text())
        self.readers = []
        for shard in index["shards"]:
            raw = self.folder / shard["raw_data"]["basename"]
            if not raw.is_file():
                what = f"compressed ({shard.get('compression')}); " if shard.get("compression") else ""
                raise FileNotFoundError(
                    f"{raw} is missing ({what}fastross reads uncompressed local MDS shards, as its converter "
                    "writes them): convert again, or decompress the shards into this folder"
                )
            self.readers.append(reader_from_json(str(self.folder), None, shard))
        self.ends = np.cumsum([r.samples for r in self.readers])  # exclusive end id of each shard

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def read(self, sample_id: int) -> dict:
        """The sample with global id `sample_id` (its position among all the shards' samples)."""
        if not 0 <= sample_id < len(self):
            raise IndexError(f"sample {sample_id} is outside {self.folder}'s {len(self)} samples")
        shard = int(np.searchsorted(self.ends, sample_id, side="right"))
        start = int(self.ends[shard - 1]) if shard else 0
        return self.readers[shard].get_item(sample_id - start)
