"""Shards read from a remote (a local folder served as one through file://, as streaming serves a plain path) into a
size-limited cache (fastross.data.remote), and the block shuffle that suits it."""

import json
import math
import shutil

import numpy as np
import pytest

from fastross.config import SourceConfig, parse_size
from fastross.data.remote import INDEX_FILES, cached_shards
from fastross.data.schema import COLUMNS, META_FILE, SHARD_HASH, ShardCorruptError, write_manifest
from fastross.data.shards import MDSShards, MDSWriter
from fastross.data.sources import open_source
from fastross.data.stream import StepStream


@pytest.fixture(scope="module")
def resharded(stage2_samples, stage2_shards, tmp_path_factory):
    """The stage-2 samples rewritten into about 6 shard files (the converter's one file is too few to evict)."""
    from fastross.data.index import build

    out = tmp_path_factory.mktemp("resharded") / "shards"
    total = sum(len(s["image"]) + len(s["latent_mean"]) * 2 for s in stage2_samples)
    with MDSWriter(out, COLUMNS, size_limit=total // 6, hashes=[SHARD_HASH]) as w:
        for s in stage2_samples:
            w.write(s)
    shutil.copy(stage2_shards / META_FILE, out / META_FILE)
    build(out)
    write_manifest(out)
    return out


def shard_bytes(folder):
    return [s["raw_data"]["bytes"] for s in json.loads((folder / "index.json").read_text())["shards"]]


def test_remote_cache_fetches_the_index_first_evicts_and_reads_what_the_folder_holds(resharded, tmp_path):
    sizes = shard_bytes(resharded)
    limit = 2 * max(sizes)
    assert len(sizes) >= 5
    src = open_source(SourceConfig(f"file://{resharded}"), str(tmp_path / "cache"), str(limit))
    assert sorted(p.name for p in src.folder.iterdir()) == sorted(INDEX_FILES)  # the length index, no shard yet
    local = MDSShards(resharded)
    for i in range(len(local)):  # every shard in turn: each download past the limit evicts the oldest
        got, ref = src.reader.read(i), local.read(i)
        assert got.keys() == ref.keys() and got["id"] == ref["id"] and got["latent_mean"] == ref["latent_mean"]
        assert np.array_equal(got["input_ids"], ref["input_ids"])
        held = cached_shards(tmp_path / "cache")
        assert sum(size for _, size, _ in held) <= limit and len(held) <= 2
    assert {p.name for _, _, p in held} <= {f"shard.{k:05}.mds" for k in range(len(sizes))}
    assert not list(src.folder.glob(".*.part"))  # nothing half-written left behind


def test_remote_shard_that_fails_its_hash_is_refused_by_name(resharded, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(resharded, broken)
    path = broken / "shard.00001.mds"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    src = open_source(SourceConfig(f"file://{broken}"), str(tmp_path / "cache"), "1gb")
    first = int(src.shard_samples[0])
    src.reader.read(0)  # an intact shard reads
    with pytest.raises(ShardCorruptError, match="shard.00001.mds"):
        src.reader.read(first)
    assert not (src.folder / "shard.00001.mds").exists()


def test_remote_source_defaults_to_the_block_shuffle(resharded, tmp_path):
    """data.shuffle=auto is block for a URL: a step's samples come from one window of shards, each sample once per
    epoch; a local folder keeps the global permutation, bit for bit."""
    src = open_source(SourceConfig(f"file://{resharded}"), str(tmp_path / "cache"), "1gb")
    window = 2
    stream = StepStream([src], 4, 0, 1, "auto", 7, max_tokens=10**6, attn_tokens=1e4, window=window)
    assert stream.orders[0].shuffle == "block"
    ends = np.cumsum(src.shard_samples)
    order = stream.epoch_order(0)
    assert sorted(order.tolist()) == list(range(len(src.lengths)))
    shard_of = np.searchsorted(ends, order, side="right")
    cut = np.cumsum([src.shard_samples[s] for s in dict.fromkeys(shard_of.tolist())])
    for w in range(0, len(cut), window):  # each window of the shard order is one contiguous stretch of the epoch
        lo = cut[w - 1] if w else 0
        hi = cut[min(w + window, len(cut)) - 1]
        assert len(set(shard_of[lo:hi].tolist())) <= window
    assert stream.epoch_order(1).tolist() != order.tolist()
    fresh = StepStream([src], 4, 0, 1, "block", 7, max_tokens=10**6, attn_tokens=1e4, window=window)
    assert fresh.epoch_order(0).tolist() == order.tolist()  # a resumed run's stream: the same order
    src.corrupt = [(range(0, int(src.shard_samples[0])), "shard.00000.mds: corrupt")]  # data.corrupt_shards=skip
    skipping = StepStream([src], 4, 0, 1, "block", 7, max_tokens=10**6, attn_tokens=1e4, window=window)
    assert sorted(skipping.epoch_order(0).tolist()) == list(range(int(src.shard_samples[0]), len(src.lengths)))
    local = StepStream(str(resharded), 4, 0, 1, "auto", 7, max_tokens=10**6, attn_tokens=1e4)
    assert local.epoch_order(0).tolist() == np.random.default_rng([7, 0]).permutation(len(src.lengths)).tolist()
    assert parse_size("50gb") == 50 * 10**9 and parse_size("1.5 MiB") == math.floor(1.5 * 2**20)


@pytest.mark.slow
def test_remote_mixture_trains_with_a_cache_limit(tiny_models, skewed_shards, resharded, tmp_path):
    """One step on 1 rank from a mixture of a local folder and a remote one, its cache held to two shards."""
    from test_train import metrics, run, write_config

    limit = 2 * max(shard_bytes(resharded))
    rd, cache = tmp_path / "run", tmp_path / "cache"
    cfg = write_config(tmp_path / "c.yaml", tiny_models, skewed_shards, rd, max_steps=1, ckpt_every=10)
    sources = f"[{{shards: {skewed_shards}, weight: 1}}, {{shards: 'file://{resharded}', weight: 3}}]"
    out = run(
        1,
        cfg,
        "data.shards=''",
        f"data.sources={sources}",
        f"data.cache_dir={cache}",
        f"data.cache_limit={limit}",
        "data.shuffle_window=2",
    )
    m = metrics(rd)
    assert [x["step"] for x in m] == [1], out[-2000:]
    assert all(math.isfinite(x["text_loss"]) and math.isfinite(x["recon_loss"]) for x in m)
    held = cached_shards(cache)
    assert held and sum(size for _, size, _ in held) <= limit
    assert "block order" in out and f"file://{resharded}" in out  # the trainer says what it mixes, and how
