"""Faults around a run: untrusted files, corrupt checkpoints, full disks, non-finite steps, the run-folder lock.

The in-process tests run the Checkpointer in a gloo world of one (tests/test_checkpoint.py's fixture); the
torchrun tests judge runs by what they wrote (see tests/test_train.py's header).
"""

import errno
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import filesystem

from fastross import checkpoint
from fastross.checkpoint import Checkpointer, CheckpointError
from test_checkpoint import tiny_trained, world_of_one  # noqa: F401  (a fixture)


class _RunsCode:
    """Unpickling this calls exec(): what a crafted `.metadata` or `rng_rank0.pt` could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def saved(tmp_path: Path, steps=(1,), keep: int = 5) -> tuple[Checkpointer, torch.nn.Module, torch.optim.Optimizer]:
    model, opt = tiny_trained(0)
    ck = Checkpointer(tmp_path / "run", rank=0, keep=keep)
    for s in steps:
        with torch.no_grad():
            model[0].weight.add_(s)
        ck.save(s, model, opt, {"step": s}, f"step: {s}\n")
    return ck, model, opt


# ---------------------------------------------------------------- nothing is unpickled


@pytest.mark.parametrize("name", [".metadata", "rng_rank0.pt"])
def test_crafted_checkpoint_file_is_refused_and_runs_no_code(world_of_one, tmp_path, name):
    """The payload sits in a checkpoint whose manifest was rewritten to match: integrity is not authorship."""
    ck, model, opt = saved(tmp_path)
    ckpt, marker = ck.root / "step_00000001", tmp_path / "code_ran"
    with open(ckpt / name, "wb") as f:
        if name == ".metadata":
            pickle.dump(_RunsCode(marker), f)
        else:
            torch.save({"torch": _RunsCode(marker)}, f)
    checkpoint.write_manifest(ckpt)
    assert ck.latest() == ckpt  # it verifies
    other, other_opt = tiny_trained(1)
    with pytest.raises((CheckpointError, pickle.UnpicklingError), match=f"{name}: refused to load"):
        ck.load(ckpt, other, other_opt)
    if name == ".metadata":  # model.init_from and fastross.export read a checkpoint's metadata the same way
        with pytest.raises(CheckpointError, match="refused to load"):
            checkpoint.load_model_weights(tmp_path / "run", other)
    assert not marker.exists()
    pickle.loads(pickle.dumps(_RunsCode(marker)))  # the payload is real: a plain unpickle runs it
    assert marker.read_text() == "pwned"


def test_genuine_metadata_passes_the_restricted_unpickler(world_of_one, tmp_path):
    ck, model, opt = saved(tmp_path)
    md = checkpoint.read_metadata(ck.root / "step_00000001" / ".metadata")
    assert "model.0.weight" in md.state_dict_metadata
    other, other_opt = tiny_trained(1)
    assert ck.load(ck.latest(), other, other_opt) == {"step": 1}
    assert torch.equal(other[0].weight, model[0].weight)


def test_init_from_a_pickle_file_is_refused_with_how_to_convert(world_of_one, tmp_path):
    model, _ = tiny_trained(0)
    pt = tmp_path / "weights.pt"
    torch.save(model.state_dict(), pt)
    with pytest.raises(ValueError, match="never a pickle.*safetensors"):
        checkpoint.load_model_weights(pt, model)


# ---------------------------------------------------------------- manifests: corrupt, incomplete, `latest`


def flip_bytes(path: Path, n: int = 64, seed: int = 0) -> None:
    data = bytearray(path.read_bytes())
    g = torch.Generator().manual_seed(seed)
    for i in torch.randperm(len(data), generator=g)[:n].tolist():
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_distcp_bytes_fall_back_to_the_previous_checkpoint(world_of_one, tmp_path, capsys):
    ck, model, opt = saved(tmp_path, steps=(1, 2))
    newest = ck.root / "step_00000002"
    assert checkpoint.verify(newest) is None and (ck.root / "latest").read_text() == "step_00000002"
    (distcp,) = newest.glob("*.distcp")
    flip_bytes(distcp)
    assert checkpoint.verify(newest) == f"{distcp} does not match its hash in {newest / 'manifest.json'} (1 file(s) differ)"
    assert ck.latest() == ck.root / "step_00000001"
    out = capsys.readouterr().out
    assert f"skipping step_00000002: {distcp} does not match" in out
    assert "resuming from step_00000001, the newest verified checkpoint" in out
    other, other_opt = tiny_trained(1)
    assert ck.load(ck.latest(), other, other_opt) == {"step": 1}

    flip_bytes(next((ck.root / "step_00000001").glob("*.distcp")))  # none verifies now: an error, not step 0
    with pytest.raises(CheckpointError, match="2 checkpoint\\(s\\) and none verifies"):
        ck.latest()


def test_incomplete_checkpoint_and_latest_as_a_hint(world_of_one, tmp_path, capsys):
    ck, model, opt = saved(tmp_path, steps=(1, 2, 3))
    (ck.root / "step_00000003" / "manifest.json").unlink()  # as if the save died before its manifest
    (ck.root / "latest").write_text("step_00000001")  # a stale hint
    assert ck.latest() == ck.root / "step_00000002"
    out = capsys.readouterr().out
    assert "skipping step_00000003" in out and "manifest.json is missing" in out

    (ck.root / "step_00000002" / "trainer.json").unlink()  # a file listed in the manifest is gone
    assert ck.latest() == ck.root / "step_00000001"
    assert "trainer.json is missing" in capsys.readouterr().out

    for d in ck.root.glob("step_*"):  # `latest` names a folder that is not there, nothing else is
        shutil.rmtree(d)
    with pytest.raises(CheckpointError, match="names step_00000001, but .* holds no checkpoint folder"):
        ck.latest()


# ---------------------------------------------------------------- a full disk during a save


def test_disk_full_during_dcp_write_names_the_folder_and_keeps_the_previous(world_of_one, tmp_path, monkeypatch):
    ck, model, opt = saved(tmp_path)
    original = filesystem._FileSystemWriter.write_data

    def full(writer, plan, planner):
        if Path(writer.path).name == "step_00000002.tmp":
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(writer, plan, planner)

    monkeypatch.setattr(filesystem._FileSystemWriter, "write_data", full)
    with pytest.raises(CheckpointError, match=r"step_00000002\.tmp: DCP's write failed.*step_00000001 is intact"):
        ck.save(2, model, opt, {"step": 2}, "")
    assert ck.latest() == ck.root / "step_00000001"
    other, other_opt = tiny_trained(1)
    assert ck.load(ck.latest(), other, other_opt) == {"step": 1}


def test_disk_full_writing_small_files_names_the_folder_and_keeps_the_previous(world_of_one, tmp_path, monkeypatch):
    ck, model, opt = saved(tmp_path)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", full)
    with pytest.raises(CheckpointError, match=r"step_00000002\.tmp: writing the RNG state.*No space left.*"
                                              r"step_00000001 is intact"):
        ck.save(2, model, opt, {"step": 2}, "")
    monkeypatch.undo()
    assert ck.latest() == ck.root / "step_00000001"
    other, other_opt = tiny_trained(1)
    assert ck.load(ck.latest(), other, other_opt) == {"step": 1}
