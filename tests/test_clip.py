"""CLIP vision towers beside SigLIP (fastross.towers): the image path against CLIPImageProcessor, the features
against Hugging Face's CLIPVisionModel, the VAE's input, convert -> train -> resume, the Llava and reference
exports, the 336 px preset, and the refusal of other towers."""

import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fastross import towers

QUESTION = "What shape is in the picture?"
USER = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]


def images() -> list[bytes]:
    """Non-square images both ways (the pad, the shortest-side resize and the crop matter) and a square one."""
    rng = np.random.default_rng(0)
    out = []
    for w, h in ((53, 37), (40, 90), (97, 96), (64, 64)):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


@pytest.mark.parametrize("aspect", ["pad", "square"])
def test_clip_image_path_equals_clip_processor(aspect, tiny_clip):
    """fastross's pil path is bit-exact with CLIPImageProcessor (after LLaVA's mean-colour pad for "pad"); the
    torchvision backend within its stated 2/255; the exported LlavaImageProcessor computes the same."""
    from transformers import CLIPImageProcessor

    from fastross.data.images import ImageSpec, pad_to_square, preprocess
    from fastross.export import image_processor

    proc = CLIPImageProcessor.from_pretrained(tiny_clip)
    spec = ImageSpec.from_pretrained(str(tiny_clip))
    assert (spec.shortest_edge, spec.height, spec.width) == (64, 64, 64) and spec.pad_fill == (122, 116, 104)
    exported = image_processor(spec, aspect)
    for data in images():
        img = Image.open(io.BytesIO(data)).convert("RGB")
        want = proc(pad_to_square(img, spec.pad_fill) if aspect == "pad" else img, return_tensors="pt").pixel_values[0]
        got = preprocess(data, spec, aspect)
        assert got.shape == (3, 64, 64) and torch.equal(got, want), img.size
        assert torch.equal(exported(img, return_tensors="pt").pixel_values[0], want), img.size
        tv = preprocess(data, spec, aspect, backend="torchvision")  # PNG: falls back to pil
        assert torch.equal(tv, want)


def test_clip_torchvision_backend_within_two_levels(tiny_clip):
    from fastross.data.images import ImageSpec, preprocess

    spec = ImageSpec.from_pretrained(str(tiny_clip))
    rng = np.random.default_rng(1)
    for w, h in ((120, 80), (70, 130)):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=95)
        for aspect in ("pad", "square"):
            a, b = (preprocess(buf.getvalue(), spec, aspect, backend=k) for k in ("pil", "torchvision"))
            levels = ((a - b).abs() * torch.tensor(spec.std).view(3, 1, 1)).max().item() * 255
            assert a.shape == b.shape == (3, 64, 64) and levels <= 2 + 1e-3, (w, h, aspect, levels)


def test_clip_vae_input_undoes_the_clip_normalisation(tiny_clip):
    """The VAE sees the image the tower saw, in [-1, 1]: CLIP's per-channel mean and std undone (the reference's
    images * image_std + image_mean), not SigLIP's 0.5."""
    from fastross.data.images import ImageSpec, preprocess, vae_input

    spec = ImageSpec.from_pretrained(str(tiny_clip))
    data = images()[0]
    pix = preprocess(data, spec, "pad")[None]
    x = vae_input(pix, 8, spec)
    rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # 53 x 37: padded to 53 x 53, resized to 64
    from fastross.data.images import pad_to_square

    img = pad_to_square(Image.fromarray(rgb), spec.pad_fill).resize((64, 64), resample=spec.resample)
    direct = torch.from_numpy(np.asarray(img)).permute(2, 0, 1)[None].float() / 255 * 2 - 1
    direct = F.interpolate(direct, size=(128, 128), mode="bilinear", align_corners=False)
    assert x.shape == (1, 3, 128, 128)
    assert (x - direct).abs().max().item() < 1e-5  # float32 rounding of normalise and back


