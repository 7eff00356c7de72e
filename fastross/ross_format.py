"""The reference ROSS checkpoint layout (github.com/Haochen-Wang409/ross), read and written.

    python -m fastross.export RUN_DIR_OR_CHECKPOINT --out DIR --format ross [--dtype bf16] [--max-shard-size 5GB]
    model.init_from=DIR            # a folder in that layout: every weight but the VAE's
    model.init_from=FILE.bin       # a LLaVA/ROSS stage-1 adapter: mm_projector.bin (and mm_inv_projector.bin)

The facts, read from the reference repository (not copied from its code):
- `config.json` is the LLM's config with model_type `ross_qwen2` (RossQwen2ForCausalLM; `ross_llama`,
  RossLlamaForCausalLM, for Vicuna: the same names) plus the `mm_*` keys its trainer sets: `mm_vision_tower`
  and `mm_pixel_decoder` (folders), `mm_projector_type` mlp2x_gelu, `mm_inv_projector_type` denoiser_vit{depth}x
  (its builder fixes the width by depth, 3 -> 1024, 8 -> 1280, 12 -> 1536, and the heads at 16),
  `mm_vision_select_layer`, `mm_hidden_size` (vision width), `mm_inv_hidden_size` (4 x latent channels),
  `image_aspect_ratio` (pad / square), `image_embed_len`, `decode_image_size`, `image_mean`, `image_std`.
- The weights are the whole module's state dict as Hugging Face's Trainer saves it (`save_pretrained`, safetensors,
  `model-0000K-of-0000N.safetensors` + `model.safetensors.index.json` past 5 GB a shard, bf16 under its bf16 runs):
  the LLM under its usual names (`model.*`, `lm_head.*`, absent when tied), `model.mm_projector.{0,2}`, the
  whole tower under `model.vision_tower.vision_tower.vision_model.*` (every layer and post-layernorm; SigLIP's
  pooling head; CLIP's class embedding and pre-layernorm, as CLIPVisionModel names them: the reference's
  ross/model/multimodal_encoder/clip_encoder.py holds a CLIPVisionModel at `vision_tower`), the VAE under
  `model.pixel_decoder.pixel_decoder.*`, the DiT under `model.mm_inv_projector.net.*`.
- The DiT against fastross.model.denoiser: the input embedding is a 1x1 Conv2d over the (64, g, g) latent image
  (weight (W, 64, 1, 1); fastross: Linear (W, 64), the same numbers per token in row-major token order); its
  `pos_embed` (1, g*g, W) is a frozen nn.Parameter holding the fixed 2-D sin-cos table (fastross recomputes it
  as a buffer: imported, it must equal that table); `attn.qkv` is fused in timm's (3, heads, head_dim) order,
  as fastross's; `mlp.fc1/fc2` are fastross's `mlp.0/2`; `adaLN_modulation.1` is `ada.1` (chunks in the same
  order); `z_embedder` (SiLU, Linear) is `c_embed`. The condition's LayerNorm (`ln_pre`) has no parameters.
- The reference builds its tower by the *name* of `mm_vision_tower` (ross/model/multimodal_encoder/builder.py:
  "clip" in it -> CLIPVisionTower, else "siglip" -> SigLipVisionTower); fastross chooses by the folder's
  config.json, and `export` warns when the folder's path would make the reference choose otherwise.
- In prompts the reference's image placeholder is the token id -200 (IMAGE_TOKEN_INDEX), which no tokenizer
  holds; fastross's shards use the tokenizer's `<image>` id instead. Weights do not depend on it.
- Its stage 1 saves only `mm_projector.bin` and `mm_inv_projector.bin` (torch.save of {name: tensor}) beside
  config.json; read here with torch.load(weights_only=True) (fastross.checkpoint_read.read_tensor_file).

Every tensor maps both ways through PARTS; any other name is an error naming it. Importing keeps the parts the file
cannot change as they are: the tower's layers fastross drops, its post-layernorm (and SigLIP's head), and the VAE when
the model has none (the shards hold the latents). Trade-off, as for the Llava export: every rank reads the whole file
set into host memory once, then keeps its FSDP shards.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

from fastross import towers
from fastross.checkpoint import read_checkpoint
from fastross.checkpoint_read import read_json_object, read_tensor_file
from fastross.data import templates
from fastross.data.schema import ShardMeta, read_meta
from fastross.data.sources import meta_folder
from fastross.model.denoiser import sincos_2d
from fastross.model.load import SafetensorsFolder

CONFIG = "config.json"
PROJECTOR_BIN = "mm_projector.bin"
INV_PROJECTOR_BIN = "mm_inv_projector.bin"
IMAGE_TOKEN_INDEX = -200  # the reference's image placeholder in token ids
# The LLM's model_type -> the reference's model_type and class.
MODEL_TYPES = {"qwen2": ("ross_qwen2", "RossQwen2ForCausalLM"), "llama": ("ross_llama", "RossLlamaForCausalLM")}
REFERENCE_TYPES = {t for t, _ in MODEL_TYPES.values()}
REFERENCE_HEADS = 16  # the reference's DiT always has 16 heads
HEADS_KEY = "mm_inv_num_heads"  # fastross writes its heads here when they differ; absent: REFERENCE_HEADS
REFERENCE_WIDTHS = {8: 1280, 12: 1536}  # denoiser_vit{depth}x -> width in the reference's builder, else 1024
DENOISER_TYPE = re.compile(r"^denoiser_vit(\d+)x$")

NET = "model.mm_inv_projector.net."
POS_EMBED = NET + "pos_embed"
VISION = "model.vision_tower.vision_tower.vision_model."
# fastross prefix <-> reference prefix; "#" stands for a block index. First match wins: "model." (the LLM) is last
# because every other reference name starts with it too.
PARTS = (
    ("projector.", "model.mm_projector."),
    ("vision.", VISION),
    ("vae.", "model.pixel_decoder.pixel_decoder."),
    ("denoiser.x_embed.", NET + "x_embedder.proj."),
    ("denoiser.t_embed.mlp.", NET + "t_embedder.mlp."),
    ("denoiser.c_embed.1.", NET + "z_embedder.1."),
    ("denoiser.blocks.#.attn.", NET + "blocks.#.attn."),
    ("denoiser.blocks.#.mlp.0.", NET + "blocks.#.mlp.fc1."),
    ("denoiser.blocks.#.mlp.2.", NET + "blocks.#.mlp.fc2."),
    ("denoiser.blocks.#.ada.1.", NET + "blocks.#.adaLN_modulation.1."),
    ("denoiser.final.ada.1.", NET + "final_layer.adaLN_modulation.1."),
    ("denoiser.final.linear.", NET + "final_layer.linear."),
    ("llm.lm_head.", "lm_head."),
    ("llm.model.", "model."),
)
# Tower parts the reference saves, fastross never builds (either kind's).
DROPPED_VISION = tuple(dict.fromkeys(p for kind in towers.KINDS for p in kind.dropped))
CONV = ("denoiser.x_embed.weight", NET + "x_embedder.proj.weight")  # Linear (W, C) <-> 1x1 Conv2d (W, C, 1, 1)


def _pattern(prefix: str) -> re.Pattern:
    return re.compile(re.escape(prefix).replace(re.escape("#"), r"(\d+)"))


_FORWARD = [(_pattern(ours), theirs) for ours, theirs in PARTS]
_BACKWARD = [(_pattern(theirs), ours) for ours, theirs in PARTS]


def _rename(name: str, table) -> str | None:
    for pattern, target in table:
        m = pattern.match(name)
        if m:
            return (target.replace("#", m.group(1)) if m.groups() else target) + name[m.end() :]
    return None


def reference_name(name: str) -> str | None:
    """A fastross parameter name -> its name in the reference layout (None: no place there)."""
    return _rename(name, _FORWARD)


def fastross_name(key: str) -> str | None:
    """A reference-layout key -> fastross's name (None: not a tensor this table knows)."""
    return _rename(key, _BACKWARD)


