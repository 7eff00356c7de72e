"""What a benchmark records beside its figures: the commit, the machine, the date.

Benchmarks print their results; they append rows to the committed CSVs under
benchmarks/results/ only when asked (`--save`), so that running one never dirties the tree.
"""

from __future__ import annotations

import csv
import datetime
import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def commit() -> str:
    """The short commit, with `-dirty` when tracked files differ from it; $FASTROSS_COMMIT overrides."""
    if os.environ.get("FASTROSS_COMMIT"):
        return os.environ["FASTROSS_COMMIT"]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    """The GPU's name when there is one, else the CPU's model and core count."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next(
        (ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")),
        platform.processor() or platform.machine(),
    )
    return f"{model} x{os.cpu_count()}"


def today() -> str:
    return datetime.date.today().isoformat()


def append_csv(name: str, header: list[str], rows: list[list]) -> Path:
    """Append rows to benchmarks/results/NAME (the header first when the file is new); returns its path."""
    path = RESULTS / name
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(header)
        w.writerows(rows)
    return path
