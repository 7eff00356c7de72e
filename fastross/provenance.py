"""What a run was made with: fastross's git commit and the versions of the libraries its numbers depend on.

The trainer writes it to run_dir/versions.json at every start, beside config.yaml (a resumed run records the
versions it resumed with). Read through importlib.metadata and git, without importing any of the packages.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import subprocess
from pathlib import Path

FILE = "versions.json"
PACKAGES = ("torch", "transformers", "triton", "liger-kernel", "mosaicml-streaming")
SOURCE = Path(__file__).resolve().parent.parent  # the checkout's root when fastross runs from one


def versions() -> dict[str, str | None]:
    """Each of PACKAGES -> its installed version (None: not installed)."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(source: Path = SOURCE) -> dict | None:
    """{"commit": HEAD, "dirty": whether tracked files differ from it} of the git checkout fastross runs from; None
    when it runs from elsewhere (an installed wheel: the checkout's top must be the folder holding the package, not
    some repository that happens to contain a virtual environment) or git is absent."""

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(source), *args], capture_output=True, text=True, timeout=60)

    try:
        top = git("rev-parse", "--show-toplevel")
        if top.returncode or Path(top.stdout.strip()).resolve() != source:
            return None
        head = git("rev-parse", "HEAD").stdout.strip()
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return {"commit": head, "dirty": bool(dirty)}


def record() -> dict:
    return {"git": git_commit(), "python": platform.python_version(), "packages": versions()}


def write(run_dir: Path) -> dict:
    rec = record()
    (Path(run_dir) / FILE).write_text(json.dumps(rec, indent=1) + "\n")
    return rec
