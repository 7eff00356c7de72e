"""End-to-end training under torchrun on CPU (gloo): rank equivalence and exact crash-resume.

About 1 run in 20 of torchrun on gloo aborts at interpreter exit after all work finished
(CPU_AND_GPU.md), so these tests judge a run by what it wrote (metrics, checkpoints and its
final log line), not by its exit code.
"""

import subprocess
import time
from pathlib import Path

import pytest
import torch

from devtools.faults import descendants, kill_tree, metrics, write_config  # noqa: F401  (shared)
from fastross.demo import torchrun_cmd

pytestmark = pytest.mark.slow

# The session's shared runs (tests/conftest.py's four_steps_1rank, four_steps_2ranks and nine_steps_2ranks) and the
# runs compared with them: the same recipe, so they train the same numbers.
FOUR_STEPS = dict(max_steps=4, ckpt_every=2)
NINE_STEPS = dict(max_steps=9, ckpt_every=3, keep_checkpoints=2)
# four_steps_1rank also logs to TensorBoard and profiles step 3, for tests/test_metrics.py; neither changes a number
# (the stop-and-restart test below compares that run with runs that do neither, bit for bit).
TELEMETRY = dict(loggers=["tensorboard"], profile={"wait": 1, "warmup": 1, "active": 1})


def run(nproc: int, config: Path, *overrides: str) -> str:
    p = subprocess.run(torchrun_cmd(nproc, config, *overrides), capture_output=True, text=True, timeout=600)
    out = p.stdout + p.stderr
    assert "train: done" in out, out[-4000:]
    return out


def final_weights(run_dir: Path, tmp: Path, checkpoint: str | None = None) -> dict:
    """The model weights of run_dir's newest checkpoint, or of the one named (`step_00000002`)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from fastross.checkpoint import resolve

    out = tmp / f"{run_dir.parent.name}_{run_dir.name}.pt"
    dcp_to_torch_save(str(run_dir / "checkpoints" / checkpoint if checkpoint else resolve(run_dir)), str(out))
    return torch.load(out, weights_only=False)["model"]


def test_two_ranks_match_one_rank(tiny_models, skewed_shards, four_steps_2ranks, tmp_path):
    """The same global batches on 1 rank unpacked-in-one vs 2 ranks in small packed micro-batches (the session's
    four_steps_2ranks): the first 2 of 4 steps (train.stop_after=2 keeps the 4-step schedule) and the weights of
    the step-2 checkpoints."""
    runs = {1: tmp_path / "run1", 2: four_steps_2ranks}
    run(
        1,
        write_config(tmp_path / "c1.yaml", tiny_models, skewed_shards, runs[1], **FOUR_STEPS),
        "data.max_tokens=100000",
        "train.stop_after=2",
    )
    m1, m2 = metrics(runs[1]), metrics(runs[2])[:2]
    assert [m["step"] for m in m1] == [m["step"] for m in m2] == [1, 2]
    # Step 1 sees identical weights: fp32 tolerance. Step 2 sees weights after one Adam step,
    # which turns gradient rounding on near-zero-gradient elements into O(lr) differences
    # (see below), so its losses agree to 1e-4.
    for a, b, rel in zip(m1, m2, (1e-5, 1e-4)):
        assert a["text_tokens"] == b["text_tokens"] and a["images"] == b["images"]
        for key in ("text_loss", "recon_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=rel), (a["step"], key)
    assert m1[0]["micro_batches"] == 1 and m2[0]["micro_batches"] > 2  # packed differently
    w1, w2 = (final_weights(runs[n], tmp_path, "step_00000002") for n in (1, 2))
    assert w1.keys() == w2.keys()
    # Adam divides by sqrt(v): on elements whose gradient is ~0, fp32 rounding of the gradient
    # (summed in another order on 2 ranks) can move the update by up to lr. So compare the
    # LLM's updates as vectors, against where they started: they must agree to 1e-3 of their size.
    init = final_weights_at_start(tiny_models)
    num = den = 0.0
    for k in init:
        num += (w1[k] - w2[k]).double().pow(2).sum().item()
        den += (w1[k] - init[k]).double().pow(2).sum().item()
    assert den > 0  # the steps really updated the LLM
    assert num**0.5 <= 1e-3 * den**0.5, (num**0.5, den**0.5)
    for k in w1:  # and no element anywhere differs by more than the two steps' lr allows
        assert (w1[k] - w2[k]).abs().max().item() <= 2 * 1e-3, k


def final_weights_at_start(models: Path) -> dict:
    from safetensors.torch import load_file

    return {
        "llm." + k: v for k, v in load_file(models / "llm" / "model.safetensors").items() if not k.startswith("lm_head")
    }  # tied to the embedding


def test_sigkill_and_resume_is_exact(tiny_models, skewed_shards, nine_steps_2ranks, tmp_path):
    """2 ranks on data of very unequal lengths (ranks read different numbers of samples); the uninterrupted
    reference is the session's nine_steps_2ranks."""
    ref_dir = nine_steps_2ranks
    rd = tmp_path / "killed"
    cfg = write_config(tmp_path / "killed.yaml", tiny_models, skewed_shards, rd, **NINE_STEPS)
    proc = subprocess.Popen(
        torchrun_cmd(2, cfg), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    latest = rd / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    kill_tree(proc)  # torchrun and its workers (own sessions), mid-run
    killed_at = int((rd / "checkpoints" / latest.read_text().strip()).name.split("_")[1])
    assert killed_at < 9, "the run finished before it could be killed: the test proved nothing"

    out = run(2, cfg)
    assert "resumed from" in out and f"at step {killed_at}" in out
    ref, got = metrics(ref_dir), metrics(rd)
    assert [m["step"] for m in got] == list(range(1, 10))
    for a, b in zip(ref, got):
        for key in ("text_loss", "recon_loss", "grad_norm", "lr", "text_tokens", "images"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])  # bit for bit
    w_ref, w_got = final_weights(ref_dir, tmp_path), final_weights(rd, tmp_path)
    for k in w_ref:
        assert torch.equal(w_ref[k], w_got[k]), k


def test_stop_after_ends_early_and_the_restart_follows_the_full_schedule(
    tiny_models, skewed_shards, four_steps_1rank, tmp_path
):
    """train.stop_after=2 of 4 steps: checkpointed at step 2 with the 4-step learning-rate schedule; started again,
    the run finishes exactly as an uninterrupted one (the session's four_steps_1rank; bit for bit, on 1 rank).
    Checkpoints every 10 steps, so the step-2 checkpoint can only be stop_after's."""
    ref_dir, rd = four_steps_1rank, tmp_path / "stopped"
    cfg = write_config(tmp_path / "stopped.yaml", tiny_models, skewed_shards, rd, max_steps=4, ckpt_every=10)
    out = run(1, cfg, "train.stop_after=2")
    assert "steps 0 -> 2" in out and [m["step"] for m in metrics(rd)] == [1, 2]
    assert (rd / "checkpoints" / "latest").read_text().strip().endswith("step_00000002")
    run(1, cfg)
    ref, got = metrics(ref_dir), metrics(rd)
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    assert len({m["lr"] for m in ref}) == 4  # the cosine schedule moves every step: a 2-step one would differ
    for a, b in zip(ref, got):
        for key in ("text_loss", "recon_loss", "grad_norm", "lr"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
    # every record carries MFU (against the CPU's measured matmul rate) and the recompute ratio of full checkpointing
    for m in ref + got:
        assert 0 < m["mfu"] < 1 and m["model_tflops_per_rank"] > 0 and 1.0 < m["recompute"] < 1.5, m
