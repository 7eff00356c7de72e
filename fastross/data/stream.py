"""Per-step sample plans over MDS shards, with an exact, random-access position.

Every rank computes the same epoch order (a seeded permutation of the dataset), takes the
step's global batch from it, and plans it with fastross.data.packing_planner using the shards'
length index (`lengths.npy`, written by the converter). Each rank then reads only its own
samples, by id (fastross.data.shards). Ranks may consume different numbers of samples, yet
the data position is simply (epoch, step in epoch), and any step can be recomputed from its
index alone: that is what makes resuming mid-epoch exact under packing, and what lets the
loader's workers prepare steps in any process, in any order.

Shuffles (data.shuffle): `global`, a seeded permutation of all the samples per epoch; `block`, a seeded
permutation of the shard files, then of the samples within each window of `data.shuffle_window` consecutive
shards of that order (`block_order`): a stretch of steps reads the shards of one window only, which is what a
remote source's cache wants; `none`, the converted order.

Mixtures (data.sources, several folders): sample ids are renumbered mixture-wide, source k's sample i being
id `offset_k + i` (offset_k: the samples of the sources before it), so ids, and the noise keys drawn from them,
never collide, and a single source keeps its own numbering. Each source keeps its own seeded order per
source-epoch and cycles through it endlessly. Every slot of a step's global batch draws its source by weight,
from a generator keyed by (data.seed, block of MIX_BLOCK steps): the draw depends on the step index alone,
not on the ranks. Where each source stands at step i is the sum of its draws before i (`_consumed`, cached
by block). An epoch of a mixture is as many samples as its sources hold together: a source weighted above its
share of them repeats within an epoch, one below it is not seen whole; the run's length is train.epochs of
those, or train.max_steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastross.config import LEGACY_BOOLS, SourceConfig
from fastross.data.packing_planner import StepPlan, plan_padded_step, plan_step
from fastross.data.schema import ShardCorruptError
from fastross.data.sources import Source, open_source


@dataclass(frozen=True)
class Position:
    epoch: int = 0  # epochs finished
    step_in_epoch: int = 0  # optimizer steps taken in the current epoch

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch}


@dataclass
class Step:
    ids: np.ndarray  # the global batch's sample ids (mixture-wide: StepStream.read), in the order drawn
    plan: StepPlan  # every rank's micro-batches (positions into ids)
    micro_batches: list[list[dict]]  # this rank's samples, micro-batch by micro-batch
    tokens: int  # the global batch's tokens (text + visual), the same on every rank
    tokens_sq: int  # the sum of its samples' squared lengths


SHUFFLES = ("global", "block", "none")
MIX_BLOCK = 1024  # steps whose source draws come from one generator
_MIX_KEY = 0x6D6978  # separates the mixture's draws from the orders' generators


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The order of the n samples in `epoch` (training's, and `python -m fastross.data.packing_report`'s)."""
    return np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)


def block_order(shard_samples: np.ndarray, key: list[int], epoch: int, window: int) -> np.ndarray:
    """The shards in a seeded order, then the samples of each window of `window` consecutive shards permuted.

    Reads touch `window` shard files at a time, where a global permutation touches about one per sample."""
    rng = np.random.default_rng([*key, epoch])
    starts = np.concatenate([[0], np.cumsum(shard_samples)[:-1]])
    shards = rng.permutation(len(shard_samples))
    parts = []
    for w in range(0, len(shards), window):
        ids = np.concatenate([np.arange(starts[s], starts[s] + shard_samples[s]) for s in shards[w : w + window]])
        parts.append(ids[rng.permutation(len(ids))])
    return np.concatenate(parts)


def resolve_shuffle(shuffle: str | bool, remote: bool) -> str:
    """data.shuffle -> global, block or none (auto: block for a remote source, global for a local one)."""
    if isinstance(shuffle, bool):  # the old boolean key, as the config reads it
        return LEGACY_BOOLS["data.shuffle"][shuffle]
    if shuffle == "auto":
        return "block" if remote else "global"
    if shuffle not in SHUFFLES:
        raise ValueError(f"data.shuffle={shuffle!r}: use auto, {', '.join(SHUFFLES)}")
    return shuffle


