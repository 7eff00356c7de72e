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
the training process dies (SIGTERM from the kernel: fastross.lifecycle.die_with_parent). One
DataLoader iterator spans the whole run (all epochs), so its workers live as long as the run.

The hand-off: a worker packs all of a step's tensors into one buffer (`PackedStep`), so the step
crosses the process boundary as one shared-memory file descriptor. Sent tensor by tensor, each of
the ~13 tensors of a micro-batch cost the trainer one round trip to the worker's fd-sharing thread,
about 0.6 ms each on a busy host: 8-10 ms per step, 4% of a 0.36 s step (benchmarks/loader.py).
The buffer is pinned (CUDA only), copied to the device in one non_blocking copy, and the
micro-batches are views into it. A worker also holds on to its last few buffers (`data.prefetch`
+ 3, longer than the trainer holds them): the process that drops a shared buffer last frees its
pages, 3 ms for the 34 MB of a 16-image step at the 7B shapes, and that should be the worker, not
the trainer. Holding them is only about time: a buffer is never reused, so holding too few costs
the trainer those milliseconds and nothing else.
"""

from __future__ import annotations

import collections
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace

import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from fastross.config import ConfigError, DataConfig, parse_size
from fastross.data.batch import Collator, MicroBatch
from fastross.data.images import ImageSpec
from fastross.data.schema import ShardCorruptError
from fastross.data.sources import open_sources
from fastross.data.stream import Position, StepStream
from fastross.lifecycle import die_with_parent


@dataclass
class StepBatch:
    micro_batches: list[MicroBatch]  # this rank's micro-batches (the same number on every rank)
    tokens: int  # the global batch's tokens (text + visual), known to every rank
    tokens_sq: int  # the sum of its samples' squared lengths (attention's FLOPs: fastross.flops)
    num_micro_batches: int  # micro-batches per rank this step
    imbalance: float  # max / mean of the ranks' estimated costs
    position: Position  # the data position after this step (what a checkpoint records)


_ALIGN = 256  # bytes: every tensor in a PackedStep starts aligned as cudaMalloc aligns


@dataclass(frozen=True)
class _Slot:
    """Where one tensor lies in a PackedStep's buffer."""

    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass
