"""Conversion throughput: records/s of `python -m fastross.data.convert`, with and without the VAE.

    python benchmarks/convert.py [--records 200] [--vae-batch 16] [--device cpu|cuda] [--save]

Builds the tiny test models (fastross.demo.make_tiny: 64 px SigLIP, the real Qwen2 vocabulary, a
FLUX-like 16-channel VAE) and the synthetic stage-2 set (fastross.data.synth, `--records` records,
each with a 64 px PNG) in a temporary folder, then converts it with the qwen2_ross template twice:
without `--vae` (tokenise, decode, check) and with it (plus the VAE's latent moments). Reports
records/s of each, timed around the converter's `main` (the models' loading included, as a user
sees it). Prints `convert: records R no_vae X rec/s vae Y rec/s`; --save appends a row (date, commit,
machine) to benchmarks/results/convert.csv. Nothing else is written outside the temporary folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from fastross.data.convert import main as convert
from fastross.data.synth import write_dataset
from fastross.demo import convert_args
from fastross.demo.make_tiny import make_tiny

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: devtools/ is never installed
from devtools import results as R  # noqa: E402


def timed_convert(models: Path, data: Path, out: Path, extra: list[str]) -> float:
    """Seconds one conversion of data/stage2.json takes."""
    argv = convert_args(models, data / "stage2.json", data / "images", out, "qwen2_ross", *extra, vae=False)
    start = time.perf_counter()
    if convert(argv) != 0:
        raise RuntimeError(f"benchmark: the conversion {' '.join(argv)} failed")
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=200, help="records of the synthetic stage-2 set")
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--device", default=None, help="the converter's --device (its default when not given)")
    p.add_argument("--save", action="store_true", help="append a row to benchmarks/results/convert.csv")
    a = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="fastross-bench-convert-"))
    try:
        models = make_tiny(work / "models")
        write_dataset(work / "synth", n_train=a.records, n_eval=1)
        records = len(json.loads((work / "synth" / "stage2.json").read_text()))
        device = ["--device", a.device] if a.device else []
        plain = timed_convert(models, work / "synth", work / "plain", device)
        vae = timed_convert(
            models,
            work / "synth",
            work / "vae",
            ["--vae", str(models / "vae"), "--vae-batch", str(a.vae_batch), *device],
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    no_vae_rate, vae_rate = records / plain, records / vae
    print(
        f"convert: records {records} no_vae {no_vae_rate:.1f} rec/s vae {vae_rate:.1f} rec/s "
        f"(vae_batch {a.vae_batch}, device {a.device or 'default'})"
    )
    if a.save:
        out = R.append_csv(
            "convert.csv",
            ["date", "commit", "machine", "records", "vae_batch", "device", "no_vae_rec_per_s", "vae_rec_per_s"],
            [
                [
                    R.today(),
                    R.commit(),
                    R.machine(),
                    records,
                    a.vae_batch,
                    a.device or "default",
                    f"{no_vae_rate:.1f}",
                    f"{vae_rate:.1f}",
                ]
            ],
        )
        print(f"convert: appended a row to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
