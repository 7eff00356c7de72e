"""MDS shards on local disk (or fetched into a local cache: fastross.data.remote), read and written without
importing `streaming`.

Why our own reader: `import streaming` (mosaicml-streaming 0.13) imports all of its storage back-ends at
once (boto3, google-cloud, zstd, ...) and fails where any is missing, as on the lent GPU machines. And
`streaming.StreamingDataset` registers every folder in POSIX shared memory: processes that are not one
torch.distributed group (loader workers, several jobs on one machine) each act as the local leader, race to
create the same `/dev/shm/{N:06d}_locals` and fail with `FileExistsError`. fastross needs none of that: every
rank plans its own steps and reads its own samples by global id from shards already on local disk.

The format (mosaicml-streaming's MDS, index version 2): `index.json` lists the shards, each with its
`raw_data.basename`, sample count and columns (names sorted, their encodings, and their byte sizes, None
when variable). A shard file holds: the sample count (uint32), n + 1 uint32 file offsets of the samples (the
last is the file's end), the shard's config as sorted JSON, then the samples. A sample is the uint32 sizes of
its variable-size columns, in column order, then every column's bytes. Compressed shards (`compression` set,
only `zip_data` present) are refused: the converter writes them uncompressed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import xxhash

from fastross.data.schema import parse_json

# Fixed-size scalar encodings: numpy dtype of each.
SCALARS = {
    "int": "int64",
    "uint8": "uint8",
    "uint16": "uint16",
    "uint32": "uint32",
    "uint64": "uint64",
    "int8": "int8",
    "int16": "int16",
    "int32": "int32",
    "int64": "int64",
    "float16": "float16",
    "float32": "float32",
    "float64": "float64",
}
# ndarray value dtypes by the code streaming writes before the values when the encoding leaves the dtype open.
NDARRAY_DTYPES = {
    8: "uint8",
    9: "int8",
    16: "uint16",
    17: "int16",
    18: "float16",
    32: "uint32",
    33: "int32",
    34: "float32",
    64: "uint64",
    65: "int64",
    66: "float64",
}
SHAPE_DTYPES = ("uint8", "uint16", "uint32", "uint64")  # by the low 2 bits of an ndarray's ndim byte


def _ndarray_spec(encoding: str) -> tuple[str | None, tuple[int, ...] | None]:
    parts = encoding.split(":")[1:]
    dtype = parts[0] if parts else None
    shape = tuple(int(x) for x in parts[1].split(",")) if len(parts) > 1 else None
    return dtype, shape


def encoded_size(encoding: str) -> int | None:
    """Bytes of a fixed-size encoding, None when the size varies per sample."""
    if encoding in SCALARS:
        return np.dtype(SCALARS[encoding]).itemsize
    if encoding.startswith("ndarray"):
        dtype, shape = _ndarray_spec(encoding)
        return int(np.prod(shape)) * np.dtype(dtype).itemsize if dtype and shape else None
    if encoding in ("str", "bytes"):
        return None
    raise ValueError(f"MDS encoding {encoding!r} is not one fastross reads (str, bytes, int, scalars, ndarray)")


def decode(encoding: str, data: bytes):
    if encoding == "str":
        return data.decode("utf-8")
    if encoding == "bytes":
        return data
    if encoding in SCALARS:
        value = np.frombuffer(data, SCALARS[encoding])[0]
        return int(value) if encoding == "int" else value
    dtype, shape = _ndarray_spec(encoding)
    i = 0
    if dtype is None:
        dtype, i = NDARRAY_DTYPES[data[0]], 1
    if shape is None:
        ndim, shape_dtype = data[i] >> 2, np.dtype(SHAPE_DTYPES[data[i] & 3])
        shape = tuple(np.frombuffer(data, shape_dtype, ndim, i + 1))
        i += 1 + ndim * shape_dtype.itemsize
    return np.frombuffer(data, dtype, offset=i).reshape(shape)


def encode(encoding: str, value) -> bytes:
    if encoding == "str":
        return value.encode("utf-8")
    if encoding == "bytes":
        return bytes(value)
    if encoding in SCALARS:
        return np.asarray(value, SCALARS[encoding]).tobytes()
    dtype, shape = _ndarray_spec(encoding)
    value = np.asarray(value)
    head = b""
    if dtype is None:
        head += bytes([{v: k for k, v in NDARRAY_DTYPES.items()}[value.dtype.name]])
    elif value.dtype.name != dtype:
        raise ValueError(f"ndarray column of {dtype} given {value.dtype.name}")
    if value.size == 0:
        raise ValueError("MDS cannot store an empty ndarray")
    if shape is None:
        dims = np.asarray(value.shape, np.int64)
        code = next(c for c, t in enumerate(SHAPE_DTYPES) if dims.max() < 1 << (8 * np.dtype(t).itemsize))
        head += bytes([(value.ndim << 2) | code]) + dims.astype(SHAPE_DTYPES[code]).tobytes()
    elif value.shape != shape:
        raise ValueError(f"ndarray column of shape {shape} given {value.shape}")
    return head + value.tobytes()


class MDSShard:
    """One uncompressed shard file: its columns, and its samples by position."""

    def __init__(self, folder: Path, info: dict, remote=None):
        """remote: a fastross.data.remote.RemoteShards whose cache folder is `folder`: the file is fetched when
        first read, not required to be there now."""
        if info.get("format") != "mds":
            raise ValueError(f"{folder / 'index.json'}: shard format {info.get('format')!r} is not 'mds'")
        raw = folder / info["raw_data"]["basename"] if info.get("raw_data") else None
        if info.get("compression") or raw is None:
            raise FileNotFoundError(self._missing(raw or folder, info))
        if remote is not None:
            remote.register(info)
        # A missing local file is an error at its first read, not here: data.corrupt_shards=skip leaves it unread.
        self.missing = None if remote is not None or raw.is_file() else self._missing(raw, info)
        self.path, self.samples, self.remote = raw, int(info["samples"]), remote
        self.columns = list(zip(info["column_names"], info["column_encodings"]))
        for _, enc in self.columns:
            encoded_size(enc)  # refuses encodings we cannot decode now, not at the first read
        self.sizes = info["column_sizes"]

    @staticmethod
    def _missing(path: Path, info: dict) -> str:
        what = f"compressed ({info.get('compression')}); " if info.get("compression") else ""
        return (
            f"{path} is missing ({what}fastross reads uncompressed local MDS shards, as its converter writes "
            "them): convert again, or decompress the shards into this folder"
        )

    def raw(self, i: int) -> bytes:
        """Sample i's bytes as stored (variable sizes, then columns)."""
        if self.missing:
            raise FileNotFoundError(self.missing)
        with open(self.path, "rb", buffering=0) if self.remote is None else self.remote.open(self.path.name) as f:
            f.seek(4 + 4 * i)
            begin, end = np.frombuffer(f.read(8), np.uint32)
            f.seek(begin)
            return f.read(end - begin)

    def get_item(self, i: int) -> dict:
        data = self.raw(i)
        nvar = sum(s is None for s in self.sizes)
        var = iter(np.frombuffer(data, np.uint32, nvar).tolist())
        sizes = [s if s is not None else next(var) for s in self.sizes]
        sample, at = {}, 4 * nvar
        for (name, enc), size in zip(self.columns, sizes):
            sample[name] = decode(enc, data[at : at + size])
            at += size
        return sample


