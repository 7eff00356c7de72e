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

from devtools.faults import RunsCode, flip_bytes, kill_tree
from fastross import checkpoint, weights
from fastross.checkpoint import Checkpointer, CheckpointError
from test_checkpoint import tiny_trained


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
            pickle.dump(RunsCode(marker), f)
        else:
            torch.save({"torch": RunsCode(marker)}, f)
    checkpoint.write_manifest(ckpt)
    assert ck.latest() == ckpt  # it verifies
    other, other_opt = tiny_trained(1)
    with pytest.raises((CheckpointError, pickle.UnpicklingError), match=f"{name}: refused to load"):
        ck.load(ckpt, other, other_opt)
    if name == ".metadata":  # model.init_from and fastross.export read a checkpoint's metadata the same way
        with pytest.raises(CheckpointError, match="refused to load"):
            weights.load_model_weights(tmp_path / "run", other)
    assert not marker.exists()
    pickle.loads(pickle.dumps(RunsCode(marker)))  # the payload is real: a plain unpickle runs it
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
    with pytest.raises(
        ValueError, match="is a file, and not a reference ROSS mm_projector.bin.*never other pickles.*safetensors"
    ):
        weights.load_model_weights(pt, model)


# ---------------------------------------------------------------- manifests: corrupt, incomplete, `latest`


def test_flipped_distcp_bytes_fall_back_to_the_previous_checkpoint(world_of_one, tmp_path, capsys):
    ck, model, opt = saved(tmp_path, steps=(1, 2))
    newest = ck.root / "step_00000002"
    assert checkpoint.verify(newest) is None and (ck.root / "latest").read_text() == "step_00000002"
    (distcp,) = newest.glob("*.distcp")
    flip_bytes(distcp)
    want = f"{distcp} does not match its hash in {newest / 'manifest.json'} (1 file(s) differ)"
    assert checkpoint.verify(newest) == want
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
    with pytest.raises(
        CheckpointError,
        match=r"step_00000002\.tmp: writing the RNG state.*No space left.*"
        r"step_00000001 is intact",
    ):
        ck.save(2, model, opt, {"step": 2}, "")
    monkeypatch.undo()
    assert ck.latest() == ck.root / "step_00000001"
    other, other_opt = tiny_trained(1)
    assert ck.load(ck.latest(), other, other_opt) == {"step": 1}


# ---------------------------------------------------------------- non-finite steps (torchrun, 1 rank)


