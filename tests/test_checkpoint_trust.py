"""Nothing a checkpoint holds runs, at any entry point; files fastross did not write are refused naming the file and
the key; a prune killed at any moment leaves a run that resumes from its newest complete checkpoint.

Each crafted checkpoint gets its manifest rewritten to match: the manifest proves integrity, not authorship, so the
attacker here controls every file of the folder. Each payload writes a marker file when unpickled; the tests check
that the payload is real (a plain unpickle runs it) and that no entry point ran it.
"""

import io
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex
from transformers import get_cosine_schedule_with_warmup

from devtools.faults import RunsCode
from fastross import checkpoint, checkpoint_read, config, weights
from fastross.checkpoint import Checkpointer, CheckpointError
from test_checkpoint import tiny_trained

LR = 0.01


class ReturnsLR:
    """Unpickling this writes `marker` and returns a valid learning rate: a run that ran it would look normal."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"(open({str(self.marker)!r}, 'w').write('pwned'), {LR})[1]",)


def trainer(seed: int):
    model, opt = tiny_trained(seed)
    sched = get_cosine_schedule_with_warmup(opt, 1, 10)
    sched.step()
    return model, opt, sched


def trainer_state(step: int, sched) -> dict:
    return {
        "step": step,
        "data": {"epoch": 0, "step_in_epoch": step},
        "scheduler": sched.state_dict(),
        "world_size": 1,
        "bad_in_a_row": 0,
    }


@pytest.fixture
def saved(world_of_one, tmp_path):
    """A genuine run folder with checkpoint step 1 of (model, optimizer, schedule)."""
    model, opt, sched = trainer(0)
    ck = Checkpointer(tmp_path / "run", rank=0, keep=2)
    ck.save(1, model, opt, trainer_state(1, sched), "a: 1\n")
    return ck, ck.root / "step_00000001", model, opt, sched


def plant(ckpt: Path, fqn: str, payload: bytes, declare_bytes: bool) -> Path:
    """Point `fqn` of the checkpoint at `payload` in a new data file, with a `.metadata` made of DCP's own classes
    only (it passes the restricted unpickler), and a manifest that matches."""
    md = checkpoint.read_metadata(ckpt / ".metadata")
    evil = ckpt / "__0_9.distcp"
    evil.write_bytes(payload)
    if declare_bytes:
        md.state_dict_metadata[fqn] = BytesStorageMetadata()
        for index in [i for i in md.storage_data if i.fqn == fqn]:
            del md.storage_data[index]
    md.storage_data[MetadataIndex(fqn)] = _StorageInfo(evil.name, 0, len(payload))
    with open(ckpt / ".metadata", "wb") as f:
        pickle.dump(md, f)
    checkpoint.write_manifest(ckpt)
    checkpoint_read.read_metadata(ckpt / ".metadata")  # the crafted metadata itself is accepted
    return evil


def torch_saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def every_entry_point(ck, ckpt, tmp_path, monkeypatch, with_resume: bool = True):
    """Each way fastross reads a checkpoint's DCP data: resume, model.init_from (also generate's and eval's way in),
    fastross.checkpoint.read_checkpoint (both export formats call it). Yields (name, callable)."""
    monkeypatch.setattr(checkpoint.fconfig, "load", lambda *a, **k: "the checkpoint's config")
    other, other_opt, other_sched = trainer(1)
    points = [
        ("init_from", lambda: weights.load_model_weights(tmp_path / "run", other)),
        ("export", lambda: checkpoint.read_checkpoint(tmp_path / "run")),
    ]
    if with_resume:
        points.insert(0, ("resume", lambda: ck.load(ck.latest(), other, other_opt, other_sched)))
    return points


@pytest.mark.parametrize("fmt", ["torch.save", "pickle"])
def test_bytes_item_holding_a_pickle_runs_nothing_on_resume(saved, tmp_path, fmt):
    ck, ckpt, *_ = saved
    marker = tmp_path / "code_ran"
    payload = torch_saved(ReturnsLR(marker)) if fmt == "torch.save" else pickle.dumps(ReturnsLR(marker))
    evil = plant(ckpt, "optim.param_groups.0.lr", payload, declare_bytes=False)
    other, other_opt, other_sched = trainer(1)
    with pytest.raises(CheckpointError, match=f"{evil}: refused to load key optim.param_groups.0.lr"):
        ck.load(ck.latest(), other, other_opt, other_sched)
    with pytest.raises(CheckpointError, match=f"{evil}: refused to load key optim.param_groups.0.lr"):
        checkpoint_read.read_state(ckpt, None)  # the whole checkpoint, as a comparison tool reads it
    assert not marker.exists()
    # A model-only reader never reads the optimizer's items: init_from and export load, and run nothing.
    model2, _, _ = trainer(2)
    weights.load_model_weights(tmp_path / "run", model2)
    assert torch.equal(model2[0].weight, saved[2][0].weight)
    assert not marker.exists()
    # The payload is real, and returns a valid lr (a plain pickle runs too: torch.load's legacy reader unpickles
    # the first object of a file before it checks the magic number).
    assert (torch.load(io.BytesIO(payload), weights_only=False) if fmt == "torch.save" else pickle.loads(payload)) == LR
    assert marker.read_text() == "pwned"


def test_model_entry_declared_as_bytes_is_refused_at_every_entry_point(saved, tmp_path, monkeypatch):
    ck, ckpt, *_ = saved
    marker = tmp_path / "code_ran"
    payload = torch_saved(RunsCode(marker))
    plant(ckpt, "model.0.weight", payload, declare_bytes=True)
    for name, read in every_entry_point(ck, ckpt, tmp_path, monkeypatch):
        with pytest.raises(
            CheckpointError, match=f"{ckpt / '.metadata'}: refused to load key model.0.weight: it is declared as bytes"
        ):
            read()
        assert not marker.exists(), name
    torch.load(io.BytesIO(payload), weights_only=False)
    assert marker.read_text() == "pwned"


def test_model_entry_of_another_kind_where_a_value_is_kept_is_refused(saved, tmp_path):
    """The optimizer's lr declared as a tensor: the kind differs from what fastross saves (a plain value)."""
    ck, ckpt, *_ = saved
    md = checkpoint.read_metadata(ckpt / ".metadata")
    md.state_dict_metadata["optim.param_groups.0.lr"] = md.state_dict_metadata["model.0.bias"]
    with open(ckpt / ".metadata", "wb") as f:
        pickle.dump(md, f)
    checkpoint.write_manifest(ckpt)
    other, other_opt, other_sched = trainer(1)
    with pytest.raises(CheckpointError, match=r"\.metadata: refused to load key optim\.param_groups\.0\.lr"):
        ck.load(ck.latest(), other, other_opt, other_sched)