def is_reference(path: str | Path) -> bool:
    """A stage-1 adapter file (*.bin), a folder holding mm_projector.bin, or a folder whose config.json is ross_*."""
    path = Path(path)
    if path.is_file():
        return path.suffix == ".bin"
    if (path / PROJECTOR_BIN).is_file():
        return True
    cfg = path / CONFIG
    return cfg.is_file() and read_json_object(cfg).get("model_type") in REFERENCE_TYPES


def _config_error(where: Path, key: str, got, want: str) -> ValueError:
    return ValueError(f"{where}: {key} is {got!r}, {want}")


def check_config(cfg: dict, where: Path, model, full: bool, denoiser: bool) -> None:
    """The config.json facts that no tensor shape shows: model type, projector, denoiser type, depth, heads."""
    if full and cfg.get("model_type") not in REFERENCE_TYPES:
        raise _config_error(where, "model_type", cfg.get("model_type"), f"expected one of {sorted(REFERENCE_TYPES)}")
    if cfg.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise _config_error(where, "mm_projector_type", cfg["mm_projector_type"], "fastross's projector is mlp2x_gelu")
    if not denoiser:
        return
    d = model.denoiser
    m = DENOISER_TYPE.match(str(cfg.get("mm_inv_projector_type")))
    if m is None or d.kind != "dit":
        raise _config_error(
            where,
            "mm_inv_projector_type",
            cfg.get("mm_inv_projector_type"),
            f"this model's denoiser is model.denoiser.kind={d.kind!r} (the layout holds dit: denoiser_vit{{depth}}x)",
        )
    if int(m.group(1)) != len(d.blocks):
        raise _config_error(
            where,
            "mm_inv_projector_type",
            m.group(0),
            f"this model has model.denoiser.depth={len(d.blocks)}: set it to {m.group(1)}",
        )
    heads = int(cfg.get(HEADS_KEY, REFERENCE_HEADS))
    if heads != d.blocks[0].attn.heads:
        raise _config_error(
            where, HEADS_KEY, heads, f"this model has model.denoiser.heads={d.blocks[0].attn.heads}: set it to {heads}"
        )


