"""Sharded DCP checkpoints that a crash cannot corrupt, with everything needed to resume exactly.

Layout of a run folder:
    run_dir/checkpoints/step_00000040/   DCP shards of model + optimizer, trainer.json,
                                         rng_rank{r}.pt, config.yaml, manifest.json (written last)
    run_dir/checkpoints/latest           the name of the newest complete checkpoint (a hint)

A checkpoint is written into `step_N.tmp/` and renamed only once every rank has finished;
`latest` is then replaced atomically, and only then are older checkpoints pruned: each is
renamed to `step_M.pruned.tmp/` (atomic) before it is deleted, so no moment of a prune leaves
a half-deleted `step_M/`. A crash during a save leaves the previous checkpoint and `latest`
untouched; stale `.tmp` folders are removed at the next start, which also finishes a prune the
crash interrupted (`Checkpointer.latest`).

Integrity. Once every rank's files are on disk, rank 0 hashes them (sha256, several files at
once) into `manifest.json`, the last file written before the rename. Loading picks the newest
checkpoint folder whose files match its manifest, whatever `latest` says; a corrupt or
incomplete newer one is skipped with a message naming the file, and a run folder that holds
checkpoints of which none verifies is an error, never a silent start from step 0. The manifest
proves integrity, not authorship: what a checkpoint holds is read by fastross.checkpoint_read,
which runs nothing a file holds (DCP's `.metadata` through a restricted unpickler, every other
pickle with `weights_only=True`, only the kinds of entries fastross writes).

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

Besides the save and the resume, the two reads of a finished checkpoint that other modules build on:
`load_model_state` (the model's weights alone) and `read_checkpoint` (config and full model state on one host). This
module knows DCP checkpoints only; `model.init_from`'s choice among a checkpoint, an export and the reference layout
is fastross.weights's, above it and the exports.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from fastross import config as fconfig
from fastross.checkpoint_read import (  # noqa: F401  (CheckpointError, read_metadata, SafeReader: fastross.checkpoint's)
    CheckpointError,
    SafeReader,
    check_scheduler_state,
    check_trainer_state,
    load_into,
    read_json_object,
    read_metadata,
    read_state,
    read_tensor_file,
)

LATEST = "latest"
MANIFEST = "manifest.json"


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()  # with SHA-NI (current x86) faster than blake2b
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):  # hashlib drops the GIL on large updates: files hash in parallel
            h.update(chunk)
    return h.hexdigest()


def hash_files(folder: Path, names: list[str]) -> dict[str, str]:
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(names)))) as pool:
        return dict(zip(names, pool.map(lambda n: _hash_file(folder / n), names)))


def write_manifest(folder: Path) -> None:
    """sha256 of every file of the checkpoint, written last (after every rank's files are on disk)."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)
    _fsync_write(folder / MANIFEST, json.dumps({"sha256": hash_files(folder, names)}, indent=1))


def verify(folder: Path) -> str | None:
    """None when every file listed in the manifest is there with its hash; else what is wrong, naming the file."""
    path = folder / MANIFEST
    if not path.is_file():
        return f"{path} is missing (an incomplete checkpoint, or one written before fastross kept manifests)"
    try:
        want = json.loads(path.read_bytes())["sha256"]
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        return f"{path} is unreadable ({e})"
    if not isinstance(want, dict) or not all(isinstance(v, str) for v in want.values()):
        return f"{path} is unreadable (its sha256 is not a table of file -> hash)"
    odd = [n for n in want if not isinstance(n, str) or "/" in n or n in ("", ".", "..", MANIFEST)]
    if odd:
        return f"{path} lists {odd[0]!r}, not a file of {folder}"
    if ".metadata" not in want:
        return f"{path} lists no .metadata"
    missing = [n for n in want if not (folder / n).is_file()]
    if missing:
        return f"{folder / missing[0]} is missing"
    got = hash_files(folder, sorted(want))
    bad = [n for n in sorted(want) if got[n] != want[n]]
    if bad:
        return f"{folder / bad[0]} does not match its hash in {path} ({len(bad)} file(s) differ)"
    return None


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
    """Read an `rng_rank{r}.pt` (fastross.checkpoint_read.read_tensor_file): tensors only, so a crafted pickle
    cannot run code."""
    state = read_tensor_file(path)
    for key in ("torch", *sorted(state)):
        if key not in ("torch", "cuda") or key not in state or state[key].dtype != torch.uint8:
            raise CheckpointError(
                f"{path}: refused to load key {key}: fastross writes the torch (and cuda) generator "
                "states there, as uint8 tensors"
            )
    return state


def read_hint(file: Path, say=None) -> str | None:
    """`checkpoints/latest`'s folder name, or None when it is absent or unreadable (it is a hint: said, not fatal)."""
    if not file.is_file():
        return None
    try:
        name = file.read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        if say:
            say(
                f"checkpoint: warning: {file} is unreadable ({e}); it is only a hint: taking the newest verified "
                "checkpoint instead"
            )
        return None
    if "/" in name or name in (".", ".."):
        if say:
            say(
                f"checkpoint: warning: {file} names {name!r}, not a checkpoint folder; it is only a hint: taking the "
                "newest verified checkpoint instead"
            )
        return None
    return name


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
            self._stager = DefaultStager(
                StagingOptions(
                    use_pinned_memory=cuda,
                    use_shared_memory=False,
                    use_async_staging=False,
                    use_non_blocking_copy=False,
                )
            )
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("*.tmp"):
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink()
        dist.barrier()

    def latest(self) -> Path | None:
        """The newest verified checkpoint (rank 0 hashes, every rank gets its answer), or None in a fresh run.

        Rank 0 also settles what an interrupted prune left: older checkpoints past `keep` are removed (the stale
        `*.pruned.tmp` folders went at construction, with the other `.tmp` ones)."""
        say = print if self.rank == 0 else None
        return agreed(lambda: self._settle(resolve(self.root.parent, say=say), say), self.rank)

    def _settle(self, newest: Path | None, say=None) -> Path | None:
        """Finish the prune that the save of `newest` began: of the checkpoint folders up to `newest` (a corrupt newer
        one is left for the next save of its step to replace), keep the newest `keep`."""
        if newest is None:
            return None
        done = sorted(
            (
                p
                for p in self.root.glob("step_*")
                if p.is_dir() and not p.name.endswith(".tmp") and _step_of(p) <= _step_of(newest)
            ),
            key=_step_of,
        )
        for old in done[: -self.keep]:
            try:
                discard(old)
            except OSError as e:  # a folder that stays costs disk space, not correctness: the next prune retries
                if say:
                    say(f"checkpoint: warning: could not remove {old.name} ({e})")
                continue
            if say:
                say(f"checkpoint: removed {old.name}, older than the newest {self.keep} (an interrupted prune)")
        return newest

    def save(self, step: int, model, optimizer, trainer_state: dict, config_yaml: str) -> SaveReport:
        """Write a checkpoint of this step; asynchronous saves return once the state is staged.

        A write that fails on any rank (a full disk) raises CheckpointError on every rank, naming the folder; the
        previous checkpoint stays the newest complete one."""
        t0 = time.perf_counter()
        self.wait()  # never two saves at once; the previous one is complete and finalised
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f"step_{step:08d}.tmp"
        err = None
        if self.rank == 0:
            err = _attempt(lambda: (shutil.rmtree(tmp, ignore_errors=True), tmp.mkdir(parents=True)))
        self._agree(err, tmp, "creating the folder")
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd}
        # Captured now, with the tensors: they describe the same step.
        self._agree(
            _attempt(lambda: self._write_small_files(tmp, trainer_state, config_yaml)),
            tmp,
            "writing the RNG state, trainer.json and config.yaml",
        )
        if not self.async_save:
            try:
                dcp.save(state, checkpoint_id=str(tmp))  # DCP gathers every rank's result: all raise or none
            except (Exception, CheckpointException) as e:  # DCP's own exception is a BaseException
                raise CheckpointError(
                    f"checkpoint {tmp}: DCP's write failed ({_first_line(e)}); {self._previous()}"
                ) from e
            dist.barrier()  # every rank's shards and RNG files are on disk
            if self.rank == 0:
                err = _attempt(lambda: (write_manifest(tmp), self._finalise(tmp, final)))
            self._agree(err, tmp, "writing its manifest and renaming it")
            return SaveReport(final, time.perf_counter() - t0)
        upload = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._pg, async_stager=self._stager)
        job = _InFlight(step, tmp, final, upload, threading.Event(), time.perf_counter())
        self._inflight = job
        if self.rank == 0:
            upload.add_done_callback(lambda f: self._on_written(job, f))
        return SaveReport(final, time.perf_counter() - t0)

    def hint(self) -> Path | None:
        """The newest checkpoint this run completed, as `latest` names it (for messages: no hashing, no collective)."""
        name = read_hint(self.root / LATEST)
        return self.root / name if name else None

    def _previous(self) -> str:
        previous = self.hint()
        return (
            f"the previous checkpoint {previous} is intact and is where a restart resumes"
            if previous
            else "no earlier checkpoint exists: a restart begins at step 0"
        )

    def _agree(self, err: BaseException | None, tmp: Path, what: str) -> None:
        """Collective: raise on every rank if `what` failed on any (a rank alone raising would hang the others)."""
        failed = torch.tensor([0.0 if err is None else 1.0], device=_collective_device())
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if failed.item():
            why = f"{_first_line(err)}" if err is not None else "it failed on another rank"
            raise CheckpointError(
                f"checkpoint {tmp}: {what} failed on rank {self.rank}: {why}; {self._previous()}"
            ) from err

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
            write_manifest(job.tmp)
            self._finalise(job.tmp, job.final)
            print(
                f"train: checkpoint {job.final.name} complete, written {time.perf_counter() - job.staged_at:.2f} s "
                "after staging",
                flush=True,
            )
        except BaseException as e:  # raised to the training loop at the next wait()
            job.error = e
        finally:
            job.finalised.set()

    def _finalise(self, tmp: Path, final: Path) -> None:
        if final.exists():  # a checkpoint of the same step from an earlier, interrupted attempt
            discard(final)
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
            raise CheckpointError(
                f"checkpoint {job.tmp} failed to write on rank {self.rank} ({_first_line(e)}); {self._previous()}"
            ) from e
        if self.rank == 0:
            job.finalised.wait()
            if job.error is not None:
                raise CheckpointError(
                    f"checkpoint {job.tmp} could not be finalised ({_first_line(job.error)}); {self._previous()}"
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
            discard(old)

    def load(self, path: Path, model, optimizer, scheduler=None) -> dict:
        """Restore model, optimizer, this rank's RNG and (given) the learning-rate schedule; returns the trainer state
        (step, data, scheduler). Every file is checked before anything is restored (fastross.checkpoint_read)."""
        trainer = read_json_object(path / "trainer.json")
        if scheduler is not None:
            check_trainer_state(trainer, path / "trainer.json")
            check_scheduler_state(trainer["scheduler"], scheduler.state_dict(), path / "trainer.json")
        rng_file = path / f"rng_rank{self.rank}.pt"
        rng = load_rng(rng_file) if rng_file.exists() else None  # absent when resuming on another number of ranks
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd}
        load_into(state, path)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        if rng is not None:
            set_rng_state(rng)
        if scheduler is not None:
            scheduler.load_state_dict(trainer["scheduler"])
        return trainer


