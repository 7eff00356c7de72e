"""Export a fastross run to a Hugging Face Llava folder, and read one back.

    python -m fastross.export RUN_DIR_OR_CHECKPOINT --out DIR [--format llava|ross]

(`--format ross` writes the reference ROSS code's layout instead: fastross.ross_format.)

DIR then loads with `LlavaForConditionalGeneration.from_pretrained(DIR)` (or
`AutoModelForImageTextToText`) and `AutoProcessor.from_pretrained(DIR, use_fast=False)`:
- config.json: the vision tower (SigLIP without its pooling head, or CLIP) with `vision_feature_layer` =
  model.select_layer and the strategy that keeps exactly the patch tokens (SigLIP: "full", it has no CLS;
  CLIP: "default", CLS dropped; fastross.towers), the mlp2x_gelu projector, the LLM, the `<image>` token id;
- model.safetensors: the checkpoint's weights under Llava's names. fastross truncates the tower after
  the selected layer; the layers after it and the post-layernorm, which Llava builds but never uses
  (`hidden_states[layer]` is taken before them), are copied unchanged from model.vision_path;
- the image processor (LlavaImageProcessor: mean-colour centred pad to square when the shards used
  aspect "pad", PIL resize (CLIP: shortest side, then centre crop), rescale, normalise:
  fastross.data.images.preprocess's numbers);
- the tokenizer and processor with the chat template of the shards' prompt template;
- denoiser.safetensors: the denoiser's weights under fastross's names (its config in the file's
  metadata) and fastross_config.yaml, the run's resolved config: `load_export` gives back the
  checkpoint's model state, so training can start again from an export.
"""

from __future__ import annotations

import argparse
import json
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fastross import config as fconfig, ross_format
from fastross.checkpoint import read_checkpoint
from fastross.data import templates
from fastross.data.images import ImageSpec
from fastross.data.schema import ShardMeta
from fastross.data.sources import meta_folder
from fastross.model.load import SafetensorsFolder
from fastross.towers import VISION_FOLDER_PREFIX, read_tower

DENOISER_FILE = "denoiser.safetensors"
CONFIG_FILE = "fastross_config.yaml"
# fastross prefix -> Llava prefix, for the weights a checkpoint holds.
NAMES = (
    ("vision.", "model.vision_tower.vision_model."),
    ("projector.0.", "model.multi_modal_projector.linear_1."),
    ("projector.2.", "model.multi_modal_projector.linear_2."),
    ("llm.model.", "model.language_model."),
    ("llm.lm_head.", "lm_head."),
)

# A message's content as fastross's templates see it: a string, or Hugging Face's list of parts with the
# image parts first as `<image>\n` (fastross.data.templates.normalise_turns moves the image to the front).
_FLATTEN = (
    "{%- macro fastross_text(content) -%}"
    "{%- if content is string -%}{{ content }}{%- else -%}"
    "{%- for part in content if part['type'] == 'image' -%}{{ '<image>\n' }}{%- endfor -%}"
    "{%- for part in content if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
    "{%- endif -%}{%- endmacro -%}"
    "{%- set ns = namespace(messages=[]) -%}"
    "{%- for message in messages -%}"
    "{%- set ns.messages = ns.messages + [{'role': message['role'], 'content': fastross_text(message['content'])}] -%}"
    "{%- endfor -%}"
    "{%- set messages = ns.messages -%}"
)


def _separated(name: str, system: str, end: str) -> str:
    """qwen2_ross and vicuna_v1. The user turn ends with "ASSISTANT:", the answer starts with its space: the
    tokenizer merges that space into the answer's first word in training, so the generation prompt is the training
    sample's tokens before the first answer token."""
    return (
        "{{- " + json.dumps(system + " ") + " -}}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}{{ 'USER: ' + message['content'] + ' ASSISTANT:' }}"
        "{%- elif message['role'] == 'assistant' -%}{{ ' ' + message['content'] + " + json.dumps(end) + " }}"
        "{%- else -%}{{ raise_exception('template " + name + " has user and assistant turns only') }}{%- endif -%}"
        "{%- endfor -%}"
    )


# llama3: the reference's conversation has no system message; the BOS is the tokenizer's (added when the prompt is
# encoded, as Llava's processor does for a prompt that does not start with it).
_LLAMA3 = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ('user', 'assistant') -%}"
    "{{ raise_exception('template llama3 has user and assistant turns only') }}{%- endif -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif -%}"
)
# plain: the image of the first user turn, then the first answer (the caption) and a newline.
_PLAIN = (
    "{%- for message in messages -%}"
    "{%- if loop.index0 == 0 and message['content'].startswith('<image>') -%}{{ '<image>' }}"
    "{%- elif loop.index0 == 1 -%}{{ message['content'] + '\n' }}{%- endif -%}"
    "{%- endfor -%}"
)


