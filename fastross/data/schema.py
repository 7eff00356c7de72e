"""The MDS shard columns fastross writes and reads, and the metadata file beside them
(`read_meta`: the converter's whole report as a dict; `ShardMeta`: the typed facts training uses),
and the integrity facts a shard folder carries: the tokenizer's fingerprint, the VAE's latent
constants and each shard file's hash in index.json (`check_shard_file`), and the folder's manifest.

The manifest (`manifest.json`, written last by the converter and the merger) holds the sha256 of every other
file the trainer reads from the folder: fastross.json, index.json and lengths.npy. The shard files are covered
through index.json, which records each one's size and xxh64 (`check_shard_file`). So an edit to any file of a
converted folder (a VAE constant in fastross.json, a flipped byte in lengths.npy) is refused, naming the file,
before training reads it: `read_meta`, `read_index` and `read_lengths` verify the bytes they parse, and
`verify_folder` checks the whole folder.

Shards written before these existed are refused with a message to convert again: there is no
fallback that could guess which tokenizer or VAE scaling they were made with.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import xxhash

COLUMNS = {
    "id": "str",  # the record's id from the source JSON (or its line/position)
    "index": "int",  # position among the written samples: keys the sample's noise
    "input_ids": "ndarray:int32",  # text token ids; one `<image>` id stands for the whole image
    "labels": "ndarray:int32",  # input_ids with every non-assistant token set to -100
    "image": "bytes",  # the image file's bytes as read (empty for text-only samples)
    "length": "int",  # total tokens once the image expands: text + visual tokens
    "latent_mean": "bytes",  # VAE posterior mean, raw (C, 2g, 2g) of meta's latent_dtype; empty without
    "latent_std": "bytes",  # VAE posterior std, likewise
}
META_FILE = "fastross.json"  # conversion settings and counts, written beside the shards
SHARD_HASH = "xxh64"  # the hash MDSWriter records per shard file in index.json (streaming's name; xxhash's function)


INDEX_FILE = "index.json"  # MDS's list of shard files, with each one's size and hash
LENGTHS_FILE = "lengths.npy"  # int32 total length (text + visual tokens) of every sample, in order
MANIFEST_FILE = "manifest.json"  # sha256 of each of MANIFEST_COVERS, written last
MANIFEST_COVERS = (META_FILE, INDEX_FILE, LENGTHS_FILE)  # the shards are covered by index.json's hashes
MANIFEST_VERSION = 1
FINGERPRINT_VERSION = 2
# The parts of tokenizer.json that decide the ids of a text (its decoder does not; truncation and padding are
# fastross's to set, and it sets neither).
TOKENIZER_PARTS = ("normalizer", "pre_tokenizer", "model", "added_tokens", "post_processor")


class ShardCorruptError(ValueError):
    pass


def canonical_json(value) -> bytes:
    """One byte string per JSON value: keys sorted, no whitespace, UTF-8."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def tokenizer_fingerprint(tokenizer) -> dict:
    """What decides a tokenizer's ids, hashed (version 2): canonical JSON of its tokenizer.json's normalizer,
    pre-tokenizer, model (vocabulary and merges), added tokens and post-processor, its chat template and its
    special ids.

    Why the canonical JSON and not the ids of a probe text: every setting that can change an id is in those parts,
    so any change to them changes the hash, while a probe text only shows a change that it happens to exercise
    (a normalizer rule for a character it lacks, a merge it never reaches). Version 1 hashed the vocabulary alone:
    a changed normalizer (30 ids for a sample instead of 17) kept its fingerprint.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            f"{type(tokenizer).__name__} is not a fast tokenizer: fastross needs a folder with tokenizer.json"
        )
    spec = json.loads(backend.to_str())
    template = getattr(tokenizer, "chat_template", None)
    special = {
        name: tokenizer.convert_tokens_to_ids(tok)
        for name, tok in sorted(tokenizer.special_tokens_map.items())
        if isinstance(tok, str)
    }
    whole = {"tokenizer": {k: spec.get(k) for k in TOKENIZER_PARTS}, "chat_template": template, "special_ids": special}
    return {
        "version": FINGERPRINT_VERSION,
        "sha256": hashlib.sha256(canonical_json(whole)).hexdigest(),
        "vocab_size": len(tokenizer),
        "special_ids": special,
    }


def fingerprint_problem(stored, ours: dict, where: str, tokenizer: str) -> str | None:
    """None when the data's tokenizer fingerprint (`stored`, recorded in `where`) equals `ours`, that of the
    tokenizer folder `tokenizer`; else what to say."""
    if not isinstance(stored, dict) or stored.get("version") != FINGERPRINT_VERSION:
        return (
            f"{where} records a tokenizer fingerprint of an older fastross (of the vocabulary only, not the "
            "normalizer, pre-tokenizer, merges or chat template), so whether the tokenizer in "
            f"{tokenizer} gives the same ids cannot be checked: convert the data again with --tokenizer {tokenizer}"
        )
    if stored != ours:
        return (
            f"{where} was tokenised by another tokenizer than the one in {tokenizer} (fingerprint "
            f"{str(stored.get('sha256'))[:16]}, vocabulary {stored.get('vocab_size')}, special ids "
            f"{stored.get('special_ids')}; {tokenizer}: {ours['sha256'][:16]}, {ours['vocab_size']}, "
            f"{ours['special_ids']}): convert the data again with --tokenizer {tokenizer}"
        )
    return None


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_manifest(folder: str | Path) -> dict:
    """Hash the folder's MANIFEST_COVERS into its manifest.json (call it when they are all written); returns it.

    A folder of prompt facts only (fastross.json, no samples: what fastross.convert_checkpoint writes) lists
    fastross.json alone; a loader that needs index.json or lengths.npy then refuses it (`verified_bytes`)."""
    folder = Path(folder)
    covers = [n for n in MANIFEST_COVERS if n == META_FILE or (folder / n).exists()]
    manifest = {"version": MANIFEST_VERSION, "sha256": {n: _sha256((folder / n).read_bytes()) for n in covers}}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def parse_json(path: Path, data: bytes | None = None):
    """A JSON file's value; a file that is not UTF-8 JSON is a ShardCorruptError naming it."""
    try:
        if data is None:
            data = path.read_bytes()
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ShardCorruptError(f"{path}: not UTF-8 text (byte {e.start}): the file is corrupt") from None
    except json.JSONDecodeError as e:
        raise ShardCorruptError(
            f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}): the file is corrupt"
        ) from None
    except RecursionError:
        raise ShardCorruptError(f"{path}: JSON nested too deeply: the file is corrupt") from None


