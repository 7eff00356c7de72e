"""What the reconstruction loss buys: the tiny model trained with lambda = 0 against lambda = 1, on held-out answers
and with a linear probe of what its hidden states at the visual positions keep of the image.

    python benchmarks/ross_effect.py [--seeds 3] [--epochs1 20] [--epochs2 16] [--lr 3e-3] [--vocab 768]
                                     [--train-images 600] [--eval-images 64] [--probe-images 400] [--probe-layer -1]
                                     [--pool mean] [--ranks 2] [--work DIR] [--save]

Setup, once: the bundled generator's data (generator seed 0, --train-images shapes images for training,
--eval-images held-out ones, 9 questions each) and tiny random-initialised models whose LLM reads a byte-level BPE
of --vocab ids trained on that data's text (fastross.demo.make_tiny --corpus; --vocab 0: Qwen2's 151k ids, which a
tiny model does not learn in this budget: it then answers one POPE answer to everything). Then for every seed and
for lambda (model.recon_weight) = 0 and 1: stage 1 (configs/tiny_pretrain.yaml, projector, LLM and denoiser
trained, --epochs1 epochs) then stage 2 (configs/tiny.yaml from that stage 1, --epochs2 epochs), both at --lr, under
torchrun, train.seed and data.seed = the seed. The two runs of one seed share the data order, the initialisation and
the noise keys: they differ only in lambda (lambda = 0 trains the denoiser not at all).

Each stage-2 run is scored two ways:
  acc    held-out accuracy of greedy answers over every held-out question (fastross.eval), beside the majority-answer
         baseline (every question answered with its answer type's most frequent held-out answer);
  probe  --probe-images fresh shapes images (generator seed 10_000, never trained on) go through the model; the LLM's
         hidden states at the visual positions, at --probe-layer (a hidden_states index: 0 the projector's output, -1
         the last layer's), mean-pooled over the visual positions (--pool grid: over each of 3 x 3 regions of the
         visual token grid, concatenated), are one feature vector per image. Closed-form ridge classifiers (one-hot
         targets, the ridge chosen by 5-fold cross-validation on the training half) are fitted on the first half of
         the images and scored on the second, for the generator's ground truth: count (1-3), colour (each of 4
         present or not), shape (each of 3 present or not) and position (each of 9 grid cells occupied or not).
         The probe score is the mean of the four attributes' held-out accuracies (an attribute's: the mean over its
         targets); the chance line is the same with the training half's majority class.

Prints per metric lambda = 0 and lambda = 1 as mean +- sample std over seeds and their difference (lambda 1 - lambda 0)
with a 95% t-interval over seeds of the PAIRED difference, and ends with

    ross_effect: acc A->B baseline M probe P->Q seeds S

(A, P: lambda = 0's means; B, Q: lambda = 1's; M the majority baseline). The work folder is a temporary one unless
--work names one; --save writes the table and that line to benchmarks/results/ross_effect.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import stats

from fastross import demo  # its prepare and its majority-answer baseline, which the demo's accuracy line uses too

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: devtools/ is never installed
from devtools import results as R  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LAMBDAS = (0.0, 1.0)
PROBE_SEED = 10_000  # the probe images' generator seed: a stream of its own, never trained on
ATTRIBUTES = ("count", "colour", "shape", "position")
METRICS = ("acc", "probe", *(f"probe_{a}" for a in ATTRIBUTES), "text_loss")


def run(cmd: list[str], env: dict | None = None) -> None:
    print("ross_effect: $", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, env=env)


# --- statistics ------------------------------------------------------------------------------------------------------


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def paired_interval(a: list[float], b: list[float]) -> tuple[float, float]:
    """The mean of b - a over seeds and the half-width of its 95% t-interval (nan with one seed)."""
    if len(a) != len(b):
        raise ValueError(f"paired_interval: {len(a)} values against {len(b)}: the seeds must pair up")
    d = [y - x for x, y in zip(a, b)]
    m, s = mean_std(d)
    if len(d) < 2:
        return m, math.nan
    return m, float(stats.t.ppf(0.975, len(d) - 1)) * s / math.sqrt(len(d))


# --- the linear probe ------------------------------------------------------------------------------------------------


def targets(scenes: list[dict]) -> dict[str, np.ndarray]:
    """The generator's ground truth of each scene as class labels, per attribute an (images, targets) int array:
    count (1 target: 1-3 shapes -> 0-2), colour (4: each colour present), shape (3: each shape present), position
    (9: each grid cell occupied)."""
    from fastross.data.synth import COLOURS, COLS, ROWS, SHAPES

    out = {a: [] for a in ATTRIBUTES}
    for sc in scenes:
        shapes = sc["shapes"]
        cells = {(s["row"], s["col"]) for s in shapes}
        out["count"].append([len(shapes) - 1])
        out["colour"].append([int(any(s["colour"] == c for s in shapes)) for c in sorted(COLOURS)])
        out["shape"].append([int(any(s["shape"] == k for s in shapes)) for k in SHAPES])
        out["position"].append([int((r, c) in cells) for r in ROWS for c in COLS])
    return {a: np.asarray(v, np.int64) for a, v in out.items()}


def _ridge_fit(x: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
    """Weights (features + 1, classes) of ridge regression onto y's one-hot columns; the bias is not penalised."""
    xb = np.hstack([x, np.ones((len(x), 1))])
    reg = alpha * np.eye(xb.shape[1])
    reg[-1, -1] = 0.0
    return np.linalg.solve(xb.T @ xb + reg, xb.T @ y)