@pytest.mark.parametrize(
    "value, why",
    [
        (torch.zeros(3), "it holds a Tensor"),
        ("0.01", "it holds '0.01', where this optimizer holds"),
        ({"lr": 0.01}, "it holds a dict"),
    ],
)
def test_bytes_item_of_the_wrong_kind_is_refused(saved, tmp_path, value, why):
    ck, ckpt, *_ = saved
    evil = plant(ckpt, "optim.param_groups.0.lr", torch_saved(value), declare_bytes=False)
    other, other_opt, other_sched = trainer(1)
    with pytest.raises(CheckpointError, match=f"{evil}: refused to load key optim.param_groups.0.lr: {why}"):
        ck.load(ck.latest(), other, other_opt, other_sched)


@pytest.mark.parametrize("name, transforms", [("../../outside.distcp", None), ("__0_0.distcp", ["zstd"])])
def test_storage_outside_the_folder_or_transformed_is_refused(saved, tmp_path, monkeypatch, name, transforms):
    ck, ckpt, *_ = saved
    md = checkpoint.read_metadata(ckpt / ".metadata")
    index = next(i for i in md.storage_data if i.fqn == "model.0.weight")
    info = md.storage_data[index]
    md.storage_data[index] = _StorageInfo(name, info.offset, info.length, transforms)
    with open(ckpt / ".metadata", "wb") as f:
        pickle.dump(md, f)
    checkpoint.write_manifest(ckpt)
    for _, read in every_entry_point(ck, ckpt, tmp_path, monkeypatch):
        with pytest.raises(CheckpointError, match=r"\.metadata: refused to load key model\.0\.weight"):
            read()


