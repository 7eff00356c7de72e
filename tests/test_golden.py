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
    # Inductor fuses and reorders fp32 arithmetic, and fused CE sums the logits in chunks: rounding, which AdamW at
    # lr 1e-3 carries into the weights; seen 1.8e-7 over the 20 steps (test_compile.py holds compile alone to 1e-5).
    # The first 8 steps only (train.stop_after keeps the 20-step schedule): the interpreted fused CE made all 20 the
    # suite's slowest test (207 s). All 20: python -m devtools.golden train.compile=true model.fused_ce=true ...
    "fast": (FAST, 1e-5, 8),
    # ... and the Triton denoiser and asynchronous saves as well, for the golden run's first 3 steps only (its
    # kernels run in Triton's interpreter; train.stop_after keeps the 20-step schedule): seen 7.9e-8.
    "all": (FAST + ["model.denoiser.impl=triton", "train.async_checkpoint=true"], 1e-5, 3),
}


@pytest.fixture(scope="module")
def golden_losses():
    return golden.read()["losses"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_reproduces_the_golden_losses(variant, tiny_models, stage2_shards, tmp_path, golden_losses):
    overrides, tol, steps = VARIANTS[variant]
    got = golden.losses(golden.train(tiny_models, stage2_shards, tmp_path / "run", overrides, steps=steps))
    want = golden_losses[:steps]
    assert len(got) == steps
    worst = max(max(d["text_loss"], d["recon_loss"]) for d in golden.deviation(got, want))
    assert worst <= tol, (variant, worst, got, want)
    # and the recipe learns: the golden curve itself falls (a broken golden file would not)
    if variant == "recipe":
        assert (
            want[-1]["text_loss"] < 0.9 * want[0]["text_loss"] and want[-1]["recon_loss"] < 0.95 * want[0]["recon_loss"]
        )
