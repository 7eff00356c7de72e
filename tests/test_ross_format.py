"""The reference ROSS layout in and out (fastross.ross_format), on tiny random weights: round trips through every
format, a stage-1 mm_projector.bin, a checkpoint written here the way the reference code saves one (bf16, sharded,
whole tower, 1x1 conv, frozen pos_embed) against ROSS_SPEC.md section 3's maths, and bad files refused by name."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from fastross import ross_format
from fastross.config import DenoiserConfig, ModelConfig

NET = "model.mm_inv_projector.net."
HEADS = 16  # the reference's DiT always has 16 heads
WIDTH = 64
DEPTH = 2


@pytest.fixture(scope="module")
def checkpoint(run_dir):
    from fastross.checkpoint import read_checkpoint

    return read_checkpoint(run_dir)


def fresh_model(model_cfg, seed):
    from fastross.model.ross import RossModel

    return RossModel(model_cfg, "sdpa", seed=seed)


def assert_state_equals(model, want: dict, skip=("vae.",)):
    got = model.state_dict()
    names = [k for k in want if not k.startswith(skip)]
    assert names and set(names) <= got.keys()
    for k in names:
        assert torch.equal(got[k], want[k].to(got[k].dtype)), k


@pytest.mark.slow
def test_fastross_to_ross_to_fastross_is_exact(run_dir, checkpoint, tmp_path):
    """fp32 export, sharded (a tiny shard size forces it), read back into a fresh model: bit for bit."""
    from fastross.export import main

    out = tmp_path / "ross"
    with pytest.warns(UserWarning, match="width 32 and 4 heads: fastross reads it back, the reference code cannot"):
        assert main([str(run_dir), "--out", str(out), "--format", "ross", "--max-shard-size", "300KB"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "ross_qwen2" and cfg["architectures"] == ["RossQwen2ForCausalLM"]
    assert cfg["torch_dtype"] == cfg["dtype"] == "float32"
    assert cfg["mm_inv_projector_type"] == "denoiser_vit1x" and cfg["mm_vision_select_layer"] == -2
    assert cfg["mm_inv_hidden_size"] == 64 and cfg["image_aspect_ratio"] == "pad" and cfg["mm_inv_num_heads"] == 4
    keys = set(index["weight_map"])
    assert {
        NET + "x_embedder.proj.weight",
        NET + "pos_embed",
        NET + "blocks.0.mlp.fc1.weight",
        "model.mm_projector.2.weight",
        "model.vision_tower.vision_tower.vision_model.post_layernorm.weight",
        "model.vision_tower.vision_tower.vision_model.encoder.layers.2.mlp.fc1.weight",
        "model.pixel_decoder.pixel_decoder.encoder.conv_in.weight",
        "model.embed_tokens.weight",
    } <= keys
    assert (out / "tokenizer.json").is_file()

    _, run_cfg, state = checkpoint
    model = fresh_model(run_cfg.model, seed=run_cfg.train.seed + 1)  # other fresh values: the import must set them
    ross_format.load_into(out, model)
    assert_state_equals(model, state)


@pytest.mark.slow
def test_llava_round_trip_still_holds(run_dir, checkpoint, tmp_path):
    from fastross.export import export, load_export

    _, _, state = checkpoint
    back = load_export(export(run_dir, tmp_path / "llava"))
    want = {k: v for k, v in state.items() if not k.startswith("vae.")}
    assert back.keys() == want.keys()
    for k in want:
        assert torch.equal(back[k], want[k]), k


@pytest.mark.slow
def test_bf16_export_reads_back_rounded(run_dir, checkpoint, tmp_path):
    from fastross.export import main

    out = tmp_path / "ross16"
    with pytest.warns(UserWarning, match="the reference code cannot load its denoiser"):
        assert main([str(run_dir), "--out", str(out), "--format", "ross", "--dtype", "bf16"]) == 0
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load_file(out / "model.safetensors")["model.mm_projector.0.weight"].dtype == torch.bfloat16
    _, run_cfg, state = checkpoint
    model = fresh_model(run_cfg.model, seed=run_cfg.train.seed)
    ross_format.load_into(out, model)
    assert_state_equals(model, {k: v.to(torch.bfloat16) for k, v in state.items()})


# --- a checkpoint as the reference code saves one, written here from the layout's facts -----------------------------


def model_cfg(tiny_models, **denoiser) -> ModelConfig:
    return ModelConfig(
        vision_path=str(tiny_models / "vision"),
        llm_path=str(tiny_models / "llm"),
        fused_ce=False,
        denoiser=DenoiserConfig(**{"depth": DEPTH, "width": WIDTH, "heads": HEADS} | denoiser),
    )


def sincos_table(width: int, grid: int) -> np.ndarray:
    """ROSS_SPEC.md section 3: first half the column, last half the row, each [sin, cos], omega = 10000^(-i/(W/4))."""
    omega = 1.0 / 10000 ** (np.arange(width // 4) / (width / 4))
    rows, cols = np.divmod(np.arange(grid * grid), grid)

    def enc(p):
        a = np.outer(p, omega)
        return np.concatenate([np.sin(a), np.cos(a)], axis=1)

    return np.concatenate([enc(cols), enc(rows)], axis=1)[None].astype(np.float32)


def reference_tensors(tiny_models, seed=0) -> dict[str, torch.Tensor]:
    """Every tensor of a ross_qwen2 checkpoint: the tiny folders' LLM and whole SigLIP (perturbed) and VAE under the
    reference's prefixes, a random projector and a random DiT (adaLN not zero, so every path carries signal)."""
    from transformers import AutoConfig, SiglipVisionConfig

    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, s=0.2: torch.randn(*shape, generator=g) * s  # noqa: E731
    llm = AutoConfig.from_pretrained(tiny_models / "llm")
    vision = SiglipVisionConfig.from_pretrained(tiny_models / "vision")
    h, v, grid, c = llm.hidden_size, vision.hidden_size, vision.image_size // vision.patch_size, 64
    out = {k: t + rnd(*t.shape, s=0.01) for k, t in load_file(tiny_models / "llm" / "model.safetensors").items()}
    out |= {
        "model.vision_tower.vision_tower." + k: t + rnd(*t.shape, s=0.01)
        for k, t in load_file(tiny_models / "vision" / "model.safetensors").items()
    }
    out |= {
        "model.pixel_decoder.pixel_decoder." + k: t
        for k, t in load_file(tiny_models / "vae" / "diffusion_pytorch_model.safetensors").items()
    }
    out |= {
        "model.mm_projector.0.weight": rnd(h, v),
        "model.mm_projector.0.bias": rnd(h),
        "model.mm_projector.2.weight": rnd(h, h),
        "model.mm_projector.2.bias": rnd(h),
    }
    w = WIDTH
    net = {
        "x_embedder.proj.weight": rnd(w, c, 1, 1),
        "x_embedder.proj.bias": rnd(w),
        "pos_embed": torch.from_numpy(sincos_table(w, grid)),
        "t_embedder.mlp.0.weight": rnd(w, 256),
        "t_embedder.mlp.0.bias": rnd(w),
        "t_embedder.mlp.2.weight": rnd(w, w),
        "t_embedder.mlp.2.bias": rnd(w),
        "z_embedder.1.weight": rnd(w, h),
        "z_embedder.1.bias": rnd(w),
        "final_layer.adaLN_modulation.1.weight": rnd(2 * w, w),
        "final_layer.adaLN_modulation.1.bias": rnd(2 * w),
        "final_layer.linear.weight": rnd(c, w),
        "final_layer.linear.bias": rnd(c),
    }
    for i in range(DEPTH):
        b = f"blocks.{i}."
        net |= {
            b + "adaLN_modulation.1.weight": rnd(6 * w, w),
            b + "adaLN_modulation.1.bias": rnd(6 * w),
            b + "attn.qkv.weight": rnd(3 * w, w),
            b + "attn.qkv.bias": rnd(3 * w),
            b + "attn.proj.weight": rnd(w, w),
            b + "attn.proj.bias": rnd(w),
            b + "mlp.fc1.weight": rnd(4 * w, w),
            b + "mlp.fc1.bias": rnd(4 * w),
            b + "mlp.fc2.weight": rnd(w, 4 * w),
            b + "mlp.fc2.bias": rnd(w),
        }
    out |= {NET + k: t for k, t in net.items()}
    return {k: t.to(torch.bfloat16).contiguous() for k, t in out.items()}