def test_crafted_rng_file_refused_on_resume_before_anything_is_restored(saved, tmp_path):
    ck, ckpt, model, *_ = saved
    marker = tmp_path / "code_ran"
    torch.save({"torch": RunsCode(marker)}, ckpt / "rng_rank0.pt")
    checkpoint.write_manifest(ckpt)
    other, other_opt, other_sched = trainer(1)
    before = other[0].weight.clone()
    with pytest.raises(CheckpointError, match=f"{ckpt / 'rng_rank0.pt'}: refused to load"):
        ck.load(ck.latest(), other, other_opt, other_sched)
    assert not marker.exists()
    assert torch.equal(other[0].weight, before)  # refused before the weights were touched
    torch.save({"torch": torch.zeros(3), "evil": torch.zeros(1)}, ckpt / "rng_rank0.pt")  # tensors, not RNG states
    with pytest.raises(CheckpointError, match="rng_rank0.pt: refused to load key"):
        checkpoint.load_rng(ckpt / "rng_rank0.pt")


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda s: s.pop("scheduler"), "scheduler is missing"),
        (lambda s: s.update(step="3"), "step is '3'"),
        (lambda s: s.update(data={"epoch": 0}), "data is"),
        (lambda s: s["scheduler"].update(optimizer="x"), "scheduler.optimizer is not one the schedule has"),
        (lambda s: s["scheduler"].update(base_lrs=[1.0, 2.0, 3.0]), "scheduler.base_lrs is"),
        (lambda s: s["scheduler"].pop("last_epoch"), "scheduler.last_epoch is missing"),
    ],
)
def test_trainer_json_is_checked_naming_the_key(saved, tmp_path, edit, key):
    ck, ckpt, *_ = saved
    path = ckpt / "trainer.json"
    state = json.loads(path.read_text())
    edit(state)
    path.write_text(json.dumps(state))
    checkpoint.write_manifest(ckpt)
    other, other_opt, other_sched = trainer(1)
    with pytest.raises(CheckpointError, match=f"{path}: key {key}"):
        ck.load(ck.latest(), other, other_opt, other_sched)


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe{}", b"[1, 2]"])
def test_invalid_trainer_json_names_its_file(saved, content):
    ck, ckpt, *_ = saved
    (ckpt / "trainer.json").write_bytes(content)
    checkpoint.write_manifest(ckpt)
    other, other_opt, other_sched = trainer(1)
    with pytest.raises(CheckpointError, match=f"{ckpt / 'trainer.json'}: "):
        ck.load(ck.latest(), other, other_opt, other_sched)


def test_non_utf8_latest_is_a_hint_that_falls_back_with_a_warning(saved, capsys):
    ck, ckpt, model, opt, sched = saved
    model[0].weight.data.add_(1)
    ck.save(2, model, opt, trainer_state(2, sched), "a: 2\n")
    (ck.root / "latest").write_bytes(b"\xffstep_\x80")
    capsys.readouterr()
    assert ck.latest() == ck.root / "step_00000002"
    out = capsys.readouterr().out
    assert f"{ck.root / 'latest'} is unreadable" in out and "warning" in out
    assert ck.hint() is None
    assert checkpoint.resolve(ck.root.parent) == ck.root / "step_00000002"


