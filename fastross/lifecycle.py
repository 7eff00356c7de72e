"""A run's processes and its folder: one trainer per run folder, and no process outliving the one that started it.

The lock is `run_dir/trainer.lock`: rank 0 holds an exclusive `flock` on it for the run's life and writes its host
and PID into it. The kernel drops a flock when its process dies, however it dies, so a lock left by a killed run is
free (stale) and the next trainer takes it over with a message naming the dead owner; a lock whose owner is alive is
refused, naming it. On NFS the flock is Linux's emulation over POSIX locks (lockd), held across hosts.

Shared memory: mosaicml-streaming leaves its /dev/shm segments behind when a process using them is killed;
`clean_dead_streaming_shm` removes, at start, those of runs that are gone and leaves live runs' alone.

Multiprocessing's folders: Python's multiprocessing makes a `pymp-*` folder under the temporary folder for its
listener sockets and removes it at a clean exit; a SIGKILLed run (every rank, torchrun) leaves them behind.
`clean_dead_multiprocessing_dirs` removes, at start, this user's folders whose every socket no process holds.

Parent death: torchrun's ranks and the loader's workers ask the kernel for SIGTERM when their parent dies
(`PR_SET_PDEATHSIG`), so killing torchrun alone ends the ranks, and a rank's end ends its workers, instead of leaving
them training into a folder no lock protects any more.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import signal
import socket
import stat
import sys
import tempfile
import time
from pathlib import Path

LOCK = "trainer.lock"


class RunLocked(RuntimeError):
    """Another live trainer holds the run folder."""


class RunLock:
    def __init__(self, run_dir: str | Path, say=print):
        """Take the lock of `run_dir` (created if missing) or raise RunLocked naming its holder."""
        self.path = Path(run_dir) / LOCK
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _owner(self.path)
            os.close(self.fd)
            raise RunLocked(
                f"{self.path.parent} is in use: a trainer ({owner}) holds {self.path}. Wait for it, stop it, or set "
                "train.run_dir to another folder"
            ) from None
        previous = _owner(self.path)
        if previous:  # written by a trainer that never released it: it is dead, or the flock would be held
            say(f"train: taking over the stale lock {self.path} of {previous}: that process is gone")
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(me).encode(), 0)

    def release(self) -> None:
        """Empty the file (a clean end leaves no stale owner to report) and drop the flock."""
        if self.fd < 0:
            return
        os.ftruncate(self.fd, 0)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = -1


def _owner(path: Path) -> str:
    try:
        rec = json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        return "an unreadable owner record"
    if not isinstance(rec, dict):
        return ""
    return f"host {rec.get('host')} pid {rec.get('pid')} since {rec.get('since')}"


@contextlib.contextmanager
def hold(run_dir: str | Path, is_main: bool, agree):
    """Rank 0 takes the run folder's lock for the block; `agree(message or None) -> message or None` shares its
    outcome with every rank (a broadcast), so that all ranks stop when it is refused, not only rank 0."""
    lock, refused = None, None
    if is_main:
        try:
            lock = RunLock(run_dir)
        except RunLocked as e:
            refused = str(e)
    refused = agree(refused)
    if refused:
        raise RunLocked(refused)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send `sig` to this process when its parent dies (Linux; a no-op elsewhere). If the parent is
    already gone (it died before this call), exit now."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_PDEATHSIG = 1
    if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        return
    if os.getppid() != parent or parent == 1:
        os._exit(1)


# mosaicml-streaming's shared-memory segments are named f"{N:06}_{name}" (streaming/base/shared/prefix.py), N the
# first free prefix, name one of streaming.base.constant.SHM_TO_CLEAN (0.13; tests/test_faults.py checks the list).
STREAMING_SHM = (
    "locals",
    "barrier",
    "next_epoch",
    "cache_usage",
    "shard_states",
    "shard_access_times",
    "resume",
    "epoch_shape",
    "epoch_data",
)


def clean_dead_streaming_shm(shm_dir: Path = Path("/dev/shm"), say=print) -> list[str]:
    """Unlink the streaming segments of dead runs: every prefix N none of whose segments a live process maps or holds
    open. streaming's own `clean_stale_shared_memory` unlinks every prefix, live runs' included; this one leaves
    those alone, and other users' segments too. Returns the names removed.

    A process that has created a segment but not yet mapped it (a moment inside streaming's start-up) looks dead here;
    fastross's trainer itself creates none (fastross/data/shards.py), so this only matters beside other streaming
    jobs, and it runs once, at start."""
    if not shm_dir.is_dir():
        return []
    ours = {}
    for p in shm_dir.iterdir():
        prefix, _, name = p.name.partition("_")
        if len(prefix) == 6 and prefix.isdigit() and name in STREAMING_SHM and _owned(p):
            ours.setdefault(prefix, []).append(p)
    if not ours:
        return []
    live = _prefixes_in_use(shm_dir)
    removed = []
    for prefix, paths in sorted(ours.items()):
        if prefix in live:
            continue
        for p in paths:
            try:
                p.unlink()
                removed.append(p.name)
            except FileNotFoundError:
                pass
    if removed:
        say(
            f"train: removed {len(removed)} shared-memory segment(s) of dead streaming runs from {shm_dir}: "
            f"{', '.join(removed[:6])}{' ...' if len(removed) > 6 else ''}"
        )
    return removed


def _owned(path: Path) -> bool:
    try:
        return path.stat().st_uid == os.getuid()
    except OSError:
        return False


def _prefixes_in_use(shm_dir: Path) -> set[str]:
    """Prefixes of the streaming segments that some live process maps (/proc/PID/maps) or holds open (/proc/PID/fd).
    One of this user's processes whose /proc entries cannot be read might use any of them: none is then removed."""
    live, root = set(), str(shm_dir) + "/"
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or proc.name == "1":  # init (in a sandbox often unreadable) runs no streaming job
            continue
        try:
            names = [ln.rsplit(None, 1)[-1] for ln in (proc / "maps").read_text().splitlines() if root in ln]
            for fd in (proc / "fd").iterdir():
                try:
                    names.append(os.readlink(fd))
                except OSError:
                    pass
        except PermissionError:
            try:
                if proc.stat().st_uid == os.getuid():  # ours but unreadable: be safe
                    return {p.name.partition("_")[0] for p in shm_dir.iterdir()}
            except OSError:
                pass
            continue
        except OSError:  # the process ended while being read
            continue
        for n in names:
            if n.startswith(root):
                live.add(n[len(root) :].partition("_")[0])
    return live


# ---------------------------------------------------------------- multiprocessing's pymp-* folders


def clean_dead_multiprocessing_dirs(tmp: str | Path | None = None, say=print) -> list[str]:
    """Remove this user's `pymp-*` folders (multiprocessing.util.get_temp_dir) under `tmp` (default: the temporary
    folder) that only a dead process can have used. Returns the folders removed.

    Such a folder holds the AF_UNIX listener sockets of one process (and of the children it forked). A live process
    either holds each of its sockets bound -- the kernel lists the path in /proc/net/unix until the socket is closed,
    and a SIGKILL closes it -- or has unlinked it (Listener.close does). So a folder is dead when it holds at least one
    socket, nothing but sockets, and none of them is bound. Left alone: a folder with no socket (a process may be
    about to bind its first one there), one holding anything else, another user's, and everything when
    /proc/net/unix cannot be read. (/proc/net/unix lists this network namespace's sockets: a process of this user in
    another namespace that shares this temporary folder would look dead.) A socket that goes away between the
    listing and the check means a live owner: its folder is kept. Not told apart: a live process that holds no
    socket of its own in its folder while a forked child that bound one there has died; its next listener there
    would fail."""
    root = Path(tmp or tempfile.gettempdir())
    try:
        candidates = sorted(p for p in root.glob("pymp-*") if not p.is_symlink() and p.is_dir() and _owned(p))
    except OSError:
        return []
    dead_candidates = {}
    for d in candidates:
        socks = _socket_files(d)
        if socks:
            dead_candidates[d] = socks
    if not dead_candidates:
        return []
    bound = _bound_unix_paths()
    if bound is None:
        return []
    removed = []
    for d, socks in dead_candidates.items():
        if any(str(p) in bound for p in socks):
            continue
        if _socket_files(d) != socks:  # changed since the listing (a socket closed and unlinked, or a new one): live
            continue
        for p in socks:
            try:
                p.unlink()
            except FileNotFoundError:
                pass
        try:
            d.rmdir()  # fails, and keeps the folder, if anything appeared in it meanwhile
        except OSError:
            continue
        removed.append(d.name)
    if removed:
        say(
            f"train: removed {len(removed)} multiprocessing folder(s) of dead processes from {root}: "
            f"{', '.join(removed[:4])}{' ...' if len(removed) > 4 else ''}"
        )
    return removed


def _socket_files(d: Path) -> dict[Path, int] | None:
    """{socket path: inode} of a folder holding only sockets of this user; None if it holds anything else (or
    cannot be read), {} when empty."""
    out = {}
    try:
        for p in d.iterdir():
            st = p.lstat()
            if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.getuid():
                return None
            out[p] = st.st_ino
    except OSError:
        return None
    return out


def _bound_unix_paths(table: Path = Path("/proc/net/unix")) -> set[str] | None:
    """The paths of every AF_UNIX socket open in this network namespace (/proc/net/unix's last column), None when
    the table cannot be read."""
    try:
        lines = table.read_text(errors="surrogateescape").splitlines()[1:]
    except OSError:
        return None
    paths = set()
    for line in lines:
        fields = line.split(None, 7)
        if len(fields) == 8 and fields[7].startswith("/"):
            paths.add(fields[7])
    return paths
