"""The data path: the image path against the HF processor, the loader's determinism across
worker counts and resume points, shard opening from many processes, and import hygiene."""

import io
import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastross.data.images import ImageSpec, pad_to_square, preprocess

SIGLIP_384 = dict(size={"height": 384, "width": 384}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def hf_processor(**kw):
    from transformers import SiglipImageProcessor

    return SiglipImageProcessor(**kw)


def hf_reference(data: bytes, processor, aspect: str) -> torch.Tensor:
    """The inline path fastross used before: PIL -> RGB -> pad -> the Hugging Face processor."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    if aspect == "pad":
        img = pad_to_square(img, tuple(int(m * 255) for m in processor.image_mean))
    out = processor(images=img, input_data_format="channels_last", return_tensors="np")  # never a guessed axis
    return torch.from_numpy(np.ascontiguousarray(out["pixel_values"][0]))


def photos():
    """Real photos in several aspect ratios, modes and formats: (name, encoded bytes)."""
    from skimage import data

    out = []
    for name in ("astronaut", "chelsea", "coffee"):
        a = getattr(data, name)()
        h, w = a.shape[:2]
        for crop_name, crop in (("full", a), ("tall", a[:, : w // 3]), ("wide", a[: h // 4]), ("odd", a[1:, 3:])):
            for mode in ("RGB", "L", "RGBA", "P"):
                img = Image.fromarray(np.ascontiguousarray(crop)).convert(mode)
                for fmt in ("PNG", "JPEG") if mode in ("RGB", "L") else ("PNG",):
                    buf = io.BytesIO()
                    img.save(buf, fmt, quality=90)
                    out.append((f"{name}/{crop_name}/{mode}/{fmt}", buf.getvalue()))
    return out


@pytest.mark.parametrize("size", [384, 64])
def test_pil_path_is_bit_exact_with_the_hf_processor(size):
    proc = hf_processor(**{**SIGLIP_384, "size": {"height": size, "width": size}})
    spec = ImageSpec.from_processor(proc)
    for name, data in photos():
        for aspect in ("pad", "square"):
            want = hf_reference(data, proc, aspect)
            got = preprocess(data, spec, aspect, "pil")
            assert got.dtype == torch.float32 and torch.equal(got, want), (name, aspect)


def test_torchvision_path_is_within_two_levels_and_falls_back_for_non_jpeg():
    proc = hf_processor(**SIGLIP_384)
    spec = ImageSpec.from_processor(proc)
    level = spec.rescale_factor / spec.std[0]  # one input level, in normalised units
    worst, jpegs = 0.0, 0
    for name, data in photos():
        for aspect in ("pad", "square"):
            pil = preprocess(data, spec, aspect, "pil")
            tv = preprocess(data, spec, aspect, "torchvision")
            if name.endswith("PNG"):
                assert torch.equal(tv, pil), name  # not JPEG: the pil path
                continue
            jpegs += 1
            err = (tv - pil).abs().max().item() / level
            worst = max(worst, err)
            # bicubic resize and JPEG decode round differently from PIL's; the bound: 2 levels
            assert err <= 2 + 1e-3, (name, aspect, err)
    assert jpegs == 48 and worst >= 1  # it really is a different path (seen: 2 levels)


def test_data_modules_import_without_model_kernels_or_triton_switch():
    import fastross.data

    names = sorted(
        f"fastross.data.{p.stem}" for p in Path(fastross.data.__file__).parent.glob("*.py") if p.stem != "__init__"
    )
    assert "fastross.data.loader" in names and "fastross.data.images" in names
    code = (
        "import importlib, os, sys\n"
        f"for n in {names!r}: importlib.import_module(n)\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('fastross.model', 'fastross.kernels')))\n"
        "print(repr((os.environ.get('TRITON_INTERPRET'), bad)))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == repr((None, []))


def loader(shards, tiny_models, rank: int = 0, world: int = 2, **data):
    from fastross.config import DataConfig
    from fastross.data.loader import Loader

    cfg = DataConfig(shards=str(shards), global_batch=8, max_tokens=300, shuffle=True, seed=3, **data)
    return Loader(
        cfg,
        rank=rank,
        world=world,
        attn_tokens=1e4,
        image=ImageSpec.from_pretrained(str(tiny_models / "vision")),
        latent_channels=16,
        replicas=4,
        seed=5,
        device=torch.device("cpu"),
    )


def flatten(batch) -> list:
    """Every number a StepBatch carries, in order."""
    out = [batch.tokens, batch.num_micro_batches, batch.imbalance, batch.position]
    for mb in batch.micro_batches:
        for name in mb.__dataclass_fields__:
            v = getattr(mb, name)
            out.append((name, v.dtype, v.shape, v.flatten().tolist()) if isinstance(v, torch.Tensor) else (name, v))
    return out


def test_a_step_crosses_from_a_worker_as_one_buffer_and_unpacks_to_the_collators_batches(skewed_shards, tiny_models):
    """PackedStep: the trainer gets exactly the collator's micro-batches (every field, dtype and shape), as views
    of one shared buffer, each tensor 256-byte aligned in it."""
    import dataclasses

    from fastross.data.loader import PackedStep, StepBatch
    from fastross.data.stream import Position

    ld = loader(skewed_shards, tiny_models, rank=0, workers=2)
    want = [ld.collate(samples, 0) for samples in ld.stream.step(0).micro_batches]
    assert len(want) >= 2
    got = next(iter(ld.steps(Position(), 0, 1)))
    assert isinstance(got, StepBatch) and len(got.micro_batches) == len(want)
    storages = set()
    for g, w in zip(got.micro_batches, want):
        for f in dataclasses.fields(w):
            a, b = getattr(g, f.name), getattr(w, f.name)
            if isinstance(b, torch.Tensor):
                assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f.name
                storages.add(a.untyped_storage().data_ptr())
                assert (a.data_ptr() - a.untyped_storage().data_ptr()) % 256 == 0, f.name
            else:
                assert a == b, f.name
    assert len(storages) == 1  # one buffer for the whole step
    packed = PackedStep.pack(StepBatch(want, 0, 0, len(want), 1.0, Position()), shared=False)
    assert packed.buffer.dtype == torch.uint8 and packed.buffer.dim() == 1


def test_loader_is_identical_with_0_1_and_4_workers_and_from_any_resume_point(skewed_shards, tiny_models):
    from fastross.data.noise import draw_timesteps, noise_key
    from fastross.data.stream import Position

    ld = loader(skewed_shards, tiny_models, rank=1, workers=0)
    per_epoch = ld.steps_per_epoch
    total = per_epoch + 3  # across an epoch boundary
    runs = {
        w: [flatten(b) for b in loader(skewed_shards, tiny_models, rank=1, workers=w).steps(Position(), 0, total)]
        for w in (0, 1, 4)
    }
    assert len(runs[0]) == total
    assert runs[1] == runs[0] and runs[4] == runs[0]

    # The keys and timesteps are the sample's own for its run step, wherever it was packed.
    batches = list(ld.steps(Position(), 0, total))
    for step, b in enumerate(batches):
        samples = ld.stream.step(step).micro_batches
        assert b.position == Position((step + 1) // per_epoch, (step + 1) % per_epoch)
        for mb, ss in zip(b.micro_batches, samples):
            idx = [int(s["index"]) for s in ss if len(s["image"])]
            if idx:
                keys = torch.tensor([noise_key(5, step, i) for i in idx])
                assert torch.equal(mb.noise_keys, keys) and torch.equal(mb.t, draw_timesteps(keys, 4))
            else:
                assert mb.num_images == 0 and mb.image_weight.tolist() == [0.0]

    # Resuming at a data position (run step = data step here) gives the tail of the same run.
    for k in (1, per_epoch, per_epoch + 1):
        tail = [
            flatten(b)
            for b in loader(skewed_shards, tiny_models, rank=1, workers=2).steps(ld.stream.position(k), k, total)
        ]
        assert tail == runs[0][k:]


def _shm_maps() -> set:
    return {ln.split()[-1] for ln in Path("/proc/self/maps").read_text().splitlines() if "/dev/shm/" in ln}


def _read_all(folder: str, barrier, rounds: int, queue) -> None:
    from fastross.data.shards import MDSShards

    try:
        inherited = _shm_maps()  # what the forked test process already mapped (and the Barrier's semaphores)
        for _ in range(rounds):
            barrier.wait(timeout=60)  # every process opens the shards at the same moment
            shards = MDSShards(folder)
            ids = sorted(int(shards.read(i)["index"]) for i in range(len(shards)))
            queue.put((ids, sorted(_shm_maps() - inherited)))
    except Exception as e:  # report it: the parent asserts on what arrived
        queue.put(f"{type(e).__name__}: {e}")


def test_shards_open_from_four_processes_at_once_repeatedly(skewed_shards):
    ctx = mp.get_context("fork")
    barrier, queue, rounds = ctx.Barrier(4), ctx.Queue(), 5
    procs = [ctx.Process(target=_read_all, args=(str(skewed_shards), barrier, rounds, queue)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=240) for _ in range(4 * rounds)]
    for p in procs:
        p.join(timeout=60)
    n = len(np.load(skewed_shards / "lengths.npy"))
    # every open worked and read every sample by its id, with no shared memory mapped (nothing to race on or leak)
    assert results == [(list(range(n)), [])] * (4 * rounds)
    assert all(p.exitcode == 0 for p in procs)


def test_loader_workers_die_with_the_training_process(skewed_shards, tiny_models):
    """SIGKILL the process that owns the loader (as tests/test_train.py kills a rank): its workers exit."""
    import signal
    import time

    code = (
        "import os, sys, time, torch\n"
        "from fastross.config import DataConfig\n"
        "from fastross.data.images import ImageSpec\n"
        "from fastross.data.loader import Loader\n"
        "from fastross.data.stream import Position\n"
        f"cfg = DataConfig(shards={str(skewed_shards)!r}, global_batch=8, max_tokens=300, workers=2)\n"
        "ld = Loader(cfg, rank=0, world=1, attn_tokens=1e4,\n"
        f"            image=ImageSpec.from_pretrained({str(tiny_models / 'vision')!r}),\n"
        "            latent_channels=16, replicas=4, seed=0, device=torch.device('cpu'))\n"
        "it = ld.steps(Position(), 0, 10)\n"
        "next(it)\n"
        "print('ready', flush=True)\n"
        "time.sleep(600)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        workers = [int(c) for c in Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()]
        assert len(workers) == 2
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    deadline = time.time() + 60  # the DataLoader's watchdog checks its parent every few seconds
    while time.time() < deadline and any(map(_alive, workers)):
        time.sleep(0.5)
    assert [w for w in workers if _alive(w)] == []


def _alive(pid: int) -> bool:
    """Running, not a zombie (an exited worker is reaped by init once its parent is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_temporary_folder_too_long_for_the_workers_sockets_is_refused():
    """Seen under pytest-xdist: a TMPDIR of 89 bytes made multiprocessing's listener path 120 bytes, the workers'
    bind failed in their queue threads, and the run waited for its first step for ever. The check's limit is the
    kernel's: a fresh process binds its first listener with a TMPDIR of the longest length allowed, and fails one
    byte above it."""
    import shutil
    import tempfile

    from fastross.config import ConfigError
    from fastross.data.loader import check_worker_tmpdir

    bind = "from multiprocessing.connection import Listener; Listener(family='AF_UNIX').close()"
    root = tempfile.mkdtemp(prefix="fr-", dir="/tmp")  # short: the session's own folder may be longer than 74 bytes
    allowed, bound = {}, {}
    try:
        for n in (74, 75, 76, 77):
            folder = os.path.join(root, "t").ljust(n, "x")
            os.mkdir(folder)
            ran = subprocess.run(
                [sys.executable, "-c", bind], env={**os.environ, "TMPDIR": folder}, capture_output=True, text=True
            )
            bound[n] = ran.returncode == 0
            assert bound[n] or "AF_UNIX path too long" in ran.stderr, ran.stderr[-300:]
            try:
                check_worker_tmpdir(2, folder)
                allowed[n] = True
            except ConfigError as e:
                assert f"the temporary folder {folder} ({n} bytes) is too long" in str(e) and "data.workers=0" in str(e)
                allowed[n] = False
            check_worker_tmpdir(0, folder)  # no workers, no sockets: any folder
    finally:
        shutil.rmtree(root)
    assert allowed == bound == {74: True, 75: True, 76: False, 77: False}