def test_yaml_tag_payload_in_a_config_runs_nothing(tmp_path):
    marker = tmp_path / "code_ran"
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(config.ConfigError, match=f"{cfg} is not valid YAML"):
        config.load(str(cfg))
    assert not marker.exists()


def test_non_utf8_config_is_refused_naming_the_file(tmp_path):
    cfg = tmp_path / "config.yaml"
    cfg.write_bytes(b"model: {vision_path: \xff\xfe}\n")
    with pytest.raises(config.ConfigError, match=f"{cfg} is not UTF-8 text \\(byte 21"):
        config.load(str(cfg))


def test_genuine_checkpoint_resumes_and_exports_bit_exact(saved, tmp_path):
    ck, ckpt, model, opt, sched = saved
    other, other_opt, other_sched = trainer(1)
    state = ck.load(ck.latest(), other, other_opt, other_sched)
    assert state == trainer_state(1, sched)
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k
    want, got = opt.state_dict(), other_opt.state_dict()
    assert want["param_groups"] == got["param_groups"]
    for i, s in want["state"].items():
        for k, v in s.items():
            assert torch.equal(v, got["state"][i][k]), (i, k)
    assert other_sched.state_dict() == sched.state_dict()
    read = checkpoint_read.read_state(ckpt, "model")  # fastross.export's reader
    assert read.keys() == model.state_dict().keys()
    assert all(torch.equal(read[k], v) for k, v in model.state_dict().items())
    whole = checkpoint_read.read_state(ckpt, None)
    assert whole["optim.param_groups.0.lr"] == want["param_groups"][0]["lr"]
    assert whole["optim.param_groups.0.betas"] == want["param_groups"][0]["betas"]
    assert torch.equal(whole["optim.state.0.weight.exp_avg"], want["state"][0]["exp_avg"])


# ---------------------------------------------------------------- a save or prune killed at each moment


class Killed(BaseException):
    """Stands for SIGKILL: nothing after the moment runs (no except clause of fastross catches a BaseException)."""


def moments():
    """(name, how to kill: a function (monkeypatch, root) that patches the moment in, the step resumed from)."""

    def at_small_files(mp, root):
        mp.setattr(checkpoint.Checkpointer, "_write_small_files", lambda *a: (_ for _ in ()).throw(Killed()))

    def at_dcp_write(mp, root):
        from torch.distributed.checkpoint import filesystem

        def write_data(writer, plan, planner):
            (Path(writer.path) / "__0_0.distcp").write_bytes(b"half a shard")
            raise Killed()

        mp.setattr(filesystem._FileSystemWriter, "write_data", write_data)

    def at_write_manifest(mp, root):
        mp.setattr(checkpoint, "write_manifest", lambda folder: (_ for _ in ()).throw(Killed()))

    def before_rename(mp, root):
        real = checkpoint.write_manifest
        mp.setattr(checkpoint, "write_manifest", lambda folder: (real(folder), (_ for _ in ()).throw(Killed())))

    def replace_when(pred):
        def patch(mp, root):
            real = os.replace

            def replace(src, dst):
                if pred(Path(src), Path(dst)):
                    raise Killed()
                return real(src, dst)

            mp.setattr(checkpoint.os, "replace", replace)

        return patch

    def latest_when(after: bool):
        def patch(mp, root):
            real = checkpoint._fsync_write

            def write(path, text):
                if path.name == "latest" and text == "step_00000003" and not after:
                    raise Killed()
                real(path, text)
                if path.name == "latest" and text == "step_00000003":
                    raise Killed()

            mp.setattr(checkpoint, "_fsync_write", write)

        return patch

    def delete_when(files: int):
        def patch(mp, root):
            real = shutil.rmtree

            def rmtree(path, *a, **k):
                path = Path(path)
                if path.name.endswith(".pruned.tmp"):
                    for f in sorted(path.iterdir())[:files]:  # .metadata and the first shards go, the rest stays
                        f.unlink()
                    raise Killed()
                return real(path, *a, **k)

            mp.setattr(checkpoint.shutil, "rmtree", rmtree)

        return patch

    def legacy_half_deleted(mp, root):
        """What a kill in the old prune left (devtools.fault_train's `prune`): step_1 without its .metadata."""

        def prune(self):
            (self.root / "step_00000001" / ".metadata").unlink()
            raise Killed()

        mp.setattr(checkpoint.Checkpointer, "_prune", prune)

    return [
        ("small_files", at_small_files, 2),
        ("dcp_write", at_dcp_write, 2),
        ("manifest", at_write_manifest, 2),
        ("rename", before_rename, 2),
        ("renamed", latest_when(after=False), 3),
        ("latest", latest_when(after=True), 3),
        ("prune_rename", replace_when(lambda s, d: d.name.endswith(".pruned.tmp")), 3),
        ("prune_renamed", delete_when(0), 3),
        ("prune_delete", delete_when(3), 3),
        ("legacy_prune", legacy_half_deleted, 3),
    ]


