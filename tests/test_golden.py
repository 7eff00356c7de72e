"""Every switch combination that runs on CPU trains the model of the golden file (tests/golden/tiny_losses.json).

The file holds configs/tiny.yaml's first 20 losses on 2 CPU ranks, written by `python -m fastross.tools.golden
--write`. Each variant below trains the same recipe with switches flipped and must reproduce those losses within
the tolerance its switches justify. A lever that changes the model, not only its speed, fails here.

Not here, because they do not run on CPU: model.liger_kernels (Liger's RMSNorm and SwiGLU fail in Triton's
interpreter; tests/test_liger.py and the GPU check), the flash and varlen attention backends (GPU only).
model.denoiser.dtype=bf16 changes the arithmetic by design (benchmarks/denoiser_precision.py measures it).
"""

import pytest

from fastross.tools import golden

pytestmark = pytest.mark.slow

LEVERS = ["train.compile=true", "train.activation_checkpointing=[full, selective]", "data.workers=2",
          "model.denoiser.impl=triton", "train.async_checkpoint=true"]

VARIANTS = {
    # The recipe again: the same code on the same machine kind is deterministic (fixed reduction orders, keyed
    # noise); 1e-6 leaves room for another CPU's vector width changing fp32 summation order.
    "recipe": ([], 1e-6),
    # Every lever off: recomputation changes nothing in fp32 (test_step_levers: bit-identical), nor do the
    # loader's workers (the same bytes in the same order); so the reference lands on the golden file as well.
    "reference": (["train.activation_checkpointing=none", "data.workers=0", "model.denoiser.impl=torch"], 1e-6),
    # Compile (Inductor fuses and reorders fp32 reductions, ~1e-7 relative per op) and the Triton denoiser
    # (kernels against their references: 1e-5 relative at worst, tests/kernels) perturb rounding; 20 Adam
    # steps at lr 1e-3 amplify such perturbations on near-zero gradients (Adam divides by sqrt(v)).
    "levers": (LEVERS, 2e-3),
    # Fused CE on top, 3 steps (the kernel is ~30x slower than plain CE in Triton's CPU interpreter). With
    # train.max_steps=3 the warm-up is still one step (ceil(0.03 * 3)) and the second step's learning rate is
    # cos(0) = 1 of the peak, as in the 20-step recipe: the first 3 losses are the golden ones.
    "levers+fused_ce": (LEVERS + ["model.fused_ce=true", "train.max_steps=3", "train.ckpt_every=3"], 1e-3),
}


@pytest.fixture(scope="module")
def golden_losses():
    return golden.read()["losses"]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_reproduces_the_golden_losses(variant, tiny_models, stage2_shards, tmp_path, golden_losses):
    overrides, tol = VARIANTS[variant]
    got = golden.losses(golden.train(tiny_models, stage2_shards, tmp_path / "run", overrides))
    want = golden_losses[: len(got)]
    assert len(got) == (3 if "train.max_steps=3" in overrides else golden.STEPS)
    worst = max(max(d["text_loss"], d["recon_loss"]) for d in golden.deviation(got, want))
    assert worst <= tol, (variant, worst, got, want)
    # and the recipe learns: the golden curve itself falls (a broken golden file would not)
    if variant == "recipe":
        assert want[-1]["text_loss"] < 0.8 * want[0]["text_loss"]