def test_clip_features_are_layer_minus_two_without_cls(tiny_clip):
    """The tower's output is CLIPVisionModel's hidden_states[-2] without its class token, 8 x 8 = 64 tokens; built on
    the meta device and filled by the training loader's code (fastross.model.load), as training builds it."""
    from transformers import CLIPVisionModel

    from fastross.model import load
    from fastross.model.vision import VisionTower

    hf = CLIPVisionModel.from_pretrained(tiny_clip).eval()
    tower = VisionTower(str(tiny_clip), -2, meta=True)
    tower.to_empty(device="cpu")
    sources = [load.Source("", str(tiny_clip), "vision_model.")]
    from contextlib import ExitStack

    with ExitStack() as stack:
        folders = {str(tiny_clip): load.SafetensorsFolder(str(tiny_clip), stack)}
        with torch.no_grad():
            for name, t in tower.state_dict(keep_vars=True).items():
                folder, key = load.file_key([name], sources, folders)
                t.copy_(folder.get_tensor(key))
    assert load.recompute_buffers(tower) == 1  # CLIP's position_ids
    assert len(tower.encoder.layers) == 2 and (tower.grid, tower.num_tokens) == (8, 64)
    pix = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = hf(pix, output_hidden_states=True).hidden_states[-2][:, 1:]
        got = tower(pix)
    assert got.shape == want.shape == (2, 64, 48)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_clip_336_preset_plans_576_tokens():
    """The CLIP ViT-L/14-336 preset builds as a CLIP tower: 24 x 24 = 576 tokens, the flop formula runs 577."""
    from fastross import config
    from fastross.model import presets
    from fastross.model.vision import VisionTower

    cfg = config.ModelConfig(vision_path="/none/clip-vit-large-patch14-336", llm_path="/none/vicuna-7b")
    with presets.arch_folders(cfg) as (m, sources):
        assert sources["vision"] == "preset clip-l14-336"
        tower = VisionTower(m.vision_path, -2, meta=True)
    assert tower.kind is towers.CLIP and (tower.grid, tower.num_tokens, len(tower.encoder.layers)) == (24, 576, 23)
    # The planner's default stage-2 mix counts the tower's visual tokens: the same samples as for SigLIP's 729,
    # each image sample 153 tokens shorter, the same text.
    from fastross import memory_plan

    cfg = config.load("configs/7b.yaml", ["data.shards=''"], check_paths=False)
    clip, siglip = memory_plan.sample_mix(cfg, 576), memory_plan.sample_mix(cfg, 729)
    assert clip.images.any() and np.array_equal(clip.images, siglip.images)
    assert np.array_equal(clip.lengths, siglip.lengths - 153 * siglip.images)
    assert np.array_equal(clip.supervised, siglip.supervised)


@pytest.mark.parametrize("model_type", ["dinov2", "siglip2_vision_model", None])
def test_other_vision_towers_are_refused_by_name(model_type, tiny_clip, tiny_models, tmp_path, capsys):
    from fastross import config
    from fastross.data.convert import main as convert_main
    from fastross.model.vision import VisionTower

    folder = tmp_path / "other"
    folder.mkdir()
    raw = json.loads((tiny_clip / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "model_type": model_type}))
    supported = "model_type one of siglip_vision_model, siglip, clip_vision_model, clip"
    with pytest.raises(towers.TowerError) as e:
        VisionTower(str(folder))
    assert repr(model_type) in str(e.value) and str(folder) in str(e.value) and supported in str(e.value)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"model:\n  vision_path: {folder}\n  llm_path: {tiny_models / 'llm'}\n"
        f"data:\n  shards: {tmp_path}\ntrain:\n  run_dir: {tmp_path / 'run'}\n"
    )
    with pytest.raises(config.ConfigError) as e:
        config.load(str(cfg))
    assert (
        str(e.value).startswith("model.vision_path") and repr(model_type) in str(e.value) and supported in str(e.value)
    )
    assert (
        convert_main(
            [
                "--json",
                str(tmp_path / "none.json"),
                "--images",
                str(tmp_path),
                "--tokenizer",
                str(tiny_models / "llm"),
                "--vision",
                str(folder),
                "--template",
                "qwen2_ross",
                "--out",
                str(tmp_path / "out"),
                "--quiet",
            ]
        )
        == 2
    )
    assert f"convert: error: --vision: {folder} holds a {model_type!r} model" in capsys.readouterr().err


