"""What the reconstruction loss buys: the tiny model trained with lambda = 0 against lambda = 1, on held-out images.

    python benchmarks/ross_effect.py [--seeds 3] [--steps-stage1 30] [--steps-stage2 120] [--eval-images 64]
                                     [--train-images 600] [--lr 5e-3] [--ranks 2] [--work DIR] [--save]

Builds the demo's tiny models and the bundled generator's data once (fastross.tools.demo.prepare: generator seed 0,
--train-images shapes images for training, --eval-images held-out ones), then for every seed and for lambda
(model.recon_weight) = 0 and 1 trains stage 1 (configs/tiny_pretrain.yaml) then stage 2 (configs/tiny.yaml, from
that stage 1) under torchrun, the same steps for both, train.seed and data.seed = the seed, and scores stage 2 with
fastross.eval on the held-out benchmark. lambda = 0 in stage 1 trains the projector on the text loss alone and the
denoiser not at all; it is still a valid run.

The demo's rates (1e-3) leave the tiny model answering "." to everything after 162 steps; --lr (default 5e-3) sets
the projector's and the LLM's rate in stage 2 (README "What the reconstruction loss buys" says how it was chosen).

Prints per metric lambda = 0 and lambda = 1 as mean +- std over seeds (sample std) and their difference (lambda 1 -
lambda 0) with a 95% t-interval over seeds of the PAIRED difference: the two runs of one seed share the data
order, the model's initialisation and the noise keys, so they differ only in lambda. When no run answers yes/no
non-trivially (both answers, some of them right) it says "no effect measurable". Ends with

    ross_effect: pope_f1 A->B halluc C->D count E->F seeds S

(A, C, E: lambda = 0's means; B, D, F: lambda = 1's; halluc is POPE's P(yes | no); count the count questions'
exact match). The work folder is a temporary one unless --work names one; --save writes the table and that line to
benchmarks/results/ross_effect.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from scipy import stats

from fastross.eval import evaluate
from fastross.tools import results as R
from fastross.tools.demo import prepare, read_metrics, run

LAMBDAS = (0.0, 1.0)
# (name, group in summary.json's metrics, key): what the table reports
METRICS = (
    ("pope_f1", "pope", "f1"),
    ("pope_accuracy", "pope", "accuracy"),
    ("halluc", "pope", "hallucination"),
    ("pope_yes_ratio", "pope", "yes_ratio"),
    ("pope_unknown", "pope", "unknown_rate"),
    ("count", "count", "exact_match"),
    ("mmvp_pairs", "mmvp", "pair_accuracy"),
    ("overall_accuracy", "overall", "accuracy"),
    ("overall_unknown", "overall", "unknown_rate"),
)


def train_pair(work: Path, seed: int, lam: float, a, env: dict) -> Path:
    """Stage 1 then stage 2 for one seed and lambda; returns stage 2's run folder."""
    py, models, shards = sys.executable, work / "models", work / "shards"
    out = work / f"seed{seed}_lambda{lam:g}"
    common = [f"model.vision_path={models / 'vision'}", f"model.llm_path={models / 'llm'}",
              f"model.recon_weight={lam}", f"train.seed={seed}", f"data.seed={seed}", "train.epochs=1000"]
    torchrun = [py, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={a.ranks}", "-m", "fastross.train"]
    # stage 2 reads stage 1's newest checkpoint; stage 2's own one checkpoint (at the end) is what fastross.eval loads
    run([*torchrun, "configs/tiny_pretrain.yaml", *common, f"data.shards={shards / 'stage1'}",
         f"train.run_dir={out / 'stage1'}", f"train.max_steps={a.steps_stage1}", f"train.ckpt_every={a.steps_stage1}"],
        env=env)
    run([*torchrun, "configs/tiny.yaml", *common, f"data.shards={shards / 'stage2'}", f"model.init_from={out / 'stage1'}",
         f"train.run_dir={out / 'stage2'}", f"train.max_steps={a.steps_stage2}", f"train.ckpt_every={a.steps_stage2}",
         f"optim.lr_llm={a.lr}", f"optim.lr_projector={a.lr}"], env=env)
    return out / "stage2"


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def paired_interval(a: list[float], b: list[float]) -> tuple[float, float]:
    """The mean of b - a over seeds and the half-width of its 95% t-interval (nan with one seed)."""
    d = [y - x for x, y in zip(a, b)]
    m, s = mean_std(d)
    if len(d) < 2:
        return m, math.nan
    return m, stats.t.ppf(0.975, len(d) - 1) * s / math.sqrt(len(d))


def answers_at_all(summary: dict) -> bool:
    """Non-trivial yes/no answers: both yes and no among POPE's, and some of them right."""
    p = summary["metrics"]["pope"]
    return 0.0 < p["yes_ratio"] < 1.0 - p["unknown_rate"] and p["accuracy"] > 0.0


def table(values: dict[float, dict[str, list[float]]]) -> list[str]:
    rows = ["| metric | lambda = 0 | lambda = 1 | lambda 1 - 0 (paired, 95% t-interval) |", "|---|---|---|---|"]
    for name, _, _ in METRICS:
        (m0, s0), (m1, s1) = mean_std(values[0.0][name]), mean_std(values[1.0][name])
        d, h = paired_interval(values[0.0][name], values[1.0][name])
        rows.append(f"| {name} | {m0:.3f} +- {s0:.3f} | {m1:.3f} +- {s1:.3f} | {d:+.3f} +- {h:.3f} |")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps-stage1", type=int, default=30)
    p.add_argument("--steps-stage2", type=int, default=120)
    p.add_argument("--eval-images", type=int, default=64, help="held-out images (9 questions each)")
    p.add_argument("--train-images", type=int, default=600, help="the generator's training shapes images")
    p.add_argument("--lr", type=float, default=5e-3, help="stage 2's projector and LLM learning rate")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--work", help="work folder, kept (default: a temporary one, removed)")
    p.add_argument("--save", action="store_true", help="write benchmarks/results/ross_effect.md")
    a = p.parse_args(argv)
    if a.seeds < 1 or a.steps_stage1 < 1 or a.steps_stage2 < 1 or a.eval_images < 1:
        p.error("--seeds, --steps-stage1, --steps-stage2 and --eval-images must be >= 1")
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="fastross-effect-") as tmp:
        work = Path(a.work).resolve() if a.work else Path(tmp) / "work"
        env = {**os.environ, "TMPDIR": tmp}  # streaming's shared-memory lock files stay in here
        prepare(work, ["--seed", "0", "--train", str(a.train_images), "--eval", str(a.eval_images)])
        values = {lam: {name: [] for name, _, _ in METRICS} for lam in LAMBDAS}
        answering, text_loss = {lam: 0 for lam in LAMBDAS}, {lam: [] for lam in LAMBDAS}
        for seed in range(a.seeds):
            for lam in LAMBDAS:
                run_dir = train_pair(work, seed, lam, a, env)
                text_loss[lam].append(statistics.fmean(r["text_loss"] for r in read_metrics(run_dir)[-10:]))
                s = evaluate(run_dir, work / "data" / "eval.json", run_dir.parent / "eval")
                answering[lam] += answers_at_all(s)
                for name, group, key in METRICS:
                    values[lam][name].append(s["metrics"].get(group, {}).get(key) or 0.0)
                print(f"ross_effect: seed {seed} lambda {lam:g}: stage-2 text_loss {text_loss[lam][-1]:.3f}, "
                      + ", ".join(f"{n} {values[lam][n][-1]:.3f}" for n, _, _ in METRICS), flush=True)
    wall = time.perf_counter() - t0
    rows = table(values)
    mean = {lam: {n: statistics.fmean(v) for n, v in values[lam].items()} for lam in LAMBDAS}
    setup = (f"{a.seeds} seeds, stage 1 {a.steps_stage1} steps, stage 2 {a.steps_stage2} steps at lr {a.lr:g}, "
             f"{a.train_images} training / {a.eval_images} held-out images, {a.ranks} ranks, wall {wall:.0f} s, "
             f"load average {load0:.2f} -> {os.getloadavg()[0]:.2f}")
    verdict = (f"runs answering yes/no non-trivially: lambda 0 {answering[0.0]}/{a.seeds}, lambda 1 "
               f"{answering[1.0]}/{a.seeds}; stage-2 final text_loss lambda 0 {statistics.fmean(text_loss[0.0]):.3f}, "
               f"lambda 1 {statistics.fmean(text_loss[1.0]):.3f}")
    if not any(answering.values()):
        verdict += "; no effect measurable: no run answers yes/no non-trivially"
    final = (f"ross_effect: pope_f1 {mean[0.0]['pope_f1']:.3f}->{mean[1.0]['pope_f1']:.3f} "
             f"halluc {mean[0.0]['halluc']:.3f}->{mean[1.0]['halluc']:.3f} "
             f"count {mean[0.0]['count']:.3f}->{mean[1.0]['count']:.3f} seeds {a.seeds}")
    print("\n".join(rows))
    print(f"ross_effect: {setup}")
    print(f"ross_effect: {verdict}")
    print(final, flush=True)
    if a.save:
        path = R.RESULTS / "ross_effect.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# benchmarks/ross_effect.py, commit {R.commit()}, {R.machine()}, {R.today()}\n\n"
                        f"{setup}.\n\n{verdict}.\n\n" + "\n".join(rows) + f"\n\n    {final}\n")
        print(f"ross_effect: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
