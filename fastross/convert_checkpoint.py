"""Import a checkpoint of the reference ROSS code as a fastross run, in one command.

    python -m fastross.convert_checkpoint SRC --out RUN [--llm DIR] [--vision DIR] [--vae DIR]
        [--template NAME] [--fresh-denoiser] [--seed 0] [key.sub=value ...]

SRC is a folder in the reference's layout (config.json of model_type ross_qwen2 / ross_llama and its safetensors:
fastross.ross_format). RUN becomes a fastross run folder holding one checkpoint (RUN/checkpoints/step_00000000, its
config.yaml and manifest, as the trainer writes them) that `model.init_from=RUN`, `fastross.export RUN`,
`fastross.generate --model RUN` and `fastross.eval --model RUN` read like any run. It is a start, not a run to resume:
it holds no optimizer state, so train with `model.init_from=RUN` and a run folder of its own.

What it reads from SRC/config.json, each replaceable:
- `mm_vision_tower` -> model.vision_path (--vision: a local SigLIP or CLIP folder; SRC's may be a hub name);
- `mm_pixel_decoder` -> model.vae_path (--vae), optional: the checkpoint's VAE is that folder's (frozen; SRC's copy
  is often rounded to bf16); without a VAE folder the checkpoint has none, and the latent channels come from
  `mm_inv_hidden_size` (a run that sets model.vae_path cannot start from it);
- `_name_or_path`, the base LLM the reference trained from -> model.llm_path (--llm): a local Qwen2 / Llama folder
  with its tokenizer holding the `<image>` token (fastross builds the LLM's architecture and its prompts from it; the
  weights are SRC's);
- `mm_vision_select_layer` -> model.select_layer; `image_aspect_ratio` -> the image aspect (pad or square);
  `mm_inv_projector_type` (denoiser_vit{depth}x), `mm_inv_num_heads` and the DiT's own tensors -> model.denoiser;
- the model type -> the prompt template (--template): ross_qwen2 qwen2_ross, ross_llama vicuna_v1.
Any other key follows as `key.sub=value` (fastross.train --help-config).

A checkpoint without the denoiser's tensors (a reference run without ROSS's loss, or a LLaVA-style one) is refused
unless --fresh-denoiser is given; then the denoiser is drawn fresh from --seed, as a training run's would be.

The prompt facts (template, aspect, the image token, the tokenizer's fingerprint) go to RUN/data/fastross.json, which
the checkpoint's config names as its data.shards (it holds no samples): what generate, eval and export read there.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import warnings
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from fastross import build, config as fconfig, ross_format, towers
from fastross.checkpoint import LATEST, write_manifest
from fastross.data import templates
from fastross.data.schema import tokenizer_fingerprint, write_manifest as write_data_manifest
from fastross.data.sources import check_shard_facts
from fastross.model import init
from fastross.model.denoiser import Denoiser
from fastross.model.load import SafetensorsFolder

STEP = "step_00000000"
# The reference's model type -> the fastross prompt template its conversations used.
TEMPLATES = {"ross_qwen2": "qwen2_ross", "ross_llama": "vicuna_v1"}
ASPECTS = ("pad", "square")


class ConvertError(ValueError):
    """SRC or an override cannot make a fastross checkpoint: the message names the file, the key and the fix."""


def _src_config(src: Path) -> dict:
    file = src / ross_format.CONFIG
    if src.is_file() or (src / ross_format.PROJECTOR_BIN).is_file():
        raise ConvertError(
            f"{src} is a stage-1 adapter (mm_projector.bin): it holds no LLM, so it makes no whole "
            "checkpoint; start a training run from it with model.init_from=" + str(src)
        )
    if not file.is_file():
        raise ConvertError(f"{file} is missing: {src} is not a reference ROSS checkpoint folder")
    cfg = json.loads(file.read_text())
    if cfg.get("model_type") not in ross_format.REFERENCE_TYPES:
        raise ConvertError(
            f"{file}: model_type is {cfg.get('model_type')!r}, a reference ROSS checkpoint has one of "
            f"{sorted(ross_format.REFERENCE_TYPES)}"
        )
    return cfg


def _folder(src_cfg: dict, key: str, given: str | None, flag: str, where: Path, required: bool = True) -> str:
    """An override, else SRC's config value, which must be a local folder."""
    path = given or src_cfg.get(key) or ""
    if given is not None:
        if not Path(given).is_dir():
            raise ConvertError(f"{flag} {given} is not a folder")
        return str(Path(given).resolve())
    if path and Path(path).is_dir():
        return str(Path(path).resolve())
    if not required:
        return ""
    raise ConvertError(f"{where}: {key} is {path!r}, not a local folder here: pass {flag} DIR")


def _net_shapes(src: Path) -> dict[str, tuple[int, ...]]:
    """The shapes of SRC's DiT tensors (model.mm_inv_projector.net.*), without reading them."""
    with ExitStack() as stack:
        files = SafetensorsFolder(str(src), stack)
        return {k: tuple(files.get_slice(k).get_shape()) for k in files.where if k.startswith(ross_format.NET)}