def test_clip_whole_model_folder_builds_its_vision_tower(tmp_path):
    """A two-tower `clip` folder (CLIPModel) is read through its vision_config, its vision weights under the same
    vision_model. prefix."""
    from transformers import CLIPConfig, CLIPModel

    from fastross.model.vision import VisionTower

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        vision_config=dict(
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    model = CLIPModel(cfg).eval()
    model.save_pretrained(tmp_path / "clip")
    tower = towers.read_tower(tmp_path / "clip")
    assert tower.kind is towers.CLIP and (tower.grid, tower.hidden_size) == (4, 48)
    pix = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = model.vision_model(pix, output_hidden_states=True).hidden_states[-2][:, 1:]
        got = VisionTower(str(tmp_path / "clip"), -2)(pix)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_clip_convert_train_resume(tiny_models, tiny_clip, clip_shards, clip_run_dir, tmp_path):
    """The tiny CLIP folder through convert (64 visual tokens) -> train 2 steps (clip_run_dir) -> the same run cut
    back to its step-1 checkpoint and resumed: step 2's losses and the final weights equal the uninterrupted run's
    bit for bit (1 rank)."""
    import shutil

    from fastross.data.schema import ShardMeta, read_meta
    from test_train import final_weights, metrics, run, write_config

    meta = ShardMeta.read(clip_shards)
    assert (meta.grid, meta.num_visual_tokens) == (8, 64) and read_meta(clip_shards)["vision"] == str(tiny_clip)
    rd = tmp_path / "resumed"
    shutil.copytree(clip_run_dir, rd)
    ckpts = rd / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000001", "step_00000002"]
    shutil.rmtree(ckpts / "step_00000002")
    (ckpts / "latest").write_text((ckpts / "latest").read_text().replace("step_00000002", "step_00000001"))
    (rd / "metrics.jsonl").write_text((rd / "metrics.jsonl").read_text().splitlines(keepends=True)[0])
    out = run(
        1,
        write_config(tmp_path / "c.yaml", tiny_models, clip_shards, rd, max_steps=2, ckpt_every=1),
        f"model.vision_path={tiny_clip}",
    )
    assert "steps 1 -> 2" in out, out[-2000:]
    ref, got = metrics(clip_run_dir), metrics(rd)
    assert [m["step"] for m in got] == [1, 2] and all(m["images"] > 0 for m in ref)
    for key in ("text_loss", "recon_loss", "grad_norm", "lr"):
        assert ref[1][key] == got[1][key], (key, ref[1][key], got[1][key])
    want, have = final_weights(clip_run_dir, tmp_path), final_weights(rd, tmp_path)
    assert want.keys() == have.keys() and "vision.pre_layrnorm.weight" in want
    for name in want:
        assert torch.equal(want[name], have[name]), name


@pytest.fixture(scope="module")
def clip_ours(clip_run_dir):
    from fastross.build import checkpoint_model

    return checkpoint_model(clip_run_dir)[0]


@pytest.fixture(scope="module")
def clip_exported(clip_run_dir, tmp_path_factory):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from fastross.export import main

    out = tmp_path_factory.mktemp("clip_exported") / "llava"
    assert main([str(clip_run_dir), "--out", str(out)]) == 0
    model, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weight
    return model.eval(), AutoProcessor.from_pretrained(out, use_fast=False), out


@pytest.mark.slow
def test_clip_export_parity(clip_ours, clip_exported, clip_run_dir, clip_shards, tiny_clip, tokenizer):
    """Llava with strategy "default" (CLS dropped) at layer -2: its processor's pixel values equal fastross's image
    path, the projector's input equals CLIPVisionModel's hidden_states[-2][:, 1:], the logits equal fastross's
    within fp32 tolerance, and the export reads back as the checkpoint (CLIP's pre-layernorm included)."""
    from transformers import CLIPVisionModel

    from fastross.checkpoint import read_checkpoint
    from fastross.data import templates
    from fastross.data.images import ImageSpec, preprocess
    from fastross.data.schema import ShardMeta
    from fastross.export import load_export
    from fastross.generate import micro_batch

    model, proc, folder = clip_exported
    assert (model.config.vision_feature_select_strategy, model.config.vision_feature_layer) == ("default", -2)
    assert model.config.vision_config.model_type == "clip_vision_model" and model.config.image_seq_length == 64
    meta = ShardMeta.read(clip_shards)
    spec = ImageSpec.from_pretrained(str(tiny_clip))
    hf_tower = CLIPVisionModel.from_pretrained(tiny_clip).eval()
    fed = []
    hook = clip_ours.projector.register_forward_pre_hook(lambda m, args: fed.append(args[0]))
    conv = [{"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": "A circle."}]
    ids, labels = templates.tokenize(templates.render("qwen2_ross", conv, True, tokenizer), tokenizer)
    ids = ids[: int(np.flatnonzero(labels != templates.IGNORE)[0])].tolist()
    last = []
    try:
        for data in images():
            img = Image.open(io.BytesIO(data))
            hf = proc(text=proc.apply_chat_template(USER, add_generation_prompt=True), images=img, return_tensors="pt")
            assert torch.equal(hf.pixel_values[0], preprocess(data, spec, meta.image_aspect)), img.size
            mb = micro_batch(ids, hf.pixel_values, model.config.image_token_id, model.config.image_seq_length)
            assert torch.equal(hf.input_ids, mb.input_ids)  # 64 image tokens, as the loader expands
            with torch.no_grad():
                want = clip_ours.llm.get_output_embeddings()(clip_ours.hidden_states(mb))
                got = model(**hf).logits[0]
                direct = hf_tower(hf.pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
            assert fed[-1].shape == direct.shape == (1, 64, 48)
            torch.testing.assert_close(fed[-1], direct, rtol=0, atol=1e-6)
            err = (got - want).abs().max().item()
            assert err <= 1e-4, err
            last.append(want[-1])
    finally:
        hook.remove()
    assert (last[0] - last[1]).abs().max().item() > 1e-3  # the image reaches the answer
    _, _, state = read_checkpoint(clip_run_dir)
    want, back = {k: v for k, v in state.items() if not k.startswith("vae.")}, load_export(folder)
    assert back.keys() == want.keys() and "vision.pre_layrnorm.weight" in back
    for k in want:
        assert torch.equal(back[k], want[k]), k


@pytest.mark.slow
def test_clip_reference_layout(clip_ours, clip_run_dir, tiny_clip, tmp_path):
    """--format ross for CLIP: mm_vision_tower is the CLIP folder, the whole CLIPVisionModel (class embedding,
    pre-layernorm, every layer) under model.vision_tower.vision_tower., which loads strictly into a CLIPVisionModel
    whose hidden_states[-2][:, 1:] are fastross's features; reading the layout back gives the checkpoint's weights."""
    from safetensors.torch import load_file
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from fastross import ross_format

    out = ross_format.export(clip_run_dir, tmp_path / "ross")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["mm_vision_tower"] == str(tiny_clip) and "clip" in cfg["mm_vision_tower"]
    assert (cfg["image_embed_len"], cfg["decode_image_size"], cfg["mm_vision_select_layer"]) == (64, 128, -2)
    from fastross.demo.make_tiny import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    assert (cfg["image_mean"], cfg["image_std"]) == (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    tensors = load_file(str(out / "model.safetensors"))
    prefix = "model.vision_tower.vision_tower."
    tower = CLIPVisionModel(CLIPVisionConfig.from_pretrained(tiny_clip)).eval()
    tower.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)
    pix = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            clip_ours.vision(pix), tower(pix, output_hidden_states=True).hidden_states[-2][:, 1:], rtol=0, atol=1e-6
        )
    state = ross_format.reference_state(out, clip_ours)
    have = clip_ours.state_dict()
    assert "vision.pre_layrnorm.weight" in state and "vision.embeddings.class_embedding" in state
    for name, t in state.items():
        assert torch.equal(t, have[name]), name
    assert not ross_format.reference_tower_name("/models/vision", towers.CLIP)
    assert ross_format.reference_tower_name("/models/siglip-so400m", towers.SIGLIP)
