"""fastross.memory_plan: the memory simulation against hand arithmetic on the tiny models, the policy search, the
CLI."""

import dataclasses
import json
import math

import pytest

from fastross import config, memory_plan
from fastross.model import presets

SAMPLES = ([150, 90], [True, False], [20, 40])  # one micro-batch: an image sample (64 visual tokens) and a text one


@pytest.fixture(scope="module")
def tiny_cfg(tiny_models):
    return config.load(
        "configs/tiny.yaml",
        [f"model.vision_path={tiny_models / 'vision'}", f"model.llm_path={tiny_models / 'llm'}"],
        check_paths=False,
    )


def test_simulated_state_equals_hand_arithmetic(tiny_cfg):
    """2 fake ranks, fp32: each rank holds ceil(rows / 2) rows of every FSDP-sharded parameter, the frozen vision
    tower whole (out of FSDP, unseen by the tracker: added), and AdamW's two fp32 states of its trainable shards."""
    from fastross.model.ross import RossModel

    world = memory_plan.init_fake_world(2)
    try:
        with presets.arch_folders(tiny_cfg.model) as (mc, sources):
            assert sources["llm"].startswith("folder")  # the folders' own config.json, not a preset
            mem = memory_plan.simulate(tiny_cfg, mc, world, "full", SAMPLES)
            model = RossModel(mc, meta=True)
    finally:
        memory_plan.dist.destroy_process_group()
    vision = {id(p) for p in model.vision.parameters()}
    shard = lambda p: math.ceil(p.shape[0] / 2) * math.prod(p.shape[1:]) * 4  # noqa: E731
    sharded = sum(shard(p) for p in model.parameters() if id(p) not in vision)
    frozen = sum(p.numel() * 4 for p in model.vision.parameters())
    assert mem.kinds["Sharded Param"] == sharded
    assert mem.parts["parameters"] == sharded + frozen + mem.kinds["Unsharded Param"] + mem.kinds["Buffer"]
    trainable = sum(shard(p) for part in ("projector", "llm", "denoiser") for p in getattr(model, part).parameters())
    steps = sum(1 for part in ("projector", "llm", "denoiser") for _ in getattr(model, part).parameters())
    assert mem.kinds["OptState"] == 2 * trainable + 4 * steps  # exp_avg, exp_avg_sq, and a fp32 step count each
    assert mem.peak == sum(mem.parts.values()) == mem.kinds["Total"] + frozen


def test_checkpointing_cost_is_per_layer(tiny_cfg, tmp_path):
    """The planner's model: each un-checkpointed layer adds the same activations; [full, none] sits halfway
    between all-full and all-none (2 decoder layers), and none keeps more than full. A 512-word vocabulary,
    so that activations, not the vocabulary, make the peak."""
    (tmp_path / "llm").mkdir()
    small = dict(
        presets.QWEN2_7B,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
    )
    (tmp_path / "llm" / "config.json").write_text(json.dumps(small))
    world = memory_plan.init_fake_world(2)
    samples = ([400, 400], [True, True], [8, 8])
    try:
        with presets.arch_folders(dataclasses.replace(tiny_cfg.model, llm_path=str(tmp_path / "llm"))) as (mc, _):
            peaks = {
                str(p): memory_plan.simulate(tiny_cfg, mc, world, p, samples).kinds["Activation"]
                for p in ("full", "none", ["full", "none"])
            }
    finally:
        memory_plan.dist.destroy_process_group()
    assert peaks["none"] > peaks["full"]
    assert peaks["['full', 'none']"] == pytest.approx((peaks["full"] + peaks["none"]) / 2, rel=0.02)


def test_choose_policy_by_hand():
    """28 layers, 30 GiB with all-full, +1.5 per selective, +3 per none, budget 60: 20 non-full layers fit
    (20 x 1.5 = 30); selective recomputes no matmul, so the least recompute is 8 full, 20 selective."""
    recompute = lambda ps: 1 + 0.01 * ps.count("full") + 0.0001 * ps.count("none")  # noqa: E731
    assert memory_plan.choose_policy(28, 30.0, 1.5, 3.0, 60.0, recompute) == (8, 20, 0)
    assert memory_plan.choose_policy(28, 30.0, 1.5, 3.0, 29.0, recompute) is None
    assert memory_plan.override(["full"] * 8 + ["selective"] * 20) == "[full*8,selective*20]"
    assert memory_plan.override(["full"] * 28) == "full"
    assert memory_plan.override(["none", "full", "full"]) == "[none,full*2]"
    assert config.checkpoint_policies(["full*8", "selective*20"], 28) == ["full"] * 8 + ["selective"] * 20
    assert memory_plan.budget_gib(80.0) == pytest.approx(80 * 0.9 - 2)