def read_manifest(folder: str | Path) -> dict[str, str]:
    """The folder's manifest: file name -> sha256. A folder without one was written before fastross verified data
    sets as a whole (or not by fastross): refused, with a message to convert it again."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise ShardCorruptError(
            f"{path} is missing: {folder} was converted before fastross verified converted folders as a whole (or "
            "not by fastross), so an edit to its files could not be noticed; convert it again with "
            "`python -m fastross.data.convert` (and merge parts with `python -m fastross.data.merge`)"
        )
    manifest = parse_json(path)
    hashes = manifest.get("sha256") if isinstance(manifest, dict) else None
    if (
        (manifest.get("version") if isinstance(manifest, dict) else None) != MANIFEST_VERSION
        or not isinstance(hashes, dict)
        or META_FILE not in hashes
        or not set(hashes) <= set(MANIFEST_COVERS)
    ):
        raise ShardCorruptError(
            f"{path}: not a version-{MANIFEST_VERSION} manifest of {', '.join(MANIFEST_COVERS)}; convert the data again"
        )
    return hashes


def verified_bytes(folder: str | Path, name: str) -> bytes:
    """The bytes of one of the folder's MANIFEST_COVERS, once their sha256 matches the manifest's."""
    path = Path(folder) / name
    expected = read_manifest(folder).get(name)
    if expected is None:  # a folder of prompt facts only (write_manifest)
        raise ShardCorruptError(
            f"{path}: not listed in {Path(folder) / MANIFEST_FILE}: {folder} holds no samples "
            "(or its manifest was edited); convert the data again"
        )
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        fix = (
            f"rebuild it with `python -m fastross.data.index {folder}`"
            if name == LENGTHS_FILE
            else "convert the data again"
        )
        raise FileNotFoundError(f"{path} is missing: {Path(folder) / MANIFEST_FILE} lists it; {fix}") from None
    if _sha256(data) != expected:
        raise ShardCorruptError(
            f"{path}: its sha256 differs from {Path(folder) / MANIFEST_FILE}'s: the file was "
            "changed after conversion; restore it or convert the data again"
        )
    return data


def verify_folder(folder: str | Path) -> None:
    """Refuse a converted folder any of whose files differs from its manifest (the shards: from index.json,
    checked by `check_shard_file` where they are opened), naming the file."""
    for name in MANIFEST_COVERS:
        verified_bytes(folder, name)


def read_index(folder: str | Path) -> dict:
    """The folder's index.json, verified against its manifest."""
    return parse_json(Path(folder) / INDEX_FILE, verified_bytes(folder, INDEX_FILE))


