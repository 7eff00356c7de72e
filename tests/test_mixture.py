"""data.sources: several converted folders mixed by weight, per step (fastross.data.stream, fastross.data.sources)."""

import json
import shutil

import numpy as np
import pytest

from fastross.config import ConfigError, DataConfig, SourceConfig
from fastross.data.schema import write_manifest
from fastross.data.sources import open_sources
from fastross.data.stream import Position, StepStream


def mixture(a, b, wa, wb, rank=0, world=1, batch=8, seed=5):
    d = DataConfig(sources=[SourceConfig(str(a), wa), SourceConfig(str(b), wb)])
    return StepStream(
        open_sources(d, check=False), batch, rank, world, "global", seed, max_tokens=10**6, attn_tokens=1e4
    )


def test_mixture_proportions_hold_within_sampling_error(stage2_shards, skewed_shards):
    """Over 600 steps of 8 slots the first source's share is Binomial(4800, 3/4): within 3 sigma of 3/4. Each source
    serves its own samples in its own seeded order: every sample once per pass over it."""
    s = mixture(stage2_shards, skewed_shards, 3.0, 1.0)
    steps, b = 600, s.global_batch
    ids = np.concatenate([s.step_ids(i) for i in range(steps)])
    n0 = len(s.sources[0].lengths)
    first = ids < n0
    draws, p = steps * b, 0.75
    sigma = np.sqrt(draws * p * (1 - p))
    assert abs(first.sum() - draws * p) < 3 * sigma, (first.sum(), draws * p, sigma)
    # Each source cycles through its own permutations: every window of n consecutive draws from it is one pass.
    for k, mine in ((0, ids[first]), (1, ids[~first] - n0)):
        n = len(s.sources[k].lengths)
        assert len(mine) > 2 * n  # both sources were passed over more than twice
        for e in range(len(mine) // n):
            assert sorted(mine[e * n : (e + 1) * n]) == list(range(n))
        assert (mine[:n] != mine[n : 2 * n]).any()  # reshuffled per pass
    # The steps are drawn, not fixed: the per-step count of the first source varies.
    per_step = first.reshape(steps, b).sum(1)
    assert per_step.min() < per_step.max()


def test_mixture_resume_and_ranks_give_the_same_samples(stage2_shards, skewed_shards):
    """A fresh stream (a resumed run) at any position, on any rank count, draws what the uninterrupted one did; the
    samples it reads carry mixture-wide indices (what keys their noise), unique across the sources."""
    a = mixture(stage2_shards, skewed_shards, 1.0, 2.0)
    per_epoch, n0 = a.steps_per_epoch, len(a.sources[0].lengths)
    assert per_epoch == (n0 + len(a.sources[1].lengths)) // 8  # an epoch: as many samples as the sources hold
    steps = per_epoch + 3
    ref = [a.step(k) for k in range(steps)]
    for k in (1, per_epoch, per_epoch + 2):
        pos = a.position(k)
        ranks = [mixture(stage2_shards, skewed_shards, 1.0, 2.0, rank=r, world=2) for r in (0, 1)]
        assert ranks[0].index(pos) == k
        for j in range(k, steps):
            got = [ranks[r].step(j) for r in (0, 1)]
            assert got[0].ids.tolist() == got[1].ids.tolist() == ref[j].ids.tolist()
            read = sorted(int(x["index"]) for g in got for mb in g.micro_batches for x in mb)
            assert read == sorted(ref[j].ids.tolist())  # the ranks together read the global batch, once
    samples = [x for st in ref for mb in st.micro_batches for x in mb]
    by_index = {}
    for x in samples:  # one identity per sample: never two different samples under one index
        assert by_index.setdefault(x["index"], x["id"]) == x["id"]
    first = [x for x in samples if x["index"] < n0]
    second = [x for x in samples if x["index"] >= n0]
    assert first and second and all(x["index"] < n0 + len(a.sources[1].lengths) for x in second)
    # A single folder keeps its own numbering, and so its noise keys.
    single = StepStream(str(stage2_shards), 8, 0, 1, True, 5, max_tokens=10**6, attn_tokens=1e4)
    assert all(single.read(i)["index"] == i for i in single.step_ids(0))
    assert a.index(Position(1, 0)) == per_epoch


def test_mixture_refuses_sources_that_disagree(stage2_shards, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(stage2_shards, other)
    meta = json.loads((other / "fastross.json").read_text())
    meta["latent_shift"] = meta["latent_shift"] + 0.5
    (other / "fastross.json").write_text(json.dumps(meta))
    write_manifest(other)  # another conversion's folder, whole (an edit alone is refused: tests/test_datatrust.py)
    d = DataConfig(sources=[SourceConfig(str(stage2_shards), 1.0), SourceConfig(str(other), 1.0)])
    with pytest.raises(ConfigError) as e:
        open_sources(d, check=False)
    assert str(stage2_shards) in str(e.value) and str(other) in str(e.value) and "latent_shift" in str(e.value)


def test_mixture_config_keys_are_checked(tmp_path):
    from fastross import config

    with pytest.raises(ConfigError, match="data.shards and data.sources are both set"):
        config.load(None, ["data.shards=a", "data.sources=[{shards: b}]"], check_paths=False)
    with pytest.raises(ConfigError, match=r"data.sources\[1\].weight must be > 0"):
        config.load(None, ["data.sources=[{shards: a}, {shards: b, weight: 0}]"], check_paths=False)
    with pytest.raises(ConfigError, match=r"unknown key 'data.sources\[0\].path'"):
        config.load(None, ["data.sources=[{path: a}]"], check_paths=False)
    # A missing local source is named by its key (an error, or a warning under --check); a URL is the loader's.
    cfg = config.load(
        None, [f"data.sources=[{{shards: {tmp_path / 'none'}}}, {{shards: 's3://b/x'}}]"], check_paths=False
    )
    missing = [m for m in config.missing_folders(cfg) if m.startswith("data.")]
    assert missing == [f"data.sources[0].shards: {tmp_path / 'none'} is not a folder"]
    with pytest.raises(ConfigError, match="data.cache_limit"):
        config.load(None, ["data.cache_limit=lots"], check_paths=False)
    # A run folder's config.yaml holds the sources as written, and loads back the same.
    cfg = config.load(None, ["data.sources=[{shards: 'gs://b/x', weight: 2}, {shards: /y}]"], check_paths=False)
    (tmp_path / "c.yaml").write_text(config.dump(cfg))
    again = config.load(str(tmp_path / "c.yaml"), check_paths=False)
    assert again == cfg and again.data.sources == [SourceConfig("gs://b/x", 2.0), SourceConfig("/y", 1.0)]
    # Old configs' booleans still load, as the orders they always meant.
    assert config.load(None, ["data.shuffle=true"], check_paths=False).data.shuffle == "global"
    assert config.load(None, ["data.shuffle=false"], check_paths=False).data.shuffle == "none"


def test_mixture_memory_planner_draws_the_union_by_weight(tmp_path):
    """fastross.memory_plan's step samples come from every source's length index, by weight (3 sigma of a binomial)."""
    from fastross import config, memory_plan

    for name, length in (("a", 100), ("b", 2000)):
        (tmp_path / name).mkdir()
        np.save(tmp_path / name / "lengths.npy", np.full(5, length, dtype=np.int32))
        for other in ("fastross.json", "index.json"):  # only lengths.npy is read; the manifest covers all three
            (tmp_path / name / other).write_text("{}")
        write_manifest(tmp_path / name)
    sources = f"[{{shards: {tmp_path / 'a'}, weight: 1}}, {{shards: {tmp_path / 'b'}, weight: 3}}]"
    cfg = config.load(
        "configs/7b.yaml", ["data.shards=''", f"data.sources={sources}", "data.global_batch=2000"], check_paths=False
    )
    m = memory_plan.sample_mix(cfg, visual_tokens=729)
    long = int((m.lengths == 2000).sum())
    assert set(m.lengths.tolist()) == {100, 2000} and str(tmp_path / "b") in m.source
    assert abs(long - 1500) < 3 * np.sqrt(2000 * 0.75 * 0.25), long


def test_check_refuses_what_training_refuses(stage2_shards, tiny_models, tmp_path, capsys):
    """`fastross.train CONFIG --check` runs the checks the trainer makes before training that need no weights
    (fastross.train.check_before_training, the trainer's own check_shards among them): sources that disagree on the
    template, and shards of another tokenizer, are refused there as at training, not passed."""
    from devtools.faults import write_config
    from fastross.train import main

    cfg = write_config(tmp_path / "c.yaml", tiny_models, stage2_shards, tmp_path / "run")
    assert main([str(cfg), "--check"]) == 0
    assert "train: 9 steps (9/epoch)" in capsys.readouterr().err  # the run's length, as the trainer says it

    def altered(name: str, **change) -> str:
        other = tmp_path / name
        shutil.copytree(stage2_shards, other)
        meta = json.loads((other / "fastross.json").read_text())
        (other / "fastross.json").write_text(json.dumps(meta | change))
        write_manifest(other)  # vouched for again: the check under test is the sources' agreement, not the hash
        return str(other)

    plain = altered("plain", template="plain")
    mixed = ["data.shards=", f"data.sources=[{{shards: {stage2_shards}}}, {{shards: {plain}}}]"]
    assert main([str(cfg), "--check", *mixed]) == 2
    err = capsys.readouterr().err
    assert "disagree on template ('qwen2_ross' vs 'plain')" in err and plain in err
    meta = json.loads((stage2_shards / "fastross.json").read_text())
    other_tok = altered("other_tok", tokenizer_fingerprint=meta["tokenizer_fingerprint"] | {"vocab_sha256": "0" * 16})
    assert main([str(cfg), "--check", f"data.shards={other_tok}"]) == 2
    err = capsys.readouterr().err
    assert f"data.shards: {other_tok} was tokenised by another tokenizer than the one in {tiny_models / 'llm'}" in err
    assert main([str(cfg), "--check", f"data.shards={plain}"]) == 0  # one source alone agrees with itself
