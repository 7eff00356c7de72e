"""The ladder: from the reference recipe to fastross, one switch at a time, each rung a real training run.

    python benchmarks/throughput.py [--steps 10] [--skip 2] [--rungs 1-8] [--budget-gib G] [--save]

Rungs (cumulative; every one trains the same model, so their step-1 losses agree):
  1 reference   padded micro-batches (data.packing=padded), fp32 logits CE at every position
                (model.ce_positions=all), the eager fp32 denoiser with the condition repeated per replica
                (model.denoiser.repeat_cond), the VAE encoding on the fly (shards without latents), full
                checkpointing, no compile, the data prepared inline (data.workers=0)
  2 +packing    packed, rank-balanced varlen micro-batches
  3 +fused CE   Liger's fused linear cross-entropy at the supervised positions only
  4 +latents    the latent moments stored in the shards at conversion
  5 +triton     fastross's fused denoiser (model.denoiser.impl=auto), the condition embedded once per image: the
                Triton kernels on CUDA; on CPU, where Triton has no backend, their PyTorch twins, as fastross runs
                there (fastross.model.denoiser.resolve_impl). On CPU the row "5i +triton interp." beside the
                chain runs rung 5 with the Triton kernels in the interpreter (impl=triton): what they cost there,
                reported, not part of the chain (--no-interpreted skips it)
  6 +planned AC per-layer activation checkpointing as the planner chooses it (fastross.memory_plan.plan_policy) within
                --budget-gib per rank (default: the host's memory over the ranks); the policy is printed
  7 +compile    torch.compile of every decoder layer and denoiser block
  8 +loader     2 loader workers per rank preparing steps ahead: fastross

On CPU it trains configs/tiny.yaml on 2 ranks (torchrun, gloo) on the tests' tiny models and data. With
--slice-layers K it trains configs/7b.yaml on one device at the 7B shapes with K LLM layers (random weights, the
bundled data converted for them; see slice_mode); --shrink S divides the widths for a smoke run on CPU. Each rung runs
`--steps` optimizer steps; its samples/s, tokens/s per rank and MFU (model FLOPs over the device's peak; on CPU the
measured matmul rate, see fastross/flops.py) are the medians of the logged steps after the first `--skip` (start-up
and compiling).
Peak memory per rank: on CUDA the trainer's measured `torch.cuda.max_memory_allocated` (the largest over the
rung's steps); elsewhere simulated for the rung's config and its step's largest micro-batch (padded for rung 1)
by fastross.memory_plan.simulate_config (FakeTensorMode, fake process group, FSDPMemTracker; compile not simulated).
The header says which.

On CPU compiling is slow and loader workers share the cores with the ranks: a rung may be slower than the one
before it, and is reported as measured. Neither GPU kernel library has a CPU backend, so on CPU fastross runs their
PyTorch counterparts, and the ladder does as fastross does (README, "The ladder"):
- model.denoiser.impl=auto: the fused denoiser's PyTorch twins (the same maths and state dict; the interpreted
  Triton kernels, row 5i, are measured beside the chain: under TRITON_INTERPRET they take tiles of up to 2^20
  elements, fastross/kernels/_common.py, and still cost far more than PyTorch);
- model.fused_ce on CPU is fastross's chunked torch cross-entropy, not Liger's kernel (interpreted, one program per
  supervised row: `python benchmarks/text_loss.py` times both).

Ends with `throughput: speedup X mfu M mem_ratio R device D` (X: the last rung's samples/s over the first's; M:
its MFU; R: its peak memory over the first's; D: the GPU's name, or cpu; the line before names the machine). --save
appends the table to benchmarks/results/throughput.csv.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: devtools/ is never installed
from devtools import results as R  # noqa: E402
from fastross.demo import torchrun_cmd  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny.yaml"
RANKS = 2

REFERENCE = [
    "data.packing=padded",
    "data.padded_samples=4",
    "model.fused_ce=false",
    "model.ce_positions=all",
    "model.denoiser.impl=torch",
    "model.denoiser.repeat_cond=true",
    "train.activation_checkpointing=full",
    "train.compile=false",
    "data.workers=0",
]
RUNGS = [  # (name, overrides on top of the rung before; "LATENTS" switches to the shards with stored moments)
    ("reference", REFERENCE),
    ("+packing", ["data.packing=packed"]),
    ("+fused CE", ["model.fused_ce=true", "model.ce_positions=supervised"]),
    ("+latents", ["LATENTS"]),
    ("+triton", ["model.denoiser.impl=auto", "model.denoiser.repeat_cond=false"]),
    ("+planned AC", ["PLANNED"]),
    ("+compile", ["train.compile=true"]),
    ("+loader", ["data.workers=2"]),
]
GIB = 1 << 30
SETTINGS: list[str] = []  # the device's settings on top of CONFIG (--slice-layers sets them)
TOL = 1e-4  # the step-1 losses' largest relative difference between rungs


def slice_mode(layers: int, shrink: int, work: Path) -> tuple[Path, Path, Path]:
    """--slice-layers K: configs/7b.yaml on the 7B shapes with K LLM layers, one rank, with make_slice's settings
    for the device (run_settings); step-1 losses within 1e-2 in bf16 on CUDA (its kernels differ between rungs),
    1e-4 in fp32 elsewhere (the GPU check's --dry-run, with --shrink). Returns prepare()'s folders."""
    global CONFIG, RANKS, SETTINGS, TOL
    import torch

    from devtools import make_slice

    cuda = torch.cuda.is_available()
    CONFIG, RANKS, TOL = REPO / "configs" / "7b.yaml", 1, 1e-2 if cuda else 1e-4
    SETTINGS = make_slice.run_settings(cuda, shrink)
    return make_slice.prepare(work, layers, shrink, n_train=60 if cuda else 8, device="cuda" if cuda else "cpu")


def prepare(work: Path) -> tuple[Path, Path, Path]:
    """Tiny model folders, and the tests' stage-2 data converted twice: with latent moments and without."""
    from devtools.golden import SYNTH
    from fastross.data.convert import main as convert
    from fastross.data.synth import write_dataset
    from fastross.demo import convert_args
    from fastross.demo.make_tiny import make_tiny

    models = make_tiny(work / "models")
    write_dataset(work / "synth", **SYNTH)
    out = {}
    for name, vae in (("latents", True), ("pixels", False)):
        argv = convert_args(models, work / "synth" / "stage2.json", work / "synth" / "images", work / name, vae=vae)
        if convert(argv) != 0:
            raise RuntimeError(f"throughput: converting the tiny data set ({name}) failed")
        out[name] = work / name
    return models, out["latents"], out["pixels"]


def base_overrides(models: Path, shards: Path, run_dir: Path, steps: int, vae: bool) -> list[str]:
    """What every rung sets on top of configs/tiny.yaml: the ladder's own model folders and shards, fresh weights."""
    return [
        f"model.vision_path={models / 'vision'}",
        f"model.llm_path={models / 'llm'}",
        "model.init_from=''",
        "model.vae_path=" + (str(models / "vae") if vae else "''"),
        f"data.shards={shards}",
        f"train.run_dir={run_dir}",
        f"train.max_steps={steps}",
        "train.epochs=10",
        "train.log_every=1",
        f"train.ckpt_every={10 * steps}",
        *SETTINGS,
    ]


def rung_config(models: Path, shards: Path, overrides: list[str], vae: bool):
    """The rung's resolved config, as its training run will read it (for the planner and the simulation)."""
    from fastross import config

    return config.load(CONFIG, base_overrides(models, shards, Path("unused"), 1, vae) + overrides, check_paths=False)


def planned_policy(cfg, budget: float, device: str) -> str:
    """Rung 6: the planner's per-layer checkpointing policy for this rung's config within `budget` GiB per rank."""
    from fastross import memory_plan

    chosen = memory_plan.plan_policy(cfg, RANKS, budget, device)
    if chosen is None:
        raise RuntimeError(f"throughput: no checkpointing policy fits {budget:.1f} GiB per rank (--budget-gib)")
    return memory_plan.override(chosen)


def simulated_peak_gib(cfg, device: str) -> float:
    """A rank's peak memory for this rung's config by simulation (fastross.memory_plan.simulate_config; compile not
    simulated: the eager step)."""
    from fastross import memory_plan

    return memory_plan.simulate_config(cfg, RANKS, device).peak / GIB


def train(
    models: Path, shards: Path, run_dir: Path, overrides: list[str], steps: int, vae: bool
) -> tuple[list[dict], str]:
    """One rung: configs/tiny.yaml from fresh weights for `steps` steps on RANKS ranks; its metrics records and the
    denoiser ops it ran (model.denoiser.impl as the trainer resolved it)."""
    base = base_overrides(models, shards, run_dir, steps, vae)
    with tempfile.TemporaryDirectory(prefix="fastross-ladder-") as tmp:
        cmd = torchrun_cmd(RANKS, CONFIG, *base, *overrides)
        p = subprocess.run(
            cmd, cwd=REPO, env={**os.environ, "TMPDIR": tmp}, capture_output=True, text=True, timeout=3600
        )
    out = p.stdout + p.stderr
    if "train: done" not in out:
        raise RuntimeError(f"throughput: the rung did not finish ({' '.join(overrides)}):\n{out[-4000:]}")
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(run_dir)  # its end-of-run checkpoint: one rung's on disk at a time
    ops = re.search(r", denoiser (\w+), ", out)
    if ops is None:
        raise RuntimeError(f"throughput: the trainer's start line names no denoiser ops:\n{out[-4000:]}")
    return recs, ops.group(1)


def host_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--steps",
        type=int,
        default=10,
        help="optimizer steps per rung (on a shared CPU the medians of 4 steps moved rungs by up to 30%%)",
    )
    p.add_argument("--skip", type=int, default=2, help="first steps left out of the rates (start-up, compiling)")
    p.add_argument("--rungs", default=f"1-{len(RUNGS)}", help="which rungs to run, e.g. 1-8 or 1,2,8")
    p.add_argument(
        "--budget-gib",
        type=float,
        help="memory per rank that rung 6's planner may spend (default: on CUDA the device's memory less "
        "fastross.memory_plan's margin, else the host's memory over the ranks)",
    )
    p.add_argument("--save", action="store_true", help="append the table to benchmarks/results/throughput.csv")
    p.add_argument(
        "--no-interpreted",
        action="store_true",
        help="on CPU, skip row 5i (rung 5 with the Triton kernels in the interpreter)",
    )
    p.add_argument(
        "--slice-layers",
        type=int,
        default=0,
        metavar="K",
        help="the 7B shapes with K LLM layers on one device (devtools.make_slice), not the tiny recipe",
    )
    p.add_argument(
        "--shrink", type=int, default=1, help="with --slice-layers: every width divided by this (smoke shapes)"
    )
    p.add_argument("--slice-dir", help="with --slice-layers: keep the slice's folders here, or use those made before")
    a = p.parse_args(argv)
    if a.steps <= a.skip:
        p.error("--steps must exceed --skip")
    lo, _, hi = a.rungs.partition("-")
    wanted = set(range(int(lo), int(hi) + 1)) if hi else {int(x) for x in a.rungs.split(",")}
    device = R.machine()
    import torch

    measured = torch.cuda.is_available()  # peak memory: measured by the trainer on a GPU, else simulated
    device_type = "cuda" if measured else "cpu"  # what the rungs run on (model.denoiser.impl=auto resolves for it)
    rows, beside, t0 = [], [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fastross-ladder-work-") as work:
        if a.slice_layers:
            models, latents, pixels = slice_mode(a.slice_layers, a.shrink, Path(a.slice_dir or Path(work) / "slice"))
        else:
            models, latents, pixels = prepare(Path(work))
        if a.budget_gib is None:
            from fastross import memory_plan

            a.budget_gib = (
                memory_plan.budget_gib(torch.cuda.get_device_properties(0).total_memory / GIB)
                if measured
                else host_gib() / RANKS
            )
        overrides, stored = [], False
        header = (
            f"{'rung':<17} {'denoiser':>8} {'samples/s':>10} {'tokens/s/rank':>14} {'MFU':>7} "
            f"{'peak GiB ' + ('measured' if measured else 'simulated'):>19} {'step-1 text':>12} "
            f"{'step-1 recon':>13} {'wall s':>7}"
        )
        print(header)

        def rung(k, name: str, overrides: list[str], stored: bool) -> dict:
            t = time.perf_counter()
            shards = latents if stored else pixels
            recs, ops = train(models, shards, Path(work) / f"rung{k}", overrides, a.steps, vae=not stored)
            timed = recs[a.skip :]
            peak = (
                max(r["mem_peak_allocated_gib"] for r in recs)
                if measured
                else simulated_peak_gib(rung_config(models, shards, overrides, vae=not stored), device_type)
            )
            row = {
                "rung": k,
                "name": name,
                "ops": ops,
                "samples_per_s": statistics.median(r["samples_per_s"] for r in timed),
                "tokens_per_s_per_rank": statistics.median(r["tokens_per_s_per_rank"] for r in timed),
                "mfu": statistics.median(r["mfu"] for r in timed),
                "peak_gib": peak,
                "text_loss_1": recs[0]["text_loss"],
                "recon_loss_1": recs[0]["recon_loss"],
                "wall_s": time.perf_counter() - t,
            }
            print(
                f"{name:<17} {ops:>8} {row['samples_per_s']:>10.2f} {row['tokens_per_s_per_rank']:>14.0f} "
                f"{row['mfu']:>7.2%} {peak:>19.3f} {row['text_loss_1']:>12.6f} {row['recon_loss_1']:>13.6f} "
                f"{row['wall_s']:>7.0f}",
                flush=True,
            )
            return row

        for k, (name, delta) in enumerate(RUNGS, 1):
            for o in delta:
                if o == "LATENTS":
                    stored = True
                elif o == "PLANNED":
                    cfg = rung_config(models, latents if stored else pixels, overrides, vae=not stored)
                    policy = planned_policy(cfg, a.budget_gib, device_type)
                    print(
                        f"rung {k}: the planner's policy within {a.budget_gib:.1f} GiB per rank: "
                        f"train.activation_checkpointing={policy}",
                        flush=True,
                    )
                    overrides.append(f"train.activation_checkpointing={policy}")
                else:
                    overrides.append(o)
            if k not in wanted:
                continue
            rows.append(rung(k, name, overrides, stored))
            if name == "+triton" and rows[-1]["ops"] != "triton" and not a.no_interpreted:
                # beside the chain: what the Triton kernels cost here, in the interpreter (not in the chain)
                beside.append(rung(f"{k}i", f"{name} interp.", [*overrides, "model.denoiser.impl=triton"], stored))
    first = rows[0]
    worst = max(
        max(
            abs(r["text_loss_1"] - first["text_loss_1"]) / first["text_loss_1"],
            abs(r["recon_loss_1"] - first["recon_loss_1"]) / first["recon_loss_1"],
        )
        for r in rows + beside
    )
    print(f"step-1 losses: largest relative difference from the first rung {worst:.1e} (the same model: <= {TOL:g})")
    if worst > TOL:
        print("throughput: error: the rungs do not train the same model", file=sys.stderr)
        return 1
    speedup = rows[-1]["samples_per_s"] / first["samples_per_s"]
    mem_ratio = rows[-1]["peak_gib"] / first["peak_gib"]
    for b in beside:
        twin = next(r for r in rows if str(r["rung"]) == b["rung"][:-1])  # the rung it stands beside
        print(
            f"row {b['rung']} (beside the chain): the Triton kernels interpreted, {b['samples_per_s']:.2f} samples/s "
            f"against rung {b['rung'][:-1]}'s {twin['samples_per_s']:.2f} "
            f"with their PyTorch twins"
        )
    print(
        f"ladder: {len(rows)} rungs{f' and {len(beside)} beside' if beside else ''}, {a.steps} steps each, "
        f"{time.perf_counter() - t0:.0f} s on {device}"
    )
    print(
        f"throughput: speedup {speedup:.2f} mfu {rows[-1]['mfu']:.4f} mem_ratio {mem_ratio:.3f} "
        f"device {device if measured else 'cpu'}"
    )
    if a.save:
        out = R.append_csv(
            "throughput.csv",
            [
                "date",
                "commit",
                "device",
                "rung",
                "name",
                "steps",
                "samples_per_s",
                "tokens_per_s_per_rank",
                "mfu",
                "peak_gib",
                "peak_kind",
                "text_loss_1",
                "recon_loss_1",
            ],
            [
                [
                    R.today(),
                    R.commit(),
                    device,
                    r["rung"],
                    f"{r['name']} ({r['ops']} denoiser)",
                    a.steps,
                    f"{r['samples_per_s']:.3f}",
                    f"{r['tokens_per_s_per_rank']:.1f}",
                    f"{r['mfu']:.5f}",
                    f"{r['peak_gib']:.4f}",
                    "measured" if measured else "simulated",
                    f"{r['text_loss_1']:.6f}",
                    f"{r['recon_loss_1']:.6f}",
                ]
                for r in rows + beside
            ],
        )
        print(f"appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
