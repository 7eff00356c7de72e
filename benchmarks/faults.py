"""The fault campaign: kills, full disks, corrupt shards and checkpoints, hostile records, escape attempts.

    python benchmarks/faults.py [--seed S] [--kills 10] [--save-kills 10] [--fuzz 1000] [--payloads P]
                                [--tampers U] [--skip SECTION,...] [--save]

On 2 CPU ranks with the tiny models and the tests' data set (devtools.golden.prepare), in a temporary
folder removed at the end. One uninterrupted reference run (8 steps, a checkpoint every 2, 2 kept) is made first;
every trial that trains is compared with it bit for bit: each step's metrics record (measured times aside) and
every checkpoint both runs keep (model, optimizer, trainer.json, RNG files).

- kills: SIGKILL of torchrun and all its processes at a seeded random step, then a resume to the end.
- save kills: SIGKILL at a named moment of a checkpoint save (devtools.fault_train), including between the
  folder's rename and the `latest` update, synchronous and asynchronous saves; the resume must start from the
  newest complete checkpoint at that moment, and be exact.
- full disk (ENOSPC injected where the write happens): a checkpoint save and a metrics write (the error names
  the path, the run resumes exactly from the previous checkpoint), a conversion (the error names the folder, --out
  is untouched, the same command then gives the clean shards).
- 5 corrupt shards (flipped token bytes, flipped latent bytes, a truncated file, an edited index.json, a deleted
  file): each an error naming the file, and with data.corrupt_shards=skip each skipped and counted.
- 5 corrupt checkpoints (flipped and truncated .distcp, deleted manifest, `latest` naming a deleted folder, a
  crafted `.metadata` whose manifest was rewritten to match): a resume from the newest verified one that is exact,
  or a refusal; no NaN trained on, no code run.
- escapes: `../`, absolute and symlinked image paths out of --images, and a crafted rng_rank0.pt; each refused,
  nothing from outside in the shards, no code run (the payload would create a marker file).
- pickle: every checkpoint entry point (resume, model.init_from, export, generate, eval, the reference importer)
  x every payload kind it reads (a bytes item in `.metadata` pointing at a pickle, a model entry declared as bytes,
  `.metadata`, rng_rank0.pt, trainer.json, a YAML tag in the config, a reference mm_projector.bin), the manifest
  rewritten to match; pickle_executed counts the trials where the payload's code ran (it writes a marker file).
  Run in this process from a 1-rank base run (2 steps, checkpoints at 1 and 2) and its export.
- tamper: every file of that run's step 2 (and `latest`) and of the converted data set, flipped and edited in turn
  (the manifest left as it was); tamper_caught counts those refused naming the file (exit non-zero) or recovered
  (the resume exact / 2 training steps identical to the untampered data's).
- fuzz: N records (devtools.faults.fuzz_records, with JSON-level families -- lone surrogates, deep nesting,
  wrong types, duplicate keys -- and EPS, PDF, SVG, ICO, animated GIF/WebP/APNG, 16-bit and float TIFF files),
  one JSONL line each, converted in chunks of 100: crashes (the converter raised,
  or its counts do not add up), lost (a valid record not written), silent_corruption (a written sample that differs
  from a clean conversion of the record -- its image re-encoded as a plain 8-bit RGB PNG -- or from the pixels a
  direct computation gives, or a record that had to be skipped but was written).

One line per trial, then exactly one final line:
    faults: resume_exact A/10 save_kill_ok B/10 fuzz_records N crashes C lost L silent_corruption S escapes E \
disk_full_ok F/3 corrupt_ckpt_ok K/5 pickle_executed X/P tamper_caught T/U
--save appends the counts to benchmarks/results/faults.csv.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import fastross.kernels  # noqa: F401  (without a GPU it sets TRITON_INTERPRET before Liger imports Triton)
import numpy as np

from fastross.demo import convert_args, torchrun_cmd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the repo root: devtools/ is never installed
from devtools import faults  # noqa: E402
from devtools.faults import INVALID, VALID  # noqa: E402

STEPS, CKPT_EVERY, KEEP, RANKS = 8, 2, 2, 2
# Save moments killed in order (the first --save-kills of them): (moment, asynchronous save, checkpoint steps).
SAVE_KILLS = [
    ("renamed", False, (2, 4, 6)),
    ("dcp_write", False, (2, 4, 6)),
    ("small_files", False, (4, 6)),
    ("manifest", False, (4, 6)),
    ("rename", False, (2, 4, 6)),
    ("latest", False, (2, 4, 6)),
    ("prune", False, (6, 8)),
    ("dcp_write", True, (4, 6)),
    ("renamed", True, (4, 6)),
    ("prune", True, (6,)),
]
RESUMES_AT_THE_NEW_ONE = {"renamed", "latest", "prune"}  # the new checkpoint is complete from the rename on


class Campaign:
    """The shared setup: models, shards, the reference run, and how to launch and compare runs."""

    def __init__(self, work: Path, seed: int, models: Path, shards: Path, ranks: int = RANKS):
        self.work, self.ranks, self.rng = work, ranks, random.Random(seed)
        self.env = {**os.environ, "TMPDIR": str(work)}  # streaming's lock files stay in here
        self.models, self.shards = models, shards
        self.ref = work / "reference"

    def reference(self) -> None:
        """The one uninterrupted run every trial is compared with."""
        out = self.train(self.config(self.ref))
        if "train: done" not in out:
            raise RuntimeError(f"faults: the reference run failed:\n{out[-3000:]}")

    def config(self, run_dir: Path, shards: Path | None = None) -> Path:
        return faults.write_config(
            run_dir.parent / f"{run_dir.name}.yaml",
            self.models,
            shards or self.shards,
            run_dir,
            workers=0,
            max_steps=STEPS,
            ckpt_every=CKPT_EVERY,
            keep_checkpoints=KEEP,
        )

    def launch(
        self, cfg: Path, *overrides: str, fault: str | None = None, markers: Path | None = None, log: Path
    ) -> subprocess.Popen:
        env = dict(self.env)
        module = "fastross.train"
        if fault:
            # devtools is never installed: torchrun's workers find it through PYTHONPATH
            path = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
            env.update(FASTROSS_FAULT=fault, FASTROSS_FAULT_MARKERS=str(markers), PYTHONPATH=path)
            module = "devtools.fault_train"
        return subprocess.Popen(
            torchrun_cmd(self.ranks, cfg, *overrides, module=module),
            stdout=open(log, "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )

    def train(self, cfg: Path, *overrides: str, fault: str | None = None, markers: Path | None = None) -> str:
        """A run to its end (or its failure); returns its output."""
        log = cfg.with_suffix(".log")
        proc = self.launch(cfg, *overrides, fault=fault, markers=markers, log=log)
        try:
            proc.wait(timeout=600)
        finally:
            faults.kill_tree(proc)
        return log.read_text(errors="replace")

    def differences(self, run_dir: Path) -> list[str]:
        diffs = faults.run_differences(self.ref, run_dir, self.work)
        newest = max(p.name for p in (self.ref / "checkpoints").glob("step_*"))
        if not (run_dir / "checkpoints" / newest).is_dir():
            diffs.append(f"the run has no {newest}")
        return diffs

    def differences_from(self, ref: Path, run_dir: Path) -> list[str]:
        return faults.run_differences(ref, run_dir, self.work)

    def copy_of_reference(self, name: str) -> Path:
        rd = self.work / name
        shutil.copytree(self.ref, rd)
        return rd


def logged_steps(run_dir: Path) -> list[int]:
    """Steps in metrics.jsonl, read while it is written (a line being written is skipped)."""
    path = run_dir / "metrics.jsonl"
    steps = []
    for line in path.read_text().splitlines() if path.exists() else []:
        with contextlib.suppress(ValueError):
            steps.append(json.loads(line)["step"])
    return steps


def wait_until(cond, proc: subprocess.Popen, timeout: float = 600) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        if proc.poll() is not None:
            return cond()
        time.sleep(0.05)
    return False


def resumed_at(out: str) -> int:
    """The step a run's output says it resumed at (0: it started fresh)."""
    for line in out.splitlines():
        if line.startswith("train: resumed from ") and " at step " in line:
            return int(line.rsplit(" at step ", 1)[1])
    return 0


