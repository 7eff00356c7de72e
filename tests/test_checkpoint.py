"""Checkpoints: asynchronous saves keep every crash guarantee; RNG files are read as tensors only.

The in-process tests run the Checkpointer in a gloo world of one and hold a DCP write open
with a patched storage writer, so "the write is in flight" is a state, not a race. The
torchrun tests judge runs by what they wrote (see tests/test_train.py's header).
"""

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import filesystem

from devtools.faults import MEASURED, RunsCode, checkpoint_differences, kill_tree, read_checkpoint
from fastross import checkpoint
from fastross.checkpoint import Checkpointer, load_rng

TESTS = Path(__file__).parent


# ---------------------------------------------------------------- in-process, world of one (conftest.py's world_of_one)


def tiny_trained(seed: int, device: str = "cpu"):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 5, device=device)).square().sum().backward()
    opt.step()
    return model, opt


class HeldWrite:
    """Patches DCP's file writer so that the write of one checkpoint folder waits for `release`."""

    def __init__(self, monkeypatch, folder: str, fail: bool = False):
        self.folder, self.fail = folder, fail
        self.reached, self.release = threading.Event(), threading.Event()
        original = filesystem._FileSystemWriter.write_data

        def write_data(writer, plan, planner):
            if Path(writer.path).name == self.folder:
                self.reached.set()
                if self.fail:
                    raise OSError(28, "No space left on device (injected by the test)")
                assert self.release.wait(timeout=120), "the test never released the held write"
            return original(writer, plan, planner)

        monkeypatch.setattr(filesystem._FileSystemWriter, "write_data", write_data)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])  # cuda: pinned staging
def test_async_save_moves_latest_only_when_complete(world_of_one, tmp_path, monkeypatch, device):
    model, opt = tiny_trained(0, device)
    ck = Checkpointer(tmp_path / "run", rank=0, keep=1, async_save=True)
    ck.save(1, model, opt, {"step": 1}, "a: 1\n")
    ck.wait()
    assert ck.latest() == ck.root / "step_00000001"

    model(torch.randn(4, 5, device=device)).square().sum().backward()
    opt.step()
    expected = {k: v.cpu().clone() for k, v in model.state_dict().items()}
    expected_rng = torch.get_rng_state()
    held = HeldWrite(monkeypatch, "step_00000002.tmp")
    report = ck.save(2, model, opt, {"step": 2}, "a: 2\n")
    assert not held.release.is_set()  # save returned while its write cannot have finished
    assert held.reached.wait(timeout=60), "the background write never started"
    assert report.path == ck.root / "step_00000002" and report.blocked_s > 0

    # Training goes on and changes the weights in place, as the next optimizer steps do.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    torch.rand(100)
    # While the write is held: `latest` and the previous checkpoint are untouched and loadable.
    assert (ck.root / "latest").read_text() == "step_00000001"
    assert sorted(p.name for p in ck.root.iterdir()) == ["latest", "step_00000001", "step_00000002.tmp"]
    other, other_opt = tiny_trained(1, device)
    assert ck.load(ck.latest(), other, other_opt) == {"step": 1}

    held.release.set()
    assert ck.wait() >= 0
    assert (ck.root / "latest").read_text() == "step_00000002"
    assert sorted(p.name for p in ck.root.iterdir()) == ["latest", "step_00000002"]  # pruned only now (keep=1)
    got = read_checkpoint(ck.root / "step_00000002", tmp_path)
    for k, v in expected.items():  # the staged copy, not the weights changed after save() returned
        assert torch.equal(got["model"][k], v), k
    assert torch.equal(load_rng(ck.root / "step_00000002" / "rng_rank0.pt")["torch"], expected_rng)
    assert json.loads((ck.root / "step_00000002" / "trainer.json").read_text()) == {"step": 2}
    assert (ck.root / "step_00000002" / "config.yaml").read_text() == "a: 2\n"
    ck.close()


def test_failed_async_write_raises_and_keeps_previous(world_of_one, tmp_path, monkeypatch):
    model, opt = tiny_trained(0)
    ck = Checkpointer(tmp_path / "run", rank=0, keep=2, async_save=True)
    ck.save(1, model, opt, {"step": 1}, "")
    ck.wait()
    HeldWrite(monkeypatch, "step_00000002.tmp", fail=True)
    ck.save(2, model, opt, {"step": 2}, "")
    with pytest.raises(RuntimeError, match=r"step_00000002\.tmp failed to write.*step_00000001"):
        ck.wait()
    assert ck.latest() == ck.root / "step_00000001"
    assert not (ck.root / "step_00000002").exists()
    ck.close()


# ---------------------------------------------------------------- RNG files


def test_crafted_rng_file_is_refused(tmp_path):
    marker = tmp_path / "code_ran"
    crafted = tmp_path / "rng_rank0.pt"
    torch.save({"torch": RunsCode(marker)}, crafted)
    with pytest.raises(checkpoint.CheckpointError, match="rng_rank0.pt: refused to load"):
        load_rng(crafted)
    assert not marker.exists()
    torch.load(crafted, weights_only=False)  # the file really is dangerous: the old way ran it
    assert marker.read_text() == "pwned"

    genuine = tmp_path / "rng_rank1.pt"
    torch.manual_seed(3)
    torch.save(checkpoint.rng_state(), genuine)
    want = torch.rand(5)
    torch.manual_seed(4)
    checkpoint.set_rng_state(load_rng(genuine))
    assert torch.equal(torch.rand(5), want)