class SourceOrder:
    """One source's sample order, epoch by epoch of its own (kept ids only)."""

    def __init__(self, source: Source, shuffle: str, key: list[int], window: int):
        self.source, self.shuffle, self.key, self.window = source, shuffle, key, window
        exclude = source.exclude
        self.kept = np.setdiff1d(np.arange(len(source.lengths)), exclude) if exclude is not None else None
        self.exclude = exclude
        self.size = len(source.lengths) if self.kept is None else len(self.kept)
        self._order: tuple[int, np.ndarray] | None = None

    def epoch(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, self._make(epoch))
        return self._order[1]

    def _make(self, epoch: int) -> np.ndarray:
        if self.shuffle == "block":
            order = block_order(self.source.shard_samples, self.key, epoch, self.window)
            return order if self.exclude is None else order[~np.isin(order, self.exclude)]
        if self.shuffle == "global":
            perm = np.random.default_rng([*self.key, epoch]).permutation(self.size)
            return perm if self.kept is None else self.kept[perm]
        return np.arange(self.size) if self.kept is None else self.kept

    def at(self, positions: np.ndarray) -> np.ndarray:
        """The source's ids at `positions` of its endless stream (epoch after epoch)."""
        out = np.empty(len(positions), np.int64)
        epochs = positions // self.size
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self.epoch(int(e))[positions[sel] % self.size]
        return out


def check_length(sample: dict, planned: int, num_visual: int, where: str) -> None:
    """Stop when a sample's length, as planned from lengths.npy, is not the length it holds (its text ids plus the
    visual tokens its image expands to) or its stored length column: the plan would have packed other tokens."""
    held = len(sample["input_ids"]) + (num_visual - 1 if len(sample["image"]) else 0)
    if not planned == held == sample["length"]:
        raise ShardCorruptError(
            f"{where} (record {sample['id']!r}): lengths.npy gives {planned} tokens, but the sample holds {held} "
            f"(its length column: {sample['length']}): the length index does not match the shards; convert the "
            "data again"
        )