START = time.perf_counter()


def report(kind: str, i: int, ok: bool, detail: str) -> bool:
    """One trial's progress line, with the seconds since the start."""
    print(
        f"faults: [{time.perf_counter() - START:5.0f} s] {kind} {i}: {'ok' if ok else 'FAILED'}: {detail}", flush=True
    )
    return ok


# ---------------------------------------------------------------- kills


def kill_at_random_step(c: Campaign, i: int) -> bool:
    step, delay = c.rng.randint(1, STEPS - 2), c.rng.uniform(0.0, 0.5)
    rd = c.work / f"kill{i}"
    cfg = c.config(rd)
    proc = c.launch(cfg, log=c.work / f"kill{i}.log")
    reached = wait_until(lambda: step in logged_steps(rd), proc)
    time.sleep(delay)
    faults.kill_tree(proc)
    killed_log = (c.work / f"kill{i}.log").read_text(errors="replace")
    if not reached or "train: done" in killed_log:
        return report("kill", i, False, f"the run never reached step {step} alive:\n{killed_log[-2000:]}")
    out = c.train(cfg)
    diffs = c.differences(rd) if "train: done" in out else [f"the resume failed:\n{out[-2000:]}"]
    shutil.rmtree(rd)
    return report(
        "kill",
        i,
        not diffs,
        f"SIGKILL {delay:.2f} s after step {step} was logged, resumed at step "
        f"{resumed_at(out)}" + (f": {diffs[:3]}" if diffs else ", exact"),
    )


def kill_during_save(c: Campaign, i: int) -> bool:
    moment, asynchronous, steps = SAVE_KILLS[i % len(SAVE_KILLS)]
    step = c.rng.choice(steps)
    rd, markers = c.work / f"save_kill{i}", c.work / f"markers{i}"
    markers.mkdir()
    cfg = c.config(rd)
    over = ("train.async_checkpoint=true",) if asynchronous else ()
    proc = c.launch(cfg, *over, fault=f"{moment}:{step}", markers=markers, log=c.work / f"save_kill{i}.log")
    hit = wait_until(lambda: (markers / "hit_rank0").exists(), proc)
    faults.kill_tree(proc)
    what = f"{moment} of step {step}'s {'asynchronous' if asynchronous else 'synchronous'} save"
    if not hit:
        log = (c.work / f"save_kill{i}.log").read_text(errors="replace")
        return report("save_kill", i, False, f"never reached the {what}:\n{log[-2000:]}")
    out = c.train(cfg, *over)
    want = step if moment in RESUMES_AT_THE_NEW_ONE else step - CKPT_EVERY
    diffs = c.differences(rd) if "train: done" in out else [f"the resume failed:\n{out[-2000:]}"]
    if resumed_at(out) != want:
        diffs.insert(0, f"resumed at step {resumed_at(out)}, the newest complete checkpoint was step {want}")
    shutil.rmtree(rd)
    shutil.rmtree(markers)
    return report(
        "save_kill",
        i,
        not diffs,
        f"SIGKILL at the {what}, resumed at step {resumed_at(out)}" + (f": {diffs[:3]}" if diffs else ", exact"),
    )


# ---------------------------------------------------------------- full disks


def disk_full_in_training(c: Campaign, i: int, moment: str) -> bool:
    """ENOSPC at a checkpoint save or a metrics write: the run fails naming the path; the resume is exact."""
    step = c.rng.choice((4, 6)) if moment == "enospc_save" else c.rng.randint(3, STEPS - 1)
    rd = c.work / f"full{i}"
    cfg = c.config(rd)
    out = c.train(cfg, fault=f"{moment}:{step}", markers=c.work)
    previous = (step - 1) // CKPT_EVERY * CKPT_EVERY  # step's own save comes after its log record
    if moment == "enospc_save":
        named = f"checkpoint {rd / 'checkpoints' / f'step_{step:08d}.tmp'}: DCP's write failed"
        intact = f"{rd / 'checkpoints' / f'step_{previous:08d}'} is intact"
        problems = [f"no error naming the folder ({named!r})"] if named not in out or intact not in out else []
    else:
        named = f"could not append a record to {rd / 'metrics.jsonl'}: No space left on device"
        problems = [] if named in out else [f"no error naming the file ({named!r})"]
        with contextlib.suppress(ValueError):  # every line whole: the torn half was cut off
            if logged_steps(rd) != list(range(1, step)) or len(logged_steps(rd)) != len(
                (rd / "metrics.jsonl").read_text().splitlines()
            ):
                problems.append(f"metrics.jsonl holds steps {logged_steps(rd)} or a torn line")
    if "train: done" in out:
        problems.append("the run did not fail")
    resumed = c.train(cfg)
    problems += c.differences(rd) if "train: done" in resumed else [f"the resume failed:\n{resumed[-2000:]}"]
    if resumed_at(resumed) != previous:
        problems.append(f"resumed at step {resumed_at(resumed)}, not at the previous checkpoint {previous}")
    shutil.rmtree(rd)
    where = "checkpoint save" if moment == "enospc_save" else "metrics write"
    return report(
        "disk_full",
        i,
        not problems,
        f"ENOSPC at step {step}'s {where}, resumed at step "
        f"{resumed_at(resumed)}" + (f": {problems[:3]}" if problems else ", error named the path, exact"),
    )


