"""Does a bf16 denoiser train like the fp32 one? (ROSS_SPEC.md section 7)

    python benchmarks/denoiser_precision.py [--steps 200] [--work DIR] [--save]

Three runs of the real trainer (`torchrun --standalone -m fastross.train`, FSDP2, 1 rank by default)
on the CPU demo's tiny model and data (fastross.demo.make_tiny, fastross.data.synth, converted with
VAE latent moments as fastross.demo does), stage-1 data with only the denoiser training (the
vision tower, projector and LLM frozen, so the condition is the same function in all three runs and the
reconstruction loss measures the denoiser alone; it is also the cheapest step), 8 samples per step,
the same data order in all three. The three runs go side by side (one process each, one thread each):
they are independent and share the machine's cores.

    fp32_a   model.denoiser.dtype=fp32, train.seed=A
    fp32_b   model.denoiser.dtype=fp32, train.seed=B  (another init and other noise keys)
    bf16_a   model.denoiser.dtype=bf16, train.seed=A  (the denoiser's FSDP2 policy: bf16 params and
             compute, fp32 gradient reduction; the loss is fp32; the rest of the model stays fp32)

The band, precisely. Let MA(x)[k] be the trailing mean of recon_loss over the WINDOW (20) steps
ending at step k (k >= WINDOW). The seed-to-seed noise is d_ab[k] = |MA(fp32_a)[k] - MA(fp32_b)[k]|,
and its envelope band[k] = max of d_ab over steps k - WINDOW .. k + WINDOW. bf16's deviation is
d_bf[k] = |MA(bf16_a)[k] - MA(fp32_a)[k]|. bf16 stays within the band when both hold:
  - d_bf[k] <= band[k] on at least 90 % of the steps k >= WINDOW, and
  - mean(d_bf) <= mean(d_ab): on average bf16 is no further from fp32 than another fp32 seed is.

On a CPU the bf16 matmuls run through PyTorch's CPU bf16 kernels (fp32 accumulation inside, as on
GPUs), and TF32 does not exist; on a GPU the fp32 runs would use TF32 matmuls where enabled. Run it
again on a GPU when one is lent (the same command; the device is recorded in the CSV header).

Writes the curves (CSV, PNG plot) to runs/denoiser_precision/ (git-ignored; the work folder is a temp
dir unless --work is given), or with --save to benchmarks/results/denoiser_precision_cpu.{csv,png}
(denoiser_precision_<device>.* on a GPU).
Prints a table every 20 steps and a verdict line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from fastross.demo import convert_args, torchrun_cmd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: devtools/ is never installed
from devtools import results as R  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WINDOW = 20
RUNS = {"fp32_a": ("fp32", 0), "fp32_b": ("fp32", 1), "bf16_a": ("bf16", 0)}  # name: (denoiser dtype, train.seed)


def sh(cmd: list[str]) -> None:
    print("precision: $", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def prepare(work: Path) -> Path:
    """Tiny models and stage-1 shards with latent moments under work (kept and reused if present)."""
    py = sys.executable
    models, data, shards = work / "models", work / "data", work / "shards" / "stage1"
    if not (shards / "index.json").exists():
        sh([py, "-m", "fastross.demo.make_tiny", str(models)])
        sh([py, "-m", "fastross.data.synth", str(data), "--seed", "0"])
        sh(
            [
                py,
                "-m",
                "fastross.data.convert",
                *convert_args(models, data / "stage1.json", data / "images", shards, "plain"),
            ]
        )
    return shards


def launch(work: Path, shards: Path, name: str, dtype: str, seed: int, steps: int, ranks: int, tmp: str):
    """Start one training run; returns (process, run_dir, log path), or (None, run_dir, None) when a reused
    work folder already holds the finished run."""
    run_dir = work / "runs" / name
    if (run_dir / "metrics.jsonl").exists():  # a finished run in a reused work dir is read, not redone
        if len((run_dir / "metrics.jsonl").read_text().splitlines()) >= steps:
            return None, run_dir, None
    models = work / "models"
    cfg = {
        "model": {
            "vision_path": str(models / "vision"),
            "llm_path": str(models / "llm"),
            "denoiser": {"kind": "dit", "depth": 2, "width": 64, "heads": 4, "replicas": 4, "dtype": dtype},
            "fused_ce": False,
        },  # Liger's CE is ~35x slower in Triton's CPU interpreter
        "data": {"shards": str(shards), "global_batch": 8, "max_tokens": 512},
        "optim": {"lr_denoiser": 1e-3, "warmup_ratio": 0.03},
        "train": {
            "trainable": ["denoiser"],
            "dtype": "fp32",
            "seed": seed,
            "epochs": 100,
            "max_steps": steps,
            "log_every": 1,
            "ckpt_every": 100000,
            "run_dir": str(run_dir),
            "activation_checkpointing": False,
        },
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = work / f"{name}.log"
    run_tmp = Path(tmp) / name  # streaming's shared-memory lock files stay in here
    run_tmp.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TMPDIR": str(run_tmp), "OMP_NUM_THREADS": "1"}
    cmd = torchrun_cmd(ranks, path)
    print(f"precision: $ {' '.join(cmd)}  > {log}", flush=True)
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT), run_dir, log


def read_run(name: str, run_dir: Path, steps: int, log: Path | None) -> list[float]:
    path = run_dir / "metrics.jsonl"
    recs = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    if [r["step"] for r in recs[:steps]] != list(range(1, steps + 1)):
        tail = log.read_text()[-3000:] if log else ""
        raise RuntimeError(f"{name}: {path} does not hold steps 1..{steps}; remove {run_dir} and run again\n{tail}")
    return [r["recon_loss"] for r in recs[:steps]]


def moving_average(xs: list[float], w: int) -> list[float | None]:
    """Trailing mean over w values; None for the first w - 1 steps."""
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= w:
            acc -= xs[i - w]
        out.append(acc / w if i >= w - 1 else None)
    return out


def band_verdict(curves: dict[str, list[float]], w: int = WINDOW) -> dict:
    """The band and the verdict of the module docstring; per-step columns and the summary numbers."""
    ma = {k: moving_average(v, w) for k, v in curves.items()}
    n = len(curves["fp32_a"])
    valid = range(w - 1, n)
    d_ab = {k: abs(ma["fp32_a"][k] - ma["fp32_b"][k]) for k in valid}
    d_bf = {k: abs(ma["bf16_a"][k] - ma["fp32_a"][k]) for k in valid}
    band = {k: max(d_ab[j] for j in range(max(w - 1, k - w), min(n, k + w + 1))) for k in valid}
    inside = sum(d_bf[k] <= band[k] for k in valid) / len(valid)
    mean_ab, mean_bf = sum(d_ab.values()) / len(valid), sum(d_bf.values()) / len(valid)
    return {
        "ma": ma,
        "d_ab": d_ab,
        "d_bf": d_bf,
        "band": band,
        "inside": inside,
        "mean_ab": mean_ab,
        "mean_bf": mean_bf,
        "ok": inside >= 0.9 and mean_bf <= mean_ab,
    }


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name().replace(" ", "_") if torch.cuda.is_available() else "cpu"


def write(out: Path, curves: dict, v: dict, header: str) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    dev = device_name()
    stem = "denoiser_precision_cpu" if dev == "cpu" else f"denoiser_precision_{dev}"
    csv, png = out / f"{stem}.csv", out / f"{stem}.png"
    names = list(RUNS)
    lines = [f"# {header}", ",".join(["step", *names, *(f"ma_{k}" for k in names), "d_ab", "band", "d_bf"])]
    fmt = lambda x: "" if x is None else f"{x:.6f}"  # noqa: E731
    for i in range(len(curves["fp32_a"])):
        row = [
            str(i + 1),
            *(fmt(curves[k][i]) for k in names),
            *(fmt(v["ma"][k][i]) for k in names),
            fmt(v["d_ab"].get(i)),
            fmt(v["band"].get(i)),
            fmt(v["d_bf"].get(i)),
        ]
        lines.append(",".join(row))
    csv.write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    steps = list(range(1, len(curves["fp32_a"]) + 1))
    colors = {"fp32_a": "tab:blue", "fp32_b": "tab:green", "bf16_a": "tab:red"}
    for k in names:
        ax.plot(steps, curves[k], color=colors[k], alpha=0.2, linewidth=0.8)
        ax.plot(
            steps,
            [float("nan") if x is None else x for x in v["ma"][k]],
            color=colors[k],
            label=f"{k} (MA {WINDOW})",
            linestyle="--" if k == "bf16_a" else "-",
        )  # dashed: bf16 may lie on fp32_a
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("recon_loss")
    ax.set_title(f"denoiser precision, tiny model on {dev}: bf16 within fp32 seed band: {'yes' if v['ok'] else 'no'}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return csv, png


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per run")
    p.add_argument("--ranks", type=int, default=1, help="torchrun ranks per run")
    p.add_argument(
        "--work", default="", help="work folder (models, shards, runs), reused when given; default a temp dir"
    )
    p.add_argument("--save", action="store_true", help="write the CSV and PNG to benchmarks/results/ (committed)")
    a = p.parse_args(argv)
    t0, head = time.perf_counter(), R.commit()  # the code the runs import
    with tempfile.TemporaryDirectory(prefix="fastross-precision-work-") as tmp:
        work = Path(a.work).resolve() if a.work else Path(tmp)
        shards = prepare(work)
        procs = {
            name: launch(work, shards, name, dtype, seed, a.steps, a.ranks, tmp) for name, (dtype, seed) in RUNS.items()
        }
        walls = {}
        for name, (proc, _, _) in procs.items():
            if proc is not None:
                proc.wait()  # a gloo run may abort at exit after finishing (CPU_AND_GPU.md): judged by its metrics
            walls[name] = time.perf_counter() - t0
        curves = {name: read_run(name, run_dir, a.steps, log) for name, (_, run_dir, log) in procs.items()}
        v = band_verdict(curves)
        wall = time.perf_counter() - t0
        header = (
            f"device={device_name()} commit={head} date={datetime.date.today()} steps={a.steps} "
            f"window={WINDOW} inside={v['inside']:.3f} mean_d_ab={v['mean_ab']:.5f} "
            f"mean_d_bf={v['mean_bf']:.5f} within_band={v['ok']} wall_s={wall:.0f}"
        )
        print(
            f"\n{'step':>5} " + " ".join(f"{'ma_' + k:>10}" for k in RUNS) + f" {'|A-B|':>8} {'band':>8} {'|bf-A|':>9}"
        )
        for k in range(WINDOW - 1, a.steps, WINDOW):
            print(
                f"{k + 1:>5} "
                + " ".join(f"{v['ma'][n][k]:>10.4f}" for n in RUNS)
                + f" {v['d_ab'][k]:>8.4f} {v['band'][k]:>8.4f} {v['d_bf'][k]:>9.2e}"
            )
        print(
            "finished after (s, side by side, preparation included): "
            + ", ".join(f"{k} {w:.0f}" for k, w in walls.items())
        )
        out = REPO / "benchmarks" / "results" if a.save else REPO / "runs" / "denoiser_precision"
        csv, png = write(out, curves, v, header)
        print(
            f"precision: bf16 {'stays' if v['ok'] else 'does NOT stay'} within the fp32 seed-to-seed band: "
            f"inside on {100 * v['inside']:.0f} % of steps (need 90 %), mean |bf16-A| {v['mean_bf']:.2e} vs "
            f"mean |A-B| {v['mean_ab']:.2e}; wall {wall:.0f} s; {csv} {png}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