def _ridge_predict(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    return (np.hstack([x, np.ones((len(x), 1))]) @ w).argmax(1)


ALPHAS = tuple(10.0**k for k in range(-3, 5))


def ridge_classifier(x: np.ndarray, labels: np.ndarray, classes: int, folds: int = 5) -> np.ndarray:
    """A closed-form ridge classifier on standardised features (x's own mean and std), its ridge chosen from ALPHAS
    by `folds`-fold cross-validated accuracy (ties: the larger ridge). Returns (mean, std, weights)."""
    mu, sd = x.mean(0), x.std(0) + 1e-8
    z = (x - mu) / sd
    y = np.eye(classes)[labels]
    parts = np.array_split(np.arange(len(z)), folds)
    best, best_acc = ALPHAS[-1], -1.0
    for alpha in reversed(ALPHAS):
        acc = 0.0
        for k in range(folds):
            held = parts[k]
            fit = np.concatenate([parts[j] for j in range(folds) if j != k])
            acc += (_ridge_predict(_ridge_fit(z[fit], y[fit], alpha), z[held]) == labels[held]).mean() / folds
        if acc > best_acc + 1e-12:
            best, best_acc = alpha, acc
    return mu, sd, _ridge_fit(z, y, best)


def probe_accuracy(x: np.ndarray, labels: np.ndarray, train: int) -> tuple[float, float]:
    """Held-out accuracy of a ridge classifier fitted on the first `train` rows and scored on the rest, and the
    chance line: the training rows' majority class scored on the same rest. labels: (rows,) ints."""
    classes = int(labels.max()) + 1
    mu, sd, w = ridge_classifier(x[:train], labels[:train], classes)
    pred = _ridge_predict(w, (x[train:] - mu) / sd)
    majority = np.bincount(labels[:train], minlength=classes).argmax()
    return float((pred == labels[train:]).mean()), float((labels[train:] == majority).mean())


def probe(features: np.ndarray, truth: dict[str, np.ndarray]) -> dict[str, tuple[float, float]]:
    """Per attribute (and "probe", their mean): (held-out accuracy, chance) over its targets, the first half of the
    images fitted, the second scored."""
    train = len(features) // 2
    out = {}
    for a in ATTRIBUTES:
        got = [probe_accuracy(features, truth[a][:, j], train) for j in range(truth[a].shape[1])]
        out[a] = (statistics.fmean(g[0] for g in got), statistics.fmean(g[1] for g in got))
    out["probe"] = (statistics.fmean(out[a][0] for a in ATTRIBUTES), statistics.fmean(out[a][1] for a in ATTRIBUTES))
    return out


def pool_regions(n_visual: int, pool: str) -> list[np.ndarray]:
    """The visual positions each pooled feature block averages: "mean" one block of all of them; "grid" 9 blocks,
    the square grid of visual tokens (row-major) cut into 3 x 3 regions, as the generator cuts its images."""
    if pool == "mean":
        return [np.arange(n_visual)]
    side = math.isqrt(n_visual)
    if pool != "grid" or side * side != n_visual or side < 3:
        raise ValueError(
            f"--pool {pool}: 'mean', or 'grid' on a square grid of at least 3 x 3 visual tokens "
            f"(this model has {n_visual})"
        )
    grid = np.arange(n_visual).reshape(side, side)
    return [
        grid[np.ix_(r, c)].ravel()
        for r in np.array_split(np.arange(side), 3)
        for c in np.array_split(np.arange(side), 3)
    ]


def visual_features(run_dir: Path, images: list[Path], layer: int, pool: str = "mean", batch: int = 32) -> np.ndarray:
    """(images, blocks x hidden) float64: the LLM's hidden states at the visual positions of a prompt holding one
    image, at hidden_states[layer], mean-pooled over each of pool_regions' blocks. Under the causal mask the states
    at the visual positions depend only on the text before the image, so the question asked does not matter."""
    import torch

    from fastross.generate import hf_sdpa, load, pixel_values, prompt_ids

    loaded = load(run_dir)
    model, llm = loaded.model, loaded.model.llm
    ids = prompt_ids(loaded, "Describe the image briefly.", True)
    n_vis = model.num_visual_tokens
    expanded = []
    for t in ids:
        expanded += [t] * n_vis if t == loaded.image_token_id else [t]
    ids_t = torch.tensor(expanded)
    where = ids_t == loaded.image_token_id
    regions = pool_regions(n_vis, pool)
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            pix = torch.stack([pixel_values(loaded, p) for p in images[i : i + batch]])
            rows = ids_t[None].expand(len(pix), -1)
            embeds = llm.get_input_embeddings()(rows)
            vis = model.projector(model.vision(pix).to(model.projector[0].weight.dtype)).to(embeds.dtype)
            embeds = embeds.masked_scatter(where[None, :, None].expand_as(embeds), vis.flatten(0, 1))
            with hf_sdpa(llm):
                hs = llm.model(inputs_embeds=embeds, output_hidden_states=True).hidden_states[layer]
            vis_states = hs[:, where].double().numpy()
            out.append(np.concatenate([vis_states[:, r].mean(1) for r in regions], 1))
    return np.concatenate(out)


# --- the runs --------------------------------------------------------------------------------------------------------


def prepare(work: Path, a) -> None:
    """The demo's preparation (fastross.demo.prepare: the generator's data in WORK/data, tiny models in WORK/models,
    both stages' shards in WORK/shards) at this run's sizes, and the probe images in WORK/probe."""
    from fastross.data.synth import write_dataset

    synth = ["--seed", "0", "--train", str(a.train_images), "--eval", str(a.eval_images)]
    demo.prepare(work, synth, vocab=a.vocab)
    write_dataset(work / "probe", seed=PROBE_SEED, n_train=a.probe_images, n_eval=0)


def train_pair(work: Path, seed: int, lam: float, a, env: dict) -> Path:
    """Stage 1 then stage 2 for one seed and lambda; returns stage 2's run folder."""
    models, shards = work / "models", work / "shards"
    out = work / f"seed{seed}_lambda{lam:g}"
    common = [
        f"model.vision_path={models / 'vision'}",
        f"model.llm_path={models / 'llm'}",
        f"model.recon_weight={lam}",
        f"train.seed={seed}",
        f"data.seed={seed}",
        *(f"optim.lr_{k}={a.lr}" for k in ("projector", "llm", "denoiser")),
    ]
    # stage 2 reads stage 1's newest checkpoint; stage 2's newest one is what the scoring loads. The LLM is random
    # here: stage 1's captions are where it first learns to read the image, so it trains there too.
    run(
        demo.torchrun_cmd(
            a.ranks,
            "configs/tiny_pretrain.yaml",
            *common,
            f"data.shards={shards / 'stage1'}",
            f"train.run_dir={out / 'stage1'}",
            f"train.epochs={a.epochs1}",
            "train.ckpt_every=100000",
            "train.trainable=[projector,llm,denoiser]",
        ),
        env=env,
    )
    run(
        demo.torchrun_cmd(
            a.ranks,
            "configs/tiny.yaml",
            *common,
            f"data.shards={shards / 'stage2'}",
            f"model.init_from={out / 'stage1'}",
            f"train.run_dir={out / 'stage2'}",
            f"train.epochs={a.epochs2}",
            "train.ckpt_every=100000",
        ),
        env=env,
    )
    return out / "stage2"


def final_text_loss(run_dir: Path) -> float:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "text_loss" in r and not r.get("eval")]
    return statistics.fmean(r["text_loss"] for r in recs[-10:])