class MDSShards:
    def __init__(self, folder: str | Path, remote=None):
        """remote: the folder is a remote's cache folder (fastross.data.remote.RemoteShards), shards fetched on use."""
        self.folder = Path(folder)
        index_path = self.folder / "index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"{index_path} is missing: {folder} is not a folder of MDS shards")
        index = parse_json(index_path)  # a file that is not UTF-8 JSON is named
        if not isinstance(index, dict) or index.get("version") != 2:
            version = index.get("version") if isinstance(index, dict) else None
            raise ValueError(f"{index_path}: MDS index version {version!r}, fastross reads version 2")
        self.readers = [MDSShard(self.folder, shard, remote) for shard in index["shards"]]
        self.ends = np.cumsum([r.samples for r in self.readers])  # exclusive end id of each shard

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def read(self, sample_id: int) -> dict:
        """The sample with global id `sample_id` (its position among all the shards' samples)."""
        if not 0 <= sample_id < len(self):
            raise IndexError(f"sample {sample_id} is outside {self.folder}'s {len(self)} samples")
        shard = int(np.searchsorted(self.ends, sample_id, side="right"))
        start = int(self.ends[shard - 1]) if shard else 0
        return self.readers[shard].get_item(sample_id - start)


# Hashes of whole shard files recorded in index.json, under streaming's names (hex digests, as streaming writes them).
HASHES = {"xxh64": lambda data: xxhash.xxh64(data).hexdigest()}