def poisoned_shards(src: Path, dst: Path, first: int, last: int) -> tuple[Path, str]:
    """A copy of `src` whose first sample with an image among ids first..last has NaN latent moments (its bytes
    patched in place in the shard file, the file rehashed): what a badly converted sample feeds the loss."""
    import numpy as np

    from fastross.data.schema import ShardMeta
    from fastross.data.shards import MDSShards

    shutil.copytree(src, dst)
    shards, meta = MDSShards(dst), ShardMeta.read(dst)
    sid = next(i for i in range(first, last + 1) if len(shards.read(i)["image"]))
    sample = shards.read(sid)
    raw = sample["latent_mean"]
    nan = np.full(len(raw) // np.dtype(meta.latent_dtype).itemsize, np.nan, meta.latent_dtype).tobytes()
    hits = [(f, f.read_bytes().count(raw)) for f in dst.glob("*.mds")]
    ((path, n),) = [(f, n) for f, n in hits if n]
    assert n == 1, "the sample's latent bytes are not unique in its shard"
    data = path.read_bytes().replace(raw, nan)
    path.write_bytes(data)
    # Rehashed in index.json, as a converter that let the NaNs through would have written it (fastross's own refuses
    # non-finite moments, and the loader would refuse a file whose hash differs).
    import xxhash

    from fastross.data.schema import SHARD_HASH

    index = json.loads((dst / "index.json").read_text())
    for shard in index["shards"]:
        if shard["raw_data"]["basename"] == path.name:
            shard["raw_data"]["hashes"][SHARD_HASH] = xxhash.xxh64(data).hexdigest()
    (dst / "index.json").write_text(json.dumps(index))
    from fastross.data.schema import write_manifest

    write_manifest(dst)  # and its manifest, as that converter would have written it
    assert np.isnan(meta.decode_latent(MDSShards(dst).read(sid)["latent_mean"])).all()
    return dst, str(sample["id"])


@pytest.mark.slow
def test_nan_sample_skips_the_step_and_then_stops_the_run(tiny_models, skewed_shards, tmp_path):
    import subprocess

    from devtools.faults import flatten, read_checkpoint
    from test_train import metrics, run, torchrun_cmd, write_config

    # Unshuffled, 8 samples a step on one rank: step 2 holds samples 8..15, one of them poisoned.
    shards, bad_id = poisoned_shards(skewed_shards, tmp_path / "shards", 8, 15)
    rd = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_models, shards, rd, max_steps=3, ckpt_every=1, keep_checkpoints=3)
    over = ["data.shuffle=false", "data.workers=0"]

    # max_bad_steps=1: the first non-finite step stops the run, naming the sample; step 1's checkpoint stays.
    p = subprocess.run(
        torchrun_cmd(1, cfg, *over, "train.max_bad_steps=1"), capture_output=True, text=True, timeout=600
    )
    out = p.stdout + p.stderr
    assert "train: stopped: 1 steps in a row (through step 2) had a non-finite loss" in out, out[-4000:]
    assert bad_id in out.split("train: stopped:")[1].split("\n")[0]
    assert sorted(d.name for d in (rd / "checkpoints").glob("step_*")) == ["step_00000001"]
    (rec,) = [json.loads(x) for x in (rd / "nonfinite.jsonl").read_text().splitlines()]
    assert rec["step"] == 2 and bad_id in rec["samples"] and len(rec["samples"]) < 8

    # Started again with room for 3: step 2 is skipped (no update, no moment change), step 3 trains.
    out = run(1, cfg, *over, "train.max_bad_steps=3")
    assert "resumed from" in out and "at step 1" in out
    assert "step 2: non-finite loss or gradient norm" in out and "update skipped (1 in a row" in out
    got = metrics(rd)
    assert [m["step"] for m in got] == [1, 2, 3] and [m["skipped_steps"] for m in got] == [0, 1, 0]
    assert all(torch.isfinite(torch.tensor(m["grad_norm"])) for m in (got[0], got[2]))
    ck = {n: read_checkpoint(rd / "checkpoints" / f"step_{n:08d}", tmp_path) for n in (1, 2, 3)}
    for part in ("model", "optim"):
        a, b, c = (flatten(ck[n][part]) for n in (1, 2, 3))
        changed = 0
        for k, v in a.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, b[k]), (part, k)  # the skipped step changed nothing
                changed += not torch.equal(b[k], c[k])
            elif not k.startswith("param_groups."):  # the learning rate follows the schedule, skipped steps too
                assert v == b[k], (part, k)
        assert changed > 0, part  # and step 3 did update
    assert len((rd / "nonfinite.jsonl").read_text().splitlines()) == 2  # both runs' step 2
    shutil.rmtree(rd)  # the shared machines' disk


# ---------------------------------------------------------------- metrics.jsonl: full disk, torn lines, trimming


def test_metrics_write_on_a_full_disk_names_the_file_and_leaves_whole_lines(tmp_path, monkeypatch):
    import io

    from fastross import metrics

    log = metrics.MetricsLogger(tmp_path, True, world=1, stream=io.StringIO())
    values = {"text_loss": 2.5, "recon_loss": 0.5, "lr": 1e-3, "grad_norm": 1.0}
    log.log(1, 10, values)
    whole = log.path.read_text()
    real_write = os.write

    def half_then_full(fd, data):  # the first write lands half the record, the next finds the disk full
        if not getattr(half_then_full, "done", False):
            half_then_full.done = True
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(metrics.os, "write", half_then_full)
    with pytest.raises(OSError, match=f"could not append a record to {log.path}: No space left on device"):
        log.log(2, 10, values)
    monkeypatch.undo()
    assert log.path.read_text() == whole  # cut back to the last whole record


def test_trim_drops_torn_lines_and_steps_past_the_checkpoint(tmp_path):
    from fastross import metrics

    path = tmp_path / "metrics.jsonl"
    recs = [json.dumps({"step": s, "text_loss": 1.0}) for s in (1, 2, 3, 4)]
    path.write_text("\n".join(recs) + "\n" + '{"step": 5, "text_lo')  # a crash mid-write tore the last one
    assert metrics.trim(path, 3) == 2
    assert path.read_text() == "\n".join(recs[:3]) + "\n"
    path.write_text("\n".join(recs) + "\n\x00\x00garbage\n")
    assert metrics.trim(path, 10) == 1 and path.read_text() == "\n".join(recs) + "\n"
    assert metrics.trim(path, 0) == 4 and path.read_text() == ""  # no checkpoint yet: every record runs again
    assert metrics.trim(tmp_path / "absent.jsonl", 0) == 0


# ---------------------------------------------------------------- the run-folder lock


def try_lock(run_dir: Path) -> str:
    """Take the lock from another process, as a second trainer would."""
    import subprocess
    import sys

    code = (
        "import sys; from fastross.lifecycle import RunLock, RunLocked\n"
        "try:\n    RunLock(sys.argv[1]).release(); print('taken')\n"
        "except RunLocked as e:\n    print('refused:', e)\n"
    )
    return subprocess.run([sys.executable, "-c", code, str(run_dir)], capture_output=True, text=True, timeout=60).stdout