def write_reference(folder, tensors, tiny_models, **config):
    """config.json + two bf16 shards + model.safetensors.index.json, as Hugging Face's Trainer names them."""
    from transformers import AutoConfig

    folder.mkdir(parents=True)
    keys = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, str(folder / name), metadata={"format": "pt"})
        weight_map |= {k: name for k in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = (
        AutoConfig.from_pretrained(tiny_models / "llm").to_dict()
        | {
            "model_type": "ross_qwen2",
            "architectures": ["RossQwen2ForCausalLM"],
            "mm_projector_type": "mlp2x_gelu",
            "mm_inv_projector_type": f"denoiser_vit{DEPTH}x",
            "mm_vision_select_layer": -2,
            "mm_inv_hidden_size": 64,
            "mm_vision_tower": str(tiny_models / "vision"),
            "mm_pixel_decoder": str(tiny_models / "vae"),
            "image_aspect_ratio": "pad",
            "torch_dtype": "bfloat16",
        }
        | config
    )
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def reference_dit(w: dict, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """ROSS_SPEC.md section 3 on the reference's tensors, in its image layout: x (n, 64, g, g) noisy latents,
    t (n,) integer timesteps, context (n, H, g, g) the normed hidden states -> predicted eps (n, 64, g, g)."""
    p = {k[len(NET) :]: v.float() for k, v in w.items() if k.startswith(NET)}
    lin = lambda y, name: F.linear(y, p[name + ".weight"], p[name + ".bias"])  # noqa: E731
    n, c, g, _ = x.shape
    tok = F.conv2d(x, p["x_embedder.proj.weight"], p["x_embedder.proj.bias"]).flatten(2).transpose(1, 2)
    # The fixed table, which the file's frozen pos_embed holds rounded to bf16 (the import checks that): the
    # reference computes it in fp32 at build time, and fastross recomputes it, so the maths use it exactly.
    tok = tok + torch.from_numpy(sincos_table(tok.shape[-1], g))
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    temb = lin(F.silu(lin(torch.cat([torch.cos(args), torch.sin(args)], -1), "t_embedder.mlp.0")), "t_embedder.mlp.2")
    cond = temb[:, None] + lin(F.silu(context.flatten(2).transpose(1, 2)), "z_embedder.1")
    width = tok.shape[-1]
    norm = lambda y: F.layer_norm(y, (width,), eps=1e-6)  # noqa: E731
    for i in range(DEPTH):
        b = f"blocks.{i}."
        sh1, sc1, g1, sh2, sc2, g2 = lin(F.silu(cond), b + "adaLN_modulation.1").chunk(6, -1)
        qkv = lin(norm(tok) * (1 + sc1) + sh1, b + "attn.qkv").reshape(n, g * g, 3, HEADS, width // HEADS)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(width // HEADS), -1) @ v
        tok = tok + g1 * lin(att.transpose(1, 2).reshape(n, g * g, width), b + "attn.proj")
        mlp = lin(F.gelu(lin(norm(tok) * (1 + sc2) + sh2, b + "mlp.fc1"), approximate="tanh"), b + "mlp.fc2")
        tok = tok + g2 * mlp
    shift, scale = lin(F.silu(cond), "final_layer.adaLN_modulation.1").chunk(2, -1)
    out = lin(norm(tok) * (1 + scale) + shift, "final_layer.linear")
    return out.transpose(1, 2).reshape(n, c, g, g)


def reference_logits(tensors: dict, tiny_models, ids: list[int], pixel_values: torch.Tensor) -> torch.Tensor:
    """The reference's inference on its own tensors: SigLIP built whole from model.vision_tower.vision_tower.*, its
    hidden_states[-2], mm_projector, spliced into the LLM's embeddings where the prompt holds -200."""
    from transformers import AutoConfig, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    def part(prefix):
        return {k[len(prefix) :]: v.float() for k, v in tensors.items() if k.startswith(prefix)}

    tower = SiglipVisionModel(SiglipVisionConfig.from_pretrained(tiny_models / "vision")).eval()
    tower.load_state_dict(part("model.vision_tower.vision_tower."), strict=True)
    llm = Qwen2ForCausalLM(AutoConfig.from_pretrained(tiny_models / "llm")).eval()
    lm = {
        k: v.float()
        for k, v in tensors.items()
        if not k.startswith(("model.mm_", "model.vision_tower.", "model.pixel_decoder."))
    }
    assert llm.load_state_dict(lm, strict=False).missing_keys == ["lm_head.weight"]  # tied: not saved
    p = part("model.mm_projector.")
    with torch.no_grad():
        feats = tower(pixel_values, output_hidden_states=True).hidden_states[-2][0]
        vis = F.linear(F.gelu(F.linear(feats, p["0.weight"], p["0.bias"])), p["2.weight"], p["2.bias"])
        at = ids.index(ross_format.IMAGE_TOKEN_INDEX)
        emb = llm.get_input_embeddings()
        embeds = torch.cat([emb(torch.tensor(ids[:at])), vis, emb(torch.tensor(ids[at + 1 :]))])[None]
        return llm(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long)).logits[0]


@pytest.fixture(scope="module")
def reference_folder(tiny_models, tmp_path_factory):
    tensors = reference_tensors(tiny_models)
    return write_reference(tmp_path_factory.mktemp("reference") / "ross-qwen2-tiny", tensors, tiny_models), tensors


def test_imported_reference_checkpoint_computes_the_reference_denoiser(reference_folder, tiny_models):
    folder, tensors = reference_folder
    from fastross.weights import load_model_weights

    model = fresh_model(model_cfg(tiny_models), seed=0)
    assert load_model_weights(folder, model) == folder  # model.init_from's dispatch
    state = model.state_dict()
    for name, key in (
        ("llm.model.embed_tokens.weight", "model.embed_tokens.weight"),
        ("projector.2.weight", "model.mm_projector.2.weight"),
        (
            "vision.encoder.layers.1.mlp.fc1.weight",
            "model.vision_tower.vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight",
        ),
    ):
        assert torch.equal(state[name], tensors[key].float()), name
    assert torch.equal(state["llm.lm_head.weight"], state["llm.model.embed_tokens.weight"])  # the tiny LLM ties

    g = torch.Generator().manual_seed(1)
    n, grid, hidden = 3, model.vision.grid, model.llm.config.hidden_size
    x = torch.randn(n, 64, grid, grid, generator=g)
    t = torch.tensor([0, 417, 999])
    context = F.layer_norm(torch.randn(n, grid * grid, hidden, generator=g), (hidden,), eps=1e-5)
    want = reference_dit(tensors, x, t, context.transpose(1, 2).reshape(n, hidden, grid, grid))
    with torch.no_grad():
        got = model.denoiser(x.flatten(2).transpose(1, 2)[:, None], t[:, None], context)
    want = want.flatten(2).transpose(1, 2).flatten(0, 1)  # the denoiser returns rows (n * N, C)
    err = (got - want).abs().max().item()
    print(f"ross_format: denoiser against the reference maths, max |diff| {err:.2e} (scale {want.abs().max():.2f})")
    assert want.abs().max() > 0.5 and err <= 2e-5 * want.abs().max()  # fp32, other op orders (conv, softmax)


def test_mm_projector_bin_is_stage1_init(tiny_models, tmp_path):
    """A LLaVA projector file: the projector equals it, every other tensor equals a fresh build's."""
    proj = {k: v for k, v in reference_tensors(tiny_models, seed=2).items() if k.startswith("model.mm_projector.")}
    torch.save(proj, tmp_path / "mm_projector.bin")
    cfg = model_cfg(tiny_models)
    model, fresh = fresh_model(cfg, seed=5), fresh_model(cfg, seed=5).state_dict()
    ross_format.load_into(tmp_path / "mm_projector.bin", model)
    got = model.state_dict()
    for k in got:
        if k.startswith("projector."):
            assert torch.equal(got[k], proj["model.mm_projector." + k[len("projector.") :]].float()), k
            assert not torch.equal(got[k], fresh[k]), k
        else:
            assert torch.equal(got[k], fresh[k]), k


def test_reference_stage1_folder_sets_projector_and_denoiser(reference_folder, tiny_models, tmp_path):
    """The reference's stage-1 output: config.json, mm_projector.bin and mm_inv_projector.bin."""
    folder, tensors = reference_folder
    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    (stage1 / "config.json").write_text((folder / "config.json").read_text())
    torch.save({k: v for k, v in tensors.items() if k.startswith("model.mm_projector.")}, stage1 / "mm_projector.bin")
    torch.save({k: v for k, v in tensors.items() if k.startswith(NET)}, stage1 / "mm_inv_projector.bin")
    cfg = model_cfg(tiny_models)
    model, fresh = fresh_model(cfg, seed=0), fresh_model(cfg, seed=0).state_dict()
    ross_format.load_into(stage1, model)
    full = fresh_model(cfg, seed=0)
    ross_format.load_into(folder, full)
    want = full.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, want[k] if k.startswith(("projector.", "denoiser.")) else fresh[k]), k


def bad_bin(tmp_path, tensors, **change):
    out = {k: v for k, v in tensors.items() if k.startswith("model.mm_projector.")} | change
    torch.save(out, tmp_path / "mm_projector.bin")
    return tmp_path / "mm_projector.bin"


def test_bad_files_are_refused_naming_the_key(reference_folder, tiny_models, tmp_path):
    folder, tensors = reference_folder
    model = fresh_model(model_cfg(tiny_models), seed=0)
    key = "model.mm_projector.0.weight"
    with pytest.raises(ValueError, match=f"{key} has shape"):
        ross_format.load_into(bad_bin(tmp_path, tensors, **{key: torch.zeros(3, 4)}), model)
    with pytest.raises(KeyError, match="model.mm_projector.7.weight"):
        ross_format.load_into(bad_bin(tmp_path, tensors, **{"model.mm_projector.7.weight": torch.zeros(1)}), model)
    with pytest.raises(KeyError, match="model.mm_inv_projector.ln_pre.weight"):
        ross_format.load_into(
            bad_bin(tmp_path, tensors, **{"model.mm_inv_projector.ln_pre.weight": torch.zeros(1)}), model
        )
    with pytest.raises(KeyError, match="model.mm_projector.2.bias"):  # missing
        ross_format.load_into(bad_bin(tmp_path, {k: v for k, v in tensors.items() if not k.endswith("2.bias")}), model)
    conv = NET + "x_embedder.proj.weight"
    with pytest.raises(ValueError, match=f"{conv}.*1x1 convolution"):
        ross_format.load_into(bad_bin(tmp_path, tensors, **{conv: torch.zeros(WIDTH, 16, 2, 2)}), model)
    with pytest.raises(ValueError, match=f"{NET}pos_embed"):  # a learned (not sin-cos) position embedding
        ross_format.load_into(
            bad_bin(tmp_path, tensors, **{NET + "pos_embed": tensors[NET + "pos_embed"] * 1.1}), model
        )
    # config.json facts no shape shows
    for cfg, name in (
        ({"mm_inv_projector_type": "denoiser_vit3x"}, "mm_inv_projector_type"),
        ({"mm_projector_type": "linear"}, "mm_projector_type"),
        ({"mm_inv_num_heads": 4}, "mm_inv_num_heads"),
        ({"mm_vision_select_layer": -1}, "mm_vision_select_layer"),
        ({"model_type": "llava_qwen2"}, "model_type"),
    ):
        bad = tmp_path / name
        bad.mkdir()
        for f in folder.iterdir():
            (bad / f.name).symlink_to(f)
        (bad / "config.json").unlink()
        (bad / "config.json").write_text(json.dumps(json.loads((folder / "config.json").read_text()) | cfg))
        with pytest.raises(ValueError, match=name):
            ross_format.load_into(bad, model)
    fresh = fresh_model(model_cfg(tiny_models), seed=0).state_dict()
    assert all(torch.equal(v, fresh[k]) for k, v in model.state_dict().items())  # nothing was half loaded


@pytest.mark.slow
def test_training_starts_from_the_ross_layout_as_from_the_checkpoint(
    run_dir, first_step_from_run, tiny_models, stage2_shards, tmp_path
):
    """model.init_from = the reference-layout export (fp32) or the checkpoint it came from (first_step_from_run), on
    2 ranks (each keeps its FSDP shards): the same first step, bit for bit."""
    from fastross.export import main
    from test_train import metrics, run, write_config

    ross = tmp_path / "ross"
    with pytest.warns(UserWarning, match="the reference code cannot load its denoiser"):
        assert main([str(run_dir), "--out", str(ross), "--format", "ross"]) == 0
    rd = tmp_path / "from_ross"
    out = run(
        2,
        write_config(tmp_path / "from_ross.yaml", tiny_models, stage2_shards, rd, max_steps=1, ckpt_every=10),
        f"model.init_from={ross}",
    )
    assert f"model weights from {ross}" in out
    for key in ("text_loss", "recon_loss", "grad_norm"):
        assert metrics(rd)[0][key] == first_step_from_run[key], key


def test_name_table_is_a_bijection_ready_for_llama(tiny_models):
    """Every fastross name maps to a reference name and back; an LLM's own names (Qwen2's, and Llama's for
    ross_llama) are the reference's under model.* / lm_head.*, as its Ross*ForCausalLM subclasses keep them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    names = list(fresh_model(model_cfg(tiny_models), seed=0).state_dict())
    with torch.device("meta"):
        llama = LlamaForCausalLM(
            LlamaConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                vocab_size=128,
                tie_word_embeddings=False,
            )
        )
    hf = list(llama.state_dict())
    for ours in (names, ["llm." + k for k in hf]):
        theirs = [ross_format.reference_name(n) for n in ours]
        assert None not in theirs and len(set(theirs)) == len(theirs)
        assert [ross_format.fastross_name(k) for k in theirs] == ours
    assert theirs == hf
    assert ross_format.MODEL_TYPES["llama"] == ("ross_llama", "RossLlamaForCausalLM")


def test_imported_reference_checkpoint_gives_the_reference_logits(reference_folder, tiny_models, tokenizer):
    """The whole model, not only the denoiser: the imported tower (cut after mm_vision_select_layer), projector and
    LLM give the logits the reference's own inference path gives on the file's tensors."""
    from fastross.generate import micro_batch

    folder, tensors = reference_folder
    model = fresh_model(model_cfg(tiny_models), seed=0).eval()
    ross_format.load_into(folder, model)
    pre = tokenizer("A chat. USER: ", add_special_tokens=False).input_ids
    post = tokenizer("\nWhat is shown? ASSISTANT:", add_special_tokens=False).input_ids
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    want = reference_logits(tensors, tiny_models, pre + [ross_format.IMAGE_TOKEN_INDEX] + post, pixels)
    with torch.no_grad():
        h = model.hidden_states(micro_batch(pre + [image_id] + post, pixels, image_id, model.num_visual_tokens))
        got = model.llm.get_output_embeddings()(h)
    err = (got - want).abs().max().item()
    print(f"ross_format: logits against the reference's inference, max |diff| {err:.2e} (scale {want.abs().max():.2f})")
    assert got.shape == want.shape and err <= 1e-4
    fresh = fresh_model(model_cfg(tiny_models), seed=0).eval()  # the folders' tower and LLM, not the file's
    with torch.no_grad():
        h = fresh.hidden_states(micro_batch(pre + [image_id] + post, pixels, image_id, model.num_visual_tokens))
        assert (fresh.llm.get_output_embeddings()(h) - want).abs().max() > 100 * max(err, 1e-6)