class MDSWriter:
    """Writes uncompressed MDS shards (the same bytes as streaming's MDSWriter) into a new local folder.

    A shard is closed before the sample that would take it over `size_limit` bytes, counting each sample's
    4-byte offset and the shard's header, as streaming does."""

    def __init__(self, out: str | Path, columns: dict[str, str], size_limit: int = 1 << 26, hashes: list[str] = ()):
        unknown = sorted(set(hashes) - HASHES.keys())
        if unknown:
            raise ValueError(f"MDSWriter: unsupported shard hashes {unknown} (supported: {sorted(HASHES)})")
        self.hashes = sorted(hashes)
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.names = sorted(columns)
        self.encodings = [columns[n] for n in self.names]
        self.sizes = [encoded_size(e) for e in self.encodings]
        self.config = {
            "version": 2,
            "format": "mds",
            "compression": None,
            "hashes": self.hashes,
            "size_limit": size_limit,
            "column_names": self.names,
            "column_encodings": self.encodings,
            "column_sizes": self.sizes,
        }
        self.config_bytes = json.dumps(self.config, sort_keys=True).encode("utf-8")
        self.shards: list[dict] = []
        self.pending: list[bytes] = []
        self.pending_size = 8 + len(self.config_bytes)

    def write(self, sample: dict) -> None:
        heads, body = [], []
        for name, enc, size in zip(self.names, self.encodings, self.sizes):
            data = encode(enc, sample[name])
            if size is None:
                heads.append(len(data))
            elif size != len(data):
                raise ValueError(f"column {name!r} ({enc}) must encode to {size} bytes, got {len(data)}")
            body.append(data)
        data = np.asarray(heads, np.uint32).tobytes() + b"".join(body)
        if self.pending and self.config["size_limit"] < self.pending_size + len(data) + 4:
            self.flush()
        self.pending.append(data)
        self.pending_size += len(data) + 4

    def flush(self) -> None:
        n = len(self.pending)
        offsets = np.cumsum([0] + [len(s) for s in self.pending]) + 4 + 4 * (n + 1) + len(self.config_bytes)
        data = np.uint32(n).tobytes() + offsets.astype(np.uint32).tobytes() + self.config_bytes + b"".join(self.pending)
        name = f"shard.{len(self.shards):05}.mds"
        (self.out / name).write_bytes(data)
        self.shards.append(
            {
                "samples": n,
                "raw_data": {"basename": name, "bytes": len(data), "hashes": {h: HASHES[h](data) for h in self.hashes}},
                "zip_data": None,
                **self.config,
            }
        )
        self.pending, self.pending_size = [], 8 + len(self.config_bytes)

    def finish(self) -> None:
        if self.pending:
            self.flush()
        (self.out / "index.json").write_text(json.dumps({"version": 2, "shards": self.shards}, sort_keys=True))

    def __enter__(self) -> MDSWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.finish()