class PackedStep:
    """A StepBatch whose tensors all live in one uint8 buffer; its micro-batches hold `_Slot`s in their place."""

    buffer: torch.Tensor
    step: StepBatch

    @classmethod
    def pack(cls, step: StepBatch, shared: bool) -> PackedStep:
        """shared: allocate the buffer in shared memory (in a worker), so that sending it copies nothing more."""
        tensors = [
            v for mb in step.micro_batches for f in fields(mb) if isinstance(v := getattr(mb, f.name), torch.Tensor)
        ]
        offsets, total = [], 0
        for v in tensors:
            total = -(-total // _ALIGN) * _ALIGN
            offsets.append(total)
            total += v.numel() * v.element_size()
        buffer = torch.empty(total, dtype=torch.uint8)
        if shared:
            buffer.share_memory_()
        slots = {}
        for off, v in zip(offsets, tensors):
            _view(buffer, off, v.dtype, v.shape).copy_(v)
            slots[id(v)] = _Slot(off, v.dtype, tuple(v.shape))
        return cls(
            buffer, replace(step, micro_batches=[mb.map_tensors(lambda v: slots[id(v)]) for mb in step.micro_batches])
        )

    def pin_memory(self) -> PackedStep:
        """Called by the DataLoader's pin-memory thread (CUDA only): one page-locked buffer per step."""
        return PackedStep(self.buffer.pin_memory(), self.step)

    def to(self, device) -> StepBatch:
        """One copy of the buffer to `device` (asynchronous from pinned memory), then views into it."""
        buffer = self.buffer.to(device, non_blocking=True)
        return replace(
            self.step,
            micro_batches=[
                mb.map_tensors(lambda s: _view(buffer, s.offset, s.dtype, s.shape), kind=_Slot)
                for mb in self.step.micro_batches
            ],
        )


def _view(buffer: torch.Tensor, offset: int, dtype: torch.dtype, shape) -> torch.Tensor:
    n = dtype.itemsize * int(torch.Size(shape).numel())
    return buffer[offset : offset + n].view(dtype).view(shape)


class StepDataset(Dataset):
    """Item i: the finished StepBatch of data step `first_index + i`, keyed as run step `first_step + i`."""

    def __init__(
        self, stream: StepStream, collate: Collator, first_index: int, first_step: int, length: int, keep: int = 0
    ):
        """keep: how many of its latest buffers a worker holds on to (see the module's docstring)."""
        self.stream, self.collate = stream, collate
        self.first_index, self.first_step, self.length = first_index, first_step, length
        self.recent: collections.deque = collections.deque(maxlen=keep)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> PackedStep:
        """The step packed into one buffer (see the module's docstring), in shared memory in a worker."""
        index, run_step = self.first_index + i, self.first_step + i
        step = self.stream.step(index)
        batch = StepBatch(
            micro_batches=[self.collate(samples, run_step) for samples in step.micro_batches],
            tokens=step.tokens,
            tokens_sq=step.tokens_sq,
            num_micro_batches=step.plan.num_micro_batches,
            imbalance=step.plan.imbalance(),
            position=self.stream.position(index + 1),
        )
        if get_worker_info() is None:
            return PackedStep.pack(batch, shared=False)
        packed = PackedStep.pack(batch, shared=True)
        self.recent.append(packed.buffer)  # this worker's own copy of the deque (the dataset is forked)
        return packed


# A worker sends each step's buffer by passing its file descriptor over an AF_UNIX socket that multiprocessing binds at
# TMPDIR/pymp-XXXXXXXX/listener-XXXXXXXX. Linux holds at most 107 bytes of such a path: with a longer TMPDIR the bind
# fails inside the worker's queue thread, the step is never sent, and the trainer would wait for it for ever.
SOCKET_PATH_MAX = 107
WORKER_SOCKET = os.path.join("pymp-XXXXXXXX", "listener-XXXXXXXX")


def check_worker_tmpdir(workers: int, tmp: str | None = None) -> None:
    """Refuse loader workers when the temporary folder is too long for their sockets (ConfigError, TMPDIR named)."""
    tmp = tmp or tempfile.gettempdir()
    n = len(os.fsencode(os.path.join(tmp, WORKER_SOCKET)))
    if workers and n > SOCKET_PATH_MAX:
        room = SOCKET_PATH_MAX - len(os.fsencode(os.path.join("", WORKER_SOCKET))) - 1
        raise ConfigError(
            f"data.workers={workers}: the temporary folder {tmp} ({len(os.fsencode(tmp))} bytes) is too long for the "
            f"loader workers' sockets (multiprocessing binds them at TMPDIR/{WORKER_SOCKET}, at most "
            f"{SOCKET_PATH_MAX} bytes): set TMPDIR to a folder of at most {room} bytes, or data.workers=0"
        )


def _as_is(item):
    return item


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # workers run side by side with the trainer; no intra-op pools per worker
    die_with_parent()  # at once when the rank dies (the DataLoader's own watchdog polls, and only between steps)


class Loader:
    def __init__(
        self,
        cfg: DataConfig,
        *,
        rank: int,
        world: int,
        attn_tokens: float,
        image: ImageSpec,
        latent_channels: int,
        replicas: int,
        seed: int,
        device: torch.device,
    ):
        """seed: the run seed that keys the noise (train.seed); cfg.seed orders the data."""
        self.cfg, self.device = cfg, device
        check_worker_tmpdir(cfg.workers)
        # Every local shard file hash-checked once, here, before any step is planned (each rank reads them all once);
        # a remote's as each is downloaded (fastross.data.remote).
        self.sources = open_sources(cfg)
        self.name = ", ".join(s.name for s in self.sources)  # for messages
        self.meta = self.sources[0].meta  # the sources agree on it (fastross.data.sources.check_agree)
        self.corrupt = [c for s in self.sources for c in s.corrupt]
        if self.corrupt and cfg.corrupt_shards == "error":
            raise ShardCorruptError(
                f"{self.corrupt[0][1]} ({len(self.corrupt)} corrupt shard(s) in {self.name}): convert the data "
                "again, or set data.corrupt_shards=skip to train without them"
            )
        padded = cfg.packing == "padded"
        self.stream = StepStream(
            self.sources,
            cfg.global_batch,
            rank,
            world,
            cfg.shuffle,
            cfg.seed,
            max_tokens=cfg.max_tokens,
            attn_tokens=attn_tokens,
            padded_samples=cfg.padded_samples if padded else 0,
            window=cfg.shuffle_window,
        )
        self.collate = Collator(
            meta=self.meta,
            image=image,
            latent_channels=latent_channels,
            replicas=replicas,
            seed=seed,
            image_backend=cfg.image_backend,
            pad=padded,
        )
        self.steps_per_epoch = self.stream.steps_per_epoch

    @property
    def skipped_samples(self) -> int:
        """The samples of the corrupt shards left out (data.corrupt_shards=skip)."""
        return sum(len(ids) for ids, _ in self.corrupt)

    def notes(self) -> list[str]:
        """What a run says about its data at start: each corrupt shard skipped, the sources of a mixture or a
        remote, a cache smaller than a block shuffle's window, the samples longer than data.max_tokens."""
        cfg, stream = self.cfg, self.stream
        notes = [f"skipped a corrupt shard ({len(ids)} samples): {problem}" for ids, problem in self.corrupt]
        if len(stream.sources) > 1 or stream.sources[0].remote:
            notes.append(
                "data: "
                + "; ".join(
                    f"{s.name} ({len(s.lengths)} samples, weight {w:.3g}, {o.shuffle} order)"
                    for s, w, o in zip(stream.sources, stream.weights, stream.orders)
                )
            )
        window = sum(sum(sorted(s.shard_bytes.tolist())[-cfg.shuffle_window :]) for s in stream.sources if s.remote)
        if window > parse_size(cfg.cache_limit):  # not an error: it costs downloads, nothing else
            notes.append(
                f"data.cache_limit={cfg.cache_limit} is less than a block shuffle's window of every remote "
                f"({window} bytes): shards will be downloaded more than once per epoch"
            )
        too_long = int((stream.lengths > cfg.max_tokens).sum())
        if too_long:
            notes.append(
                f"{too_long} of {len(stream.lengths)} samples are longer than data.max_tokens={cfg.max_tokens}: "
                "each is planned alone in its micro-batch"
            )
        return notes

    def dataset(self, position: Position, step: int, total_steps: int) -> StepDataset:
        # A worker's step n is still held by the trainer while the worker makes at most steps n+1..n+prefetch+1.
        return StepDataset(
            self.stream,
            self.collate,
            self.stream.index(position),
            step,
            max(0, total_steps - step),
            keep=self.cfg.prefetch + 3,
        )

    def steps(self, position: Position, step: int, total_steps: int) -> Iterator[StepBatch]:
        """The finished steps from data `position` (run step `step`) up to run step `total_steps`, on the device."""
        workers = self.cfg.workers
        loader = DataLoader(
            self.dataset(position, step, total_steps),
            batch_size=None,
            shuffle=False,
            collate_fn=_as_is,
            num_workers=workers,
            prefetch_factor=self.cfg.prefetch if workers else None,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=_worker_init if workers else None,
            # Its own generator: starting the workers would otherwise draw their base seed from the global RNG,
            # so a resumed run's saved RNG state would differ from the uninterrupted run's (nothing here is random).
            generator=torch.Generator().manual_seed(0),
        )
        for batch in loader:
            yield batch.to(self.device)