def model_overrides(src: Path, src_cfg: dict, paths: dict, net: dict, fresh_denoiser: bool) -> list[str]:
    """The model.* keys SRC's config and its DiT tensors' shapes (`net`) give, before the user's own overrides."""
    where = src / ross_format.CONFIG
    out = [
        f"model.vision_path={paths['vision']}",
        f"model.llm_path={paths['llm']}",
        f"model.vae_path={paths['vae']}",
        f"model.select_layer={int(src_cfg.get('mm_vision_select_layer', -2))}",
        "model.init_from=",
    ]
    if not paths["vae"] and "mm_inv_hidden_size" in src_cfg:
        out.append(f"model.latent_channels={int(src_cfg['mm_inv_hidden_size']) // 4}")
    if not net and not fresh_denoiser:
        raise ConvertError(
            f"{src} holds no denoiser tensors ({ross_format.NET}*): pass --fresh-denoiser to import "
            "it with a freshly initialised denoiser (drawn from --seed)"
        )
    kind = src_cfg.get("mm_inv_projector_type")
    m = ross_format.DENOISER_TYPE.match(str(kind))
    if net and m is None:
        raise ConvertError(
            f"{where}: mm_inv_projector_type is {kind!r}; fastross reads the DiT (denoiser_vit{{depth}}x)"
        )
    if m is not None:
        depth = int(m.group(1))
        width = net[ross_format.CONV[1]][0] if net else ross_format.REFERENCE_WIDTHS.get(depth, 1024)
        heads = int(src_cfg.get(ross_format.HEADS_KEY, ross_format.REFERENCE_HEADS))
        out += [
            "model.denoiser.kind=dit",
            f"model.denoiser.depth={depth}",
            f"model.denoiser.width={width}",
            f"model.denoiser.heads={heads}",
        ]
    return out


def shard_meta(llm_path: str, vision_path: str, template: str, aspect: str, vae_path: str) -> dict:
    """fastross.json for RUN/data: the prompt and image facts a converted folder records, and no samples."""
    tok = templates.load_tokenizer(llm_path)
    templates.check_tokenizer(template, tok, llm_path)
    grid = towers.read_tower(vision_path).grid
    return {
        "template": template,
        "image_aspect": aspect,
        "grid": grid,
        "num_visual_tokens": grid * grid,
        "image_token_id": tok.convert_tokens_to_ids(templates.IMAGE_TOKEN),
        "latents": False,
        "latent_channels": None,
        "latent_shift": None,
        "latent_scale": None,
        "latent_dtype": "float16",
        "tokenizer": llm_path,
        "tokenizer_fingerprint": tokenizer_fingerprint(tok),
        "vae": vae_path or None,
        "samples": 0,
        "written_by": "fastross.convert_checkpoint",
    }


def fresh_denoiser_state(cfg, model, seed: int) -> dict[str, torch.Tensor]:
    """The denoiser a training run with this seed starts from (RossModel's own init rules), built on the host.
    cfg: model.denoiser; model: the meta-built RossModel it belongs to."""
    fresh = Denoiser(
        cfg.kind,
        model.llm.config.hidden_size,
        cfg.width,
        cfg.depth,
        cfg.heads,
        model.vision.grid,
        channels=4 * model.latent_channels,
        impl=model.denoiser.impl,
        dtype=cfg.dtype,
        repeat_cond=cfg.repeat_cond,
    )
    init.apply_rules(fresh, fresh.init_rules(), seed, "denoiser.")
    return {"denoiser." + k: v for k, v in fresh.state_dict().items()}


def vae_state(vae_path: str) -> dict[str, torch.Tensor]:
    with ExitStack() as stack:
        files = SafetensorsFolder(vae_path, stack)
        return {"vae." + k: files.get_tensor(k).float() for k in files.where}


