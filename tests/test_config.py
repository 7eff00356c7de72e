"""Config loading: overrides, and errors that name the offending key before any work starts."""

import subprocess
import sys

import pytest

from fastross import config


@pytest.fixture
def base(tmp_path, tiny_models, stage2_shards):
    p = tmp_path / "c.yaml"
    p.write_text(
        f"model: {{vision_path: {tiny_models / 'vision'}, llm_path: {tiny_models / 'llm'}}}\n"
        f"data: {{shards: {stage2_shards}, global_batch: 8}}\n"
    )
    return p


def test_defaults_and_overrides(base):
    cfg = config.load(str(base), ["train.max_steps=7", "model.denoiser.kind=mlp", "optim.lr_llm=1e-4"])
    assert cfg.train.max_steps == 7 and cfg.model.denoiser.kind == "mlp" and cfg.optim.lr_llm == 1e-4
    assert cfg.model.select_layer == -2 and cfg.model.denoiser.replicas == 4 and cfg.model.recon_weight == 1.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.denoiser.widht=3", "unknown key 'model.denoiser.widht'"),
        ("train.max_steps=many", "train.max_steps: expected int"),
        ("train.dtype=fp8", "train.dtype must be one of 'bf16', 'fp32', got 'fp8'"),
        ("train.trainable=[vision]", "train.trainable"),
        ("model.denoiser.heads=5", "model.denoiser.width must be divisible"),
        ("model.denoiser.impl=cuda", "model.denoiser.impl must be one of 'torch', 'triton', got 'cuda'"),
        ("attention.backend=xformers", "attention.backend must be one of 'auto', 'flash'"),
        ("data.shards=/nonexistent", "data.shards: /nonexistent is not a folder"),
        ("train.activation_checkpointing=3", "train.activation_checkpointing: expected str | list"),
        ("train.activation_checkpointing=partial", "train.activation_checkpointing: bad entry 'partial'"),
        ("train.activation_checkpointing=[full*0]", "train.activation_checkpointing: bad entry 'full*0'"),
        ("train.ckpt_every=-1", "train.ckpt_every >= 0"),
        ("nokey", "is not of the form key.sub=value"),
        # issue 11 item 6: each rejected before any work, the key named
        ("train.max_steps=-1", "train.max_steps (-1) and train.stop_after (0) must be >= 0"),
        ("train.epochs=0", "train.epochs must be >= 1, got 0"),
        ("model.select_layer=-4", "model.select_layer=-4 is out of range for the vision tower's 3 layers"),
        ("model.select_layer=0", "model.select_layer=0 is out of range"),
        ("data.global_batch=77", "data.global_batch=77 is larger than"),
        ("data.max_tokens=64", "data.max_tokens=64 holds no image sample: one image is 64 visual tokens"),
        ("optim.betas=[0.9, fast]", "optim.betas[1]: expected float, got 'fast' (str)"),
        ("train.trainable=[llm, 3]", "train.trainable[1]: expected str, got 3 (int)"),
        ("train.activation_checkpointing=[full, 2]", "train.activation_checkpointing[1]: expected str"),
    ],
)
def test_bad_config_names_the_key(base, override, message):
    with pytest.raises(config.ConfigError, match=None) as e:
        config.load(str(base), [override])
    assert message in str(e.value)


@pytest.mark.parametrize("key, folder, message", [
    ("model.vision_path", "llm", "holds a 'qwen2' model, not a supported vision tower (model_type one of "
                          "siglip_vision_model, siglip, clip_vision_model, clip)"),
    ("model.llm_path", "vision", "holds a 'siglip_vision_model' model, not a causal LM"),
    ("model.vae_path", "llm", "holds a None, not an AutoencoderKL"),
    ("model.llm_path", "missing", "config.json is missing"),
])
def test_model_folder_of_the_wrong_type(base, tiny_models, tmp_path, key, folder, message):
    (tmp_path / "missing").mkdir()
    path = tmp_path / "missing" if folder == "missing" else tiny_models / folder
    with pytest.raises(config.ConfigError) as e:
        config.load(str(base), [f"{key}={path}"])
    assert str(e.value).startswith(key) and message in str(e.value)


def test_no_checkpoints_only_without_stop_after(base):
    assert config.load(str(base), ["train.ckpt_every=0"]).train.ckpt_every == 0  # benchmarks: no 7B-sized saves
    with pytest.raises(config.ConfigError, match="train.stop_after needs checkpoints"):
        config.load(str(base), ["train.ckpt_every=0", "train.stop_after=2"])


def test_yaml_round_trip(base, tmp_path):
    cfg = config.load(str(base), ["train.log_every=3"])
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(config.dump(cfg))
    assert config.load(str(dumped)) == cfg


def test_train_cli_rejects_bad_key_before_work(base):
    p = subprocess.run([sys.executable, "-m", "fastross.train", str(base), "optim.lr=1"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "unknown key 'optim.lr'" in p.stderr


def test_checkpoint_policies_expand():
    assert config.checkpoint_policies("selective", 3) == ["selective"] * 3
    assert config.checkpoint_policies(["full*2", "none", "selective*1"], 4) == ["full", "full", "none", "selective"]
    with pytest.raises(config.ConfigError, match="names 3 layers, but the LLM has 4"):
        config.checkpoint_policies(["full*2", "none"], 4)


@pytest.mark.parametrize("recipe", ["tiny_pretrain", "tiny", "7b_pretrain", "7b"])
def test_shipped_configs_load(recipe, tiny_models, stage2_shards):
    """Every recipe in configs/ passes the type checks (its folders pointed at the test's own, its global batch at
    most the test data's 76 samples)."""
    cfg = config.load(f"configs/{recipe}.yaml", [f"model.vision_path={tiny_models / 'vision'}",
                                                 f"model.llm_path={tiny_models / 'llm'}", f"data.shards={stage2_shards}",
                                                 "data.global_batch=8"])
    if recipe.startswith("7b"):  # per-layer policies for the recipe's own LLM (fastross.plan chose 7b.yaml's)
        from fastross.model.presets import QWEN2_7B

        policies = config.checkpoint_policies(cfg.train.activation_checkpointing, QWEN2_7B["num_hidden_layers"])
        assert policies == (["full"] * 28 if recipe == "7b_pretrain" else ["full"] * 8 + ["selective"] * 20)
    else:
        assert config.checkpoint_policies(cfg.train.activation_checkpointing, 2) == ["full", "full"]