def chat_template(template: str, tokenizer) -> str:
    """The Jinja chat template that renders what fastross.data.templates renders for `template`."""
    name = templates.canonical(template)
    if name == "qwen2_ross":
        body = _separated(name, templates.ROSS_SYSTEM, "<|im_end|>")
    elif name == "vicuna_v1":
        body = _separated(name, templates.VICUNA_SYSTEM, "</s>")
    elif name == "llama3":
        body = _LLAMA3
    elif name == "plain":
        body = _PLAIN
    else:
        if not tokenizer.chat_template:
            raise ValueError(f"template {template}: the LLM's tokenizer has no chat template to export")
        body = tokenizer.chat_template
    return _FLATTEN + body


def llava_name(name: str) -> str | None:
    """A fastross parameter name -> its Llava name; None for parts Llava has no place for (denoiser, VAE)."""
    for ours, theirs in NAMES:
        if name.startswith(ours):
            return theirs + name[len(ours) :]
    return None


def llava_config(cfg: fconfig.Config, meta: ShardMeta):
    from transformers import AutoConfig, LlavaConfig  # transformers (seconds) only where its classes are made

    m = cfg.model
    kind = read_tower(m.vision_path).kind
    vision = kind.load_config(m.vision_path)
    if vision.image_size // vision.patch_size != meta.grid:
        raise ValueError(
            f"{m.vision_path} has a {vision.image_size // vision.patch_size}-patch grid, "
            f"the shards {meta_folder(cfg.data)} {meta.grid}: the run's folders and shards disagree"
        )
    text = AutoConfig.from_pretrained(m.llm_path)
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=meta.image_token_id,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        vision_feature_layer=m.select_layer,
        vision_feature_select_strategy=kind.llava_strategy,
        image_seq_length=meta.num_visual_tokens,
        tie_word_embeddings=bool(text.tie_word_embeddings),
    )


