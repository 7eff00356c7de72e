"""The 7B slice trained for real: N steps with each attention backend present, and the memory plan against the
measured peak.

    python benchmarks/slice_train.py --layers K [--shrink S] [--steps 30] [--slice-dir DIR] [--csv PATH]

The slice (devtools.make_slice: the 7B shapes with K LLM layers, random weights, the bundled data with
stored latents) trains configs/7b.yaml on one rank with make_slice.run_settings, once per backend of
`attention.backend` that can train here: sdpa always; on CUDA varlen (torch's varlen_attn), flex, and flash
when flash-attn is importable. Each prints one line as soon as it ends: steps, first and last losses,
samples/s, tokens/s, MFU and the peak allocated memory (CUDA).

Then fastross.memory_plan.simulate (FakeTensorMode, a fake process group of 1, FSDPMemTracker) on the largest
micro-batch those steps actually trained, with the run's own settings, against the first backend's measured
`torch.cuda.max_memory_allocated` (metrics' mem_peak_allocated_gib, the largest record):
`slice_train: memory simulated_gib S measured_gib M ratio R` (measured / simulated; n/a without CUDA).
--csv appends one row per backend and one for the memory to PATH.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fastross import config
from fastross.demo import torchrun_cmd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: devtools/ is never installed
from devtools import (
    make_slice,  # noqa: E402
    results as R,  # noqa: E402
)

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "7b.yaml"
GIB = 1 << 30


def backends(cuda: bool) -> list[str]:
    """The attention backends that can train on this device, the default one first."""
    if not cuda:
        return ["sdpa"]  # flex has no backward on CPU; varlen and flash are CUDA kernels
    found = ["flash"] if importlib.util.find_spec("flash_attn") is not None else []
    return found + ["varlen", "flex", "sdpa"]


def overrides(models: Path, shards: Path, run_dir: Path, steps: int, settings: list[str], backend: str) -> list[str]:
    return [
        f"model.vision_path={models / 'vision'}",
        f"model.llm_path={models / 'llm'}",
        "model.init_from=''",
        "model.vae_path=''",
        f"data.shards={shards}",
        f"train.run_dir={run_dir}",
        f"train.max_steps={steps}",
        "train.epochs=100",
        "train.log_every=1",
        *settings,
        f"attention.backend={backend}",
    ]


def train(args: list[str], timeout: float) -> tuple[list[dict], str]:
    """One run on one rank; its metrics records (empty when it did not finish) and its output's tail."""
    run_dir = Path(next(a.split("=", 1)[1] for a in args if a.startswith("train.run_dir=")))
    with tempfile.TemporaryDirectory(prefix="fastross-slice-") as tmp:
        cmd = torchrun_cmd(1, CONFIG, *args)
        try:
            p = subprocess.run(
                cmd, cwd=REPO, env={**os.environ, "TMPDIR": tmp}, capture_output=True, text=True, timeout=timeout
            )
            out = p.stdout + p.stderr
        except subprocess.TimeoutExpired as e:
            out = f"timed out after {timeout:.0f} s\n" + (e.stdout or b"").decode()[-3000:]
    done = "train: done" in out and (run_dir / "metrics.jsonl").is_file()
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()] if done else []
    return recs, out[-3000:]


def trained_micro_batches(cfg: config.Config, steps: int, attn_tokens: float):
    """The largest micro-batch (tokens, then images) of the run's steps, as (lengths, images, supervised) read
    from the shards: what the trainer packed, so the simulation sees what the device ran."""
    from fastross.data.stream import StepStream

    d = cfg.data
    stream = StepStream(d.shards, d.global_batch, 0, 1, d.shuffle, d.seed, d.max_tokens, attn_tokens)
    best = None
    for k in range(steps):
        for mb in stream.step(k).micro_batches:  # this rank's
            lengths = [int(s["length"]) for s in mb]
            images = [len(s["image"]) > 0 for s in mb]
            supervised = [int((np.asarray(s["labels"]) != -100).sum()) for s in mb]
            key = (sum(lengths), sum(images))
            if best is None or key > best[0]:
                best = (key, (lengths, images, supervised))
    return best[1]


