"""The CPU demo: tiny models, bundled data, both ROSS stages on 2 ranks, one summary line.

    python -m fastross.tools.demo [--work runs/demo] [--ranks 2]

Builds tiny random-initialised model folders, generates the bundled shapes data, converts it
to MDS shards (with VAE latent moments), trains stage 1 (configs/tiny_pretrain.yaml) then
stage 2 (configs/tiny.yaml) under torchrun with FSDP2 on gloo, and ends with

    demo: text_loss A -> B, recon_loss C -> D, steps N, samples/s S, wall T s

where A, C are the means of the first 10 logged steps (stage 1) and B, D of the last 10
(stage 2). The work folder is rebuilt from scratch on every run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run(cmd: list[str], env: dict | None = None) -> None:
    print("demo: $", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, env=env)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def prepare(work: Path, synth_args: list[str]) -> None:
    """Tiny models in WORK/models, the generator's data in WORK/data, both stages' shards in WORK/shards."""
    py = sys.executable
    models, data, shards = work / "models", work / "data", work / "shards"
    run([py, "-m", "fastross.tools.make_tiny", str(models)])
    run([py, "-m", "fastross.data.synth", str(data), *synth_args])
    for stage, template in ((1, "plain"), (2, "qwen2_ross")):
        run([py, "-m", "fastross.data.convert", "--json", str(data / f"stage{stage}.json"),
             "--images", str(data / "images"), "--tokenizer", str(models / "llm"), "--vision", str(models / "vision"),
             "--vae", str(models / "vae"), "--template", template, "--out", str(shards / f"stage{stage}"), "--quiet"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/demo", help="work folder (must match the paths in configs/tiny*.yaml)")
    p.add_argument("--ranks", type=int, default=2)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    py = sys.executable
    work = REPO / a.work
    if work.exists():
        print(f"demo: removing the previous demo folder {work}", flush=True)
        shutil.rmtree(work)
    # 64 held-out images (the generator draws 500 by default): the training data the demo line was measured on
    prepare(work, ["--seed", "0", "--eval", "64"])

    records = []
    with tempfile.TemporaryDirectory(prefix="fastross-demo-") as tmp:
        env = {**os.environ, "TMPDIR": tmp}  # streaming's shared-memory lock files stay in here
        for stage, cfg in ((1, "configs/tiny_pretrain.yaml"), (2, "configs/tiny.yaml")):
            run([py, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={a.ranks}",
                 "-m", "fastross.train", cfg], env=env)
            recs = read_metrics(work / f"stage{stage}")
            records += recs
            print(
                f"demo: stage {stage}: text_loss {mean(r['text_loss'] for r in recs[:10]):.3f} -> "
                f"{mean(r['text_loss'] for r in recs[-10:]):.3f}, recon_loss "
                f"{mean(r['recon_loss'] for r in recs[:10]):.3f} -> {mean(r['recon_loss'] for r in recs[-10:]):.3f}, "
                f"steps {len(recs)}",
                flush=True,
            )
    first, last = records[:10], records[-10:]
    wall = time.perf_counter() - t0
    print(
        f"demo: text_loss {mean(r['text_loss'] for r in first):.3f} -> {mean(r['text_loss'] for r in last):.3f}, "
        f"recon_loss {mean(r['recon_loss'] for r in first):.3f} -> {mean(r['recon_loss'] for r in last):.3f}, "
        f"steps {len(records)}, samples/s {mean(r['samples_per_s'] for r in records):.1f}, wall {wall:.0f} s",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