def llava_weights(cfg: fconfig.Config, state: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """The checkpoint's weights under Llava's names, plus the tower's layers fastross dropped (from vision_path)."""
    out = {}
    for name, t in state.items():
        theirs = llava_name(name)
        if theirs is not None and not (tied and theirs == "lm_head.weight"):
            out[theirs] = t.to(torch.float32).contiguous()  # the frozen tower may have been cast to train.dtype
    with ExitStack() as stack:
        folder = SafetensorsFolder(cfg.model.vision_path, stack)
        for key in folder.where:
            theirs = "model.vision_tower." + key
            if (
                key.startswith(VISION_FOLDER_PREFIX)
                and not key.startswith(VISION_FOLDER_PREFIX + "head.")
                and theirs not in out
            ):
                out[theirs] = folder.get_tensor(key).to(torch.float32).contiguous()
    return out


def image_processor(spec: ImageSpec, aspect: str):
    """The LlavaImageProcessor that computes fastross.data.images.preprocess(., spec, aspect) (pil backend)."""
    from transformers import LlavaImageProcessor  # as in llava_config

    if aspect not in ("pad", "square"):
        raise ValueError(f"image aspect must be 'pad' or 'square', got {aspect!r}")
    crop = {"height": spec.height, "width": spec.width}
    size = {"shortest_edge": spec.shortest_edge} if spec.shortest_edge else crop
    return LlavaImageProcessor(
        do_pad=aspect == "pad",
        do_resize=True,
        size=size,
        resample=spec.resample,
        do_center_crop=bool(spec.shortest_edge),
        crop_size=crop,
        do_rescale=True,
        rescale_factor=spec.rescale_factor,
        do_normalize=True,
        image_mean=list(spec.mean),
        image_std=list(spec.std),
        do_convert_rgb=True,
    )


def export(src: str | Path, out: str | Path) -> Path:
    """Write the Llava folder for the newest checkpoint of `src` (a run folder or a checkpoint) into `out`."""
    from transformers import GenerationConfig, LlavaProcessor  # as in llava_config

    ckpt, cfg, state = read_checkpoint(src)
    meta = ShardMeta.read(meta_folder(cfg.data))  # the run's sources agree on it
    tok = templates.load_tokenizer(cfg.model.llm_path)
    if tok.convert_tokens_to_ids(templates.IMAGE_TOKEN) != meta.image_token_id:
        raise ValueError(
            f"{cfg.model.llm_path}'s <image> id {tok.convert_tokens_to_ids(templates.IMAGE_TOKEN)} is "
            f"not the shards' {meta.image_token_id} ({meta_folder(cfg.data)})"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    lcfg = llava_config(cfg, meta)
    kind = read_tower(cfg.model.vision_path).kind
    lcfg.save_pretrained(out)
    save_file(
        llava_weights(cfg, state, lcfg.tie_word_embeddings), str(out / "model.safetensors"), metadata={"format": "pt"}
    )
    GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id).save_pretrained(out)

    tok.chat_template = chat_template(meta.template, tok)
    # Llava's forward takes no token_type_ids: a tokenizer that returns them would break `generate(**inputs)`.
    tok.model_input_names = tok.init_kwargs["model_input_names"] = ["input_ids", "attention_mask"]
    LlavaProcessor(
        image_processor=image_processor(ImageSpec.from_pretrained(cfg.model.vision_path), meta.image_aspect),
        tokenizer=tok,
        patch_size=lcfg.vision_config.patch_size,
        vision_feature_select_strategy=kind.llava_strategy,
        num_additional_image_tokens=kind.class_tokens,
        image_token=templates.IMAGE_TOKEN,
        chat_template=tok.chat_template,
    ).save_pretrained(out)

    denoiser = {k: t.contiguous() for k, t in state.items() if k.startswith("denoiser.")}
    save_file(
        denoiser,
        str(out / DENOISER_FILE),
        metadata={
            "denoiser": json.dumps(asdict(cfg.model.denoiser)),
            "checkpoint": str(ckpt),
            "template": meta.template,
        },
    )
    (out / CONFIG_FILE).write_text(fconfig.dump(cfg))
    return out


def is_export(folder: str | Path) -> bool:
    return (Path(folder) / DENOISER_FILE).is_file() and (Path(folder) / CONFIG_FILE).is_file()


def load_export(folder: str | Path) -> dict[str, torch.Tensor]:
    """An exported folder -> the model state under fastross's names (frozen VAE excluded: it comes from vae_path)."""
    folder = Path(folder)
    for f in ("model.safetensors", DENOISER_FILE, CONFIG_FILE):
        if not (folder / f).is_file():
            raise FileNotFoundError(f"{folder / f} is missing: {folder} was not written by `python -m fastross.export`")
    cfg = fconfig.load(
        str(folder / CONFIG_FILE), ["model.init_from="]
    )  # the export's weights, whatever they started from
    keep = read_tower(cfg.model.vision_path).kept_layers(cfg.model.select_layer)
    kept = ("vision.embeddings.", "vision.pre_layrnorm.", *(f"vision.encoder.layers.{i}." for i in range(keep)))
    ours_of = {theirs: ours for ours, theirs in NAMES}
    state = {}
    for key, t in load_file(str(folder / "model.safetensors")).items():
        theirs = next((p for p in ours_of if key.startswith(p)), None)
        if theirs is None:
            raise KeyError(f"{folder / 'model.safetensors'}: {key} is no weight fastross.export writes")
        name = ours_of[theirs] + key[len(theirs) :]
        if name.startswith("vision.") and not name.startswith(kept):
            continue  # the layers and post-layernorm fastross does not build
        state[name] = t
    if "llm.lm_head.weight" not in state:  # tied: the embedding is the head
        state["llm.lm_head.weight"] = state["llm.model.embed_tokens.weight"]
    return state | load_file(str(folder / DENOISER_FILE))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="a run folder (its newest checkpoint) or one checkpoint folder")
    p.add_argument("--out", required=True, help="folder to write the model into")
    p.add_argument(
        "--format",
        choices=("llava", "ross"),
        default="llava",
        help="llava: a transformers Llava folder (+ the denoiser sidecar); ross: the reference ROSS code's "
        "layout (fastross.ross_format)",
    )
    p.add_argument(
        "--dtype",
        choices=("fp32", "bf16"),
        default="fp32",
        help="ross only: the weights' dtype (fp32 reads back bit for bit; the reference's runs save bf16)",
    )
    p.add_argument("--max-shard-size", default="5GB", help="ross only: safetensors shard size, as Hugging Face's")
    a = p.parse_args(argv)
    if a.format == "ross":
        out = ross_format.export(a.src, a.out, a.dtype, a.max_shard_size)
        print(f"export: wrote {out} (reference ROSS layout, {a.dtype})")
        return 0
    out = export(a.src, a.out)
    print(f"export: wrote {out} (LlavaForConditionalGeneration; AutoProcessor with use_fast=False; {DENOISER_FILE})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
