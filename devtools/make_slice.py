"""A slice of the 7B model that fits one GPU: the paper's shapes with K decoder layers, random weights, and the
bundled data converted for it. Nothing comes from a hub.

    python -m devtools.make_slice OUT --layers K [--shrink S] [--n-train N] [--device cuda]

OUT/models/vision  SigLIP so400m-384 (fastross.model.presets), no pooling head, with its image processor
OUT/models/llm     Qwen2-7B with K decoder layers, the Qwen2 tokenizer of make_tiny (its vocabulary fits the
                   7B's 152064 rows), saved in bf16
OUT/models/vae     the FLUX VAE's architecture
OUT/synth          the bundled shapes data set (fastross.data.synth)
OUT/latents        its stage-2 shards with the VAE's latent moments stored; OUT/pixels: without them

--shrink S divides every width by S (hidden sizes, MLPs, head dims, VAE channels; head counts, depths, the
vocabulary, the image and patch sizes stay), so the same code path runs on a CPU at smoke shapes
(`benchmarks/gpu_check.sh --dry-run`, tests/test_make_slice.py).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from fastross.model import presets


def _div(value: int, shrink: int, what: str) -> int:
    if value % shrink:
        raise ValueError(f"--shrink {shrink} does not divide {what} ({value})")
    return value // shrink


def archs(layers: int, shrink: int = 1) -> dict[str, dict]:
    """The presets' configs for the slice: {"llm", "vision", "vae"}."""
    if layers < 1:
        raise ValueError(f"--layers must be at least 1, got {layers}")
    llm, vision, vae = (copy.deepcopy(a) for a in (presets.QWEN2_7B, presets.SIGLIP_SO400M_384, presets.FLUX_VAE))
    llm_head = llm["hidden_size"] // llm["num_attention_heads"]
    llm["hidden_size"] = llm["num_attention_heads"] * _div(llm_head, shrink, "the LLM's head dim")
    llm["intermediate_size"] = _div(llm["intermediate_size"], shrink, "the LLM's MLP width")
    llm["num_hidden_layers"] = layers
    vision_head = vision["hidden_size"] // vision["num_attention_heads"]
    vision["hidden_size"] = vision["num_attention_heads"] * _div(vision_head, shrink, "the vision head dim")
    vision["intermediate_size"] = _div(vision["intermediate_size"], shrink, "the vision MLP width")
    vision["vision_use_head"] = False
    vae["block_out_channels"] = [_div(c, shrink, "the VAE's channels") for c in vae["block_out_channels"]]
    vae["norm_num_groups"] = min(vae["norm_num_groups"], *vae["block_out_channels"])
    return {"llm": llm, "vision": vision, "vae": vae}


def make_models(out: str | Path, layers: int, shrink: int = 1, seed: int = 0, device: str = "cpu") -> Path:
    """Write the slice's model folders under `out`; weights drawn on `device` (a GPU draws 2B numbers quickly)."""
    from diffusers import AutoencoderKL
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    from fastross.demo.make_tiny import build_qwen2_tokenizer

    out, a = Path(out), archs(layers, shrink)
    torch.manual_seed(seed)
    size = a["vision"]["image_size"]
    with torch.device(device):
        vcfg = {k: v for k, v in a["vision"].items() if k != "model_type"}
        SiglipVisionModel(SiglipVisionConfig(**vcfg)).to(torch.bfloat16).save_pretrained(out / "vision")
    SiglipImageProcessor(
        size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    ).save_pretrained(out / "vision")

    tok = build_qwen2_tokenizer()
    llm = {k: v for k, v in a["llm"].items() if k not in ("architectures", "model_type")}
    if len(tok) > llm["vocab_size"]:
        raise ValueError(f"the tokenizer has {len(tok)} tokens, more than the 7B's {llm['vocab_size']} rows")
    with torch.device(device):
        model = Qwen2ForCausalLM(
            Qwen2Config(**llm, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
        )
        model.to(torch.bfloat16).save_pretrained(out / "llm")
    del model
    tok.save_pretrained(out / "llm")

    vae = {k: v for k, v in a["vae"].items() if k != "_class_name"}
    AutoencoderKL(**vae).save_pretrained(out / "vae")
    return out


def run_settings(cuda: bool, shrink: int = 1) -> list[str]:
    """configs/7b.yaml's overrides to train the slice on one device, without checkpoints (a slice's are tens of
    GB). CUDA: bf16, 8 samples a step in micro-batches of up to 8192 tokens; CPU (smoke shapes): fp32, one sample
    a step (the 152k-row lm_head dominates there); the denoiser's width divided like the others."""
    return [
        "train.ckpt_every=0",
        f"model.denoiser.width={_div(1024, shrink, 'the denoiser width')}",
        f"train.dtype={'bf16' if cuda else 'fp32'}",
        f"data.global_batch={8 if cuda else 1}",
        f"data.max_tokens={8192 if cuda else 2048}",
        "train.activation_checkpointing=full",
    ]


def prepare(
    work: str | Path, layers: int, shrink: int = 1, n_train: int = 60, device: str = "cpu", quiet: bool = True
) -> tuple[Path, Path, Path]:
    """The slice's model folders and the bundled stage-2 data converted for them, with stored latent moments and
    without (the ladder's first rungs encode on the fly): (models, latents, pixels). A folder that already holds
    this slice (WORK/slice.json) is used as it is."""
    from fastross.data.convert import main as convert
    from fastross.data.synth import write_dataset

    work = Path(work)
    made = {"layers": layers, "shrink": shrink, "n_train": n_train}
    if (work / "slice.json").is_file() and json.loads((work / "slice.json").read_text()) == made:
        return work / "models", work / "latents", work / "pixels"
    if work.exists() and any(work.iterdir()):
        raise ValueError(f"{work} holds something other than this slice ({made}): choose an empty folder")
    models = make_models(work / "models", layers, shrink, device=device)
    write_dataset(work / "synth", seed=0, n_train=n_train, n_eval=0)
    for name, vae in (("latents", True), ("pixels", False)):
        argv = (
            [
                "--json",
                str(work / "synth" / "stage2.json"),
                "--images",
                str(work / "synth" / "images"),
                "--tokenizer",
                str(models / "llm"),
                "--vision",
                str(models / "vision"),
                "--template",
                "qwen2_ross",
                "--out",
                str(work / name),
            ]
            + (["--quiet"] if quiet else [])
            + (["--vae", str(models / "vae")] if vae else [])
        )
        if convert(argv) != 0:
            raise RuntimeError(f"make_slice: converting the bundled data ({name}) failed")
    (work / "slice.json").write_text(json.dumps(made))
    return models, work / "latents", work / "pixels"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--layers", type=int, required=True, help="decoder layers of the 7B LLM to keep (K)")
    p.add_argument("--shrink", type=int, default=1, help="divide every width by this (smoke shapes on a CPU)")
    p.add_argument("--n-train", type=int, default=60, help="samples of the bundled data set to convert")
    p.add_argument("--device", default="cpu", help="where the random weights are drawn")
    a = p.parse_args(argv)
    try:
        models, latents, pixels = prepare(a.out, a.layers, a.shrink, a.n_train, a.device, quiet=False)
    except ValueError as e:
        p.error(str(e))
    print(f"make_slice: wrote {models}/vision, llm, vae and the shards {latents}, {pixels}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
