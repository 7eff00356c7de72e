"""Per-step sample plans over MDS shards, with an exact, random-access position.

Every rank computes the same epoch order (a seeded permutation of the dataset), takes the
step's global batch from it, and plans it with fastross.data.planner using the shards'
length index (`lengths.npy`, written by the converter). Each rank then reads only its own
samples, by id (fastross.data.shards). Ranks may consume different numbers of samples, yet
the data position is simply (epoch, step in epoch), and any step can be recomputed from its
index alone: that is what makes resuming mid-epoch exact under packing, and what lets the
loader's workers prepare steps in any process, in any order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastross.data.planner import StepPlan, plan_padded_step, plan_step
from fastross.data.schema import LENGTHS_FILE
from fastross.data.shards import MDSShards


@dataclass(frozen=True)
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
    tokens: int  # the global batch's tokens (text + visual), the same on every rank
    tokens_sq: int  # the sum of its samples' squared lengths


def load_lengths(shards: str | Path) -> np.ndarray:
    path = Path(shards) / LENGTHS_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: build it with `python -m fastross.data.index {shards}` (the converter writes it)"
        )
    return np.load(path)


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The order of the n samples in `epoch` (training's, and `python -m fastross.data.plan`'s)."""
    return np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)


class StepStream:
    def __init__(self, shards: str, global_batch: int, rank: int, world: int, shuffle: bool, seed: int,
                 max_tokens: int, attn_tokens: float, padded_samples: int = 0, exclude: np.ndarray | None = None):
        """padded_samples > 0: the reference's padded micro-batches of that many samples (data.packing=padded).

        exclude: sample ids left out of every epoch (those of corrupt shards, data.corrupt_shards=skip).
        """
        self.lengths = load_lengths(shards)
        self.shards = MDSShards(shards)
        if len(self.shards) != len(self.lengths):
            raise ValueError(
                f"{shards}: {LENGTHS_FILE} lists {len(self.lengths)} samples but the shards hold "
                f"{len(self.shards)}: rebuild it with `python -m fastross.data.index {shards}`"
            )
        self.global_batch, self.rank, self.world = global_batch, rank, world
        self.shuffle, self.seed = shuffle, seed
        self.max_tokens, self.attn_tokens, self.padded_samples = max_tokens, attn_tokens, padded_samples
        self.kept = np.setdiff1d(np.arange(len(self.lengths)), exclude) if exclude is not None and len(exclude) else None
        n = len(self.lengths) if self.kept is None else len(self.kept)
        self.steps_per_epoch = n // global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"{shards} holds {n} usable samples, fewer than data.global_batch={global_batch}")
        self._order: tuple[int, np.ndarray] | None = None

    def position(self, index: int) -> Position:
        """The data position after `index` steps."""
        return Position(index // self.steps_per_epoch, index % self.steps_per_epoch)

    def index(self, position: Position) -> int:
        """Steps taken at `position` (also accepts the (epoch, steps_per_epoch) form of an epoch's end)."""
        return position.epoch * self.steps_per_epoch + position.step_in_epoch

    def epoch_order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            if self.kept is None:
                self._order = (epoch, epoch_order(len(self.lengths), self.seed, epoch, self.shuffle))
            else:
                self._order = (epoch, self.kept[epoch_order(len(self.kept), self.seed, epoch, self.shuffle)])
        return self._order[1]

    def plan(self, epoch: int, step_in_epoch: int) -> tuple[np.ndarray, StepPlan]:
        b = self.global_batch
        ids = self.epoch_order(epoch)[step_in_epoch * b : (step_in_epoch + 1) * b]
        if self.padded_samples:
            return ids, plan_padded_step(self.lengths[ids], self.world, self.padded_samples, self.attn_tokens)
        return ids, plan_step(self.lengths[ids], self.world, self.max_tokens, self.attn_tokens)

    def read(self, sample_id: int) -> dict:
        s = self.shards.read(int(sample_id))
        if s["index"] != sample_id:
            raise ValueError(f"sample {sample_id} of the shards carries index {s['index']}: the shards are inconsistent")
        return s

    def step(self, index: int) -> Step:
        """Step number `index` (0-based, counted across epochs): its plan and this rank's samples."""
        pos = self.position(index)
        ids, plan = self.plan(pos.epoch, pos.step_in_epoch)
        mine = [[self.read(ids[i]) for i in mb] for mb in plan.micro_batches[self.rank]]
        lengths = self.lengths[ids].astype(np.int64)
        return Step(ids=ids, plan=plan, micro_batches=mine, tokens=int(lengths.sum()),
                    tokens_sq=int((lengths * lengths).sum()))
