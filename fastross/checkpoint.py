"""Sharded DCP checkpoints that a crash cannot corrupt, with everything needed to resume exactly.

Layout of a run folder:
    run_dir/checkpoints/step_00000040/   DCP shards of model + optimizer, trainer.json,
                                         rng_rank{r}.pt, config.yaml
    run_dir/checkpoints/latest           the name of the newest complete checkpoint

A checkpoint is written into `step_N.tmp/` and renamed only once every rank has finished;
`latest` is then replaced atomically, and only then are older checkpoints pruned. A crash
during a save leaves the previous checkpoint and `latest` untouched; stale `.tmp` folders
are removed at the next start.

Asynchronous saves (`train.async_checkpoint`). The step is blocked only while the state is
copied to host memory (DCP's `DefaultStager`, pinned buffers on CUDA, reused from save to
save); DCP's `async_save` then writes the copy from a background thread while training
goes on. The RNG states, trainer.json and config.yaml are written at staging time, so they
describe the same step as the staged tensors. The background write runs its collectives on
a gloo group of its own: sharing the training's group from a second thread would interleave
its collectives with FSDP's, in a different order on each rank.

When an asynchronous checkpoint is finalised (renamed to `step_N/`, `latest` moved, older
ones pruned): on rank 0, in a callback of its write, the moment that write returns. Rank 0
is DCP's coordinator; its save returns only after it has gathered every rank's write
results and written `.metadata`, so at that moment every rank's shards are on disk (DCP
fsyncs them), and the RNG files were written before any rank's write began. This costs no
collective and no per-step poll, and a completed checkpoint becomes `latest` as soon as it
can, not one save interval later (an all-reduced done flag per step would cost a collective
a step for the same result). Two saves never overlap: each save, and the end of `fit`, first
wait for the previous write and its finalisation (that wait counts as blocked time). A write
that failed on any rank raises at that wait; the previous checkpoint stays `latest`.
Trade-off: host memory holds one copy of this rank's shard of the model and optimizer.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

LATEST = "latest"


def _fsync_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def load_rng(path: Path) -> dict:
    """Read an `rng_rank{r}.pt`: tensors only, so a crafted pickle cannot run code."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        raise pickle.UnpicklingError(
            f"{path}: refused to load, it holds more than tensors (fastross writes RNG states as plain tensors); "
            f"this checkpoint was not written by fastross or was tampered with: delete its folder or point "
            f"`latest` at another checkpoint. ({str(e).splitlines()[0]})"
        ) from e


@dataclass
class SaveReport:
    path: Path  # the checkpoint's final folder (step_N/); complete once `wait()` returns
    blocked_s: float  # seconds the training loop waited: the previous write, staging, the small files


@dataclass
class _InFlight:
    step: int
    tmp: Path
    final: Path
    upload: Future  # this rank's DCP write
    finalised: threading.Event  # rank 0: set once the checkpoint is renamed, `latest` moved, pruned
    staged_at: float
    error: BaseException | None = None


