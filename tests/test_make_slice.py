"""The 7B slice's folders (devtools.make_slice): the presets' shapes with K layers, built at shrunken widths
on CPU and read back through fastross's own model, tokenizer and data paths."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from devtools import make_slice
from fastross import config
from fastross.data.schema import ShardMeta
from fastross.data.shards import MDSShards
from fastross.model import presets


def test_full_width_slice_is_the_presets_with_k_layers():
    a = make_slice.archs(3)
    assert a["llm"] == {**presets.QWEN2_7B, "num_hidden_layers": 3}
    assert a["vision"] == {**presets.SIGLIP_SO400M_384, "vision_use_head": False}
    assert a["vae"] == presets.FLUX_VAE


def test_shrink_divides_widths_and_keeps_heads_depths_and_vocabulary():
    a = make_slice.archs(2, shrink=8)
    assert (
        a["llm"]["hidden_size"],
        a["llm"]["intermediate_size"],
        a["llm"]["num_attention_heads"],
        a["llm"]["num_key_value_heads"],
        a["llm"]["vocab_size"],
    ) == (448, 2368, 28, 4, 152064)
    assert (a["vision"]["hidden_size"], a["vision"]["num_hidden_layers"], a["vision"]["image_size"]) == (144, 27, 384)
    assert a["vae"]["block_out_channels"] == [16, 32, 64, 64] and a["vae"]["norm_num_groups"] == 16
    with pytest.raises(ValueError, match="--shrink 5 does not divide the LLM's head dim"):
        make_slice.archs(2, shrink=5)
    with pytest.raises(ValueError, match="--layers must be at least 1"):
        make_slice.archs(0)


def test_shrunken_slice_loads_and_its_data_has_the_7b_grid(tmp_path):
    from fastross.data.templates import load_tokenizer
    from fastross.model.ross import RossModel

    models, latents, pixels = make_slice.prepare(tmp_path, layers=1, shrink=8, n_train=4)
    assert make_slice.prepare(tmp_path, layers=1, shrink=8, n_train=4) == (models, latents, pixels)  # reused
    with pytest.raises(ValueError, match="holds something other than this slice"):
        make_slice.prepare(tmp_path, layers=2, shrink=8, n_train=4)
    cfg = config.load(
        "configs/7b.yaml",
        [
            f"model.vision_path={models / 'vision'}",
            f"model.llm_path={models / 'llm'}",
            f"model.vae_path={models / 'vae'}",
            "model.init_from=''",
            "model.denoiser.width=128",
            f"data.shards={latents}",
            "train.activation_checkpointing=full",
        ],
        check_paths=False,
    )
    model = RossModel(cfg.model, meta=True)
    assert len(model.llm.model.layers) == 1 and model.llm.lm_head.weight.shape == (152064, 448)
    assert model.num_visual_tokens == 27 * 27  # SigLIP so400m-384's patch grid
    model.load_weights(torch.device("cpu"))  # every parameter filled from the folders (or fresh), as training does
    with safe_open(str(models / "llm" / "model.safetensors"), "pt") as f:
        torch.testing.assert_close(model.llm.lm_head.weight, f.get_tensor("lm_head.weight").float(), rtol=0, atol=0)
    llm = json.loads((models / "llm" / "config.json").read_text())
    assert llm["num_hidden_layers"] == 1 and llm["vocab_size"] == 152064
    tok = load_tokenizer(str(models / "llm"))
    assert tok.convert_tokens_to_ids("<image>") < 152064

    meta = ShardMeta.read(latents)
    assert (meta.grid, meta.latent_channels, meta.latents) == (27, 16, True)
    assert not ShardMeta.read(pixels).latents
    with_image = [s for s in (MDSShards(latents).read(i) for i in range(len(MDSShards(latents)))) if s["image"]]
    mean = meta.decode_latent(with_image[0]["latent_mean"])
    assert mean.shape == (16, 54, 54) and np.isfinite(mean).all()
