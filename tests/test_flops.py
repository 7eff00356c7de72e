"""fastross.flops: the analytic formula against FlopCounterMode on the real model at 7B shapes (fake tensors)."""

import pytest
import torch

from fastross import config, flops
from fastross.model import presets

STAGE2 = ("projector", "llm", "denoiser")
STAGE1 = ("projector", "denoiser")


@pytest.fixture(scope="module")
def fake_models():
    """FakeModels at the 7B recipe's shapes (Qwen2-7B, SigLIP so400m-384, DiT 3 x 1024), built once each."""
    built = {}

    def get(trainable, policy):
        key = (trainable, str(policy))
        if key not in built:
            cfg = config.ModelConfig(vision_path="/none/siglip-so400m-patch14-384", llm_path="/none/qwen2-7b")
            with presets.arch_folders(cfg) as (mc, sources):
                assert sources == {"llm": "preset qwen2-7b", "vision": "preset siglip-so400m-384"}
                built[key] = flops.FakeModel(mc, trainable, policy)
        return built[key]

    return get


# (lengths with visual tokens, has image, supervised tokens): mixes of lengths, with and without images
MIXES = {
    "images": ([800, 1500], [True, True], [60, 400]),
    "text_only": ([120, 2400], [False, False], [100, 1800]),
    "mixed_long": ([790, 6000, 3200], [True, False, True], [40, 3000, 1200]),
}


@pytest.mark.parametrize(
    "trainable,policy,mix",
    [
        (STAGE2, "none", "text_only"),
        (STAGE2, "none", "mixed_long"),
        (STAGE2, "full", "mixed_long"),
        (STAGE2, ["full*8", "selective*8", "none*12"], "images"),
        (STAGE1, "full", "images"),
    ],
)
def test_formula_within_2pct_of_counter(fake_models, trainable, policy, mix):
    fake = fake_models(trainable, policy)
    lengths, images, supervised = MIXES[mix]
    counted = flops.count(fake, lengths, images, supervised)
    formula = flops.step_flops(fake.arch, lengths, images, supervised, trainable, fake.policies)
    total = sum(counted.values())
    assert formula.hardware_total == pytest.approx(total, rel=0.02)
    for part in flops.PARTS:  # each part on its own, too
        assert formula.hardware[part] == pytest.approx(counted[part], rel=0.02, abs=1e-6 * total), part
    assert (counted["vision"] > 0) == any(images)
    # model FLOPs drop only the recompute: checkpointing and the attention kernels' score recompute
    assert formula.model["lm_head"] == formula.hardware["lm_head"]
    assert formula.model_total < formula.hardware_total


def test_full_checkpointing_recompute_is_a_layer_forward_without_down_proj(fake_models):
    """R for full against none on one 4096-token text sample: the hand arithmetic of the recompute."""
    arch = fake_models(STAGE2, "none").arch
    none = flops.step_flops(arch, [4096], [False], [2048], STAGE2, ["none"] * 28)
    full = flops.step_flops(arch, [4096], [False], [2048], STAGE2, ["full"] * 28)
    H, inter, q, kv = 3584, 18944, 3584, 512  # hidden, intermediate (MLP), q and kv projection widths
    per_layer = 2 * 4096 * (2 * H * q + 2 * H * kv + 2 * H * inter) + 4 * 4096**2 * q
    assert full.hardware_total - none.hardware_total == pytest.approx(28 * per_layer, rel=1e-9)
    assert full.model == none.model


def test_model_flops_follow_six_n():
    """LLM linears of a trained LLM: 6 x (non-embedding linear params) x tokens, as ARCHITECTURE.md states."""
    arch = flops.Arch(26, 1152, 4304, 588, 729, 3584, 28, 28, 4, 128, 18944, 152064, "dit", 1024, 3, 4, 64, 256)
    f = flops.step_flops(arch, [1000], [False], [0])
    assert f.model["llm_linear"] == 6 * 1000 * 28 * (2 * 3584 * 3584 + 2 * 3584 * 512 + 3 * 3584 * 18944)
    assert f.model["attention"] == 12 * 28 * 1000**2 * 3584
    assert f.model["vision"] == f.model["denoiser"] == f.model["lm_head"] == 0


@pytest.mark.parametrize(
    "name,tflops",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA B200", 2250.0),
        ("Tesla T4", None),
    ],
)
def test_peak_table(name, tflops):
    assert flops.table_peak_tflops(name) == tflops


def test_peak_and_mfu_on_cpu():
    peak, source = flops.peak_tflops(0.0, torch.device("cpu"))
    assert source == "measured CPU matmul" and 1e-4 < peak < 100  # a CPU's fp32 matmul rate in TFLOP/s
    assert flops.peak_tflops(500.0, torch.device("cpu")) == (500.0, "train.peak_tflops")
    assert flops.mfu(989e12 * 8 * 0.5, 1.0, 8, 989.0) == pytest.approx(0.5)


def test_peak_tflops_config_key():
    with pytest.raises(config.ConfigError, match="train.peak_tflops"):
        config.validate(
            config.Config(
                model=config.ModelConfig(vision_path=".", llm_path="."),
                data=config.DataConfig(shards="."),
                train=config.TrainConfig(peak_tflops=-1.0),
            ),
            check_paths=False,
        )


def test_preset_pick():
    assert presets.pick("/models/vicuna-7b-v1.5", presets.LLMS)[0] == "vicuna-7b"
    assert presets.pick("/models/clip-vit-large-patch14-336", presets.VISION)[0] == "clip-l14-336"
    assert presets.pick("", presets.LLMS)[0] == "qwen2-7b"
