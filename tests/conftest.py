"""Shared fixtures: tiny model folders and bundled data, made once per session.

TRITON_INTERPRET must be set before any module defining a @triton.jit kernel is imported.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Workers share the machine's cores: one intra-op thread each (and in what they launch), as torchrun gives each
    # rank, rather than a pool per worker whose threads spin against the other worker's. Set before torch loads.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Streaming leaves shared memory and lock files in TMPDIR: give the session its own. pytest-xdist's workers inherit
# the controller's TMPDIR; their folders go beside the controller's, not inside it, so that the paths of the loader
# workers' sockets under a run's TMPDIR stay within the kernel's 107 bytes (fastross.data.loader.check_worker_tmpdir).
_BASE = os.environ.setdefault("FASTROSS_TESTS_BASE", tempfile.gettempdir())
_TMP = tempfile.mkdtemp(prefix="fastross-tests-", dir=_BASE)
os.environ["TMPDIR"] = _TMP
tempfile.tempdir = _TMP

# Hypothesis keeps its caches (constants, unicode data, any example database) in ./.hypothesis by default: the
# repository tree. Give it the session's folder instead.
from hypothesis.configuration import set_hypothesis_home_dir  # noqa: E402

set_hypothesis_home_dir(Path(_TMP) / "hypothesis")


def pytest_sessionfinish(session, exitstatus):
    """The session's folder goes with a passing session (the torchrun tests' runs reach gigabytes); a failing one
    keeps it to look at."""
    if exitstatus == 0:
        shutil.rmtree(_TMP, ignore_errors=True)
    else:
        print(f"\nthe session's files are kept in {_TMP}")


# Session runs that several tests read. `make test` runs the suite on 2 pytest-xdist workers (--dist loadgroup), and
# each worker builds the session fixtures it needs: the tests reading one of these runs share a worker, so that each
# run is made once. (tiny_models, synth_data and the shards are made on both workers: seconds each.)
SHARED_RUNS = {
    "four_steps_1rank": "skewed_runs",
    "four_steps_2ranks": "skewed_runs",
    "nine_steps_2ranks": "skewed_runs",
    "run_dir": "run_dir",
    "first_step_from_run": "run_dir",
    "tiny_clip": "clip",
}


def xdist_group(item) -> str | None:
    """The worker group of a test: that of the first shared run it reads, else its module's when it reads a
    module-scoped fixture (made once per module and worker), else none (any worker)."""
    defs = item._fixtureinfo.name2fixturedefs
    for name, group in SHARED_RUNS.items():
        if name in defs:
            return group
    if any(d[-1].scope in ("module", "class") for d in defs.values() if d):
        return item.nodeid.split("::")[0]
    return None


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups into the test ids
def pytest_collection_modifyitems(config, items):
    import torch

    for item in items:
        group = xdist_group(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
    # The multi-process tests first: among tests without a group, xdist hands them out in this order, and a
    # 70-second test started last would be the run's tail.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    from fastross.demo.make_tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def llama_tokenizers(tmp_path_factory) -> Path:
    """Tiny Vicuna-style (llama/) and Llama-3-style (llama3/) tokenizer folders."""
    from devtools.tiny_tokenizers import write

    return write(tmp_path_factory.mktemp("llama_tokenizers"))


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Path:
    from devtools.golden import SYNTH
    from fastross.data.synth import write_dataset

    out = tmp_path_factory.mktemp("synth")
    write_dataset(out, **SYNTH)
    return out


@pytest.fixture(scope="session")
def tokenizer(tiny_models):
    from fastross.data.templates import load_tokenizer

    return load_tokenizer(str(tiny_models / "llm"))


def convert(
    models: Path,
    data: Path,
    out: Path,
    template: str,
    json_name: str,
    vae: bool = True,
    images: Path | None = None,
    vision: Path | None = None,
) -> Path:
    from fastross.data.convert import main
    from fastross.demo import convert_args

    assert (
        main(convert_args(models, data / json_name, images or data / "images", out, template, vision=vision, vae=vae))
        == 0
    )
    return out


@pytest.fixture(scope="session")
def stage2_shards(tiny_models, synth_data, tmp_path_factory) -> Path:
    return convert(tiny_models, synth_data, tmp_path_factory.mktemp("shards") / "stage2", "qwen2_ross", "stage2.json")


@pytest.fixture(scope="session")
def eval_shards(tiny_models, synth_data, tmp_path_factory) -> Path:
    """The generator's held-out questions, converted as the training shards are. A fixture, since tests cannot
    import this module: where tests/ and tests/kernels/ are collected together, `conftest` names the other one."""
    return convert(tiny_models, synth_data, tmp_path_factory.mktemp("eval_shards") / "eval", "qwen2_ross", "eval.json")


@pytest.fixture(scope="session")
def run_dir(tiny_models, stage2_shards, tmp_path_factory) -> Path:
    """A 1-step stage-2 run on 1 rank, with its checkpoint: what export, generate and eval read (read only)."""
    from test_train import run, write_config

    tmp = tmp_path_factory.mktemp("one_step_run")
    rd = tmp / "run"
    run(1, write_config(tmp / "c.yaml", tiny_models, stage2_shards, rd, max_steps=1, ckpt_every=10))
    return rd


@pytest.fixture(scope="session")
def first_step_from_run(run_dir, tiny_models, stage2_shards, tmp_path_factory) -> dict:
    """The metrics of a first step on 2 ranks with model.init_from = run_dir's checkpoint: what a start from one of
    its exports (Llava, reference layout) must give bit for bit."""
    from test_train import metrics, run, write_config

    tmp = tmp_path_factory.mktemp("from_run")
    rd = tmp / "run"
    out = run(
        2,
        write_config(tmp / "c.yaml", tiny_models, stage2_shards, rd, max_steps=1, ckpt_every=10),
        f"model.init_from={run_dir}",
    )
    assert f"model weights from {run_dir}" in out
    first = metrics(rd)[0]
    assert first["text_loss"] != metrics(run_dir)[0]["text_loss"]  # the trained weights were loaded, not fresh ones
    return first


def skewed_run(nproc: int, train: dict, models: Path, shards: Path, tmp: Path) -> Path:
    """A run of the tests' recipe (test_train.write_config) with `train` keys, in tmp/run; returns that folder."""
    from test_train import run, write_config

    rd = tmp / "run"
    run(nproc, write_config(tmp / "c.yaml", models, shards, rd, **train))
    return rd


