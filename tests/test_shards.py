"""fastross's own MDS reader and writer against mosaicml-streaming's, on shards the converter writes."""

import json
import subprocess
import sys

import numpy as np
import pytest

from fastross.data.schema import COLUMNS
from fastross.data.shards import MDSShards, MDSWriter


def same(a, b) -> bool:
    """Equal values of the same type; arrays: dtype, shape and bytes."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    return type(a) is type(b) and a == b


def streaming_samples(folder):
    from streaming.base.format import reader_from_json

    index = json.loads((folder / "index.json").read_text())
    readers = [reader_from_json(str(folder), None, shard) for shard in index["shards"]]
    return [r.get_item(i) for r in readers for i in range(r.samples)]


def test_reader_returns_streamings_samples_byte_for_byte(stage2_shards):
    ours = MDSShards(stage2_shards)
    theirs = streaming_samples(stage2_shards)
    assert len(ours) == len(theirs) > 0
    for i, t in enumerate(theirs):
        o = ours.read(i)
        assert o.keys() == t.keys() == COLUMNS.keys()
        bad = [k for k in t if not same(o[k], t[k])]
        assert not bad, f"sample {i}: columns {bad} differ from streaming's reader"
    with pytest.raises(IndexError, match="outside"):
        ours.read(len(ours))


def test_writer_writes_streamings_bytes_across_several_shards(stage2_shards, tmp_path):
    from streaming import MDSWriter as StreamingWriter

    samples = [MDSShards(stage2_shards).read(i) for i in range(12)]
    # every encoding the MDS format has that fastross may meet: scalars, dtype left open, a fixed shape
    columns = {**COLUMNS, "f": "float32", "open": "ndarray", "fixed": "ndarray:int16:2,3"}
    for k, s in enumerate(samples):
        s.update(
            f=np.float32(k / 3),
            open=np.arange(k + 1, dtype=np.float16).reshape(-1, 1),
            fixed=np.full((2, 3), k, np.int16),
        )
    limit = 3 * max(len(s["image"]) + len(s["latent_mean"]) * 2 for s in samples)  # forces several shards
    with StreamingWriter(out=str(tmp_path / "theirs"), columns=columns, size_limit=limit, hashes=["xxh64"]) as w:
        for s in samples:
            w.write(s)
    with MDSWriter(tmp_path / "ours", columns, size_limit=limit, hashes=["xxh64"]) as w:
        for s in samples:
            w.write(s)
    names = sorted(p.name for p in (tmp_path / "theirs").iterdir())
    assert len(names) > 3 and names == sorted(p.name for p in (tmp_path / "ours").iterdir())
    for name in names:
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "theirs" / name).read_bytes(), name
    assert json.loads((tmp_path / "ours" / "index.json").read_text())["shards"][0]["raw_data"]["hashes"]["xxh64"]
    back = MDSShards(tmp_path / "ours")
    for i, s in enumerate(samples):
        assert all(same(back.read(i)[k], s[k] if k != "index" else int(s[k])) for k in columns)


def test_compressed_shards_are_refused_by_name(stage2_shards, tmp_path):
    from streaming import MDSWriter as StreamingWriter

    with StreamingWriter(out=str(tmp_path / "z"), columns=COLUMNS, compression="zstd") as w:
        w.write(MDSShards(stage2_shards).read(0))
    with pytest.raises(FileNotFoundError, match=r"shard\.00000\.mds is missing \(compressed \(zstd\); .*decompress"):
        MDSShards(tmp_path / "z")


def test_training_reads_and_indexes_shards_without_importing_streaming(stage2_shards, tmp_path):
    """As on the GPU image, where `import streaming` fails: blocked here, the step stream and the index work."""
    (tmp_path / "s").mkdir()
    for p in stage2_shards.iterdir():
        if p.name != "lengths.npy":
            (tmp_path / "s" / p.name).symlink_to(p)
    code = f"""
import sys
sys.modules['streaming'] = None  # import streaming raises ImportError
import fastross.data.index as index
index.native_layout = lambda shards: None  # the python reader, not the native one
lengths = index.build({str(tmp_path / "s")!r})
from fastross.data.stream import StepStream
step = StepStream({str(tmp_path / "s")!r}, 8, 0, 1, True, 0, 4096, 0.0).step(0)
print(int(lengths.sum()), sum(len(mb) for mb in step.micro_batches))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    total, samples = map(int, out.stdout.split())
    assert total == int(np.load(stage2_shards / "lengths.npy").sum()) and samples == 8
