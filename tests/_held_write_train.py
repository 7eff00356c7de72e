"""Test-only launcher: `fastross.train` with the DCP write of one checkpoint held until the process is killed.

    torchrun ... tests/_held_write_train.py config.yaml [overrides]

Environment (read here only, never by fastross): FASTROSS_TEST_HOLD_WRITE names the checkpoint
folder whose write to hold (e.g. step_00000006.tmp); FASTROSS_TEST_HOLD_MARKERS is a folder
where each rank drops `held_rank{r}` once its write is held. This makes "killed while an
asynchronous write is in flight" deterministic instead of a race against a fast disk.
"""

import os
import sys
import threading
from pathlib import Path

import torch.distributed as dist
from torch.distributed.checkpoint import filesystem

HOLD = os.environ["FASTROSS_TEST_HOLD_WRITE"]
MARKERS = Path(os.environ["FASTROSS_TEST_HOLD_MARKERS"])
_write_data = filesystem._FileSystemWriter.write_data


def write_data(self, plan, planner):
    if Path(self.path).name == HOLD:
        (MARKERS / f"held_rank{dist.get_rank()}").write_text("held")
        threading.Event().wait()  # forever: the test kills the process
    return _write_data(self, plan, planner)


filesystem._FileSystemWriter.write_data = write_data

if __name__ == "__main__":
    from fastross.train import main

    sys.exit(main(sys.argv[1:]))