@pytest.fixture(scope="session")
def four_steps_1rank(tiny_models, skewed_shards, tmp_path_factory) -> Path:
    """An uninterrupted run of test_train.FOUR_STEPS (checkpoints at steps 2 and 4) on 1 rank over skewed_shards,
    with test_train.TELEMETRY, read only (copy it to resume it): the reference of the stop-and-restart and
    rank-change tests, and the logged run of tests/test_metrics.py."""
    from test_train import FOUR_STEPS, TELEMETRY

    return skewed_run(
        1, FOUR_STEPS | TELEMETRY, tiny_models, skewed_shards, tmp_path_factory.mktemp("four_steps_1rank")
    )


@pytest.fixture(scope="session")
def four_steps_2ranks(tiny_models, skewed_shards, tmp_path_factory) -> Path:
    """four_steps_1rank's run on 2 ranks (read only): the rank-change test's other reference, and the 2-rank side
    of the 1-vs-2-rank test (its step-2 checkpoint)."""
    from test_train import FOUR_STEPS

    return skewed_run(2, FOUR_STEPS, tiny_models, skewed_shards, tmp_path_factory.mktemp("four_steps_2ranks"))


@pytest.fixture(scope="session")
def nine_steps_2ranks(tiny_models, skewed_shards, tmp_path_factory) -> Path:
    """An uninterrupted run of test_train.NINE_STEPS (synchronous saves, checkpoints 6 and 9 kept) on 2 ranks over
    skewed_shards, read only: what the SIGKILL resumes and the asynchronous-save run must equal."""
    from test_train import NINE_STEPS

    return skewed_run(2, NINE_STEPS, tiny_models, skewed_shards, tmp_path_factory.mktemp("nine_steps_2ranks"))


@pytest.fixture
def load_benchmark():
    """benchmarks/NAME.py as a fresh module (benchmarks/ is not a package): `load_benchmark("faults")`."""
    import importlib.util

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"{name}_bench", REPO / "benchmarks" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load


@pytest.fixture(scope="session")
def stage2_samples(stage2_shards) -> list:
    from fastross.data.shards import MDSShards  # streaming's own samples (tests/test_shards.py), without streaming

    shards = MDSShards(stage2_shards)
    return [shards.read(i) for i in range(len(shards))]


@pytest.fixture(scope="session")
def skewed_shards(tiny_models, synth_data, tmp_path_factory) -> Path:
    """Stage-2 shards with very unequal lengths: the bundled records plus long text-only ones."""
    import json
    import random

    rng = random.Random(1)
    records = json.loads((synth_data / "stage2.json").read_text())
    words = "red green blue yellow circle square triangle left right top bottom centre shape".split()
    for i in range(24):
        n = rng.choice([40, 150, 400, 900])
        q = " ".join(rng.choice(words) for _ in range(n))
        records.append(
            {
                "id": f"long_{i}",
                "conversations": [{"from": "human", "value": f"Repeat after me: {q}"}, {"from": "gpt", "value": q}],
            }
        )
    rng.shuffle(records)
    src = tmp_path_factory.mktemp("skewed") / "skewed.json"
    src.write_text(json.dumps(records))
    return convert(
        tiny_models, src.parent, src.parent / "shards", "qwen2_ross", "skewed.json", images=synth_data / "images"
    )


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    """A tiny CLIP vision folder (fastross.demo.make_tiny.make_tiny_clip), in a folder named clip as the
    reference code needs (fastross.ross_format)."""
    from fastross.demo.make_tiny import make_tiny_clip

    return make_tiny_clip(tmp_path_factory.mktemp("clip_models"))


@pytest.fixture(scope="session")
def clip_shards(tiny_models, tiny_clip, synth_data, tmp_path_factory) -> Path:
    """The bundled stage-2 records converted for the tiny CLIP tower (latent moments from the tiny VAE)."""
    return convert(
        tiny_models,
        synth_data,
        tmp_path_factory.mktemp("clip_shards") / "stage2",
        "qwen2_ross",
        "stage2.json",
        vision=tiny_clip,
    )


@pytest.fixture(scope="session")
def clip_run_dir(tiny_models, tiny_clip, clip_shards, tmp_path_factory) -> Path:
    """A 2-step stage-2 run on 1 rank with the tiny CLIP tower, checkpointed after each step (read only)."""
    from test_train import run, write_config

    tmp = tmp_path_factory.mktemp("clip_run")
    rd = tmp / "run"
    run(
        1,
        write_config(tmp / "c.yaml", tiny_models, clip_shards, rd, max_steps=2, ckpt_every=1),
        f"model.vision_path={tiny_clip}",
    )
    return rd


@pytest.fixture
def world_of_one(tmp_path):
    """An in-process gloo world of one rank, for the checkpoint tests (a test module's own world_of_one overrides
    this one)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()
