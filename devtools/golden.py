"""Golden losses: the tiny config's first 20 losses on 2 CPU ranks, which every lever must reproduce.

    python -m devtools.golden --write            # (re)write tests/golden/tiny_losses.json
    python -m devtools.golden model.fused_ce=false train.compile=true ...   # compare a variant

The recipe is configs/tiny.yaml (the demo's stage 2: the tiny models, global batch 16, micro-batches of <= 512
tokens, lr 1e-3, fp32) on the test suite's data (tests/conftest.py: `make_tiny`, `write_dataset` with the
seed and sizes below, converted with the qwen2_ross template and VAE latent moments), from fresh weights
(no init_from), for 20 optimizer steps on 2 ranks under torchrun. torchtitan keeps such files for the same
reason: a lever that changes the model, not just its speed, shows up as a changed loss curve.
tests/test_golden.py runs the switch combinations that work on CPU and holds each to this file, within the
tolerance each switch justifies there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from fastross.demo import torchrun_cmd

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny.yaml"
GOLDEN = REPO / "tests" / "golden" / "tiny_losses.json"
STEPS = 20
RANKS = 2
SYNTH = dict(seed=0, n_train=60, n_eval=8)  # the tests' data set (tests/conftest.py uses the same)


def prepare(work: Path) -> tuple[Path, Path]:
    """Tiny model folders and stage-2 shards, made exactly as the test fixtures make them."""
    from fastross.data.convert import main as convert
    from fastross.data.synth import write_dataset
    from fastross.demo import convert_args
    from fastross.demo.make_tiny import make_tiny

    models = make_tiny(work / "models")
    write_dataset(work / "synth", **SYNTH)
    shards = work / "shards"
    if convert(convert_args(models, work / "synth" / "stage2.json", work / "synth" / "images", shards)) != 0:
        raise RuntimeError("golden: converting the tiny data set failed")
    return models, shards


def overrides(models: Path, shards: Path, run_dir: Path, steps: int = STEPS) -> list[str]:
    """configs/tiny.yaml pointed at these folders, from fresh weights: the first `steps` of the golden run's STEPS
    (train.stop_after keeps the learning-rate schedule of all STEPS)."""
    return [
        f"model.vision_path={models / 'vision'}",
        f"model.llm_path={models / 'llm'}",
        "model.init_from=''",
        f"data.shards={shards}",
        f"train.run_dir={run_dir}",
        f"train.max_steps={STEPS}",
        "train.epochs=10",
        "train.log_every=1",
        f"train.ckpt_every={STEPS}",
        f"train.stop_after={steps}",
    ]


def train(
    models: Path, shards: Path, run_dir: Path, variant: list[str], timeout: int = 1200, steps: int = STEPS
) -> list[dict]:
    """Run the recipe's first `steps` steps with `variant` overrides on RANKS ranks; returns its metrics records
    (judged by what it wrote: about 1 gloo run in 20 aborts at interpreter exit after finishing, CPU_AND_GPU.md)."""
    with tempfile.TemporaryDirectory(prefix="fastross-golden-") as tmp:
        env = {**os.environ, "TMPDIR": tmp}  # streaming's shared-memory lock files stay in here
        cmd = torchrun_cmd(RANKS, CONFIG, *overrides(models, shards, run_dir, steps), *variant)
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    out = p.stdout + p.stderr
    if "train: done" not in out:
        raise RuntimeError(f"golden: the run did not finish ({' '.join(variant) or 'the recipe'}):\n{out[-4000:]}")
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(records: list[dict]) -> list[dict]:
    return [{"step": r["step"], "text_loss": r["text_loss"], "recon_loss": r["recon_loss"]} for r in records]


def deviation(got: list[dict], want: list[dict]) -> list[dict]:
    """Per step, the relative deviation of each loss from the golden one."""
    if [r["step"] for r in got] != [r["step"] for r in want]:
        raise ValueError(f"steps differ: {[r['step'] for r in got]} vs {[r['step'] for r in want]}")
    return [
        {"step": w["step"], **{k: abs(g[k] - w[k]) / abs(w[k]) for k in ("text_loss", "recon_loss")}}
        for g, w in zip(got, want)
    ]


def read() -> dict:
    return json.loads(GOLDEN.read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variant", nargs="*", help="key.sub=value overrides on top of the recipe")
    p.add_argument("--write", action="store_true", help=f"write the recipe's losses to {GOLDEN.relative_to(REPO)}")
    p.add_argument("--steps", type=int, default=STEPS, help="compare the first STEPS steps only")
    p.add_argument("--timeout", type=int, default=3600, help="seconds the run may take")
    a = p.parse_args(argv)
    if a.write and (a.variant or a.steps != STEPS):
        p.error("--write records the recipe itself: give no overrides and all the steps")
    with tempfile.TemporaryDirectory(prefix="fastross-golden-work-") as work:
        models, shards = prepare(Path(work))
        got = losses(train(models, shards, Path(work) / "run", a.variant, timeout=a.timeout, steps=a.steps))
    if a.write:
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        import torch

        GOLDEN.write_text(
            json.dumps(
                {
                    "recipe": f"configs/tiny.yaml, {STEPS} steps on {RANKS} CPU ranks, fresh weights (devtools.golden)",
                    "torch": torch.__version__,
                    "losses": got,
                },
                indent=1,
            )
            + "\n"
        )
        print(f"golden: wrote {len(got)} steps to {GOLDEN}")
        return 0
    dev = deviation(got, read()["losses"][: len(got)])
    print(f"{'step':>4} {'text_loss':>12} {'recon_loss':>12}   relative deviation from the golden file")
    for g, d in zip(got, dev):
        print(
            f"{g['step']:>4} {g['text_loss']:>12.6f} {g['recon_loss']:>12.6f}   "
            f"{d['text_loss']:.1e} {d['recon_loss']:.1e}"
        )
    worst = max(max(d["text_loss"], d["recon_loss"]) for d in dev)
    print(f"golden: largest relative deviation {worst:.2e} over {len(dev)} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