def test_cli_final_line(tiny_models, capsys):
    memory_plan.main(
        [
            "configs/tiny.yaml",
            "--gpus",
            "2",
            "--gpu-gib",
            "8",
            f"model.vision_path={tiny_models / 'vision'}",
            f"model.llm_path={tiny_models / 'llm'}",
        ]
    )
    out = capsys.readouterr().out
    assert "chosen (least recompute within the budget): train.activation_checkpointing=" in out
    last = out.strip().splitlines()[-1].split()
    assert last[0] == "plan:" and last[1] == "peak_gib" and last[3] == "budget_gib" and last[5] == "fits"
    assert last[6] == ("yes" if float(last[2]) <= float(last[4]) else "no") and float(last[8]) >= 1.0


def test_mix_from_the_length_index(tmp_path):
    """data.shards with a length index: the step's samples are drawn from it; without one, the default mix."""
    import numpy as np

    from fastross.data.schema import write_manifest

    np.save(tmp_path / "lengths.npy", np.array([100, 800, 2000], dtype=np.int32))
    for other in ("fastross.json", "index.json"):  # only lengths.npy is read; the manifest covers all three
        (tmp_path / other).write_text("{}")
    write_manifest(tmp_path)
    cfg = config.load("configs/7b.yaml", [f"data.shards={tmp_path}", "data.global_batch=64"], check_paths=False)
    m = memory_plan.sample_mix(cfg, visual_tokens=729)
    assert set(m.lengths.tolist()) <= {100, 800, 2000} and len(m.lengths) == 64 and "lengths.npy" in m.source
    assert (m.images == (m.lengths > 729)).all()
    assert (m.supervised == np.maximum(1, ((m.lengths - 729 * m.images) * 0.5).astype(int))).all()
    default = memory_plan.sample_mix(config.load("configs/7b.yaml", ["data.shards=''"], check_paths=False), 729)
    assert "default stage-2 mix" in default.source and len(default.lengths) == 128


def test_padded_micro_batch_by_hand(tiny_cfg):
    """data.packing=padded: 2 ranks, 2 samples per micro-batch, rank 0 takes samples 0-3 in order; every sample is
    padded to the longest of its micro-batch, and the largest is the one of most padded tokens: [300, 300]."""
    import numpy as np

    m = memory_plan.Mix(
        np.array([100, 300, 50, 200, 120, 120, 90, 10]),
        np.array([1, 0, 1, 1, 0, 0, 1, 1], bool),
        np.array([5, 6, 7, 8, 9, 10, 11, 12]),
        "by hand",
    )
    padded = dataclasses.replace(tiny_cfg, data=dataclasses.replace(tiny_cfg.data, packing="padded", padded_samples=2))
    assert memory_plan.step_micro_batch(padded, m, 2, 1000.0) == ([300, 300], [True, False], [5, 6])
    lengths, _, _ = memory_plan.step_micro_batch(tiny_cfg, m, 2, 1000.0)  # packed: real lengths, within max_tokens
    assert lengths == m.lengths[memory_plan.largest_micro_batch(m, 2, 512, 1000.0)].tolist() and sum(lengths) <= 512


def test_reference_levers_in_the_simulation(tiny_cfg, tiny_models):
    """The ladder's simulated column: fp32 logits at every position (model.ce_positions=all) cost at least one
    (T - K) x V fp32 tensor more than at the K supervised ones, and at most three (logits, log-softmax kept for
    backward, their gradient); the VAE encoding on the fly (model.vae_path) adds its parameters whole, to the byte."""
    from fastross.model.ross import RossModel

    def sim(**model):
        cfg = dataclasses.replace(tiny_cfg, model=dataclasses.replace(tiny_cfg.model, fused_ce=False, **model))
        world = memory_plan.init_fake_world(2)
        try:
            with presets.arch_folders(cfg.model) as (mc, _):
                return memory_plan.simulate(cfg, mc, world, "full", SAMPLES), RossModel(mc, meta=True)
        finally:
            memory_plan.dist.destroy_process_group()

    sup, model = sim()
    every, _ = sim(ce_positions="all")
    vae, with_vae = sim(vae_path=str(tiny_models / "vae"))
    logits = (sum(SAMPLES[0]) - sum(SAMPLES[2])) * model.llm.get_output_embeddings().weight.shape[0] * 4
    assert logits <= every.peak - sup.peak <= 3 * logits
    assert vae.parts["parameters"] - sup.parts["parameters"] == sum(p.numel() * 4 for p in with_vae.vae.parameters())
