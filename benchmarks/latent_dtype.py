"""What `--latent-dtype float16` changes in the reconstruction target, measured against float32 moments.

    python benchmarks/latent_dtype.py [--records 64] [--seed 0] [--vae DIR --vision DIR] [--save]

Converts the same records (the synthetic stage-2 set's images, 64 px, with the tiny FLUX-like VAE of
fastross.demo.make_tiny) twice through the converter, `--latent-dtype float32` and `float16`, reads
the stored moments back as training does (ShardMeta.decode_latent), and compares, image by image:

- mean:   the scaled mean target (mean - shift) * scale (the posterior's centre, what xi = 0 gives);
- sample: the sampled target latent_target(mean, std, xi) with the same keyed xi for both (key from
          noise_key(seed, step 0, the sample's index), as training draws it);
- loss:   the per-image eps loss of a tiny DiT denoiser (random weights, 1 block, width 32) on x_t built
          from each target with the same keyed eps and timesteps.

Prints max and mean |fp16 - fp32| and the same relative to the fp32 value's size (mean |d| / mean |ref|,
max |d| / RMS(ref)). The tiny VAE is random-initialised: its moments' range
(printed) is not a real FLUX VAE's, whose std can fall below float16's normal range (6.1e-5), where float16's
relative step grows. --vae and --vision compare a real VAE's moments instead (the
images are still the synthetic ones, resized by the tower's processor). --save appends a row to
benchmarks/results/latent_dtype.csv.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from fastross.data.convert import main as convert
from fastross.data.noise import draw_timesteps, noise_key
from fastross.data.schema import ShardMeta
from fastross.data.shards import MDSShards
from fastross.data.synth import write_dataset
from fastross.demo import convert_args
from fastross.demo.make_tiny import make_tiny
from fastross.model import diffusion
from fastross.model.denoiser import Denoiser

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: devtools/ is never installed
from devtools import results as R  # noqa: E402


def moments(
    models: Path, vae: str, vision: str, data: Path, out: Path, dtype: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, ShardMeta]:
    """Convert data/stage2.json with --latent-dtype `dtype`: (mean, std, sample indices) of its images, in fp32."""
    extra = ("--latent-dtype", dtype, "--device", "cpu")
    argv = convert_args(
        models, data / "stage2.json", data / "images", out, "qwen2_ross", *extra, vision=vision, vae=vae
    )
    if convert(argv) != 0:
        raise RuntimeError(f"benchmark: converting with --latent-dtype {dtype} failed")
    meta, shards = ShardMeta.read(out), MDSShards(out)
    samples = [s for s in (shards.read(i) for i in range(len(shards))) if s["latent_mean"]]
    mean = torch.from_numpy(np.stack([meta.decode_latent(s["latent_mean"]) for s in samples]))
    std = torch.from_numpy(np.stack([meta.decode_latent(s["latent_std"]) for s in samples]))
    return mean, std, torch.tensor([s["index"] for s in samples]), meta


def compare(name: str, ref: torch.Tensor, half: torch.Tensor) -> dict:
    """The differences' size, absolute and relative to the fp32 value's (relative to its RMS for the maximum: an
    element-wise ratio is unbounded where the target crosses 0)."""
    d, a = (half - ref).abs().double(), ref.abs().double()
    return {
        "what": name,
        "max_abs": d.max().item(),
        "mean_abs": d.mean().item(),
        "mean_rel": (d.mean() / a.mean()).item(),
        "max_rel": (d.max() / a.pow(2).mean().sqrt()).item(),
    }


def tiny_denoiser(grid: int, channels: int, seed: int) -> Denoiser:
    """A 1-block DiT with every weight drawn at random (adaLN-Zero's zero init would predict 0 whatever x_t)."""
    torch.manual_seed(seed)
    den = Denoiser("dit", cond_width=32, width=32, depth=1, heads=4, grid=grid, channels=4 * channels)
    with torch.no_grad():
        for p in den.parameters():
            p.normal_(0, 0.2)
    return den.eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=64, help="records of the synthetic stage-2 set")
    p.add_argument("--seed", type=int, default=0, help="the run seed keying xi, eps and timesteps")
    p.add_argument("--vae", default=None, help="an AutoencoderKL folder (default: the tiny one)")
    p.add_argument("--vision", default=None, help="the vision tower's folder, for its grid (default: the tiny one)")
    p.add_argument("--save", action="store_true", help="append rows to benchmarks/results/latent_dtype.csv")
    a = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="fastross-bench-latent-dtype-"))
    try:
        models = make_tiny(work / "models")
        write_dataset(work / "synth", n_train=a.records, n_eval=1)
        vae, vision = a.vae or str(models / "vae"), a.vision or str(models / "vision")
        mean32, std32, index, meta = moments(models, vae, vision, work / "synth", work / "fp32", "float32")
        mean16, std16, index16, _ = moments(models, vae, vision, work / "synth", work / "fp16", "float16")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert torch.equal(index, index16), "the two conversions wrote different samples"
    n, c, side, _ = mean32.shape
    tokens, shift, scale = (side // 2) ** 2, meta.latent_shift, meta.latent_scale
    keys = torch.tensor([noise_key(a.seed, 0, int(i)) for i in index], dtype=torch.long)
    xi = diffusion.keyed_xi(keys, tokens, 4 * c)
    zero = torch.zeros_like(xi)
    rows = [
        compare(
            "mean", *(diffusion.latent_target(m, s, zero, shift, scale) for m, s in ((mean32, std32), (mean16, std16)))
        ),
        compare(
            "sample", *(diffusion.latent_target(m, s, xi, shift, scale) for m, s in ((mean32, std32), (mean16, std16)))
        ),
    ]
    den, t = tiny_denoiser(side // 2, c, a.seed), draw_timesteps(keys, 4)
    ab = diffusion.cosine_alphas_cumprod().float()
    cond = torch.nn.functional.layer_norm(
        torch.randn(n, tokens, 32, generator=torch.Generator().manual_seed(a.seed)), (32,)
    )
    with torch.no_grad():
        losses = [
            diffusion.eps_loss_materialised(den, m, s, keys, t, ab[t].sqrt(), (1 - ab[t]).sqrt(), cond, shift, scale)
            for m, s in ((mean32, std32), (mean16, std16))
        ]
    rows.append(compare("loss", *losses))
    print(
        f"latent_dtype: {n} images, moments {c}x{side}x{side}; "
        f"fp32 mean in [{mean32.min():.3g}, {mean32.max():.3g}], "
        f"std in [{std32.min():.3g}, {std32.max():.3g}]; per-image loss {losses[0].mean():.4f} (fp32)"
    )
    print(f"{'target':<8} {'max |d|':>10} {'mean |d|':>10} {'mean rel':>10} {'max/RMS':>10}")
    for r in rows:
        print(f"{r['what']:<8}", *(f"{r[k]:>10.3g}" for k in ("max_abs", "mean_abs", "mean_rel", "max_rel")))
    if a.save:
        out = R.append_csv(
            "latent_dtype.csv",
            ["date", "commit", "machine", "images", "target", "max_abs", "mean_abs", "mean_rel", "max_over_rms"],
            [
                [R.today(), R.commit(), R.machine(), n, r["what"]]
                + [f"{r[k]:.4g}" for k in ("max_abs", "mean_abs", "mean_rel", "max_rel")]
                for r in rows
            ],
        )
        print(f"latent_dtype: appended {len(rows)} rows to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