def read_lengths(folder: str | Path) -> np.ndarray:
    """The folder's lengths.npy (int32, one per sample), verified against its manifest."""
    path = Path(folder) / LENGTHS_FILE
    data = verified_bytes(folder, LENGTHS_FILE)
    try:
        lengths = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ShardCorruptError(f"{path}: not a numpy array file ({e})") from None
    if lengths.ndim != 1 or lengths.dtype.kind not in "iu":
        raise ShardCorruptError(
            f"{path}: a {lengths.dtype} array of shape {lengths.shape}, expected one integer per sample"
        )
    return lengths


def check_shard_file(folder: str | Path, shard: dict) -> str | None:
    """One index.json shard entry -> None when its raw file has the recorded size and hash, else what is wrong.

    Reads the whole file: call it once per shard, when the shard is first opened.
    """
    raw = shard["raw_data"]
    path = Path(folder) / raw["basename"]
    expected = (raw.get("hashes") or {}).get(SHARD_HASH)
    if expected is None:
        return f"{path}: index.json records no {SHARD_HASH} hash; convert the data again with fastross.data.convert"
    try:
        data = path.read_bytes()
    except OSError as e:
        return f"{path}: cannot be read ({e.strerror})"
    if len(data) != raw["bytes"]:
        return f"{path}: {len(data)} bytes, index.json records {raw['bytes']}"
    if xxhash.xxh64(data).hexdigest() != expected:
        return f"{path}: its {SHARD_HASH} hash differs from index.json's: the file is corrupt"
    return None


def corrupt_shards(folder: str | Path) -> list[tuple[range, str]]:
    """Check every shard file of `folder` against index.json: (the sample ids it holds, the problem) per bad one.
    An intact file whose own sample count differs from index.json's raises ShardCorruptError: the index is wrong."""
    index_path = Path(folder) / INDEX_FILE
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path} is missing: {folder} is not a folder of MDS shards")
    bad, start = [], 0
    for shard in read_index(folder)["shards"]:
        problem = check_shard_file(folder, shard)
        if problem is not None:
            bad.append((range(start, start + shard["samples"]), problem))
        elif (held := _samples_held(folder, shard)) != shard["samples"]:
            # The file is intact but index.json is not: every later sample id would be off. Not skippable.
            raise ShardCorruptError(
                f"{Path(folder) / shard['raw_data']['basename']}: holds {held} samples, {index_path} records "
                f"{shard['samples']}: index.json was edited or belongs to other shards; convert the data again"
            )
        start += shard["samples"]
    return bad


def _samples_held(folder: str | Path, shard: dict) -> int:
    """The sample count an MDS shard file states in its first 4 bytes (little-endian uint32)."""
    with open(Path(folder) / shard["raw_data"]["basename"], "rb") as f:
        return int.from_bytes(f.read(4), "little")


def read_meta(shards: str | Path) -> dict:
    """The folder's fastross.json, verified against its manifest."""
    path = Path(shards) / META_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: {shards} was not written by `python -m fastross.data.convert`")
    meta = parse_json(path, verified_bytes(shards, META_FILE))
    if not isinstance(meta, dict):
        raise ShardCorruptError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    return meta


@dataclass(frozen=True)
class ShardMeta:
    """The facts about a shard folder that training needs, typed (read from its fastross.json)."""

    template: str  # prompt template the converter used
    image_aspect: str  # "pad" (mean-colour square first) or "square"
    grid: int  # vision patch grid g: an image is g * g visual tokens
    image_token_id: int  # the `<image>` token id
    latents: bool  # the samples carry VAE latent moments
    latent_channels: int | None  # C of the stored moments (None without latents)
    latent_shift: float | None  # the encoding VAE's shift factor (None without latents)
    latent_scale: float | None  # the encoding VAE's scaling factor (None without latents)
    latent_dtype: str  # numpy dtype of the stored moments
    tokenizer: str  # the tokenizer folder the converter used (for messages)
    tokenizer_fingerprint: dict  # schema.tokenizer_fingerprint of that tokenizer

    @property
    def num_visual_tokens(self) -> int:
        return self.grid * self.grid

    @classmethod
    def read(cls, shards: str | Path) -> ShardMeta:
        meta = read_meta(shards)
        try:
            return cls(**{f.name: meta[f.name] for f in fields(cls)})
        except KeyError as e:
            raise ValueError(
                f"{Path(shards) / META_FILE} has no {e.args[0]!r}: convert the data again with "
                "`python -m fastross.data.convert`"
            ) from None

    def decode_latent(self, raw: bytes) -> np.ndarray:
        """Stored latent moment bytes -> float32 array (C, 2g, 2g)."""
        side = 2 * self.grid
        return np.frombuffer(raw, dtype=self.latent_dtype).reshape(self.latent_channels, side, side).astype(np.float32)
