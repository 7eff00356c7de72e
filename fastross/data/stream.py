"""Per-step sample streams over MDS shards, planned into packed micro-batches, with an exact position.

Every rank computes the same epoch order (a seeded permutation of the dataset), takes the
step's global batch from it, and plans it with fastross.data.planner using the shards'
length index (`lengths.npy`, written by the converter). Each rank then reads only its own
samples, by id, from a `streaming.StreamingDataset`. Ranks may consume different numbers of
samples, yet the data position is simply (epoch, step in epoch): the plan of any step can be
recomputed exactly, which is what makes resuming mid-epoch exact under packing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastross.data.planner import StepPlan, plan_step
from fastross.data.schema import LENGTHS_FILE, read_meta


@dataclass
class Position:
    epoch: int = 0  # epochs finished
    step_in_epoch: int = 0  # optimizer steps taken in the current epoch

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch}


@dataclass
class Step:
    ids: np.ndarray  # the global batch's sample ids, in epoch order
    plan: StepPlan  # every rank's micro-batches (positions into ids)
    micro_batches: list[list[dict]]  # this rank's samples, micro-batch by micro-batch


def load_lengths(shards: str | Path) -> np.ndarray:
    path = Path(shards) / LENGTHS_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: build it with `python -m fastross.data.index {shards}` (the converter writes it)"
        )
    return np.load(path)


class StepStream:
    def __init__(self, shards: str, global_batch: int, rank: int, world: int, shuffle: bool, seed: int,
                 max_tokens: int, attn_tokens: float):
        from streaming import StreamingDataset

        self.meta = read_meta(shards)
        self.lengths = load_lengths(shards)
        self.ds = StreamingDataset(local=shards, shuffle=False, batch_size=1, replication=None)
        if self.ds.num_samples != len(self.lengths):
            raise ValueError(
                f"{shards}: {LENGTHS_FILE} lists {len(self.lengths)} samples but the shards hold "
                f"{self.ds.num_samples}: rebuild it with `python -m fastross.data.index {shards}`"
            )
        self.global_batch, self.rank, self.world = global_batch, rank, world
        self.shuffle, self.seed = shuffle, seed
        self.max_tokens, self.attn_tokens = max_tokens, attn_tokens
        self.steps_per_epoch = len(self.lengths) // global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"{shards} holds {len(self.lengths)} samples, fewer than data.global_batch={global_batch}")
        self.position = Position()
        self._order: tuple[int, np.ndarray] | None = None

    def state_dict(self) -> dict:
        return self.position.to_dict()

    def load_state_dict(self, state: dict) -> None:
        self.position = Position(**state)

    def epoch_order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            n = len(self.lengths)
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order = (epoch, order)
        return self._order[1]

    def plan(self, epoch: int, step_in_epoch: int) -> tuple[np.ndarray, StepPlan]:
        b = self.global_batch
        ids = self.epoch_order(epoch)[step_in_epoch * b : (step_in_epoch + 1) * b]
        return ids, plan_step(self.lengths[ids], self.world, self.max_tokens, self.attn_tokens)

    def read(self, sample_id: int) -> dict:
        s = self.ds[int(sample_id)]
        if s["index"] != sample_id:
            raise ValueError(f"sample {sample_id} of the shards carries index {s['index']}: the shards are inconsistent")
        return s

    def next_step(self) -> Step:
        if self.position.step_in_epoch == self.steps_per_epoch:
            self.position = Position(self.position.epoch + 1, 0)
        ids, plan = self.plan(self.position.epoch, self.position.step_in_epoch)
        mine = [[self.read(ids[i]) for i in mb] for mb in plan.micro_batches[self.rank]]
        self.position.step_in_epoch += 1
        return Step(ids=ids, plan=plan, micro_batches=mine)