def test_lock_refuses_a_second_owner_and_takes_over_a_dead_ones(tmp_path, capsys):
    import socket
    import subprocess
    import sys

    from fastross.lifecycle import LOCK, RunLock

    rd = tmp_path / "run"
    lock = RunLock(rd)
    owner = json.loads((rd / LOCK).read_text())
    assert owner["host"] == socket.gethostname() and owner["pid"] == os.getpid()
    out = try_lock(rd)
    assert out.startswith("refused:") and f"pid {os.getpid()}" in out and "train.run_dir" in out
    lock.release()
    assert try_lock(rd) == "taken\n" and (rd / LOCK).read_text() == ""  # released cleanly: nothing stale

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (rd / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "since": "then"}))
    lock = RunLock(rd)  # the file names a dead process that holds no flock: taken over, with a message
    assert (
        f"taking over the stale lock {rd / LOCK} of host {socket.gethostname()} pid {dead.pid}"
        in capsys.readouterr().out
    )
    assert json.loads((rd / LOCK).read_text())["pid"] == os.getpid()
    lock.release()


@pytest.mark.slow
def test_second_trainer_refused_and_killing_torchrun_ends_every_process(tiny_models, skewed_shards, tmp_path):
    """Trainer A (2 ranks, 2 loader workers each) runs; B on the same folder is refused; SIGKILL to A's torchrun
    alone ends A's ranks and their workers, which frees the lock: the next trainer takes it over."""
    import signal
    import subprocess
    import time

    from fastross.lifecycle import RunLock
    from test_train import descendants, metrics, torchrun_cmd, write_config

    rd = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_models, skewed_shards, rd, max_steps=400, ckpt_every=1000)
    a = subprocess.Popen(
        torchrun_cmd(2, cfg), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.time() + 300
        while not ((rd / "metrics.jsonl").exists() and metrics(rd)) and a.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert a.poll() is None and metrics(rd), "trainer A never logged a step"
        procs = descendants(a.pid)
        assert len(procs) >= 6, procs  # 2 ranks and their 2 workers each (at least)

        b = subprocess.run(torchrun_cmd(1, cfg), capture_output=True, text=True, timeout=300)
        assert b.returncode != 0 and "train: refused:" in b.stderr, b.stderr[-3000:]
        assert f"{rd} is in use: a trainer (host " in b.stderr
        assert a.poll() is None  # A untouched

        os.kill(a.pid, signal.SIGKILL)  # torchrun only
        a.wait()
        deadline = time.time() + 60
        alive = procs
        while alive and time.time() < deadline:
            time.sleep(0.5)
            alive = [p for p in procs if Path(f"/proc/{p}").exists() and "Z" not in _state(p)]
        assert not alive, f"still running after torchrun died: {alive}"
    finally:
        kill_tree(a)
    said = []
    RunLock(rd, say=said.append).release()
    assert len(said) == 1 and "taking over the stale lock" in said[0] and "that process is gone" in said[0]


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


# ---------------------------------------------------------------- streaming's shared memory


def test_dead_runs_streaming_shm_is_removed_and_live_runs_kept():
    from multiprocessing import shared_memory

    import streaming.base.constant

    from fastross import lifecycle

    assert lifecycle.STREAMING_SHM == tuple(streaming.base.constant.SHM_TO_CLEAN)  # the names streaming uses
    shm = Path("/dev/shm")
    dead = [shm / "987654_locals", shm / "987654_barrier"]  # as a SIGKILLed streaming run leaves them
    other = shm / "987656_my_own_segment"  # not streaming's: never touched
    for p in [*dead, other]:
        p.write_bytes(b"\0" * 64)
    live = shared_memory.SharedMemory(name="987655_locals", create=True, size=64)  # mapped by this live process
    try:
        said = []
        removed = lifecycle.clean_dead_streaming_shm(say=said.append)
        assert sorted(removed) == ["987654_barrier", "987654_locals"]
        assert not any(p.exists() for p in dead) and other.exists() and (shm / "987655_locals").exists()
        assert len(said) == 1 and "removed 2 shared-memory segment(s) of dead streaming runs" in said[0]
        assert lifecycle.clean_dead_streaming_shm(say=said.append) == []  # nothing left to remove
    finally:
        live.close()
        live.unlink()
        for p in [*dead, other]:
            p.unlink(missing_ok=True)


# ---------------------------------------------------------------- multiprocessing's pymp-* folders

_LISTENER = """
import multiprocessing.connection, sys, time
listener = multiprocessing.connection.Listener(family="AF_UNIX")  # in a new pymp-* folder under TMPDIR
print(listener.address, flush=True)
time.sleep(600)
"""


def _listening_child(tmp: Path):
    """A Python process holding a multiprocessing listener in a pymp-* folder under `tmp`; returns (it, the
    socket's path)."""
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-c", _LISTENER], stdout=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(tmp)}
    )
    return proc, Path(proc.stdout.readline().strip())