MOMENTS = moments()


@pytest.mark.parametrize("moment, kill, resumes_at", MOMENTS, ids=[m[0] for m in MOMENTS])
def test_kill_at_each_moment_of_save_and_prune_resumes_from_the_newest_complete(
    world_of_one, tmp_path, monkeypatch, capsys, moment, kill, resumes_at
):
    model, opt, sched = trainer(0)
    run = tmp_path / "run"
    ck = Checkpointer(run, rank=0, keep=2)
    weights = {}
    for step in (1, 2, 3):
        with torch.no_grad():
            model[0].weight.add_(step)
        weights[step] = model[0].weight.detach().clone()
        if step == 3:
            with monkeypatch.context() as mp:
                kill(mp, ck.root)
                with pytest.raises((Killed, CheckpointError)):  # DCP wraps what its write raised
                    ck.save(step, model, opt, trainer_state(step, sched), f"a: {step}\n")
        else:
            ck.save(step, model, opt, trainer_state(step, sched), f"a: {step}\n")
    restarted = Checkpointer(run, rank=0, keep=2)  # the next start
    latest = restarted.latest()
    assert latest == restarted.root / f"step_{resumes_at:08d}"
    kept = sorted(p.name for p in restarted.root.iterdir() if p.name != "latest")
    assert kept == [f"step_{s:08d}" for s in (resumes_at - 1, resumes_at)]  # what an uninterrupted run keeps
    for p in restarted.root.glob("step_*"):
        assert checkpoint.verify(p) is None, p
    other, other_opt, other_sched = trainer(1)
    assert restarted.load(latest, other, other_opt, other_sched)["step"] == resumes_at
    assert torch.equal(other[0].weight, weights[resumes_at])


def test_prune_renames_before_deleting(world_of_one, tmp_path, monkeypatch):
    """The rename is the first thing a prune does to a checkpoint folder: no file is deleted before it."""
    model, opt, sched = trainer(0)
    ck = Checkpointer(tmp_path / "run", rank=0, keep=1)
    ck.save(1, model, opt, trainer_state(1, sched), "")
    seen = []
    real_replace, real_rmtree = os.replace, shutil.rmtree
    monkeypatch.setattr(
        checkpoint.os,
        "replace",
        lambda s, d: (seen.append(("replace", Path(s).name, Path(d).name)), real_replace(s, d))[1],
    )
    monkeypatch.setattr(
        checkpoint.shutil,
        "rmtree",
        lambda p, *a, **k: (seen.append(("rmtree", Path(p).name)), real_rmtree(p, *a, **k))[1],
    )
    ck.save(2, model, opt, trainer_state(2, sched), "")
    i = seen.index(("replace", "step_00000001", "step_00000001.pruned.tmp"))
    assert ("rmtree", "step_00000001.pruned.tmp") in seen[i:]
    assert not any(e[0] == "rmtree" and e[1] == "step_00000001" for e in seen)
    assert sorted(p.name for p in ck.root.iterdir()) == ["latest", "step_00000002"]
