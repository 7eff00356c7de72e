"""Loader throughput at the 7B image shapes, and the share of a step's wall time spent waiting for data.

    python benchmarks/loader.py [--samples 2000] [--backend pil|torchvision] [--save]

Writes `--samples` samples to a temporary folder through MosaicML's MDSWriter with fastross's
own columns (fastross.data.schema.COLUMNS), as the converter writes them: 640x480 JPEGs (64 random
crops of scikit-image's photos, quality 90, reused), 100-400 text tokens each with one `<image>`, and latent
moments of 16x54x54 float32 (16 random arrays of the right shape, reused: the VAE's cost
belongs to the converter). The image processor is SigLIP-so400m's (384 px, mean and std 0.5), the grid 27x27,
the aspect "pad" (stage 2). Then, through fastross.data.loader.Loader on one rank:

- P (per_worker): samples/s with one worker and the default image path, the consumer draining;
- S (samples_per_s): the same with W = 2 workers;
- D (data_wait): with W workers, a consumer that "computes" by sleeping for each step as long as
  44 samples/s per rank implies (four times the goal's demand) and measures the share of wall
  time it spends waiting for its next step. The first step (workers starting) is left out of all
  three figures and reported separately.

Targets: P >= 110, D <= 0.02. Prints `loader: samples_per_s S per_worker P workers W data_wait D`.
--save appends a row (date, commit, machine) to benchmarks/results/loader.csv; nothing else is
written outside the temporary folder.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastross.config import DataConfig
from fastross.data.images import ImageSpec
from fastross.data.loader import Loader
from fastross.data.schema import COLUMNS, LENGTHS_FILE, META_FILE, SHARD_HASH, write_manifest
from fastross.data.shards import MDSWriter
from fastross.data.stream import Position

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: devtools/ is never installed
from devtools import results as R  # noqa: E402

GRID, CHANNELS, IMAGE_TOKEN = 27, 16, 151646
DEMAND = 44.0  # samples/s per rank the sleeping consumer implies
SIGLIP_384 = ImageSpec(384, 384, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 1 / 255, 3)


def photos() -> list[np.ndarray]:
    from skimage import data

    return [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]


def jpeg(rng: np.random.Generator, sources: list[np.ndarray]) -> bytes:
    """A 640x480 JPEG: a random crop of a photo, resized, flipped at random."""
    a = sources[rng.integers(len(sources))]
    h, w = a.shape[:2]
    ch, cw = int(h * rng.uniform(0.6, 1)), int(w * rng.uniform(0.6, 1))
    y, x = rng.integers(h - ch + 1), rng.integers(w - cw + 1)
    img = Image.fromarray(a[y : y + ch, x : x + cw]).resize((640, 480), Image.BICUBIC)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_shards(out: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    sources, side, lengths = photos(), 2 * GRID, []
    # Pools reused across samples: writing stays quick, and every sample is still decoded on its own.
    jpegs = [jpeg(rng, sources) for _ in range(64)]
    moments = [rng.standard_normal((2, CHANNELS, side, side), dtype=np.float32) for _ in range(16)]
    with MDSWriter(out, COLUMNS, size_limit=1 << 26, hashes=[SHARD_HASH]) as w:
        for i in range(n):
            text = int(rng.integers(100, 401))
            ids = rng.integers(0, 150000, text).astype(np.int32)
            ids[int(rng.integers(0, 20))] = IMAGE_TOKEN
            labels = np.where(np.arange(text) > text // 2, ids, -100).astype(np.int32)
            m = moments[i % len(moments)]
            w.write(
                {
                    "id": f"bench_{i}",
                    "index": i,
                    "input_ids": ids,
                    "labels": labels,
                    "image": jpegs[i % len(jpegs)],
                    "length": text - 1 + GRID * GRID,
                    "latent_mean": m[0].tobytes(),
                    "latent_std": np.abs(m[1]).tobytes(),
                }
            )
            lengths.append(text - 1 + GRID * GRID)
    np.save(out / LENGTHS_FILE, np.asarray(lengths, dtype=np.int32))
    (out / META_FILE).write_text(
        json.dumps(
            {
                "template": "qwen2_ross",
                "image_aspect": "pad",
                "grid": GRID,
                "num_visual_tokens": GRID * GRID,
                "image_token_id": IMAGE_TOKEN,
                "latents": True,
                "latent_channels": CHANNELS,
                "latent_dtype": "float32",
                "latent_shift": 0.1159,
                "latent_scale": 0.3611,
                "tokenizer": "none: random ids (the trainer would refuse these)",
                "tokenizer_fingerprint": {},
                "read": n,
                "written": n,
                "skipped": {},
            }
        )
    )
    write_manifest(out)  # as the converter does: the loader verifies the folder against it


def run(shards: Path, n: int, workers: int, backend: str, sleep: bool, batch: int) -> dict:
    """Drain the loader over all samples once; returns samples/s and the waiting share, first step apart."""
    cfg = DataConfig(
        shards=str(shards),
        global_batch=batch,
        max_tokens=16384,
        shuffle=True,
        seed=0,
        workers=workers,
        prefetch=2,
        image_backend=backend,
    )
    ld = Loader(
        cfg,
        rank=0,
        world=1,
        attn_tokens=32768.0,
        image=SIGLIP_384,
        latent_channels=CHANNELS,
        replicas=4,
        seed=0,
        device=torch.device("cpu"),
    )
    it = ld.steps(Position(), 0, n // batch)
    t0 = time.perf_counter()
    first = next(it)
    first_s = time.perf_counter() - t0
    if sleep:
        time.sleep(sum(mb.num_images for mb in first.micro_batches) / DEMAND)
    t1 = time.perf_counter()  # the figures start once the first step is done
    samples, waited, start = 0, 0.0, t1
    for step in it:
        t = time.perf_counter()
        waited += t - start
        k = sum(mb.num_images for mb in step.micro_batches)  # every sample has one image here
        samples += k
        if sleep:
            time.sleep(k / DEMAND)  # the "GPU step"
        start = time.perf_counter()
    wall = time.perf_counter() - t1
    return {"samples_per_s": samples / wall, "data_wait": waited / wall, "first_step_s": first_s}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--workers", type=int, default=2, help="W for samples_per_s and data_wait")
    p.add_argument("--backend", default="pil", choices=("pil", "torchvision"), help="data.image_backend")
    p.add_argument("--batch", type=int, default=16, help="samples per step on this rank")
    p.add_argument("--save", action="store_true", help="append a row to benchmarks/results/loader.csv")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="fastross-bench-loader-") as tmp:
        shards = Path(tmp) / "shards"
        t = time.perf_counter()
        write_shards(shards, a.samples, seed=0)
        print(f"wrote {a.samples} samples (640x480 JPEG, 16x54x54 moments) in {time.perf_counter() - t:.1f} s")
        one = run(shards, a.samples, 1, a.backend, sleep=False, batch=a.batch)
        many = run(shards, a.samples, a.workers, a.backend, sleep=False, batch=a.batch)
        fed = run(shards, a.samples, a.workers, a.backend, sleep=True, batch=a.batch)
    print(f"{'run':<28} {'samples/s':>10} {'data_wait':>10} {'first step s':>13}")
    for name, r in (
        ("1 worker, draining", one),
        (f"{a.workers} workers, draining", many),
        (f"{a.workers} workers, {DEMAND:.0f}/s consumer", fed),
    ):
        print(f"{name:<28} {r['samples_per_s']:>10.1f} {r['data_wait']:>10.4f} {r['first_step_s']:>13.2f}")
    s, pw, d = many["samples_per_s"], one["samples_per_s"], fed["data_wait"]
    print(f"loader: samples_per_s {s:.1f} per_worker {pw:.1f} workers {a.workers} data_wait {d:.4f}")
    if a.save:
        out = R.append_csv(
            "loader.csv",
            ["date", "commit", "machine", "backend", "samples", "samples_per_s", "per_worker", "workers", "data_wait"],
            [
                [
                    R.today(),
                    R.commit(),
                    R.machine(),
                    a.backend,
                    a.samples,
                    f"{s:.1f}",
                    f"{pw:.1f}",
                    a.workers,
                    f"{d:.4f}",
                ]
            ],
        )
        print(f"appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