class Checkpointer:
    def __init__(self, run_dir: str | Path, rank: int, keep: int, async_save: bool = False):
        self.root = Path(run_dir) / "checkpoints"
        self.rank = rank
        self.keep = keep
        self.async_save = async_save
        self._inflight: _InFlight | None = None
        self._pg = self._stager = None
        if async_save:
            # Every rank creates the group, in the same order relative to other groups.
            self._pg = dist.new_group(backend="gloo")
            cuda = torch.cuda.is_available()
            # Synchronous staging: the copy is done when async_save returns, so the next
            # optimizer step cannot change what is being written.
            self._stager = DefaultStager(StagingOptions(
                use_pinned_memory=cuda, use_shared_memory=False, use_async_staging=False, use_non_blocking_copy=False,
            ))
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("*.tmp"):
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink()
        dist.barrier()

    def latest(self) -> Path | None:
        return resolve(self.root.parent)

    def save(self, step: int, model, optimizer, trainer_state: dict, config_yaml: str) -> SaveReport:
        """Write a checkpoint of this step; asynchronous saves return once the state is staged."""
        t0 = time.perf_counter()
        self.wait()  # never two saves at once; the previous one is complete and finalised
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f"step_{step:08d}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd}
        # Captured now, with the tensors: they describe the same step.
        self._write_small_files(tmp, trainer_state, config_yaml)
        if not self.async_save:
            dcp.save(state, checkpoint_id=str(tmp))
            dist.barrier()  # every rank's shards and RNG files are on disk
            if self.rank == 0:
                self._finalise(tmp, final)
            dist.barrier()
            return SaveReport(final, time.perf_counter() - t0)
        upload = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._pg, async_stager=self._stager)
        job = _InFlight(step, tmp, final, upload, threading.Event(), time.perf_counter())
        self._inflight = job
        if self.rank == 0:
            upload.add_done_callback(lambda f: self._on_written(job, f))
        return SaveReport(final, time.perf_counter() - t0)

    def _write_small_files(self, tmp: Path, trainer_state: dict, config_yaml: str) -> None:
        with open(tmp / f"rng_rank{self.rank}.pt", "wb") as f:
            torch.save(rng_state(), f)
            f.flush()
            os.fsync(f.fileno())
        if self.rank == 0:
            _fsync_write(tmp / "trainer.json", json.dumps(trainer_state, indent=2))
            _fsync_write(tmp / "config.yaml", config_yaml)

    def _on_written(self, job: _InFlight, upload: Future) -> None:
        """Rank 0, in the writer thread: every rank's write is complete (see the header)."""
        try:
            upload.result()
            self._finalise(job.tmp, job.final)
            print(f"train: checkpoint {job.final.name} complete, written {time.perf_counter() - job.staged_at:.2f} s "
                  "after staging", flush=True)
        except BaseException as e:  # raised to the training loop at the next wait()
            job.error = e
        finally:
            job.finalised.set()

    def _finalise(self, tmp: Path, final: Path) -> None:
        if final.exists():  # a checkpoint of the same step from an earlier, interrupted attempt
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        _fsync_write(self.root / LATEST, final.name)
        _fsync_dir(self.root)
        self._prune()

    def wait(self) -> float:
        """Block until the in-flight write (if any) is complete and, on rank 0, finalised; returns seconds waited."""
        job, self._inflight = self._inflight, None
        if job is None:
            return 0.0
        t0 = time.perf_counter()
        try:
            job.upload.result()
        except BaseException as e:
            raise RuntimeError(
                f"checkpoint {job.tmp} failed to write on rank {self.rank}; the previous checkpoint "
                f"({self.latest()}) is intact and is where a restart resumes"
            ) from e
        if self.rank == 0:
            job.finalised.wait()
            if job.error is not None:
                raise RuntimeError(
                    f"checkpoint {job.tmp} could not be finalised; the previous checkpoint ({self.latest()}) is intact"
                ) from job.error
        return time.perf_counter() - t0

    def close(self) -> float:
        """Finish the last write (before a run reports done), free the staging buffers; returns seconds waited."""
        waited = self.wait()
        dist.barrier()  # no rank leaves while rank 0 may still be finalising
        if self._stager is not None:
            self._stager.close()
            self._stager = None
        return waited

    def _prune(self) -> None:
        done = sorted(p for p in self.root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path, model, optimizer) -> dict:
        """Restore model, optimizer and this rank's RNG; returns the trainer state (step, data, scheduler)."""
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        rng = path / f"rng_rank{self.rank}.pt"
        if rng.exists():  # absent when resuming on a different number of ranks
            set_rng_state(load_rng(rng))
        return json.loads((path / "trainer.json").read_text())


def resolve(path: str | Path) -> Path | None:
    """A run folder -> its newest complete checkpoint; a checkpoint folder -> itself; else None."""
    path = Path(path)
    if (path / ".metadata").exists():
        return path
    pointer = path / "checkpoints" / LATEST
    if pointer.exists():
        ckpt = pointer.parent / pointer.read_text().strip()
        if (ckpt / ".metadata").exists():
            return ckpt
    return None


def load_model_weights(path: str | Path, model) -> Path:
    """Load only the model's weights from a checkpoint (stage 2 starting from stage 1), a fastross.export folder, or
    the reference ROSS layout / a stage-1 mm_projector.bin (fastross.ross_format)."""
    ckpt = resolve(path)
    if ckpt is None:
        from fastross import export, ross_format

        if export.is_export(path):
            return _load_export_weights(Path(path), model)
        if ross_format.is_reference(path):
            return ross_format.load_into(path, model)
        raise FileNotFoundError(f"model.init_from: {path} holds no complete fastross checkpoint, no fastross export "
                                "and no reference ROSS checkpoint or mm_projector.bin")
    msd = get_model_state_dict(model)
    dcp.load({"model": msd}, checkpoint_id=str(ckpt))
    set_model_state_dict(model, msd, options=StateDictOptions(strict=True))
    return ckpt


def _load_export_weights(folder: Path, model) -> Path:
    """Every rank reads the whole export (fastross.export.load_export) and keeps its shards; the VAE stays as loaded."""
    from fastross.export import load_export

    state = load_export(folder)
    have = set(get_model_state_dict(model, options=StateDictOptions(full_state_dict=False)))
    missing = sorted(k for k in have - state.keys() if not k.startswith("vae."))
    extra = sorted(state.keys() - have)
    if missing or extra:
        raise KeyError(f"model.init_from: the export {folder} does not fit this model: missing {missing[:5]}, "
                       f"unexpected {extra[:5]} (is model.* the export's fastross_config.yaml's?)")
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
    return folder
