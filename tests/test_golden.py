"""Every switch combination that runs on CPU trains the model of the golden file (tests/golden/tiny_losses.json).

The file holds configs/tiny.yaml's first 20 losses on 2 CPU ranks, written by `python -m devtools.golden
--write`. Each variant below trains the same recipe with switches flipped and must reproduce those losses within
the tolerance its switches justify. A lever that changes the model, not only its speed, fails here.

Not here, because they do not run on CPU: model.liger_kernels (Liger's RMSNorm and SwiGLU fail in Triton's
interpreter; tests/test_liger.py and the GPU check), the flash and varlen attention backends (GPU only).
model.denoiser.dtype=bf16 changes the arithmetic by design (benchmarks/denoiser_precision.py measures it).
"""

import pytest

from devtools import golden

pytestmark = pytest.mark.slow

# Levers that run on CPU, flipped from the recipe (full checkpointing, 2 loader workers, synchronous saves).
CHEAP = ["train.activation_checkpointing=[none, selective]", "data.workers=0", "train.async_checkpoint=true"]
# The levers that make the 7B step fast, on together (docs/training.md, "The 7B step: levers"): compile,
# fused CE and per-layer checkpointing, with the recipe's 2 loader workers.
FAST = ["train.compile=true", "model.fused_ce=true", "train.activation_checkpointing=[full, selective]"]

VARIANTS = {  # name: (overrides, tolerance, steps)
    # The recipe again: the same code on the same kind of machine is deterministic (fixed reduction orders, keyed
    # noise), seen exactly 0; 1e-6 leaves room for another CPU's vector width changing fp32 summation order.
    "recipe": ([], 1e-6, golden.STEPS),
    # Recomputation, the loader's workers and asynchronous saves change nothing in fp32 (bit-identical:
    # test_step_levers, test_loader, test_checkpoint); seen exactly 0, the same bound as the recipe.
    "levers": (CHEAP, 1e-6, golden.STEPS),
    # Every lever that runs on CPU at once: Inductor fuses and reorders fp32 arithmetic, and fused CE sums the logits
    # in chunks: rounding, which AdamW at lr 1e-3 carries into the weights (test_compile.py holds compile alone to
    # 1e-5); the Triton denoiser and asynchronous saves add none (seen 7.9e-8 over 3 steps with them, 1.8e-7 over 8
    # without). The first 5 steps only (train.stop_after keeps the 20-step schedule): the kernels and the fused CE
    # run in Triton's interpreter, and all 20 steps made this the suite's slowest test. All 20:
    # python -m devtools.golden train.compile=true model.fused_ce=true model.denoiser.impl=triton ...
    "all": (FAST + ["model.denoiser.impl=triton", "train.async_checkpoint=true"], 1e-5, 5),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_reproduces_the_golden_losses(variant, tiny_models, stage2_shards, tmp_path):
    overrides, tol, steps = VARIANTS[variant]
    got = golden.losses(golden.train(tiny_models, stage2_shards, tmp_path / "run", overrides, steps=steps))
    want = golden.read()["losses"][:steps]
    assert len(got) == steps
    worst = max(max(d["text_loss"], d["recon_loss"]) for d in golden.deviation(got, want))
    assert worst <= tol, (variant, worst, got, want)
    # and the recipe learns: the golden curve itself falls (a broken golden file would not)
    if variant == "recipe":
        assert (
            want[-1]["text_loss"] < 0.9 * want[0]["text_loss"] and want[-1]["recon_loss"] < 0.95 * want[0]["recon_loss"]
        )
