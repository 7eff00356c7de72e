"""`fastross.train` with one fault injected at a named moment (benchmarks/faults.py; never used by training itself).

    FASTROSS_FAULT=MOMENT:STEP FASTROSS_FAULT_MARKERS=DIR \\
        torchrun ... -m devtools.fault_train CONFIG [overrides]

Moments of checkpoint step STEP's save at which rank 0 drops DIR/hit_rank0 and then waits to be killed: the caller
SIGKILLs the run once the file appears, so "killed at this moment" is a state, not a race against a fast disk.
    small_files  step_N.tmp exists, empty
    dcp_write    DCP is writing the shards (every rank holds; async saves: the background write)
    manifest     every rank's files are on disk, the manifest not yet written
    rename       the manifest written, step_N.tmp not yet renamed
    renamed      renamed to step_N, `latest` still names the previous checkpoint
    latest       `latest` names step_N, older checkpoints not yet pruned
    prune        pruning: the oldest checkpoint renamed to step_M.pruned.tmp, its .metadata deleted, its other files not
Full disks (OSError ENOSPC where the write happens; the run then fails as it would on a real full disk):
    enospc_save     DCP's write of step_N.tmp, on every rank
    enospc_metrics  the record of step N in metrics.jsonl: half of it lands, then the disk is full

The environment is read here only; fastross never reads FASTROSS_FAULT.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import threading
from pathlib import Path

import torch.distributed as dist
from torch.distributed.checkpoint import filesystem

from fastross import checkpoint, metrics

MOMENTS = ("small_files", "dcp_write", "manifest", "rename", "renamed", "latest", "prune")
FULL_DISK = ("enospc_save", "enospc_metrics")


def hold(moment: str, markers: Path, every_rank: bool = False) -> None:
    """Say the moment is reached (rank 0, or every rank) and wait for the SIGKILL."""
    rank = dist.get_rank()
    if rank == 0 or every_rank:
        (markers / f"hit_rank{rank}").write_text(moment)
        threading.Event().wait()


def install(moment: str, step: int, markers: Path) -> None:
    """Wrap the one function where `moment` happens; the others stay as they are."""
    tmp_name, final_name = f"step_{step:08d}.tmp", f"step_{step:08d}"
    ck = checkpoint.Checkpointer

    if moment == "small_files":
        original_small = ck._write_small_files

        def write_small_files(self, tmp, *args):
            if tmp.name == tmp_name:
                hold(moment, markers)
            return original_small(self, tmp, *args)

        ck._write_small_files = write_small_files
    elif moment in ("dcp_write", "enospc_save"):
        original_write = filesystem._FileSystemWriter.write_data

        def write_data(self, plan, planner):
            if Path(self.path).name == tmp_name:
                if moment == "enospc_save":
                    raise OSError(errno.ENOSPC, "No space left on device")
                hold(moment, markers, every_rank=True)
            return original_write(self, plan, planner)

        filesystem._FileSystemWriter.write_data = write_data
    elif moment in ("manifest", "rename"):
        original_manifest = checkpoint.write_manifest

        def write_manifest(folder):
            if folder.name == tmp_name and moment == "manifest":
                hold(moment, markers)
            original_manifest(folder)
            if folder.name == tmp_name:
                hold(moment, markers)

        checkpoint.write_manifest = write_manifest
    elif moment in ("renamed", "latest"):
        original_fsync_write = checkpoint._fsync_write

        def fsync_write(path, text):
            pointer = path.name == checkpoint.LATEST and text == final_name
            if pointer and moment == "renamed":
                hold(moment, markers)
            original_fsync_write(path, text)
            if pointer:
                hold(moment, markers)

        checkpoint._fsync_write = fsync_write
    elif moment == "prune":
        original_prune = ck._prune

        def prune(self):
            done = sorted(p for p in self.root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
            if done and done[-1].name == final_name and len(done) > self.keep:
                trash = done[0].with_name(done[0].name + ".pruned.tmp")  # as checkpoint.discard renames it
                os.replace(done[0], trash)
                (trash / ".metadata").unlink()
                hold(moment, markers)
            return original_prune(self)

        ck._prune = prune
    elif moment == "enospc_metrics":
        original_append = metrics.append_line

        def append_line(path, line):
            if Path(path).name != "metrics.jsonl" or json.loads(line).get("step") != step:
                return original_append(path, line)
            real_write = os.write

            def half_then_full(fd, data):  # half the record lands, then the disk is full
                metrics.os.write = full
                return real_write(fd, bytes(data[: len(data) // 2]))

            def full(fd, data):
                raise OSError(errno.ENOSPC, "No space left on device")

            metrics.os.write = half_then_full
            try:
                return original_append(path, line)
            finally:
                metrics.os.write = real_write

        metrics.append_line = append_line
    else:
        raise ValueError(f"FASTROSS_FAULT: unknown moment {moment!r} (one of {MOMENTS + FULL_DISK})")


def main(argv=None) -> int:
    moment, step = os.environ["FASTROSS_FAULT"].split(":")
    install(moment, int(step), Path(os.environ.get("FASTROSS_FAULT_MARKERS", ".")))
    from fastross.train import main as train

    return train(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