def discard(folder: Path) -> None:
    """Delete a checkpoint folder so that no moment of it leaves a half-deleted checkpoint: it is first renamed to
    `<name>.pruned.tmp` (atomic, made durable), then deleted; a kill during the delete leaves a `.tmp` folder, which
    no reader takes for a checkpoint and the next start removes."""
    trash = folder.with_name(folder.name + ".pruned.tmp")
    if trash.exists():
        shutil.rmtree(trash)
    os.replace(folder, trash)
    _fsync_dir(folder.parent)
    shutil.rmtree(trash, ignore_errors=True)


def _attempt(fn) -> BaseException | None:
    try:
        fn()
    except OSError as e:
        return e
    return None


def _first_line(e: BaseException | None) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def agreed(find, rank: int) -> Path | None:
    """Rank 0 runs `find` (it hashes files: once, not on every rank) and every rank gets its result or its error."""
    if not dist.is_initialized():
        return find()
    box: list = [None]
    if rank == 0:
        try:
            box[0] = ("ok", find())
        except (CheckpointError, FileNotFoundError) as e:
            box[0] = ("error", e)
    dist.broadcast_object_list(box, src=0)  # between this job's own ranks
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def _step_of(folder: Path) -> int:
    try:
        return int(folder.name.removeprefix("step_"))
    except ValueError:
        return -1