def simulate(cfg: config.Config, steps: int) -> float:
    """fastross.memory_plan's simulated peak (GiB) of one rank on the run's largest micro-batch."""
    import torch

    from fastross import flops, memory_plan
    from fastross.train import llm_attention_cost_tokens

    device = "cuda" if torch.cuda.is_available() else "cpu"  # where the slice trains (model.denoiser.impl=auto)
    world = memory_plan.init_fake_world(1)
    try:
        fake = flops.FakeModel(cfg.model, cfg.train.trainable)
        samples = trained_micro_batches(cfg, steps, llm_attention_cost_tokens(fake.model.llm))
        policy = config.checkpoint_policies(cfg.train.activation_checkpointing, fake.arch.llm_layers)
        return memory_plan.simulate(cfg, cfg.model, world, policy, samples, device).peak / GIB
    finally:
        memory_plan.dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, required=True, help="LLM decoder layers of the slice (K)")
    p.add_argument("--shrink", type=int, default=1, help="every width divided by this (smoke shapes on CPU)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per backend")
    p.add_argument("--slice-dir", help="keep the slice's folders here, or use those made before")
    p.add_argument("--timeout", type=float, default=240, help="seconds per backend's run")
    p.add_argument("--csv", help="append the rows to this CSV file")
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device, t0 = R.machine(), time.perf_counter()
    settings = make_slice.run_settings(cuda, a.shrink)
    rows, measured = [], None
    with tempfile.TemporaryDirectory(prefix="fastross-slice-work-") as work:
        folder = Path(a.slice_dir or Path(work) / "slice")
        models, latents, _ = make_slice.prepare(
            folder, a.layers, a.shrink, n_train=60 if cuda else 8, device="cuda" if cuda else "cpu"
        )
        print(
            f"slice_train: slice K={a.layers} shrink {a.shrink} ready in {time.perf_counter() - t0:.0f} s", flush=True
        )
        for backend in backends(cuda):
            args = overrides(models, latents, Path(work) / backend, a.steps, settings, backend)
            t = time.perf_counter()
            recs, tail = train(args, a.timeout)
            if not recs:
                print(f"slice_train: backend {backend} failed:\n{tail}", flush=True)
                rows.append([backend, "failed", "", "", "", "", "", "", f"{time.perf_counter() - t:.0f}"])
                continue
            timed = recs[min(2, len(recs) - 1) :]  # the first steps load, compile and warm up
            peak = max((r.get("mem_peak_allocated_gib", 0.0) for r in recs), default=0.0) if cuda else None
            measured = measured if measured is not None else peak
            mean = lambda k: sum(r[k] for r in timed) / len(timed)  # noqa: E731, B023 (used in this iteration only)
            row = [
                backend,
                len(recs),
                f"{recs[0]['text_loss']:.4f}",
                f"{recs[-1]['text_loss']:.4f}",
                f"{recs[0]['recon_loss']:.4f}",
                f"{recs[-1]['recon_loss']:.4f}",
                f"{mean('samples_per_s'):.3f}",
                f"{mean('tokens_per_s_per_rank'):.0f}",
                f"{mean('mfu'):.4f}",
                f"{peak:.2f}" if cuda else "",
                f"{time.perf_counter() - t:.0f}",
            ]
            rows.append(row)
            print(
                f"slice_train: backend {backend} steps {row[1]} text_loss {row[2]} -> {row[3]} recon_loss {row[4]} -> "
                f"{row[5]} samples/s {row[6]} tokens/s/rank {row[7]} mfu {row[8]} peak_alloc_gib {row[9] or 'n/a'} "
                f"wall {row[10]} s",
                flush=True,
            )
        cfg = config.load(
            str(CONFIG), overrides(models, latents, Path(work) / "plan", a.steps, settings, "varlen"), check_paths=False
        )
        simulated = simulate(cfg, a.steps)
    ratio = f"{measured / simulated:.3f}" if measured else "n/a"
    print(
        f"slice_train: memory simulated_gib {simulated:.2f} measured_gib "
        f"{f'{measured:.2f}' if measured else 'n/a'} ratio {ratio} device {device}",
        flush=True,
    )
    if a.csv:
        head = [
            "date",
            "commit",
            "device",
            "layers",
            "shrink",
            "what",
            "steps",
            "text_loss_first",
            "text_loss_last",
            "recon_loss_first",
            "recon_loss_last",
            "samples_per_s",
            "tokens_per_s_per_rank",
            "mfu",
            "peak_alloc_gib",
            "wall_s",
        ]
        lines = [[R.today(), R.commit(), device, a.layers, a.shrink, *r[:1], *r[1:]] for r in rows]
        lines = [x if len(x) == len(head) else x + [""] * (len(head) - len(x)) for x in lines]
        lines.append(
            [
                R.today(),
                R.commit(),
                device,
                a.layers,
                a.shrink,
                f"memory simulated {simulated:.2f} ratio {ratio}",
                "",
                "",
                "",
                "",
                "",
                "",
                "",
                "",
                f"{measured:.2f}" if measured else "",
                "",
            ]
        )
        R.append_csv(str(Path(a.csv).resolve()), head, lines)  # an absolute path: not under results/
    print(
        f"slice_train: {len([r for r in rows if r[1] != 'failed'])} of {len(rows)} backends trained, "
        f"{time.perf_counter() - t0:.0f} s"
    )
    return 0 if rows and all(r[1] != "failed" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