class StepStream:
    def __init__(
        self,
        sources: str | list[Source],
        global_batch: int,
        rank: int,
        world: int,
        shuffle: str | bool,
        seed: int,
        max_tokens: int,
        attn_tokens: float,
        padded_samples: int = 0,
        window: int = 8,
    ):
        """sources: opened sources (fastross.data.sources), or one local folder's path, opened here unchecked.

        shuffle: data.shuffle (auto, global, block, none; true/false as global/none), resolved per source.
        padded_samples > 0: the reference's padded micro-batches of that many samples (data.packing=padded).
        window: the shards a block shuffle mixes at once (data.shuffle_window).
        Each source's `exclude` (its corrupt shards' samples, data.corrupt_shards=skip) is left out of every epoch.
        """
        if isinstance(sources, (str, Path)):
            sources = [open_source(SourceConfig(str(sources)), check=False)]
        self.sources = sources
        # The first source's orders are keyed by data.seed alone, as a single folder's always were.
        self.orders = [
            SourceOrder(s, resolve_shuffle(shuffle, s.remote), [seed] if k == 0 else [seed, k], window)
            for k, s in enumerate(sources)
        ]
        sizes = np.array([len(s.lengths) for s in sources], np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        self.lengths = np.concatenate([s.lengths for s in sources])  # mixture-wide ids
        weights = np.array([s.weight for s in sources], np.float64)
        self.weights = weights / weights.sum()
        self.global_batch, self.rank, self.world, self.seed = global_batch, rank, world, seed
        self.max_tokens, self.attn_tokens, self.padded_samples = max_tokens, attn_tokens, padded_samples
        n = sum(o.size for o in self.orders)
        self.steps_per_epoch = n // global_batch
        if self.steps_per_epoch == 0:
            names = ", ".join(s.name for s in sources)
            raise ValueError(f"{names} hold(s) {n} usable samples, fewer than data.global_batch={global_batch}")
        self._draws: tuple[int, np.ndarray] | None = None  # (block, its steps' slot sources)
        self._starts = [np.zeros(len(sources), np.int64)]  # per block: each source's draws before it

    def position(self, index: int) -> Position:
        """The data position after `index` steps."""
        return Position(index // self.steps_per_epoch, index % self.steps_per_epoch)

    def index(self, position: Position) -> int:
        """Steps taken at `position` (also accepts the (epoch, steps_per_epoch) form of an epoch's end)."""
        return position.epoch * self.steps_per_epoch + position.step_in_epoch

    def epoch_order(self, epoch: int) -> np.ndarray:
        """A single source's order in `epoch` (a mixture's sources each have their own: `orders`)."""
        (order,) = self.orders
        return order.epoch(epoch)

    def _block_draws(self, block: int) -> np.ndarray:
        """(MIX_BLOCK, global_batch): the source of every slot of the block's steps."""
        if self._draws is None or self._draws[0] != block:
            rng = np.random.default_rng([self.seed, _MIX_KEY, block])
            self._draws = (block, rng.choice(len(self.sources), size=(MIX_BLOCK, self.global_batch), p=self.weights))
        return self._draws[1]

    def _consumed(self, index: int) -> np.ndarray:
        """How many samples each source gave in the steps before `index`."""
        block, k = divmod(index, MIX_BLOCK)
        while len(self._starts) <= block:
            done = len(self._starts) - 1
            counts = np.bincount(self._block_draws(done).ravel(), minlength=len(self.sources))
            self._starts.append(self._starts[-1] + counts)
        draws = self._block_draws(block)[:k]
        return self._starts[block] + np.bincount(draws.ravel(), minlength=len(self.sources))

    def step_ids(self, index: int) -> np.ndarray:
        """The mixture-wide ids of step `index`'s global batch."""
        b = self.global_batch
        if len(self.sources) == 1:
            pos = self.position(index)
            return self.epoch_order(pos.epoch)[pos.step_in_epoch * b : (pos.step_in_epoch + 1) * b]
        slots = self._block_draws(index // MIX_BLOCK)[index % MIX_BLOCK]
        start = self._consumed(index)
        ids = np.empty(b, np.int64)
        for k, order in enumerate(self.orders):
            at = np.flatnonzero(slots == k)
            ids[at] = self.offsets[k] + order.at(start[k] + np.arange(len(at)))
        return ids

    def plan(self, epoch: int, step_in_epoch: int) -> tuple[np.ndarray, StepPlan]:
        ids = self.step_ids(self.index(Position(epoch, step_in_epoch)))
        if self.padded_samples:
            return ids, plan_padded_step(self.lengths[ids], self.world, self.padded_samples, self.attn_tokens)
        return ids, plan_step(self.lengths[ids], self.world, self.max_tokens, self.attn_tokens)

    def source_of(self, sample_id: int) -> int:
        return int(np.searchsorted(self.offsets, sample_id, side="right")) - 1

    def read(self, sample_id: int) -> dict:
        """A sample by mixture-wide id; its `index` (what keys its noise) becomes that id."""
        k = self.source_of(sample_id)
        local = int(sample_id - self.offsets[k])
        source = self.sources[k]
        s = source.reader.read(local)
        if s["index"] != local:
            raise ValueError(f"sample {local} of {source.name} carries index {s['index']}: the shards are inconsistent")
        check_length(s, int(source.lengths[local]), source.meta.num_visual_tokens, f"sample {local} of {source.name}")
        s["index"] = int(sample_id)
        return s

    def step(self, index: int) -> Step:
        """Step number `index` (0-based, counted across epochs): its plan and this rank's samples."""
        pos = self.position(index)
        ids, plan = self.plan(pos.epoch, pos.step_in_epoch)
        mine = [[self.read(ids[i]) for i in mb] for mb in plan.micro_batches[self.rank]]
        lengths = self.lengths[ids].astype(np.int64)
        return Step(
            ids=ids, plan=plan, micro_batches=mine, tokens=int(lengths.sum()), tokens_sq=int((lengths * lengths).sum())
        )
