"""The loader: finished micro-batches for every step, prepared ahead in worker processes.

Design: a map-style dataset indexed by step (`StepDataset`): item i is this rank's micro-batches
for the run's step `first + i`, finished (samples read by id, images decoded and preprocessed,
text packed, noise keys and timesteps drawn), plus the host facts the trainer logs. Everything
an item depends on is a function of its step index (fastross.data.stream), so a
`torch.utils.data.DataLoader` over it, in order, with `data.workers` processes, gives exactly what
building the steps inline (0 workers) gives, and a resumed run simply starts the index at its
checkpoint's step. The trade-off: a worker prepares a whole step (all of the rank's micro-batches),
so a step's preparation is not split across workers; with `data.prefetch` steps queued per worker
the GPU step hides it as long as one worker keeps up with a step's duration times the workers.

Workers are forked by the DataLoader, read the shards with fastross.data.shards (no shared
memory names to race on, nothing left in /dev/shm), use one intra-op thread each, and exit when
the training process dies (the DataLoader's watchdog). Batches are pinned (CUDA only) and copied
to the device with non_blocking=True, so the copy overlaps the host. One DataLoader iterator
spans the whole run (all epochs), so its workers live as long as the run.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from fastross.config import DataConfig
from fastross.data.batch import Collator, MicroBatch
from fastross.data.images import ImageSpec
from fastross.data.schema import ShardMeta
from fastross.data.stream import Position, StepStream


@dataclass
class StepBatch:
    micro_batches: list[MicroBatch]  # this rank's micro-batches (the same number on every rank)
    tokens: int  # the global batch's tokens (text + visual), known to every rank
    num_micro_batches: int  # micro-batches per rank this step
    imbalance: float  # max / mean of the ranks' estimated costs
    position: Position  # the data position after this step (what a checkpoint records)

    def pin_memory(self) -> "StepBatch":
        return replace(self, micro_batches=[mb.pin_memory() for mb in self.micro_batches])

    def to(self, device) -> "StepBatch":
        return replace(self, micro_batches=[mb.to(device, non_blocking=True) for mb in self.micro_batches])


class StepDataset(Dataset):
    """Item i: the finished StepBatch of data step `first_index + i`, keyed as run step `first_step + i`."""

    def __init__(self, stream: StepStream, collate: Collator, first_index: int, first_step: int, length: int):
        self.stream, self.collate = stream, collate
        self.first_index, self.first_step, self.length = first_index, first_step, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> StepBatch:
        index, run_step = self.first_index + i, self.first_step + i
        step = self.stream.step(index)
        return StepBatch(
            micro_batches=[self.collate(samples, run_step) for samples in step.micro_batches],
            tokens=step.tokens, num_micro_batches=step.plan.num_micro_batches, imbalance=step.plan.imbalance(),
            position=self.stream.position(index + 1),
        )


def _as_is(item):
    return item


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # workers run side by side with the trainer; no intra-op pools per worker


class Loader:
    def __init__(self, cfg: DataConfig, *, rank: int, world: int, attn_tokens: float, image: ImageSpec,
                 latent_channels: int, replicas: int, seed: int, device: torch.device):
        """seed: the run seed that keys the noise (train.seed); cfg.seed orders the data."""
        self.cfg, self.device = cfg, device
        self.meta = ShardMeta.read(cfg.shards)
        self.stream = StepStream(cfg.shards, cfg.global_batch, rank, world, cfg.shuffle, cfg.seed,
                                 max_tokens=cfg.max_tokens, attn_tokens=attn_tokens)
        self.collate = Collator(meta=self.meta, image=image, latent_channels=latent_channels, replicas=replicas,
                                seed=seed, image_backend=cfg.image_backend)
        self.steps_per_epoch = self.stream.steps_per_epoch

    def dataset(self, position: Position, step: int, total_steps: int) -> StepDataset:
        return StepDataset(self.stream, self.collate, self.stream.index(position), step, max(0, total_steps - step))

    def steps(self, position: Position, step: int, total_steps: int) -> Iterator[StepBatch]:
        """The finished steps from data `position` (run step `step`) up to run step `total_steps`, on the device."""
        workers = self.cfg.workers
        loader = DataLoader(
            self.dataset(position, step, total_steps), batch_size=None, shuffle=False, collate_fn=_as_is,
            num_workers=workers, prefetch_factor=self.cfg.prefetch if workers else None,
            pin_memory=self.device.type == "cuda", worker_init_fn=_worker_init if workers else None,
            # Its own generator: starting the workers would otherwise draw their base seed from the global RNG,
            # so a resumed run's saved RNG state would differ from the uninterrupted run's (nothing here is random).
            generator=torch.Generator().manual_seed(0),
        )
        for batch in loader:
            yield batch.to(self.device)