def table(values: dict[float, dict[str, list[float]]]) -> list[str]:
    rows = ["| metric | lambda = 0 | lambda = 1 | lambda 1 - 0 (paired, 95% t-interval) |", "|---|---|---|---|"]
    for name in METRICS:
        (m0, s0), (m1, s1) = mean_std(values[0.0][name]), mean_std(values[1.0][name])
        d, h = paired_interval(values[0.0][name], values[1.0][name])
        rows.append(f"| {name} | {m0:.3f} +- {s0:.3f} | {m1:.3f} +- {s1:.3f} | {d:+.3f} +- {h:.3f} |")
    return rows


def final_line(acc0: float, acc1: float, baseline: float, p0: float, p1: float, seeds: int) -> str:
    return f"ross_effect: acc {acc0:.3f}->{acc1:.3f} baseline {baseline:.3f} probe {p0:.3f}->{p1:.3f} seeds {seeds}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs1", type=int, default=20, help="stage 1's epochs (the demo's)")
    p.add_argument("--epochs2", type=int, default=16, help="stage 2's epochs (twice the demo's)")
    p.add_argument("--lr", type=float, default=3e-3, help="both stages' projector, LLM and denoiser learning rate")
    p.add_argument(
        "--vocab", type=int, default=768, help="the tiny LLM's tokenizer, trained on the data's text (0: Qwen2's)"
    )
    p.add_argument("--train-images", type=int, default=600, help="the generator's training shapes images")
    p.add_argument("--eval-images", type=int, default=64, help="held-out images (9 questions each)")
    p.add_argument("--probe-images", type=int, default=400, help="the probe's images, half fitted, half scored")
    p.add_argument("--probe-layer", type=int, default=-1, help="hidden_states index the probe reads")
    p.add_argument(
        "--pool",
        choices=("mean", "grid"),
        default="mean",
        help="the probe's features: the mean over all visual positions, or over each of 3 x 3 regions",
    )
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--work", help="work folder, kept (default: a temporary one, removed)")
    p.add_argument("--save", action="store_true", help="write benchmarks/results/ross_effect.md")
    a = p.parse_args(argv)
    if min(a.seeds, a.epochs1, a.epochs2, a.eval_images) < 1 or a.probe_images < 20:
        p.error("--seeds, --epochs1, --epochs2 and --eval-images must be >= 1, --probe-images >= 20")
    t0 = time.perf_counter()
    load0 = os.getloadavg()[0]
    from fastross.eval import evaluate

    with tempfile.TemporaryDirectory(prefix="fastross-effect-") as tmp:
        work = Path(a.work).resolve() if a.work else Path(tmp) / "work"
        env = {**os.environ, "TMPDIR": tmp}  # streaming's shared-memory lock files stay in here
        prepare(work, a)
        scenes = [
            s for s in json.loads((work / "probe" / "scenes.json").read_text()) if s["image"].startswith("shapes_")
        ]
        truth = targets(scenes)
        probe_images = [work / "probe" / "images" / s["image"] for s in scenes]
        values = {lam: {name: [] for name in METRICS} for lam in LAMBDAS}
        chance, baselines = {}, []
        for seed in range(a.seeds):
            for lam in LAMBDAS:
                run_dir = train_pair(work, seed, lam, a, env)
                evaluate(run_dir, work / "data" / "eval.json", run_dir.parent / "eval", max_new_tokens=8)
                rows = [json.loads(x) for x in (run_dir.parent / "eval" / "items.jsonl").read_text().splitlines()]
                baselines.append(demo.majority_baseline(rows))
                got = probe(visual_features(run_dir, probe_images, a.probe_layer, a.pool), truth)
                chance = {k: v[1] for k, v in got.items()}
                v = values[lam]
                v["acc"].append(sum(r["correct"] for r in rows) / len(rows))
                v["probe"].append(got["probe"][0])
                for at in ATTRIBUTES:
                    v[f"probe_{at}"].append(got[at][0])
                v["text_loss"].append(final_text_loss(run_dir))
                print(
                    f"ross_effect: seed {seed} lambda {lam:g}: "
                    + ", ".join(f"{n} {v[n][-1]:.3f}" for n in METRICS)
                    + f" ({len(rows)} questions, baseline {baselines[-1]:.3f})",
                    flush=True,
                )
    wall = time.perf_counter() - t0
    rows = table(values)
    mean = {lam: {n: statistics.fmean(v) for n, v in values[lam].items()} for lam in LAMBDAS}
    setup = (
        f"{a.seeds} seeds, stage 1 {a.epochs1} epochs, stage 2 {a.epochs2} epochs at lr {a.lr:g}, tokenizer "
        f"{f'{a.vocab} ids' if a.vocab else 'Qwen2'}, {a.train_images} training / {a.eval_images} held-out "
        f"images, probe on {len(probe_images)} images (half fitted) at hidden_states[{a.probe_layer}], "
        f"{a.pool}-pooled, {a.ranks} ranks, "
        f"wall {wall:.0f} s, load average {load0:.2f} -> {os.getloadavg()[0]:.2f}"
    )
    chance_line = (
        "probe chance (majority class): "
        + ", ".join(f"{k} {v:.3f}" for k, v in chance.items())
        + f"; majority-answer baseline {statistics.fmean(baselines):.3f}"
    )
    final = final_line(
        mean[0.0]["acc"], mean[1.0]["acc"], statistics.fmean(baselines), mean[0.0]["probe"], mean[1.0]["probe"], a.seeds
    )
    print("\n".join(rows))
    print(f"ross_effect: {setup}")
    print(f"ross_effect: {chance_line}")
    print(final, flush=True)
    if a.save:
        path = R.RESULTS / "ross_effect.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            f"# benchmarks/ross_effect.py, commit {R.commit()}, {R.machine()}, {R.today()}\n\n"
            f"{setup}.\n\n{chance_line}.\n\n" + "\n".join(rows) + f"\n\n    {final}\n"
        )
        print(f"ross_effect: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
