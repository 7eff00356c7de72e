"""Shard folders in object storage, read through a local cache with a size limit.

A source whose `shards` is a URL (s3://, gs://, oci://, hf://, ..., or file:// for a path on a network
filesystem served the same way) is fetched with mosaicml-streaming's downloaders (`CloudDownloader`,
streaming.base.storage) into `data.cache_dir/<hash of the URL>/`: first its length index (manifest.json,
index.json, fastross.json, lengths.npy, verified against the manifest), which is all planning needs, then each shard
file when a sample in it is first read. A downloaded shard is hash-checked against index.json before it is put in
place, so a shard in the cache is always whole and correct. When the shards of all remote sources would exceed
`data.cache_limit`, the least recently used shard files are deleted first.

streaming is imported here only, and only when a remote is opened: its imports are heavy, and fail where any of
its storage back-ends is missing (docs/DEVELOPING.md). The downloader is made once per process (loader workers are
forked, and cloud clients are not fork-safe).

Several processes (ranks and loader workers on one machine) share a cache folder: every file lands by an atomic
rename of a file private to its process, so a reader never sees a partial file, and a reader whose shard was
evicted between its check and its open downloads it again (`RemoteShards.open`).
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.parse
from pathlib import Path

from fastross.data.schema import LENGTHS_FILE, MANIFEST_FILE, META_FILE, ShardCorruptError, check_shard_file

# Fetched first, never evicted; the trainer verifies the other three against the manifest before using them.
INDEX_FILES = (MANIFEST_FILE, "index.json", META_FILE, LENGTHS_FILE)
SHARD_SUFFIX = ".mds"


def is_remote(shards: str) -> bool:
    """A URL with a scheme (s3://, gs://, file://, ...), as opposed to a local folder."""
    return "://" in shards


def cache_folder(cache_dir: str | Path, url: str) -> Path:
    """The cache folder of one remote: a hash of its URL, with the URL's last part kept readable."""
    tail = re.sub(r"[^A-Za-z0-9._-]", "_", url.rstrip("/").rsplit("/", 1)[-1])[:40]
    return Path(cache_dir).expanduser() / f"{tail}-{hashlib.sha256(url.encode()).hexdigest()[:12]}"


def _downloader_path(url: str) -> str:
    """What streaming's downloaders take: the URL itself, or for file:// the plain path (its local 'remote')."""
    parsed = urllib.parse.urlparse(url)
    return parsed.path if parsed.scheme == "file" else url


class Downloader:
    """streaming's downloader for one URL scheme, made lazily once per process."""

    def __init__(self, url: str):
        self.url = url
        self._client, self._pid = None, None

    def download(self, name: str, local: Path, timeout: float = 60.0) -> None:
        if self._pid != os.getpid():
            from streaming.base.storage import CloudDownloader  # heavy: only for remote sources

            self._client, self._pid = CloudDownloader.get(_downloader_path(self.url)), os.getpid()
        remote = _downloader_path(self.url).rstrip("/") + "/" + name
        try:
            self._client.download(remote, str(local), timeout)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{self.url}: {name} is missing there ({e})") from None


class RemoteShards:
    """One remote shard folder mirrored on demand into its cache folder."""

    def __init__(self, url: str, cache_dir: str | Path, cache_limit: int):
        self.url, self.limit = url, cache_limit
        self.root = Path(cache_dir).expanduser()
        self.local = cache_folder(cache_dir, url)
        self.local.mkdir(parents=True, exist_ok=True)
        self.downloader = Downloader(url)
        for name in INDEX_FILES:
            self._fetch(name)
        self.infos: dict[str, dict] = {}

    def _fetch(self, name: str) -> Path:
        """name into the cache folder unless there already (an atomic rename of this process's own copy)."""
        path = self.local / name
        if not path.exists():
            part = self.local / f".{name}.{os.getpid()}.part"
            part.unlink(missing_ok=True)
            self.downloader.download(name, part)
            os.replace(part, path)
        return path

    def register(self, info: dict) -> None:
        """Remember a shard's index.json entry (its size and hash, checked when it is downloaded)."""
        self.infos[info["raw_data"]["basename"]] = info

    def open(self, name: str):
        """The shard file `name`, opened for reading: downloaded, checked and made room for first if missing."""
        for _ in range(3):  # another process may evict it between our check and our open
            path = self.local / name
            if path.exists():
                os.utime(path)  # recently used: evicted last
            else:
                self._download_shard(name)
            try:
                return open(path, "rb", buffering=0)
            except FileNotFoundError:
                continue
        raise FileNotFoundError(
            f"{self.url}: {name} keeps being evicted from {self.local}: raise data.cache_limit ({self.limit} bytes)"
        )

    def _download_shard(self, name: str) -> None:
        info = self.infos[name]
        size = int(info["raw_data"]["bytes"])
        if size > self.limit:
            raise ValueError(
                f"{self.url}: shard {name} is {size} bytes, more than data.cache_limit ({self.limit} "
                "bytes): raise the limit"
            )
        part = self.local / f".{name}.{os.getpid()}.part"
        part.unlink(missing_ok=True)
        self.downloader.download(name, part)
        problem = check_shard_file(self.local, {**info, "raw_data": {**info["raw_data"], "basename": part.name}})
        if problem is not None:
            part.unlink(missing_ok=True)
            raise ShardCorruptError(f"{self.url}/{name} (downloaded to {part}): {problem}")
        evict(self.root, self.limit - size)
        os.replace(part, self.local / name)


def cached_shards(root: Path) -> list[tuple[float, int, Path]]:
    """(last use, bytes, path) of every shard file under the cache root, oldest first."""
    found = []
    for path in root.glob(f"*/*{SHARD_SUFFIX}"):
        try:
            st = path.stat()
        except FileNotFoundError:  # evicted by another process meanwhile
            continue
        found.append((st.st_mtime, st.st_size, path))
    return sorted(found)


def evict(root: Path, budget: int) -> None:
    """Delete the least recently used shard files under root until the rest hold at most `budget` bytes."""
    found = cached_shards(root)
    total = sum(size for _, size, _ in found)
    for _, size, path in found:
        if total <= budget:
            break
        path.unlink(missing_ok=True)
        total -= size