def resolve(path: str | Path, say=None) -> Path | None:
    """A run folder -> its newest verified checkpoint; a checkpoint folder -> itself once verified; None when a run
    folder holds no checkpoint at all.

    `checkpoints/latest` is a hint: a newer verified folder wins and a corrupt one named by it is skipped, each said
    through `say`. A folder that holds checkpoints of which none verifies, or a `latest` that names a folder that
    does not exist with nothing else to resume, raises CheckpointError rather than let a run restart from step 0."""
    path = Path(path)
    if (path / ".metadata").exists() or (path / MANIFEST).exists():
        problem = verify(path)
        if problem:
            raise CheckpointError(f"{path}: not a verified checkpoint: {problem}")
        return path
    root = path / "checkpoints"
    hint_file = root / LATEST
    hint = read_hint(hint_file, say)
    found = sorted(
        (p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")), key=_step_of, reverse=True
    )
    if not found:
        if hint is not None:
            raise CheckpointError(
                f"{hint_file} names {hint}, but {root} holds no checkpoint folder: the run's checkpoints were moved "
                f"or deleted. Restore them, or delete {hint_file} to start this run from step 0"
            )
        return None
    skipped = []
    for ckpt in found:
        problem = verify(ckpt)
        if problem is None:
            if skipped and say:
                say(f"checkpoint: resuming from {ckpt.name}, the newest verified checkpoint")
            elif hint != ckpt.name and say:
                say(f"checkpoint: {hint_file} names {hint}; the newest verified checkpoint is {ckpt.name}")
            return ckpt
        skipped.append(problem)
        if say:
            say(f"checkpoint: skipping {ckpt.name}: {problem}")
    raise CheckpointError(
        f"{root} holds {len(found)} checkpoint(s) and none verifies ({'; '.join(skipped)}). Nothing was loaded: "
        f"restore a good copy, or move {root} away to start from step 0"
    )


def load_model_state(ckpt: Path, model) -> Path:
    """Only the model's weights from the verified checkpoint folder `ckpt` (model.init_from's fastross case,
    fastross.weights), read by fastross.checkpoint_read; every rank keeps its shards (DCP's collective when a process
    group is up)."""
    msd = get_model_state_dict(model)
    load_into({"model": msd}, ckpt)
    set_model_state_dict(model, msd, options=StateDictOptions(strict=True))
    return ckpt


def read_checkpoint(path: str | Path) -> tuple[Path, fconfig.Config, dict[str, torch.Tensor]]:
    """A run folder or checkpoint folder -> (checkpoint, its resolved config, the model's full state dict), on the
    host, in one process, read by fastross.checkpoint_read (nothing in the checkpoint runs): what the exports
    (fastross.export, fastross.ross_format) and fastross.build.checkpoint_model start from."""
    ckpt = resolve(path)
    if ckpt is None:
        raise FileNotFoundError(f"{path} holds no complete fastross checkpoint (no .metadata, no checkpoints/latest)")
    cfg_path = ckpt / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} is missing: the checkpoint was not written by fastross's trainer")
    cfg = fconfig.load(str(cfg_path), ["model.init_from="])  # the checkpoint's weights: where they started is moot
    return ckpt, cfg, read_state(ckpt, "model")