def _vision_layers(names) -> int:
    """How many vision encoder layers the fastross names `names` hold."""
    found = {int(m.group(1)) for n in names if (m := re.match(r"vision\.encoder\.layers\.(\d+)\.", n))}
    return max(found) + 1 if found else 0


def _expected_pos_embed(model) -> torch.Tensor:
    tokens, width = model.denoiser.pos_embed.shape
    return sincos_2d(width, math.isqrt(tokens))[None]


def _check_pos_embed(t: torch.Tensor, model, where: str) -> None:
    """The reference's frozen pos_embed must be the fixed table fastross recomputes (ROSS_SPEC.md section 3)."""
    want = _expected_pos_embed(model)
    eps = torch.finfo(t.dtype).eps if t.dtype.is_floating_point else 0.0
    if tuple(t.shape) != tuple(want.shape) or not torch.allclose(t.float(), want.to(t.dtype).float(), rtol=0, atol=eps):
        raise ValueError(
            f"{where}: {POS_EMBED} {tuple(t.shape)} is not the fixed 2-D sin-cos table of this model's "
            f"denoiser {tuple(want.shape)}; fastross does not train a position embedding"
        )


def _sources(path: Path, stack: ExitStack):
    """(where, {key: loader}) pairs of the file set, the config dict or None, and whether it is a whole checkpoint."""
    if path.is_file():
        bins, cfg_path = [path], path.parent / CONFIG
    elif (path / PROJECTOR_BIN).is_file():
        bins, cfg_path = [p for p in (path / PROJECTOR_BIN, path / INV_PROJECTOR_BIN) if p.is_file()], path / CONFIG
    else:
        folder = SafetensorsFolder(str(path), stack)
        cfg = read_json_object(path / CONFIG)
        return [(str(path), {k: (lambda k=k: folder.get_tensor(k)) for k in folder.where})], cfg, True
    sources = []
    for b in bins:
        tensors = read_tensor_file(b)  # torch.load(weights_only=True); a dict of name -> tensor, or refused
        sources.append((str(b), {k: (lambda v=v: v) for k, v in tensors.items()}))
    cfg = read_json_object(cfg_path) if cfg_path.is_file() else None
    return sources, cfg, False


