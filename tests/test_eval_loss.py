"""Held-out losses during training (data.eval_shards, train.eval_every): logged with an `eval` marker on 2 ranks, the
same noise at every evaluation, and training's losses untouched (the golden file holds)."""

import pytest
import torch

from devtools import golden
from fastross import config


def test_the_keys_go_together(tmp_path, tiny_models, stage2_shards):
    base = [
        f"model.vision_path={tiny_models / 'vision'}",
        f"model.llm_path={tiny_models / 'llm'}",
        f"data.shards={stage2_shards}",
        "data.global_batch=8",
    ]
    for bad in (
        ["train.eval_every=5"],
        [f"data.eval_shards={stage2_shards}"],
        [f"data.eval_shards={stage2_shards}", "train.eval_every=-1"],
    ):
        with pytest.raises(config.ConfigError, match="data.eval_shards and train.eval_every"):
            config.load(None, base + bad)
    with pytest.raises(config.ConfigError, match="data.eval_shards: .*nope is not a folder"):
        config.load(None, base + [f"data.eval_shards={tmp_path / 'nope'}", "train.eval_every=5"])


def test_every_evaluation_sees_the_same_noise(eval_shards, tiny_models):
    """Two passes over the held-out loader's steps 0..K-1 give the same samples, noise keys and timesteps."""
    from fastross.config import DataConfig
    from fastross.data.images import ImageSpec
    from fastross.data.loader import Loader
    from fastross.data.stream import Position

    loader = Loader(
        DataConfig(shards=str(eval_shards), global_batch=16, max_tokens=512, shuffle=False, workers=0),
        rank=0,
        world=2,
        attn_tokens=0.0,
        image=ImageSpec.from_pretrained(str(tiny_models / "vision")),
        latent_channels=16,
        replicas=4,
        seed=0,
        device=torch.device("cpu"),
    )
    passes = [list(loader.steps(Position(), 0, loader.steps_per_epoch)) for _ in range(2)]
    assert len(passes[0]) == loader.steps_per_epoch >= 4
    for a, b in zip(*passes):
        for x, y in zip(a.micro_batches, b.micro_batches):
            for key in ("input_ids", "noise_keys", "t", "latent_mean"):
                assert torch.equal(getattr(x, key), getattr(y, key)), key
    keys = torch.cat([mb.noise_keys for s in passes[0] for mb in s.micro_batches])
    assert len(keys.unique()) == len(keys)  # and each image has its own


@pytest.mark.slow
def test_eval_on_two_ranks_leaves_the_golden_losses(eval_shards, tiny_models, stage2_shards, tmp_path):
    steps = 4
    records = golden.train(
        tiny_models,
        stage2_shards,
        tmp_path / "run",
        [f"data.eval_shards={eval_shards}", "train.eval_every=2"],
        steps=steps,
    )
    train = [r for r in records if not r.get("eval")]
    evals = [r for r in records if r.get("eval")]
    dev = golden.deviation(golden.losses(train), golden.read()["losses"][:steps])
    assert max(max(d["text_loss"], d["recon_loss"]) for d in dev) <= 1e-6, dev  # the recipe's own bound
    assert [r["step"] for r in evals] == [2, 4]
    n = config.load(str(golden.CONFIG), check_paths=False).data.global_batch
    for r in evals:
        assert r["samples"] == 72 // n * n and r["eval_s"] > 0  # 8 held-out images: 72 questions
        assert 0 < r["text_loss"] < 20 and 0 < r["recon_loss"] < 5
    print(f"eval losses: {[(r['step'], round(r['text_loss'], 4), round(r['recon_loss'], 4)) for r in evals]}")
    assert evals[1]["text_loss"] < evals[0]["text_loss"]  # training on the shapes lowers the held-out loss too