@pytest.fixture
def short_tmp():
    """A temporary folder with a short path: an AF_UNIX socket's path holds at most 107 bytes."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="fr-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_dead_processes_pymp_folders_are_removed_and_live_ones_kept(short_tmp):
    """What a SIGKILLed run leaves (a pymp-* folder holding a listener socket nobody holds) is removed; a live
    process's folder, an empty one, one holding other files and a folder not named pymp-* are kept."""
    import signal

    from fastross import lifecycle

    dead_proc, dead_sock = _listening_child(short_tmp)
    live_proc, live_sock = _listening_child(short_tmp)
    try:
        assert dead_sock.parent.name.startswith("pymp-") and dead_sock.parent.parent == short_tmp
        dead_proc.send_signal(signal.SIGKILL)
        dead_proc.wait()
        assert dead_sock.exists()  # the kill left it, as it leaves torchrun's ranks'
        (short_tmp / "pymp-empty").mkdir()  # a process may be about to bind its first socket here
        (short_tmp / "pymp-other").mkdir()
        (short_tmp / "pymp-other" / "notes").write_text("not a socket")
        (short_tmp / "mine").mkdir()
        said = []
        assert lifecycle.clean_dead_multiprocessing_dirs(short_tmp, say=said.append) == [dead_sock.parent.name]
        assert not dead_sock.parent.exists() and live_sock.exists()
        assert {p.name for p in short_tmp.iterdir()} == {live_sock.parent.name, "pymp-empty", "pymp-other", "mine"}
        assert len(said) == 1 and "removed 1 multiprocessing folder(s) of dead processes" in said[0]
        assert lifecycle.clean_dead_multiprocessing_dirs(short_tmp, say=said.append) == []  # the live one stays
        assert live_proc.poll() is None
    finally:
        for proc in (dead_proc, live_proc):
            proc.kill()
            proc.wait()


def test_pymp_folders_are_kept_when_the_socket_table_cannot_be_read(short_tmp, monkeypatch):
    import signal

    from fastross import lifecycle

    proc, sock = _listening_child(short_tmp)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    monkeypatch.setattr(lifecycle, "_bound_unix_paths", lambda: None)
    assert lifecycle.clean_dead_multiprocessing_dirs(short_tmp, say=print) == [] and sock.exists()


# ---------------------------------------------------------------- resuming on another number of ranks


@pytest.mark.slow
def test_resume_on_another_rank_count_continues_the_same_global_batches(
    tiny_models, skewed_shards, four_steps_1rank, four_steps_2ranks, tmp_path
):
    """1 -> 2 and 2 -> 1 ranks at step 2 of 4: the same global batches (tokens and images per step, exactly) and
    the losses of the uninterrupted runs on either count, within what fp32 reduction order moves
    (tests/test_train.py's 1-vs-2-rank test: 1e-4 after one Adam step).

    Each resume starts from a copy of the first count's uninterrupted run (the session's), cut back to its step-2
    checkpoint and records: what a run stopped at step 2 leaves (tests/test_train.py's stop_after test)."""
    from test_train import FOUR_STEPS, metrics, run, write_config

    ref = {1: four_steps_1rank, 2: four_steps_2ranks}
    for first, then in ((1, 2), (2, 1)):
        rd = tmp_path / f"from{first}to{then}"
        shutil.copytree(ref[first], rd)
        ckpts = rd / "checkpoints"
        assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000002", "step_00000004"]
        shutil.rmtree(ckpts / "step_00000004")
        (ckpts / "latest").write_text("step_00000002")
        (rd / "metrics.jsonl").write_text("".join((rd / "metrics.jsonl").read_text().splitlines(keepends=True)[:2]))
        cfg = write_config(tmp_path / f"{first}{then}.yaml", tiny_models, skewed_shards, rd, **FOUR_STEPS)
        out = run(then, cfg)
        assert "resumed from" in out and "at step 2" in out
        got = metrics(rd)
        assert [m["step"] for m in got] == [1, 2, 3, 4]
        for n in (1, 2):
            for a, b in zip(metrics(ref[n]), got):
                assert (a["text_tokens"], a["images"]) == (b["text_tokens"], b["images"]), (first, then, a["step"])
                for key in ("text_loss", "recon_loss", "grad_norm"):
                    assert b[key] == pytest.approx(a[key], rel=2e-4), (first, then, n, a["step"], key)
        shutil.rmtree(rd)  # the shared machines' disk: 2 checkpoints of 4 runs add up