def reference_state(path: str | Path, model, fresh: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The tensors of a reference-layout checkpoint or stage-1 adapter under fastross's names, each checked against
    `model` (a RossModel, FSDP-sharded or not) and converted to its dtype. `fresh`: name prefixes the file need not
    hold, the caller fills them (fastross.convert_checkpoint --fresh-denoiser: "denoiser.")."""
    path = Path(path)
    have = {
        k: (tuple(v.shape), v.dtype)
        for k, v in get_model_state_dict(model, options=StateDictOptions(full_state_dict=False)).items()
    }
    with ExitStack() as stack:
        sources, cfg, full = _sources(path, stack)
        keys = [k for _, src in sources for k in src]
        denoiser = any(k.startswith(NET) for k in keys)
        if cfg is not None:
            check_config(cfg, path if path.is_dir() else path.parent / CONFIG, model, full, denoiser)
        kept = _vision_layers(have)
        in_file = _vision_layers(n for k in keys if (n := fastross_name(k)) and n.startswith("vision."))
        if in_file:
            select = int((cfg or {}).get("mm_vision_select_layer", -2))
            keep = in_file + 1 + select if select < 0 else select
            if keep != kept:
                raise ValueError(
                    f"{path}: mm_vision_select_layer={select} of its {in_file}-layer tower keeps {keep} "
                    f"layers, this model {kept}: set model.select_layer to {select}"
                )
        has_vae = any(k.startswith("vae.") for k in have)
        state = {}
        for where, src in sources:
            for key, load in src.items():
                if key == POS_EMBED:
                    _check_pos_embed(load(), model, where)
                    continue
                name = fastross_name(key)
                if name is None:
                    raise KeyError(f"{where}: {key} is no tensor of the reference ROSS layout")
                layer = re.match(r"vision\.encoder\.layers\.(\d+)\.", name)
                if (layer and int(layer.group(1)) >= kept) or name.startswith(DROPPED_VISION):
                    continue  # the tower past the selected layer: fastross does not build it
                if name.startswith("vae.") and not has_vae:
                    continue  # no VAE in this model: the shards hold the latents
                if name not in have:
                    raise KeyError(
                        f"{where}: {key} (fastross's {name}) has no place in this model: is model.* "
                        "(llm_path, vision_path, denoiser) the checkpoint's architecture?"
                    )
                t = load()
                if key == CONV[1]:
                    if t.dim() != 4 or tuple(t.shape[2:]) != (1, 1):
                        raise ValueError(f"{where}: {key} has shape {tuple(t.shape)}, expected a 1x1 convolution")
                    t = t.flatten(1)
                if tuple(t.shape) != have[name][0]:
                    raise ValueError(f"{where}: {key} has shape {tuple(t.shape)}, this model's {name} {have[name][0]}")
                state[name] = t.to(have[name][1])
    _complete(state, have, model, path, full, denoiser, fresh)
    return state


def _complete(state: dict, have: dict, model, path: Path, full: bool, denoiser: bool, fresh: tuple = ()) -> None:
    """Tie the head if the LLM ties it, then refuse a file set that leaves part of what it claims to set unset."""
    if (
        "llm.lm_head.weight" in have
        and "llm.lm_head.weight" not in state
        and "llm.model.embed_tokens.weight" in state
        and model.llm.config.tie_word_embeddings
    ):
        state["llm.lm_head.weight"] = state["llm.model.embed_tokens.weight"]
    parts = ("projector.", "denoiser.") if denoiser else ("projector.",)
    wanted = [k for k in have if not k.startswith(("vae.", *fresh)) and (full or k.startswith(parts))]
    missing = sorted(set(wanted) - state.keys())
    if missing:
        names = [reference_name(k) or k for k in missing]
        raise KeyError(f"{path}: {len(missing)} tensors of this model are missing: {names[:5]}")


def load_into(path: str | Path, model) -> Path:
    """model.init_from for the reference layout: every rank reads the files and keeps its shards (strict=False: the
    parts a stage-1 adapter does not hold, and the VAE, stay as loaded)."""
    state = reference_state(path, model)
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
    return Path(path)


def reference_config(cfg, meta, vae_path: str, dtype: torch.dtype) -> dict:
    """config.json: the LLM's config as the reference model's, with the mm_* keys its trainer writes."""
    from transformers import AutoConfig  # transformers (seconds) only where the layout is written

    m = cfg.model
    llm = AutoConfig.from_pretrained(m.llm_path)
    if llm.model_type not in MODEL_TYPES:
        raise ValueError(
            f"model.llm_path={m.llm_path} is a {llm.model_type!r} model; the reference layout has "
            f"{', '.join(MODEL_TYPES)} LLMs"
        )
    vision = towers.read_tower(m.vision_path)
    proc = vision.kind.transformers_class("processor").from_pretrained(m.vision_path)
    model_type, arch = MODEL_TYPES[llm.model_type]
    d = llm.to_dict()
    name = str(dtype).removeprefix("torch.")
    d.update(
        model_type=model_type,
        architectures=[arch],
        dtype=name,
        torch_dtype=name,
        use_cache=True,  # 4.57's key, older
        mm_vision_tower=str(m.vision_path),
        mm_pixel_decoder=str(vae_path),
        mm_projector_type="mlp2x_gelu",
        mm_inv_projector_type=f"denoiser_vit{m.denoiser.depth}x",
        mm_vision_select_layer=m.select_layer,
        mm_vision_select_feature="patch",
        mm_hidden_size=vision.hidden_size,
        mm_inv_hidden_size=4 * m.latent_channels,
        mm_patch_merge_type="flat",
        image_aspect_ratio=meta.image_aspect,
        image_embed_len=meta.num_visual_tokens,
        decode_image_size=16 * meta.grid,
        image_mean=list(proc.image_mean),
        image_std=list(proc.image_std),
        use_mm_proj=True,
        use_mm_inv_proj=True,
        ross_enable=True,
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        tune_mm_mlp_adapter=False,
        freeze_mm_mlp_adapter=False,
        tokenizer_padding_side="right",
    )
    if m.denoiser.heads != REFERENCE_HEADS:
        d[HEADS_KEY] = m.denoiser.heads
    return d


def reference_builds(denoiser) -> bool:
    """Whether the reference code's builder makes this denoiser from `denoiser_vit{depth}x` (its width and heads)."""
    return (denoiser.width, denoiser.heads) == (REFERENCE_WIDTHS.get(denoiser.depth, 1024), REFERENCE_HEADS)


def reference_tower_name(path: str, kind: towers.TowerKind) -> bool:
    """Whether the reference's builder, which tests "clip" in the path first and then "siglip", picks `kind`."""
    name = str(path).lower()
    return ("clip" in name) == (kind is towers.CLIP) and (kind is towers.CLIP or "siglip" in name)


def reference_weights(
    cfg, state: dict[str, torch.Tensor], vae_path: str, grid: int, tied: bool, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The checkpoint's weights under the reference's names, plus what it keeps that fastross does not: the tower's
    later layers, post-layernorm and head (from vision_path), the VAE (from its folder), the DiT's pos_embed."""
    out = {}
    for name, t in state.items():
        if name.startswith("vae."):
            continue  # written whole from its folder below
        theirs = reference_name(name)
        if theirs is None:
            raise KeyError(f"{name}: no place for it in the reference ROSS layout")
        out[theirs] = t[:, :, None, None] if name == CONV[0] else t
    if tied:
        out.pop("lm_head.weight", None)
    out[POS_EMBED] = sincos_2d(state[CONV[0]].shape[0], grid)[None]
    with ExitStack() as stack:
        tower = (cfg.model.vision_path, "model.vision_tower.vision_tower.", towers.VISION_FOLDER_PREFIX)
        for folder, prefix, keep in (tower, (vae_path, "model.pixel_decoder.pixel_decoder.", "")):
            files = SafetensorsFolder(str(folder), stack)
            for key in files.where:
                if key.startswith(keep) and prefix + key not in out:
                    out[prefix + key] = files.get_tensor(key)
    return {k: t.to(dtype).contiguous() for k, t in out.items()}


def write_safetensors(tensors: dict[str, torch.Tensor], out: Path, max_shard_size: str | int) -> list[str]:
    """model.safetensors, or Hugging Face's model-0000K-of-0000N.safetensors and model.safetensors.index.json."""
    from huggingface_hub import split_torch_state_dict_into_shards  # likewise (transformers' own dependency)

    split = split_torch_state_dict_into_shards(
        tensors, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: tensors[k] for k in keys}, str(out / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    return sorted(split.filename_to_tensors)


def export(src: str | Path, out: str | Path, dtype: str = "fp32", max_shard_size: str | int = "5GB") -> Path:
    """Write the newest checkpoint of `src` (a run folder or a checkpoint) in the reference layout into `out`.

    dtype fp32 reads back bit for bit; bf16 is what the reference's bf16 runs save."""
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"--dtype must be fp32 or bf16, got {dtype!r}")
    ckpt, cfg, state = read_checkpoint(src)
    if cfg.model.denoiser.kind != "dit":
        raise ValueError(
            f"{ckpt}: model.denoiser.kind={cfg.model.denoiser.kind!r}; the reference layout holds the DiT denoiser only"
        )
    meta = ShardMeta.read(meta_folder(cfg.data))
    vae_path = cfg.model.vae_path or read_meta(meta_folder(cfg.data)).get("vae")
    if not vae_path:
        raise ValueError(
            f"{ckpt}: neither model.vae_path nor the shards ({meta_folder(cfg.data)}) name the VAE folder the "
            "layout's model.pixel_decoder.* comes from: set model.vae_path in the run's config.yaml"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = reference_config(cfg, meta, vae_path, torch_dtype)
    tensors = reference_weights(cfg, state, vae_path, meta.grid, bool(config.get("tie_word_embeddings")), torch_dtype)
    write_safetensors(tensors, out, max_shard_size)
    (out / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    templates.load_tokenizer(cfg.model.llm_path).save_pretrained(out)
    kind = towers.read_tower(cfg.model.vision_path).kind
    if not reference_tower_name(cfg.model.vision_path, kind):
        warnings.warn(
            f"{out}: mm_vision_tower={cfg.model.vision_path} is a {kind.name} tower, but the reference code "
            f"chooses its tower class by the path's name and would not build a {kind.name} one from it: "
            f"rename the folder so that its path contains {kind.name!r} (and not 'clip' for SigLIP)",
            stacklevel=2,
        )
    d = cfg.model.denoiser
    if not reference_builds(d):
        warnings.warn(
            f"{out}: the reference code builds denoiser_vit{d.depth}x at width "
            f"{REFERENCE_WIDTHS.get(d.depth, 1024)} with {REFERENCE_HEADS} heads, this one has width "
            f"{d.width} and {d.heads} heads: fastross reads it back, the reference code cannot load "
            "its denoiser",
            stacklevel=2,
        )
    return out