def convert(
    src: str | Path,
    out: str | Path,
    *,
    llm: str | None = None,
    vision: str | None = None,
    vae: str | None = None,
    template: str | None = None,
    fresh_denoiser: bool = False,
    seed: int = 0,
    overrides: list[str] = (),
    say=print,
) -> Path:
    """SRC (the reference layout) -> RUN, a fastross run folder with one verified checkpoint; returns RUN."""
    src, out = Path(src).resolve(), Path(out).resolve()
    src_cfg = _src_config(src)
    where = src / ross_format.CONFIG
    if out.exists() and any(out.iterdir()):
        raise ConvertError(f"--out {out} exists and is not empty: choose a new folder")
    paths = {
        "vision": _folder(src_cfg, "mm_vision_tower", vision, "--vision", where),
        "llm": _folder(src_cfg, "_name_or_path", llm, "--llm", where),
        "vae": _folder(src_cfg, "mm_pixel_decoder", vae, "--vae", where, required=False),
    }
    name = template or TEMPLATES[src_cfg["model_type"]]
    templates.canonical(name)
    aspect = src_cfg.get("image_aspect_ratio", "pad")
    if aspect not in ASPECTS:
        raise ConvertError(f"{where}: image_aspect_ratio is {aspect!r}; fastross prepares images as one of {ASPECTS}")
    try:
        meta = shard_meta(paths["llm"], paths["vision"], name, aspect, paths["vae"])
    except ValueError as e:
        raise ConvertError(f"--llm {paths['llm']}: {e}") from None
    data = out / "data"
    net = _net_shapes(src)
    keys = model_overrides(src, src_cfg, paths, net, fresh_denoiser) + [
        f"data.shards={data}",
        f"train.run_dir={out}",
        f"train.seed={seed}",
        *overrides,
    ]

    tmp = out.with_name(f".{out.name}.partial")  # moved into place when complete: no half-written RUN
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "data").mkdir(parents=True)
    try:
        (tmp / "data" / "fastross.json").write_text(json.dumps(meta, indent=2))
        write_data_manifest(tmp / "data")  # fastross.json alone: the folder holds no samples
        # Validated against the folders with data.shards at its final place's twin (the same fastross.json)
        cfg = fconfig.load(None, [k.replace(f"data.shards={data}", f"data.shards={tmp / 'data'}") for k in keys])
        check_shard_facts(cfg.data)  # data.max_tokens against RUN/data's fastross.json, as the trainer will
        model = build.meta(cfg.model, "sdpa", "cpu", seed=seed)  # shapes only: nothing is read twice
        fresh = ("denoiser.",) if fresh_denoiser and not net else ()
        if fresh_denoiser and not fresh:
            say(f"convert_checkpoint: {src} holds a denoiser: --fresh-denoiser ignored, its denoiser imported")
        state = ross_format.reference_state(src, model, fresh=fresh)
        if fresh:
            state |= fresh_denoiser_state(cfg.model.denoiser, model, seed)
            say(
                f"convert_checkpoint: {src} holds no denoiser: a fresh one (seed {seed}, "
                f"{cfg.model.denoiser.kind} depth {cfg.model.denoiser.depth} width {cfg.model.denoiser.width})"
            )
        if model.vae is not None:  # the folder's frozen VAE, as a run reads it (SRC's copy is often rounded to bf16)
            state |= vae_state(cfg.model.vae_path)
        else:
            say(
                "convert_checkpoint: no VAE folder (mm_pixel_decoder / --vae): the checkpoint holds no VAE; a run "
                "that sets model.vae_path cannot start from it"
            )
        names = [k for k in model.state_dict()]
        missing = sorted(set(names) - state.keys())
        if missing:
            raise ConvertError(f"{src}: {len(missing)} tensors of the model are unset: {missing[:5]}")
        ckpt = tmp / "checkpoints" / STEP
        ckpt.mkdir(parents=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DCP: "assuming the intent is to save in a single process": it is
            dcp.save({"model": {k: state[k].contiguous() for k in names}}, checkpoint_id=str(ckpt))
        text = fconfig.dump(cfg).replace(str(tmp), str(out))
        (ckpt / "config.yaml").write_text(text)
        (ckpt / "trainer.json").write_text(json.dumps({"step": 0, "converted_from": str(src)}, indent=2))
        write_manifest(ckpt)
        (tmp / "checkpoints" / LATEST).write_text(STEP)
        (tmp / "config.yaml").write_text(text)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(
        f"convert_checkpoint: wrote {out} ({len(names)} tensors; vision {paths['vision']}, llm {paths['llm']}, "
        f"template {name}, aspect {aspect}); use it as model.init_from={out}, or with fastross.export, "
        "fastross.generate and fastross.eval"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fastross.convert_checkpoint",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", help="a reference ROSS checkpoint folder (config.json model_type ross_qwen2 / ross_llama)")
    p.add_argument("--out", required=True, help="the fastross run folder to write (new or empty)")
    p.add_argument("--llm", help="the base LLM folder with its tokenizer (default: SRC's _name_or_path)")
    p.add_argument("--vision", help="the vision tower folder (default: SRC's mm_vision_tower)")
    p.add_argument("--vae", help="the VAE folder (default: SRC's mm_pixel_decoder, when it is a folder here)")
    p.add_argument("--template", help=f"the prompt template (default by model type: {TEMPLATES})")
    p.add_argument(
        "--fresh-denoiser",
        action="store_true",
        help="import a checkpoint without denoiser tensors, drawing the denoiser fresh from --seed",
    )
    p.add_argument("--seed", type=int, default=0, help="train.seed of the checkpoint (keys a fresh denoiser)")
    p.add_argument("overrides", nargs="*", help="key.sub=value config overrides, e.g. model.denoiser.depth=8")
    a = p.parse_intermixed_args(argv)
    try:
        convert(
            a.src,
            a.out,
            llm=a.llm,
            vision=a.vision,
            vae=a.vae,
            template=a.template,
            fresh_denoiser=a.fresh_denoiser,
            seed=a.seed,
            overrides=a.overrides,
        )
    except (ConvertError, fconfig.ConfigError, KeyError, ValueError, FileNotFoundError) as e:
        print(f"convert_checkpoint: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
