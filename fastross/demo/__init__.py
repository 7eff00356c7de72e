"""The CPU demo: tiny models, bundled data, both ROSS stages on 2 ranks, answers to held-out questions.

    python -m fastross.demo [--work runs/demo] [--ranks 2] [--vocab 768] [--epochs1 20] [--epochs2 8] [--lr 3e-3]

Generates the bundled shapes data, builds tiny random-initialised model folders whose LLM reads a
--vocab-id tokenizer trained on that data's text (fastross.demo.make_tiny --corpus), converts the
data to MDS shards (with VAE latent moments), trains stage 1 (configs/tiny_pretrain.yaml, the LLM
trained too, for --epochs1 epochs) then stage 2 (configs/tiny.yaml, --epochs2 epochs), both at --lr,
under torchrun with FSDP2 on gloo,
exports stage 2 (fastross.export) and, in a fresh process, asks the export every held-out question
(fastross.eval on the generator's eval.json). It prints a few questions with their answers, then

    demo: held-out accuracy A over N questions, majority-answer baseline M
    demo: text_loss A -> B, recon_loss C -> D, steps N, samples/s S, wall T s

where the baseline answers every question with the most frequent held-out answer of its type
(yes/no, number, colour, place), and A, C are the means of the first 10 logged steps (stage 1)
and B, D of the last 10 (stage 2). The work folder is rebuilt from scratch on every run.
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


def convert_args(
    models: Path,
    source: Path,
    images: Path,
    out: Path,
    template: str = "qwen2_ross",
    *extra: str,
    vision: Path | str | None = None,
    vae: Path | str | bool = True,
) -> list[str]:
    """fastross.data.convert's arguments for the records in SOURCE (images under IMAGES) with the folders of
    make_tiny's layout in MODELS (llm, vision, vae), written to OUT. vision, vae: other folders (vae=False: no
    latent moments). EXTRA comes last. The demo, the benchmarks and the tests convert through it."""
    argv = ["--json", str(source), "--images", str(images), "--tokenizer", str(models / "llm")]
    argv += ["--vision", str(vision or models / "vision"), "--template", template, "--out", str(out), "--quiet"]
    if vae:
        argv += ["--vae", str(models / "vae" if vae is True else vae)]
    return argv + list(extra)


def torchrun_cmd(nproc: int, config: Path | str, *overrides: str, module: str = "fastross.train") -> list[str]:
    """The command that runs MODULE (the trainer) with CONFIG and OVERRIDES under torchrun on NPROC local ranks.
    The demo, the benchmarks and the tests launch training through it."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        module,
        str(config),
        *overrides,
    ]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def prepare(work: Path, synth_args: list[str], vocab: int = 0) -> None:
    """Tiny models in WORK/models, the generator's data in WORK/data, both stages' shards in WORK/shards.
    vocab: the LLM's tokenizer is a byte-level BPE of that many ids trained on the data's text (0: Qwen2's)."""
    py = sys.executable
    models, data, shards = work / "models", work / "data", work / "shards"
    run([py, "-m", "fastross.data.synth", str(data), *synth_args])
    corpus = ["--corpus", str(data / "stage1.json"), str(data / "stage2.json"), "--vocab", str(vocab)] if vocab else []
    run([py, "-m", "fastross.demo.make_tiny", str(models), *corpus])
    for stage, template in ((1, "plain"), (2, "qwen2_ross")):
        source, out = data / f"stage{stage}.json", shards / f"stage{stage}"
        run([py, "-m", "fastross.data.convert", *convert_args(models, source, data / "images", out, template)])


def majority_baseline(rows: list[dict]) -> float:
    """The accuracy of answering every question with the most frequent gold answer of its type (over these rows)."""
    right = 0
    for typ in {r["type"] for r in rows}:
        golds = [json.dumps(r["gold"]) for r in rows if r["type"] == typ]
        right += max(golds.count(g) for g in set(golds))
    return right / len(rows)


def show_answers(rows: list[dict], n: int = 6) -> list[str]:
    """A few held-out questions, one of each kind in turn, with the model's answer and the gold one."""
    picked, kinds = [], []
    for r in rows:
        if r["kind"] not in kinds:
            kinds.append(r["kind"])
    for k in range(len(rows)):
        for kind in kinds:
            of_kind = [r for r in rows if r["kind"] == kind]
            if k < len(of_kind) and len(picked) < n:
                picked.append(of_kind[k])
    width = max(len(r["question"]) for r in picked)
    return [
        f"demo:   {r['image']}  {r['question']:<{width}}  -> {r['prediction'] or '(nothing)'!s:<14} "
        f"gold {r['answer']:<14} {'right' if r['correct'] else 'wrong'}"
        for r in picked
    ]