# ---------------------------------------------------------------- torchrun, 2 ranks

from test_train import NINE_STEPS as STEPS, metrics, run, torchrun_cmd, write_config  # noqa: E402

# The record's measured fields (fastross/metrics.py), which differ from run to run; the rest must match bit for bit.
TIMING = MEASURED


@pytest.fixture
def sync_run(nine_steps_2ranks) -> Path:
    """The synchronous-save run of STEPS on 2 ranks (the session's, shared with tests/test_train.py's SIGKILL test)."""
    return nine_steps_2ranks


def same_checkpoint(a: Path, b: Path, tmp: Path) -> None:
    assert not checkpoint_differences(a, b, tmp), (a, b)


@pytest.mark.slow
def test_async_run_equals_sync_run_and_logs_blocked_time(sync_run, tiny_models, skewed_shards, tmp_path):
    rd = tmp_path / "async"
    out = run(2, write_config(tmp_path / "a.yaml", tiny_models, skewed_shards, rd, async_checkpoint=True, **STEPS))
    ref, got = metrics(sync_run), metrics(rd)
    assert [m["step"] for m in got] == list(range(1, 10))
    for a, b in zip(ref, got):
        assert a.keys() == b.keys(), a["step"]
        for key in a.keys() - TIMING:
            assert a[key] == b[key], (a["step"], key)  # bit for bit
    for recs in (ref, got):  # the saves of steps 3 and 6 are reported on the next records
        assert [m["step"] for m in recs if "ckpt_blocked_s" in m] == [4, 7]
        assert all(m["ckpt_blocked_s"] > 0 for m in recs if "ckpt_blocked_s" in m)
    for n in (3, 6, 9):
        assert f"checkpoint step_{n:08d} staged (writing in the background); the step was blocked" in out
        assert f"checkpoint step_{n:08d} complete, written" in out
    assert out.index("checkpoint step_00000009 complete") < out.index("train: done")
    # Both runs keep the same two checkpoints, and they hold the same bits.
    for r in (sync_run, rd):
        assert sorted(p.name for p in (r / "checkpoints").iterdir()) == ["latest", "step_00000006", "step_00000009"]
    for n in (6, 9):
        same_checkpoint(sync_run / "checkpoints" / f"step_{n:08d}", rd / "checkpoints" / f"step_{n:08d}", tmp_path)


@pytest.mark.slow
def test_sigkill_during_async_write_resumes_from_previous(sync_run, tiny_models, skewed_shards, tmp_path):
    """Step 6's write is held (tests/_held_write_train.py) while training runs on; then SIGKILL."""
    rd, markers = tmp_path / "killed", tmp_path / "markers"
    markers.mkdir()
    cfg = write_config(tmp_path / "k.yaml", tiny_models, skewed_shards, rd, async_checkpoint=True, **STEPS)
    cmd = torchrun_cmd(2, cfg)
    cmd[cmd.index("-m", 3) : cmd.index("-m", 3) + 2] = [str(TESTS / "_held_write_train.py")]
    env = {**os.environ, "FASTROSS_TEST_HOLD_WRITE": "step_00000006.tmp", "FASTROSS_TEST_HOLD_MARKERS": str(markers)}
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)

    def logged_steps() -> list[int]:
        path = rd / "metrics.jsonl"
        return [m["step"] for m in metrics(rd)] if path.exists() else []

    deadline = time.time() + 300
    # Steps 7 and 8 are trained while step 6's write is held; step 9's save then waits for it.
    while 8 not in logged_steps() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    try:
        assert 8 in logged_steps(), (tmp_path / "killed.log").read_text()[-4000:]
        time.sleep(1.0)  # let step 9's save reach its wait for step 6
        assert sorted(p.name for p in markers.iterdir()) == ["held_rank0", "held_rank1"]
        ckpts = rd / "checkpoints"
        assert (ckpts / "latest").read_text() == "step_00000003"
        assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000003", "step_00000006.tmp"]
        assert json.loads((ckpts / "step_00000006.tmp" / "trainer.json").read_text())["step"] == 6
        assert proc.poll() is None  # still running: the held write never let the run finish
    finally:
        kill_tree(proc)
        log.close()

    out = run(2, cfg)  # plain fastross.train, nothing held
    assert "resumed from" in out and "at step 3" in out
    ref, got = metrics(sync_run), metrics(rd)
    assert [m["step"] for m in got] == list(range(1, 10))
    for a, b in zip(ref, got):
        for key in a.keys() - TIMING:
            assert a[key] == b[key], (a["step"], key)  # bit for bit
    assert sorted(p.name for p in (rd / "checkpoints").iterdir()) == ["latest", "step_00000006", "step_00000009"]
    for n in (6, 9):
        same_checkpoint(sync_run / "checkpoints" / f"step_{n:08d}", rd / "checkpoints" / f"step_{n:08d}", tmp_path)
