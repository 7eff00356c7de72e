"""The text loss, plain against fused: time and peak memory of forward + backward, side by side.

    python benchmarks/text_loss.py [--rows K] [--hidden H] [--vocab V] [--repeats N] [--save]

Runs fastross/model/text_loss.py's two modules on the same (K, H) hidden states, (V, H) lm_head
weight and K targets (1 in 8 ignored): `plain` materialises the (K, V) logits and reduces them
with F.cross_entropy; `fused` (model.fused_ce) is Liger's fused linear cross-entropy on a GPU and
fastross's chunked torch version elsewhere. Both must give the same loss and gradients (checked
here, and in tests/test_step_levers.py).

On a GPU the defaults are the 7B recipe's: K = 8192 supervised tokens of a 16k micro-batch,
H = 3584, V = 152064, bf16; the peak is torch.cuda.max_memory_allocated above what the inputs
hold. On CPU the defaults are the tiny model's (H = 64, V = 152064, K = 128, fp32), the peak is
not measured (0), and a third row times Liger's kernel in Triton's interpreter: what fused CE
cost on CPU before it had a torch path.

Ends with `text_loss: fused_over_plain_time T fused_over_plain_peak M device D`;
--save appends a row to benchmarks/results/text_loss.csv.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import fastross.kernels  # noqa: F401  (without a GPU it sets TRITON_INTERPRET before Liger imports Triton)
import torch

from fastross.model.text_loss import FusedLinearCrossEntropy, LinearCrossEntropy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: devtools/ is never installed
from devtools import results as R  # noqa: E402


def run(module, hidden, weight, targets, repeats: int, cuda: bool) -> dict:
    """Median seconds and peak bytes (CUDA) of forward + backward; the loss and gradients of the last repeat."""
    times, peak = [], 0
    for _ in range(repeats + 1):  # the first is a warm-up (Triton compiles or interprets it the same)
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t = time.perf_counter()
        loss = module(h, w, None, targets)
        (loss / len(targets)).backward()  # as in training, the summed loss is divided before backward
        if cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        times.append(time.perf_counter() - t)
    return {"s": statistics.median(times[1:]), "peak": peak, "loss": loss.detach(), "dh": h.grad, "dw": w.grad}


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=8192 if cuda else 128, help="K, supervised tokens")
    p.add_argument("--hidden", type=int, default=3584 if cuda else 64)
    p.add_argument("--vocab", type=int, default=152064)
    p.add_argument("--repeats", type=int, default=5 if cuda else 1)
    p.add_argument("--save", action="store_true", help="append a row to benchmarks/results/text_loss.csv")
    a = p.parse_args(argv)
    dev, dtype = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(a.rows, a.hidden, generator=g).to(dev, dtype)
    weight = (torch.randn(a.vocab, a.hidden, generator=g) * a.hidden**-0.5).to(dev, dtype)
    targets = torch.randint(0, a.vocab, (a.rows,), generator=g)
    targets[::8] = -100
    targets = targets.to(dev)
    device = R.machine()
    print(f"text loss: K {a.rows} H {a.hidden} V {a.vocab} {str(dtype).removeprefix('torch.')} on {device}")
    res = {}
    modules = [
        ("plain", LinearCrossEntropy()),
        ("fused", FusedLinearCrossEntropy()),
    ]  # fused: Liger on CUDA, torch here
    if not cuda:  # what model.fused_ce cost on CPU before the torch path: Liger's kernel, interpreted
        modules.append(("liger", FusedLinearCrossEntropy("liger")))
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-4  # bf16 logits vs fp32 accumulation in the fused chunks
    for name, module in modules:
        res[name] = r = run(module, hidden, weight, targets, a.repeats, cuda)
        print(
            f"  {name:<6} {r['s'] * 1e3:10.1f} ms   peak {r['peak'] / 2**20:9.1f} MiB   loss {r['loss'].item():.6g}",
            flush=True,
        )
        if name == "plain":
            continue
        pl = res["plain"]
        rel = {
            k: ((r[k].float() - pl[k].float()).abs().max() / pl[k].float().abs().max().clamp_min(1e-30)).item()
            for k in ("loss", "dh", "dw")
        }
        print(
            f"  {name} vs plain, largest difference relative to the largest value: "
            + ", ".join(f"{k} {v:.1e}" for k, v in rel.items())
        )
        if max(rel.values()) > tol:
            print(f"text_loss: error: {name} and plain differ beyond {tol:.0e}", file=sys.stderr)
            return 1
    pl, fu = res["plain"], res["fused"]
    if "liger" in res:
        print(f"  liger (interpreted) over plain: {res['liger']['s'] / pl['s']:.1f}x the time")
    t_ratio = fu["s"] / pl["s"]
    m_ratio = fu["peak"] / pl["peak"] if pl["peak"] else 0.0
    print(f"text_loss: fused_over_plain_time {t_ratio:.2f} fused_over_plain_peak {m_ratio:.3f} device {device}")
    if a.save:
        out = R.append_csv(
            "text_loss.csv",
            [
                "date",
                "commit",
                "device",
                "rows",
                "hidden",
                "vocab",
                "dtype",
                "plain_ms",
                "fused_ms",
                "plain_peak_mib",
                "fused_peak_mib",
                "time_ratio",
                "peak_ratio",
            ],
            [
                [
                    R.today(),
                    R.commit(),
                    device,
                    a.rows,
                    a.hidden,
                    a.vocab,
                    str(dtype).removeprefix("torch."),
                    f"{pl['s'] * 1e3:.1f}",
                    f"{fu['s'] * 1e3:.1f}",
                    f"{pl['peak'] / 2**20:.1f}",
                    f"{fu['peak'] / 2**20:.1f}",
                    f"{t_ratio:.3f}",
                    f"{m_ratio:.4f}",
                ]
            ],
        )
        print(f"appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