def answers(work: Path, model: Path, out: Path) -> float:
    """Ask the export every held-out question in a fresh process (fastross.eval); print a few, then the accuracy
    beside the majority-answer baseline. Returns the accuracy."""
    run(
        [
            sys.executable,
            "-m",
            "fastross.eval",
            "--model",
            str(model),
            "--data",
            str(work / "data" / "eval.json"),
            "--out",
            str(out),
            "--max-new-tokens",
            "8",
        ]
    )
    rows = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    accuracy = sum(r["correct"] for r in rows) / len(rows)
    print(f"demo: the stage-2 export, loaded in a fresh process, answers {len(rows)} held-out questions; a few:")
    for line in show_answers(rows):
        print(line)
    print(
        f"demo: held-out accuracy {accuracy:.3f} over {len(rows)} questions, majority-answer baseline "
        f"{majority_baseline(rows):.3f}",
        flush=True,
    )
    return accuracy


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fastross.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--work", default="runs/demo", help="work folder (must match the paths in configs/tiny*.yaml)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument(
        "--vocab",
        type=int,
        default=768,
        help="the tiny LLM's tokenizer size at most, trained on the data's text (0: Qwen2's, 151k ids)",
    )
    p.add_argument("--epochs1", type=int, default=20, help="stage 1's epochs (configs/tiny_pretrain.yaml has 2)")
    p.add_argument("--epochs2", type=int, default=8, help="stage 2's epochs (configs/tiny.yaml has 2)")
    p.add_argument("--lr", type=float, default=3e-3, help="both stages' learning rates (the configs have 1e-3)")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    py = sys.executable
    work = REPO / a.work
    if work.exists():
        print(f"demo: removing the previous demo folder {work}", flush=True)
        shutil.rmtree(work)
    # 64 held-out images (the generator draws 500 by default): 576 held-out questions
    prepare(work, ["--seed", "0", "--eval", "64"], a.vocab)

    # The configs keep the recipe the golden losses were measured on; the demo trains longer, at larger rates, and
    # trains the LLM in stage 1 too: it is random here, so the captions are where it first learns to read the image.
    # Checkpoints every 100 steps (and at the end, which stage 2 and the export read).
    lrs = [f"optim.lr_{k}={a.lr}" for k in ("projector", "llm", "denoiser")] + ["train.ckpt_every=100"]
    stage1 = [f"train.epochs={a.epochs1}", "train.trainable=[projector,llm,denoiser]", *lrs]
    stage2 = [f"train.epochs={a.epochs2}", *lrs]
    records = []
    with tempfile.TemporaryDirectory(prefix="fastross-demo-") as tmp:
        env = {**os.environ, "TMPDIR": tmp}  # streaming's shared-memory lock files stay in here
        for stage, cfg, extra in ((1, "configs/tiny_pretrain.yaml", stage1), (2, "configs/tiny.yaml", stage2)):
            run(torchrun_cmd(a.ranks, cfg, *extra), env=env)
            recs = [r for r in read_metrics(work / f"stage{stage}") if not r.get("eval")]
            records += recs
            print(
                f"demo: stage {stage}: text_loss {mean(r['text_loss'] for r in recs[:10]):.3f} -> "
                f"{mean(r['text_loss'] for r in recs[-10:]):.3f}, recon_loss "
                f"{mean(r['recon_loss'] for r in recs[:10]):.3f} -> {mean(r['recon_loss'] for r in recs[-10:]):.3f}, "
                f"steps {len(recs)}",
                flush=True,
            )
    run([py, "-m", "fastross.export", str(work / "stage2"), "--out", str(work / "export")])
    answers(work, work / "export", work / "eval")
    first, last = records[:10], records[-10:]
    wall = time.perf_counter() - t0
    print(
        f"demo: text_loss {mean(r['text_loss'] for r in first):.3f} -> {mean(r['text_loss'] for r in last):.3f}, "
        f"recon_loss {mean(r['recon_loss'] for r in first):.3f} -> {mean(r['recon_loss'] for r in last):.3f}, "
        f"steps {len(records)}, samples/s {mean(r['samples_per_s'] for r in records):.1f}, wall {wall:.0f} s",
        flush=True,
    )
    return 0
