"""Sharded DCP checkpoints that a crash cannot corrupt, with everything needed to resume exactly.

Layout of a run folder:
    run_dir/checkpoints/step_00000040/   DCP shards of model + optimizer, trainer.json,
                                         rng_rank{r}.pt, config.yaml
    run_dir/checkpoints/latest           the name of the newest complete checkpoint

A checkpoint is written into `step_N.tmp/` and renamed only once every rank has finished;
`latest` is then replaced atomically. A crash during a save leaves the previous checkpoint
and `latest` untouched; stale `.tmp` folders are removed at the next start.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
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


class Checkpointer:
    def __init__(self, run_dir: str | Path, rank: int, keep: int):
        self.root = Path(run_dir) / "checkpoints"
        self.rank = rank
        self.keep = keep
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob("*.tmp"):
                shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink()
        dist.barrier()

    def latest(self) -> Path | None:
        return resolve(self.root.parent)

    def save(self, step: int, model, optimizer, trainer_state: dict, config_yaml: str) -> Path:
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f"step_{step:08d}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        msd, osd = get_state_dict(model, optimizer)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp))
        torch.save(rng_state(), tmp / f"rng_rank{self.rank}.pt")
        if self.rank == 0:
            (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=2))
            (tmp / "config.yaml").write_text(config_yaml)
        dist.barrier()  # every rank's shards and RNG files are on disk
        if self.rank == 0:
            if final.exists():  # a checkpoint of the same step from an earlier, interrupted attempt
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_write(self.root / LATEST, final.name)
            self._prune()
        dist.barrier()
        return final

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
    """Load only the model's weights from a checkpoint (stage 2 starting from stage 1)."""
    ckpt = resolve(path)
    if ckpt is None:
        raise FileNotFoundError(f"model.init_from: {path} holds no complete fastross checkpoint")
    msd = get_model_state_dict(model)
    dcp.load({"model": msd}, checkpoint_id=str(ckpt))
    set_model_state_dict(model, msd, options=StateDictOptions(strict=True))
    return ckpt