def disk_full_in_conversion(c: Campaign, i: int) -> tuple[bool, Path]:
    """ENOSPC while the converter writes its second shard file: an error naming the folder, --out untouched; the
    same command again gives the samples of a clean conversion. Returns the multi-shard folder it made."""
    from pathlib import Path as P

    from fastross.data import convert

    out = c.work / "multi_shards"
    synth = c.shards.parent / "synth"  # devtools.golden.prepare's layout
    argv = convert_args(c.models, synth / "stage2.json", synth / "images", out, "qwen2_ross", "--shard-size", "65536")
    real = P.write_bytes

    def full(path, data):
        if path.parent.name.endswith(".partial") and path.name == "shard.00001.mds":
            real(path, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    err = io.StringIO()
    with (
        mock.patch.object(P, "write_bytes", full),
        contextlib.redirect_stderr(err),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        try:
            rc = convert.main(argv)
        except OSError as e:
            rc, _ = -1, err.write(f"raised {e!r}")
    problems = []
    stage = out.parent / f".{out.name}.partial"
    if rc != 2 or str(stage) not in err.getvalue() or "No space left on device" not in err.getvalue():
        problems.append(f"exit {rc}, said {err.getvalue().strip()[-300:]!r}")
    if out.exists() or stage.exists():
        problems.append("a half-written folder was left")
    with contextlib.redirect_stdout(io.StringIO()):
        rc = convert.main(argv)
    if rc != 0:
        problems.append(f"the same command again exited {rc}")
    else:
        problems += sample_differences(c.shards, out)
        if len(list(out.glob("*.mds"))) < 3:
            problems.append("fewer than 3 shard files")
    return report(
        "disk_full",
        i,
        not problems,
        "ENOSPC during conversion"
        + (f": {problems[:3]}" if problems else ", error named the folder, --out untouched, the rerun is clean"),
    ), out


def sample_differences(a: Path, b: Path) -> list[str]:
    from fastross.data.shards import MDSShards

    sa, sb = MDSShards(a), MDSShards(b)
    if len(sa) != len(sb):
        return [f"{b}: {len(sb)} samples, {a} has {len(sa)}"]
    diffs = []
    for k in range(len(sa)):
        x, y = sa.read(k), sb.read(k)
        diffs += [f"{b} sample {k} {f}" for f in x if not _same(x[f], y[f])]
    return diffs


def _same(x, y) -> bool:
    return np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y


# ---------------------------------------------------------------- corrupt shards


def corrupt_shard_trials(c: Campaign, multi: Path, spec) -> int:
    """Each corruption on a fresh copy of a multi-shard folder: an error naming the file, and skipped and counted
    with data.corrupt_shards=skip (the loader then plans only the other shards' samples)."""
    from fastross.data.schema import MANIFEST_FILE, ShardCorruptError, write_manifest

    index = json.loads((multi / "index.json").read_text())["shards"]
    second = index[1]["raw_data"]["basename"]
    first_id = index[0]["samples"]
    images = [k for k in range(first_id, first_id + index[1]["samples"])]

    def tokens(d: Path) -> Path:
        f, at = faults.field_bytes(d, images[0], "input_ids")
        faults.flip_bytes(f, 1, seed=c.rng.randrange(2**32), at=at)
        return f

    def latents(d: Path) -> Path:
        sid = next(k for k in images if _has_latents(d, k))
        f, at = faults.field_bytes(d, sid, "latent_mean")
        faults.flip_bytes(f, 1, seed=c.rng.randrange(2**32), at=at)
        return f

    def truncated(d: Path) -> Path:
        f = d / second
        f.write_bytes(f.read_bytes()[:-100])
        return f

    def index_edited(d: Path) -> Path:
        raw = json.loads((d / "index.json").read_text())
        raw["shards"][1]["samples"] -= 1
        (d / "index.json").write_text(json.dumps(raw, sort_keys=True))
        if (d / MANIFEST_FILE).is_file():  # re-vouched for, so that the count check behind the manifest's is tried
            write_manifest(d)  # (an edit the manifest catches, naming index.json, is a tamper trial below)
        return d / second

    def deleted(d: Path) -> Path:
        (d / second).unlink()
        return d / second

    # (what, how, whether data.corrupt_shards=skip can skip it: an edited index.json shifts every later sample id)
    cases = [
        ("flipped token bytes", tokens, True),
        ("flipped latent bytes", latents, True),
        ("truncated file", truncated, True),
        ("index.json edited", index_edited, False),
        ("shard file deleted", deleted, True),
    ]
    ok = 0
    for i, (name, corrupt, skippable) in enumerate(cases):
        d = c.work / f"corrupt_shards{i}"
        shutil.copytree(multi, d)
        victim = corrupt(d)
        problems = []
        for mode in ("error", "skip"):
            try:
                got = faults.shard_loader(d, spec, mode)
            except ShardCorruptError as e:
                if str(victim) not in str(e):
                    problems.append(f"{mode}: the error does not name {victim}: {e}")
                elif mode == "skip" and skippable:
                    problems.append(f"skip: refused a shard it could skip: {e}")
                continue
            except Exception as e:  # noqa: BLE001  (any other failure is a result to report)
                problems.append(f"{mode}: {type(e).__name__}: {e}")
                continue
            kept = sum(s["samples"] for s in index) - index[1]["samples"]
            skipped = sum(len(r) for r, _ in got.corrupt)
            if mode == "error" or not skippable:
                problems.append(f"{mode}: loaded without an error")
            elif got.stream.steps_per_epoch != kept // 4 or skipped != index[1]["samples"]:
                problems.append(f"skip: {got.stream.steps_per_epoch} steps/epoch, {skipped} samples skipped")
        shutil.rmtree(d)
        outcome = "skipped and counted" if skippable else "refused in skip mode too"
        ok += report(
            "corrupt_shard",
            i,
            not problems,
            name + (f": {problems}" if problems else f": the error names {victim.name}; {outcome}"),
        )
    return ok


def _has_latents(d: Path, k: int) -> bool:
    from fastross.data.shards import MDSShards

    return len(MDSShards(d).read(k)["latent_mean"]) > 0


def crafted(ckpt: Path, name: str, marker: Path) -> None:
    """A payload in place of a checkpoint file, the manifest rewritten to match: integrity is not authorship."""
    import pickle

    import torch

    from fastross import checkpoint

    with open(ckpt / name, "wb") as f:
        if name == ".metadata":
            pickle.dump(faults.RunsCode(marker), f)
        else:
            torch.save({"torch": faults.RunsCode(marker)}, f)
    checkpoint.write_manifest(ckpt)


def corrupt_checkpoint_trials(c: Campaign) -> int:
    newest, previous = f"step_{STEPS:08d}", f"step_{STEPS - CKPT_EVERY:08d}"

    def distcp(ck: Path) -> Path:
        return sorted(ck.glob("*.distcp"))[0]

    cases = [
        ("flipped .distcp bytes", lambda ck: faults.flip_bytes(distcp(ck), 64, seed=c.rng.randrange(2**32))),
        ("truncated .distcp", lambda ck: distcp(ck).write_bytes(distcp(ck).read_bytes()[:-4096])),
        ("deleted manifest", lambda ck: (ck / "manifest.json").unlink()),
        ("`latest` names a deleted folder", lambda ck: shutil.rmtree(ck)),
        ("crafted .metadata", lambda ck: crafted(ck, ".metadata", c.work / "marker_metadata")),
    ]
    ok = 0
    for i, (name, corrupt) in enumerate(cases):
        rd = c.copy_of_reference(f"corrupt_ckpt{i}")
        corrupt(rd / "checkpoints" / newest)
        before = (rd / "metrics.jsonl").read_bytes()
        out = c.train(c.config(rd))
        problems = []
        if name.startswith("crafted"):
            if "refused to load" not in out or "train: done" in out:
                problems.append(f"not refused:\n{out[-1500:]}")
            if (c.work / "marker_metadata").exists():
                problems.append("THE PAYLOAD RAN")
            if (rd / "metrics.jsonl").read_bytes() != before:
                problems.append("the refused run wrote metrics")
            outcome = "refused"
        else:
            if resumed_at(out) != STEPS - CKPT_EVERY or "train: done" not in out:
                problems.append(f"did not resume from {previous}:\n{out[-1500:]}")
            problems += c.differences(rd)
            outcome = f"resumed from {previous}, exact"
        shutil.rmtree(rd)
        ok += report("corrupt_ckpt", i, not problems, name + (f": {problems[:3]}" if problems else f": {outcome}"))
    return ok


def converter_escapes(c: Campaign) -> int:
    """Image paths leading out of --images: `../`, absolute, a symlink. Returns how many got through (written, or
    the outside file's bytes found in a shard)."""
    from fastross.data import convert

    root = c.work / "escape"
    images, outside = root / "images", root / "outside"
    images.mkdir(parents=True)
    outside.mkdir()
    secret = faults.png(faults.rgb_image(24, 24, 99))
    (outside / "secret.png").write_bytes(secret)
    (images / "ok.png").write_bytes(faults.png(faults.rgb_image(24, 24, 1)))
    os.symlink(outside / "secret.png", images / "link.png")
    ask = [{"from": "human", "value": "<image>\nWhat is shown?"}, {"from": "gpt", "value": "Noise."}]
    attempts = {"dotdot": "../outside/secret.png", "absolute": str(outside / "secret.png"), "symlink": "link.png"}
    records = [{"id": k, "image": v, "conversations": ask} for k, v in attempts.items()]
    records.append({"id": "ok", "image": "ok.png", "conversations": ask})
    (root / "records.json").write_text(json.dumps(records))
    out = root / "shards"
    with contextlib.redirect_stdout(io.StringIO()):
        rc = convert.main(convert_args(c.models, root / "records.json", images, out, vae=False))
    from fastross.data.schema import read_meta
    from fastross.data.shards import MDSShards

    written = [MDSShards(out).read(k)["id"] for k in range(len(MDSShards(out)))] if rc == 0 else []
    leaked = any(secret in f.read_bytes() for f in out.glob("*.mds")) if rc == 0 else False
    skipped = read_meta(out)["skipped"] if rc == 0 else {}
    escaped = 0
    for i, (name, path) in enumerate(attempts.items()):
        got_through = name in written or leaked
        escaped += got_through
        report(
            "escape",
            i,
            not got_through and rc == 0 and written == ["ok"],
            f"image {path!r}: " + ("WRITTEN" if got_through else f"skipped ({skipped})"),
        )
    shutil.rmtree(root)
    return escaped


def rng_escape(c: Campaign) -> int:
    """A crafted rng_rank0.pt in the newest checkpoint, its manifest rewritten: 1 if the payload ran."""
    rd = c.copy_of_reference("escape_run")
    marker = c.work / "marker_rng"
    crafted(rd / "checkpoints" / f"step_{STEPS:08d}", "rng_rank0.pt", marker)
    run_out = c.train(c.config(rd))
    ran = marker.exists()
    refused = "rng_rank0.pt: refused to load" in run_out and "train: done" not in run_out
    report(
        "escape",
        3,
        refused and not ran,
        "crafted rng_rank0.pt: "
        + ("THE PAYLOAD RAN" if ran else "refused, no code ran" if refused else f"not refused:\n{run_out[-1500:]}"),
    )
    shutil.rmtree(rd)
    return int(ran)


# ---------------------------------------------------------------- entry points run in this process


def in_process(fn, *args) -> tuple[int, str]:
    """Call an entry point's main (or any function) here: (its exit code, everything it printed and the message of
    what it raised). An exception counts as exit 1, as it would end the command; the world-of-one variables a
    training run sets are restored after it, and so is sys.excepthook."""
    import sys
    import traceback

    world = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # what a world of one sets
    env, hook = {k: os.environ.get(k) for k in world}, sys.excepthook  # init_process_group wraps sys.excepthook
    out = io.StringIO()
    rc = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            got = fn(*args)
            rc = got if isinstance(got, int) else 0
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
            out.write(f"\nSystemExit: {e.code}\n")
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # noqa: BLE001  (judged; DCP's CheckpointException is a BaseException)
            rc = 1
            out.write(f"\nraised {type(e).__name__}: {e}\n{''.join(traceback.format_exception_only(e))}")
        finally:
            for k, v in env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            sys.excepthook = hook
            import torch.distributed as dist

            if dist.is_initialized():  # an entry point that raised before its own shutdown
                dist.destroy_process_group()
    return rc, out.getvalue()


def train_here(cfg: Path, *overrides: str) -> tuple[int, str]:
    """One `python -m fastross.train CONFIG overrides` on one rank, in this process."""
    from fastross import train

    return in_process(train.main, [str(cfg), *overrides])


BASE_STEPS, BASE_EVERY = 2, 1  # a tampered newest checkpoint falls back to the one before: one step to retrain


class Small:
    """The 1-rank run the payload and tamper trials start from, trained in this process once: a run folder with
    checkpoints at steps 1 and 2 (BASE_STEPS, BASE_EVERY), its export, the data set's untampered 2-step metrics,
    and the pieces to call each entry point."""

    def __init__(self, c: Campaign):
        self.c, self.root = c, c.work / "small"
        self.root.mkdir()
        self.run = self.root / "run"
        rc, out = train_here(self.config(self.run, steps=BASE_STEPS, every=BASE_EVERY))
        if rc != 0 or "train: done" not in out:
            raise RuntimeError(f"faults: the 1-rank base run failed:\n{out[-3000:]}")
        self.step = self.run / "checkpoints" / f"step_{BASE_STEPS:08d}"
        self.export = self.root / "export"
        rc, out = in_process(self._export_main, self.run, self.export)
        if rc != 0:
            raise RuntimeError(f"faults: exporting the 1-rank base run failed:\n{out[-3000:]}")
        self.data_run = self.root / "data_ref"
        rc, out = train_here(self.config(self.data_run, steps=2, every=100))
        if rc != 0:
            raise RuntimeError(f"faults: the 2-step data reference run failed:\n{out[-3000:]}")
        self.n = 0
        self._model = None

    def config(self, run_dir: Path, steps: int, every: int, shards: Path | None = None) -> Path:
        return faults.write_config(
            run_dir.parent / f"{run_dir.name}.yaml",
            self.c.models,
            shards or self.c.shards,
            run_dir,
            workers=0,
            max_steps=steps,
            ckpt_every=every,
            keep_checkpoints=2,
        )

    def fresh(self, name: str) -> Path:
        """A folder name not used before in this campaign."""
        self.n += 1
        return self.root / f"{name}{self.n}"

    def copy_run(self, name: str) -> Path:
        return faults.linked_copy(self.run, self.fresh(name))

    @staticmethod
    def _export_main(src: Path, out: Path) -> int:
        from fastross import export

        return export.main([str(src), "--out", str(out)])

    # -- the entry points: each returns (exit code, what it said)

    def resume(self, run_dir: Path, cfg: Path | None = None) -> tuple[int, str]:
        return train_here(cfg or self.config(run_dir, steps=BASE_STEPS, every=BASE_EVERY))

    def init_from(self, src: Path) -> tuple[int, str]:
        rd = self.fresh("init_from_run")
        return train_here(self.config(rd, steps=1, every=100), f"model.init_from={src}")

    def export_(self, src: Path) -> tuple[int, str]:
        return in_process(self._export_main, src, self.fresh("export_out"))

    def generate(self, src: Path) -> tuple[int, str]:
        from fastross import generate

        return in_process(
            generate.main,
            ["--model", str(src), "--prompt", "What is shown?", "--max-new-tokens", "2", "--device", "cpu"],
        )

    def eval_(self, src: Path) -> tuple[int, str]:
        from fastross import eval as feval

        synth = self.c.shards.parent / "synth"
        return in_process(
            feval.main,
            [
                "--model",
                str(src),
                "--data",
                str(synth / "eval.json"),
                "--images",
                str(synth / "images"),
                "--out",
                str(self.fresh("eval_out")),
                "--limit",
                "1",
                "--max-new-tokens",
                "2",
                "--device",
                "cpu",
            ],
        )

    def reference(self, src: Path) -> tuple[int, str]:
        """The reference-checkpoint importer, into this run's model."""
        from fastross import ross_format

        if self._model is None:
            from fastross import build, config as fconfig

            cfg = fconfig.load(str(self.step / "config.yaml"), check_paths=False)
            self._model = build.host(cfg.model, "sdpa", "cpu", seed=cfg.train.seed)
        return in_process(ross_format.reference_state, src, self._model)


# ---------------------------------------------------------------- code in files: every entry point x every payload

# (entry point, payload kind): every place a checkpoint (or the import of a reference one) is read, with each kind
# of file that place reads. bytes_item: a bytes item in `.metadata` pointing at a pickle (resume: an optimizer
# param_groups value; elsewhere a new model.* entry); model_bytes: a model tensor declared as bytes; metadata:
# `.metadata` itself; rng / trainer_json: those files; yaml_tag: a YAML tag in the config read (resume: the run's
# own; init_from: an export's fastross_config.yaml; else the checkpoint's config.yaml); reference_bin: a reference
# mm_projector.bin.
PAYLOAD_TRIALS = [
    ("resume", "bytes_item"),
    ("resume", "model_bytes"),
    ("resume", "metadata"),
    ("resume", "rng"),
    ("resume", "trainer_json"),
    ("resume", "yaml_tag"),
    ("init_from", "bytes_item"),
    ("init_from", "model_bytes"),
    ("init_from", "metadata"),
    ("init_from", "yaml_tag"),
    ("init_from", "reference_bin"),
    ("export", "bytes_item"),
    ("export", "model_bytes"),
    ("export", "metadata"),
    ("export", "yaml_tag"),
    ("generate", "bytes_item"),
    ("generate", "model_bytes"),
    ("generate", "metadata"),
    ("generate", "yaml_tag"),
    ("eval", "bytes_item"),
    ("eval", "model_bytes"),
    ("eval", "metadata"),
    ("eval", "yaml_tag"),
    ("reference", "reference_bin"),
]


def payload_trial(s: Small, i: int, entry: str, kind: str) -> bool:
    """Plant one payload where `entry` reads it, run `entry`: True when the payload's code ran (its marker file
    appeared)."""
    marker = s.c.work / f"marker_payload{i}"
    rd = s.copy_run(f"payload{i}_")
    ck = rd / "checkpoints" / s.step.name
    src, cfg = rd, None
    if kind in ("bytes_item", "model_bytes"):
        what = faults.plant_bytes_item(
            ck,
            marker,
            {"bytes_item": "param_group" if entry == "resume" else "extra_model", "model_bytes": "model"}[kind],
        )
        names = [".metadata", faults.PAYLOAD_FILE, what]
    elif kind in ("metadata", "rng", "trainer_json"):
        name = {"metadata": ".metadata", "rng": "rng_rank0.pt", "trainer_json": "trainer.json"}[kind]
        faults.plant_file(ck, name, marker)
        names = [name]
    elif kind == "yaml_tag":
        if entry == "resume":
            cfg = s.config(rd, steps=BASE_STEPS, every=BASE_EVERY)
            faults.plant_yaml(cfg, marker)
            names = [cfg.name]
        elif entry == "init_from":
            src = faults.linked_copy(s.export, s.fresh("payload_export"))
            faults.plant_yaml(src / "fastross_config.yaml", marker)
            names = ["fastross_config.yaml"]
        else:
            faults.plant_yaml(ck / "config.yaml", marker)
            names = ["config.yaml"]
    elif kind == "reference_bin":
        src = faults.plant_reference(s.fresh("payload_reference"), marker)
        names = ["mm_projector.bin"]
    else:
        raise ValueError(kind)
    call = {
        "resume": lambda: s.resume(rd, cfg),
        "init_from": lambda: s.init_from(src),
        "export": lambda: s.export_(src),
        "generate": lambda: s.generate(src),
        "eval": lambda: s.eval_(src),
        "reference": lambda: s.reference(src),
    }[entry]
    rc, said = call()
    ran = marker.exists()
    refused = rc != 0 and any(n in said for n in names)
    outcome = (
        "THE PAYLOAD RAN" + (f", and the entry point went on (exit {rc})" if rc == 0 else f", exit {rc}")
        if ran
        else "refused naming the file, no code ran"
        if refused
        else f"no code ran (exit {rc}{'' if rc == 0 else ', the message names none of ' + str(names)})"
    )
    report("pickle", i, not ran, f"{entry} x {kind}: {outcome}")
    if ran or rc != 0 and not refused:
        print(f"faults:   its last words: {said.strip()[-400:]!r}", flush=True)
    shutil.rmtree(rd, ignore_errors=True)
    if src != rd and Path(src).is_dir():
        shutil.rmtree(src, ignore_errors=True)
    return ran


# ---------------------------------------------------------------- tampered files: refused naming the file, or recovered


def _flip(path: Path, seed: int) -> None:
    data = bytearray(path.read_bytes())
    r = random.Random(seed)
    for k in r.sample(range(len(data)), min(8, len(data))):
        data[k] ^= 0xFF
    faults.replace_file(path, bytes(data))


def _edit_json(path: Path, change) -> None:
    raw = json.loads(path.read_text())
    change(raw)
    faults.replace_file(path, json.dumps(raw, indent=1).encode())


def _edit_lengths(path: Path) -> None:
    a = np.load(path)
    a = a + a // 2  # every sample's length half as long again: the packing plan changes from the first step
    buf = io.BytesIO()
    np.save(buf, a)
    faults.replace_file(path, buf.getvalue())


def _edit_shard(d: Path, name: str) -> None:
    """One token id of a sample in shard file `name` changed to another valid id (its structure intact)."""
    from fastross.data.shards import MDSShards

    shards = MDSShards(d)
    for k in range(len(shards)):
        try:
            f, at = faults.field_bytes(d, k, "input_ids")
        except ValueError:
            continue
        if f.name == name and len(at) >= 8:
            data = bytearray(f.read_bytes())
            data[at.start + 4] ^= 0x01  # the second id's low byte: still a small, valid id
            faults.replace_file(f, bytes(data))
            return
    raise ValueError(f"{d}: no sample with unique input_ids bytes in {name}")


def _edit_metadata(path: Path) -> None:
    """`.metadata` with one model entry's stored size changed (unpickled and re-pickled by DCP's own classes)."""
    import pickle

    from torch.distributed.checkpoint import metadata as m

    from fastross import checkpoint

    md = checkpoint.read_metadata(path)
    key = sorted(
        k
        for k, v in md.state_dict_metadata.items()
        if isinstance(v, m.TensorStorageMetadata) and k.startswith("model.")
    )[0]
    for k in list(md.storage_data):
        if k.fqn == key:
            info = md.storage_data[k]
            md.storage_data[k] = type(info)(info.relative_path, info.offset + 4, info.length)
    faults.replace_file(path, pickle.dumps(md))


def _edit_rng(path: Path) -> None:
    import torch

    state = torch.load(path, weights_only=True)
    state["torch"] = state["torch"].clone()
    state["torch"][100] ^= 1
    buf = io.BytesIO()
    torch.save(state, buf)
    faults.replace_file(path, buf.getvalue())


def _edit_distcp(path: Path) -> None:
    """A float of the shard changed by one ulp-ish bit (the file keeps its size)."""
    with open(path, "rb") as f:
        data = bytearray(f.read())
    data[len(data) // 2] ^= 0x01
    faults.replace_file(path, bytes(data))


def checkpoint_tamper_cases(seed: int) -> list[tuple[str, str, object]]:
    """(file, how, tamper(step folder)) for every file of a checkpoint step and the run's `latest`: flipped bytes
    and a plausible edit, the manifest left as it was (it is what vouches for the files)."""

    def distcp(ck):
        return sorted(ck.glob("*.distcp"))[0]

    return [
        (".metadata", "flipped", lambda ck: _flip(ck / ".metadata", seed)),
        (".metadata", "edited", lambda ck: _edit_metadata(ck / ".metadata")),
        ("__0_0.distcp", "flipped", lambda ck: _flip(distcp(ck), seed)),
        ("__0_0.distcp", "edited", lambda ck: _edit_distcp(distcp(ck))),
        ("trainer.json", "flipped", lambda ck: _flip(ck / "trainer.json", seed)),
        (
            "trainer.json",
            "edited",
            lambda ck: _edit_json(
                ck / "trainer.json",
                lambda t: t["scheduler"].update(base_lrs=[x * 10 for x in t["scheduler"]["base_lrs"]]),
            ),
        ),
        ("rng_rank0.pt", "flipped", lambda ck: _flip(ck / "rng_rank0.pt", seed)),
        ("rng_rank0.pt", "edited", lambda ck: _edit_rng(ck / "rng_rank0.pt")),
        ("config.yaml", "flipped", lambda ck: _flip(ck / "config.yaml", seed)),
        (
            "config.yaml",
            "edited",
            lambda ck: faults.replace_file(
                ck / "config.yaml", (ck / "config.yaml").read_bytes().replace(b"lr_llm: 0.001", b"lr_llm: 0.01")
            ),
        ),
        ("manifest.json", "flipped", lambda ck: _flip(ck / "manifest.json", seed)),
        (
            "manifest.json",
            "edited",
            lambda ck: _edit_json(ck / "manifest.json", lambda t: t["sha256"].update({"trainer.json": "0" * 64})),
        ),
        (
            "latest",
            "flipped",
            lambda ck: faults.replace_file(
                ck.parent / "latest", bytes(b ^ 0xFF for b in (ck.parent / "latest").read_bytes())
            ),
        ),
        ("latest", "edited", lambda ck: faults.replace_file(ck.parent / "latest", b"step_00000003")),
    ]


def dataset_tamper_cases(d: Path, seed: int) -> list[tuple[str, str, object]]:
    """(file, how, tamper(folder)) for every file of a converted data set: flipped bytes and a plausible edit."""
    cases = []
    for f in sorted(p.name for p in d.iterdir() if p.is_file()):
        cases.append((f, "flipped", lambda d, f=f: _flip(d / f, seed)))
        if f == "fastross.json":
            edit = lambda d: _edit_json(  # noqa: E731
                d / "fastross.json", lambda t: t.update(latent_scale=t["latent_scale"] * 10)
            )
        elif f == "index.json":
            edit = lambda d: _edit_json(  # noqa: E731
                d / "index.json", lambda t: t["shards"][0].update(samples=t["shards"][0]["samples"] - 1)
            )
        elif f == "lengths.npy":
            edit = lambda d: _edit_lengths(d / "lengths.npy")  # noqa: E731
        elif f.endswith(".mds"):
            edit = lambda d, f=f: _edit_shard(d, f)  # noqa: E731
        else:  # a file this campaign does not know (a manifest, say): its JSON's first value changed, else a byte
            edit = lambda d, f=f: _edit_unknown(d / f)  # noqa: E731
        cases.append((f, "edited", edit))
    return cases


def _edit_unknown(path: Path) -> None:
    try:
        raw = json.loads(path.read_text())
    except ValueError:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        faults.replace_file(path, bytes(data))
        return

    def change(x):
        if isinstance(x, dict) and x:
            k = sorted(x)[0]
            x[k] = change(x[k])
        elif isinstance(x, list) and x:
            x[0] = change(x[0])
        elif isinstance(x, str):
            return x[:-1] + ("0" if x[-1:] != "0" else "1")
        elif isinstance(x, (int, float)) and not isinstance(x, bool):
            return x + 1
        return x

    faults.replace_file(path, json.dumps(change(raw)).encode())


def metrics_differences(ref: Path, got: Path) -> list[str]:
    rm, gm = faults.metrics(ref), faults.metrics(got)
    if [m["step"] for m in rm] != [m["step"] for m in gm]:
        return [f"metrics steps {[m['step'] for m in gm]}, the untampered run has {[m['step'] for m in rm]}"]
    return [
        f"step {a['step']} {k}: {b.get(k)!r}, untampered {a.get(k)!r}"
        for a, b in zip(rm, gm)
        for k in sorted((a.keys() | b.keys()) - faults.MEASURED)
        if a.get(k) != b.get(k)
    ]


def parts_conversion(c: Campaign, root: Path) -> tuple[Path, Path, Path]:
    """A conversion of 12 stage-2 records in 2 parts and their merge: (part 0, part 1, merged)."""
    from fastross.data import convert, merge

    synth = c.shards.parent / "synth"
    src = root / "parts_src.json"
    src.write_text(json.dumps(json.loads((synth / "stage2.json").read_text())[:12]))
    parts = []
    for i in range(2):
        out = root / f"part{i}"
        rc, said = in_process(
            convert.main,
            convert_args(
                c.models, src, synth / "images", out, "qwen2_ross", "--shard-size", "65536", "--part", f"{i}/2"
            ),
        )
        if rc != 0:
            raise RuntimeError(f"faults: converting part {i}/2 failed:\n{said[-2000:]}")
        parts.append(out)
    rc, said = in_process(merge.main, [str(parts[0]), str(parts[1]), "--out", str(root / "merged")])
    if rc != 0:
        raise RuntimeError(f"faults: merging the parts failed:\n{said[-2000:]}")
    return parts[0], parts[1], root / "merged"


def same_folder(a: Path, b: Path) -> bool:
    """Every file of two folders byte for byte (fastross.json's paths aside: each merge names its own)."""
    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()):
        return False
    for n in names:
        x, y = (a / n).read_bytes(), (b / n).read_bytes()
        if n == "fastross.json":
            x, y = x.replace(str(a).encode(), b"<out>"), y.replace(str(b).encode(), b"<out>")
        if x != y:
            return False
    return True


def tamper_trials(s: Small, seed: int, limit: int | None = None) -> tuple[int, int]:
    """Every file of a checkpoint step (resumed from), of a converted data set (trained on) and of one part of a
    split conversion (merged), flipped and edited in turn, on a fresh copy each: caught (the command fails naming
    the file) or recovered (the resume exact / the training identical / the merge identical to the untampered
    one). Returns (caught or recovered, trials)."""
    from fastross.data import merge

    parts: list = []

    def checkpoint_trial(tamper):
        rd = s.copy_run("tamper_ckpt")
        tamper(rd / "checkpoints" / s.step.name)
        rc, said = s.resume(rd)
        return rc, said, lambda: not s.c.differences_from(s.run, rd), [rd]

    def data_trial(tamper):
        d, rd = s.fresh("tamper_data"), s.fresh("tamper_data_run")
        shutil.copytree(s.c.shards, d)
        tamper(d)
        rc, said = train_here(s.config(rd, steps=2, every=100, shards=d))
        return rc, said, lambda: not metrics_differences(s.data_run, rd), [d, rd]

    def parts_trial(tamper):
        part0, part1, merged = parts
        d, out = s.fresh("tamper_part"), s.fresh("tamper_merged")
        shutil.copytree(part1, d)
        tamper(d)
        rc, said = in_process(merge.main, [str(part0), str(d), "--out", str(out)])
        return rc, said, lambda: out.is_dir() and same_folder(merged, out), [d, out]

    trials = [("checkpoint", n, h, t, checkpoint_trial) for n, h, t in checkpoint_tamper_cases(seed)]
    trials += [("data set", n, h, t, data_trial) for n, h, t in dataset_tamper_cases(s.c.shards, seed)]
    if limit is None or limit > len(trials):  # the split conversion is made only when its trials are asked for
        root = s.fresh("parts")
        root.mkdir()
        parts.extend(parts_conversion(s.c, root))
        first = min(p.name for p in parts[1].glob("*.mds"))  # the other shard files are checked the same way
        trials += [
            ("part 1/2 (merged)", n, h, t, parts_trial)
            for n, h, t in dataset_tamper_cases(parts[1], seed)
            if not n.endswith(".mds") or n == first
        ]
    trials = trials[:limit] if limit is not None else trials
    ok = 0
    for i, (where, name, how, tamper, run) in enumerate(trials):
        rc, said, same, leftovers = run(tamper)
        verdict = faults.judge(rc, said, [name], same)
        good = verdict in (faults.CAUGHT, faults.RECOVERED)
        ok += good
        detail = {
            faults.CAUGHT: f"refused naming {name}",
            faults.RECOVERED: "recovered, identical to the untampered run",
            faults.SILENT: "WENT ON WITH IT (exit 0, a different result)",
            faults.UNNAMED: f"refused (exit {rc}) without naming {name}",
        }[verdict]
        report("tamper", i, good, f"{where} {name} {how}: {detail}")
        if not good:
            print(f"faults:   its last words: {said.strip()[-300:]!r}", flush=True)
        for p in leftovers:
            shutil.rmtree(p, ignore_errors=True)
    return ok, len(trials)


# ---------------------------------------------------------------- fuzzed records


def fuzz(c: Campaign, n: int, seed: int, spec, chunk: int = 100, kinds: tuple = faults.KINDS) -> dict:
    """n fuzzed records through the converter, `chunk` per conversion: crashes, lost, silent_corruption."""
    from fastross.data import convert
    from fastross.data.images import preprocess

    root = c.work / "fuzz"
    images = root / "images"
    images.mkdir(parents=True)
    (root / "outside.png").write_bytes(faults.png(faults.rgb_image(16, 16, 0)))
    args = convert.parse_args(convert_args(c.models, "-", images, "-", "qwen2_ross", "--image-aspect", "square"))
    conv = convert.Converter(args)
    counts = {"records": 0, "crashes": 0, "lost": 0, "silent_corruption": 0}
    for start in range(0, n, chunk):
        batch = faults.fuzz_records(min(chunk, n - start), seed * 1_000_003 + start, images, start, kinds)
        counts["records"] += len(batch)
        got, problem = convert_records(conv, root, f"fuzz{start}", batch)
        if problem:
            counts["crashes"] += 1
            report("fuzz", start // chunk, False, problem)
            continue
        by_id = {f.record["id"]: f for f in batch if isinstance(f.record, dict) and isinstance(f.record.get("id"), str)}
        lost = [f.kind for f in batch if f.expect == VALID and f.record["id"] not in got]
        bad = [f"{f.kind} written" for rid, f in by_id.items() if f.expect == INVALID and rid in got]
        twins = []
        for rid in got:
            f = by_id.get(rid)
            if f is None:
                bad.append(f"an unexpected sample {rid!r}")
                continue
            twin = dict(f.record)
            if f.rgb is not None:
                twin["image"] = f"twin_{rid}.png"
                (images / twin["image"]).write_bytes(faults.png(f.rgb, "RGB"))
            twins.append(twin)
        clean, problem = convert_records(conv, root, f"clean{start}", twins)
        if problem:
            bad.append(f"the clean conversion failed: {problem}")
            clean = {}
        for rid, sample in got.items():
            f, twin = by_id.get(rid), clean.get(rid)
            if f is None:
                continue
            if twin is None:
                bad.append(f"{f.kind}: a clean conversion skips it")
                continue
            bad += [
                f"{f.kind}: {k}"
                for k in sample
                if k not in ("image", "index", "latent_mean", "latent_std") and not _same(sample[k], twin[k])
            ]
            for k in ("latent_mean", "latent_std"):  # fp32 reordering: VAE batches of other companions
                a, b = (np.frombuffer(s[k], np.float32) for s in (sample, twin))
                if a.shape != b.shape or not np.allclose(a, b, rtol=0, atol=1e-5):
                    bad.append(f"{f.kind}: {k}")
            if f.rgb is not None:
                import torch

                if sample["image"] != f.data and sample["image"] != (images / f.image).read_bytes():
                    bad.append(f"{f.kind}: stored image bytes")
                want = faults.expected_pixels(f.rgb, spec)
                got_px, twin_px = (preprocess(s["image"], spec, "square") for s in (sample, twin))
                if not (torch.equal(got_px, want) and torch.equal(twin_px, want)):
                    bad.append(f"{f.kind}: pixels")
        counts["lost"] += len(lost)
        counts["silent_corruption"] += len(bad)
        kinds = sorted({f.kind.split(":")[0] for f in batch})
        report(
            "fuzz",
            start // chunk,
            not (lost or bad),
            f"{len(batch)} records ({len(kinds)} kinds), "
            f"{len(got)} written, lost {len(lost)}, silent_corruption {len(bad)}"
            + (f": {lost[:3]} {bad[:3]}" if lost or bad else ""),
        )
        shutil.rmtree(root / f"fuzz{start}", ignore_errors=True)
        shutil.rmtree(root / f"clean{start}", ignore_errors=True)
    shutil.rmtree(root)
    return counts


def convert_records(conv, root: Path, name: str, records: list) -> tuple[dict, str | None]:
    """Convert `records` with a loaded Converter: ({sample id: sample}, None), or ({}, what went wrong)."""
    from fastross.data.shards import MDSShards

    src = root / f"{name}.jsonl"  # one line per record: a record only its text can hold goes as written
    src.write_text(
        "".join((r.text() if isinstance(r, faults.Fuzzed) else json.dumps(r)) + "\n" for r in records), encoding="utf-8"
    )
    conv.a.json, conv.a.out = [str(src)], str(root / name)
    try:
        rep = conv.run()
    except Exception as e:  # noqa: BLE001  (a crash is the result being counted)
        return {}, f"the converter raised {type(e).__name__}: {e}"
    if rep.read != len(records) or rep.written + sum(rep.skipped.values()) != rep.read:
        return {}, f"read {rep.read} of {len(records)}, written {rep.written} + skipped {dict(rep.skipped)}"
    shards = MDSShards(root / name)
    return {s["id"]: s for s in (shards.read(k) for k in range(len(shards)))}, None


# ----------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=None, help="seeds the kill steps, delays and fuzz (default: random)")
    p.add_argument("--kills", type=int, default=10, help="SIGKILLs at random steps")
    p.add_argument(
        "--save-kills",
        type=int,
        default=10,
        help=f"SIGKILLs during saves (at most {len(SAVE_KILLS)} moments, then repeated)",
    )
    p.add_argument("--fuzz", type=int, default=1000, help="fuzzed converter records")
    p.add_argument(
        "--payloads",
        type=int,
        default=len(PAYLOAD_TRIALS),
        help=f"entry point x payload trials (the first N of {len(PAYLOAD_TRIALS)})",
    )
    p.add_argument("--tampers", type=int, default=None, help="tampered-file trials (the first N; default: all)")
    p.add_argument(
        "--skip",
        default="",
        help="comma-separated sections to leave out (a reduced run): kills, "
        "save_kills, disk_full, corrupt, escapes, fuzz, payloads, tampers; their counts print as 0/0",
    )
    p.add_argument("--save", action="store_true", help="append the counts to benchmarks/results/faults.csv")
    a = p.parse_args(argv)
    seed = a.seed if a.seed is not None else random.SystemRandom().randrange(1_000_000)
    print(f"faults: seed {seed} (repeat with --seed {seed})", flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fastross-faults-") as tmp:
        line = campaign(Path(tmp), seed, a)
    wall = time.perf_counter() - t0
    print(f"faults: wall {wall:.0f} s", flush=True)
    if a.save:
        from devtools import results

        path = results.append_csv(
            "faults.csv",
            ["date", "commit", "machine", "seed", "wall_s", "line"],
            [[results.today(), results.commit(), results.machine(), seed, f"{wall:.0f}", line]],
        )
        print(f"faults: appended to {path}", flush=True)
    print(line, flush=True)
    return 0


def campaign(work: Path, seed: int, a) -> str:
    from devtools.golden import prepare
    from fastross import lifecycle
    from fastross.data.images import ImageSpec

    skip = {x.strip() for x in (getattr(a, "skip", "") or "").split(",") if x.strip()}
    kills = 0 if "kills" in skip else a.kills
    save_kills = 0 if "save_kills" in skip else a.save_kills
    c = Campaign(work, seed, *prepare(work / "setup"))
    c.reference()
    spec = ImageSpec.from_pretrained(str(c.models / "vision"))
    print(f"faults: reference run done ({STEPS} steps on {RANKS} ranks, a checkpoint every {CKPT_EVERY})", flush=True)
    exact = sum(kill_at_random_step(c, i) for i in range(kills))
    save_ok = sum(kill_during_save(c, i) for i in range(save_kills))
    full, full_n, ckpt_ok, ckpt_n, escaped = 0, 0, 0, 0, 0
    if "disk_full" not in skip:
        full = disk_full_in_training(c, 0, "enospc_save") + disk_full_in_training(c, 1, "enospc_metrics")
        ok, multi = disk_full_in_conversion(c, 2)
        full, full_n = full + ok, 3
        if "corrupt" not in skip:
            caught = corrupt_shard_trials(c, multi, spec)
            print(f"faults: corrupt shards caught {caught}/5", flush=True)
    if "corrupt" not in skip:
        ckpt_ok, ckpt_n = corrupt_checkpoint_trials(c), 5
    if "escapes" not in skip:
        escaped = converter_escapes(c) + rng_escape(c)
    f = fuzz(c, 0 if "fuzz" in skip else a.fuzz, seed, spec)
    executed, payloads, tampered, tampers = 0, 0, 0, 0
    if not {"payloads", "tampers"} <= skip:
        small = Small(c)
        print("faults: the 1-rank base run, its export and the 2-step data reference done", flush=True)
        if "payloads" not in skip:
            chosen = PAYLOAD_TRIALS[: a.payloads]
            executed, payloads = sum(payload_trial(small, i, e, k) for i, (e, k) in enumerate(chosen)), len(chosen)
        if "tampers" not in skip:
            tampered, tampers = tamper_trials(small, seed, getattr(a, "tampers", None))
    left = lifecycle.clean_dead_multiprocessing_dirs(work, say=lambda m: None)  # the killed runs' pymp-* folders
    print(f"faults: removed {len(left)} pymp-* folder(s) the SIGKILLed runs left in {work}", flush=True)
    return final_line(
        resume_exact=(exact, kills),
        save_kill_ok=(save_ok, save_kills),
        fuzz=f,
        escapes=escaped,
        disk_full_ok=(full, full_n),
        corrupt_ckpt_ok=(ckpt_ok, ckpt_n),
        pickle_executed=(executed, payloads),
        tamper_caught=(tampered, tampers),
    )


def final_line(*, fuzz: dict, escapes: int, **fractions: tuple[int, int]) -> str:
    """The campaign's line; FRACTIONS: resume_exact, save_kill_ok, disk_full_ok, corrupt_ckpt_ok, pickle_executed,
    tamper_caught as (count, trials)."""
    r = {k: f"{n}/{d}" for k, (n, d) in fractions.items()}
    return (
        f"faults: resume_exact {r['resume_exact']} save_kill_ok {r['save_kill_ok']} fuzz_records {fuzz['records']} "
        f"crashes {fuzz['crashes']} lost {fuzz['lost']} silent_corruption {fuzz['silent_corruption']} "
        f"escapes {escapes} disk_full_ok {r['disk_full_ok']} corrupt_ckpt_ok {r['corrupt_ckpt_ok']} "
        f"pickle_executed {r['pickle_executed']} tamper_caught {r['tamper_caught']}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
