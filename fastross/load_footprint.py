"""Per-rank bytes while loading a recipe's model: the whole model before meta loading vs its shards now.

    python -m fastross.load_footprint [configs/7b.yaml] [--ranks 8]

Builds the recipe's RossModel on the meta device from the published configs of Qwen2-7B-Instruct
and SigLIP so400m-patch14-384 (written to a temporary folder: no weights are needed, only
shapes), and prints fastross.model.load.footprint for it: the whole model in fp32 (what every
rank held before, built on the host then moved), each rank's FSDP2 shards, and the loading
peak bound (shards plus the largest single tensor). docs/training.md quotes this command's output.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from fastross import build, config, distributed
from fastross.model import load
from fastross.model.presets import (
    QWEN2_7B as QWEN2_7B_INSTRUCT,  # Qwen2-7B-Instruct has Qwen2-7B's shapes
    SIGLIP_SO400M_384,
)


def footprint_7b(recipe: str = "configs/7b.yaml", ranks: int = 8):
    """fastross.model.load.Footprint of the recipe's model on `ranks` ranks, and its parameter count."""
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in (("llm", QWEN2_7B_INSTRUCT), ("vision", SIGLIP_SO400M_384)):
            (Path(tmp) / name).mkdir()
            (Path(tmp) / name / "config.json").write_text(json.dumps(cfg))
        cfg = config.load(
            recipe,
            [f"model.llm_path={tmp}/llm", f"model.vision_path={tmp}/vision", f"data.shards={tmp}", "model.init_from="],
        )  # the architecture, not its weights
        model = build.meta(cfg.model, "sdpa", "cuda")  # the shapes that 8 GPUs would hold
    params = sum(p.numel() for p in model.parameters())
    return load.footprint(model, ranks, distributed.frozen_parts(model)), params


def summary(recipe: str = "configs/7b.yaml", ranks: int = 8) -> str:
    fp, params = footprint_7b(recipe, ranks)
    gb = 1e9
    return (
        f"{Path(recipe).name}: {params / 1e9:.2f}B parameters; per rank on {ranks} ranks: "
        f"{fp.full_bytes / gb:.1f} GB whole model in fp32 before, now {fp.shard_bytes / gb:.2f} GB of shards "
        f"held and at most {fp.peak_bytes / gb:.2f} GB while loading (shards + largest tensor "
        f"{fp.largest_bytes / gb:.2f} GB)"
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", nargs="?", default="configs/7b.yaml")
    p.add_argument("--ranks", type=int, default=8)
    a = p.parse_args(argv)
    print(summary(a.recipe, a.ranks))


if __name__ == "__main__":
    main()
