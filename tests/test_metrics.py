"""What a log step records (fastross.metrics), its backends (TensorBoard, W&B offline), the bar, and the profiler."""

import io
import json
import shutil
import sys

import pytest
import torch

from fastross import config, metrics
from fastross.metrics import MetricsLogger

LOSSES = {"text_loss": 2.5, "recon_loss": 0.5, "lr": 1e-3, "grad_norm": 1.0}


class Clock:
    """time.perf_counter under the test's control: the logger's intervals become exact."""

    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(metrics.time, "perf_counter", c)
    return c


def test_record_averages_the_step_times_and_counts_throughput(tmp_path, clock):
    log = MetricsLogger(tmp_path, True, world=2, stream=io.StringIO())
    log.start(0, 10)
    for wait, compute in ((0.1, 0.5), (0.3, 0.7)):
        log.add("data_wait_s", wait)
        log.add("compute_s", compute)
        log.count(samples=8, tokens=1000)
    log.add("ckpt_blocked_s", 0.4)
    clock.t += 2.5
    rec = log.log(2, 10, LOSSES)
    assert rec["data_wait_s"] == pytest.approx(0.2) and rec["compute_s"] == pytest.approx(0.6)
    assert rec["ckpt_blocked_s"] == pytest.approx(0.2) and rec["step_s"] == pytest.approx(1.25)
    assert rec["samples_per_s"] == pytest.approx(16 / 2.5)
    assert rec["tokens_per_s_per_rank"] == pytest.approx(2000 / 2.5 / 2)
    assert "mfu" not in rec and "model_tflops_per_rank" not in rec  # no FLOPs counted: no figure
    assert 0.01 < rec["host_peak_rss_gib"] < 64  # this process's peak RSS, in GiB
    assert "mem_peak_allocated_gib" not in rec  # CPU: no CUDA allocator figure
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == rec
    # The next record averages only its own steps; a key with nothing added is absent.
    log.add("compute_s", 0.9)
    log.count(8, 1000)
    clock.t += 1.0
    rec = log.log(3, 10, LOSSES)
    assert rec["compute_s"] == pytest.approx(0.9) and rec["step_s"] == pytest.approx(1.0)
    assert "ckpt_blocked_s" not in rec and "data_wait_s" not in rec


def test_a_start_drops_the_records_of_steps_that_run_again(tmp_path):
    """MetricsLogger.drop_after(step): rank 0 keeps the records up to the start's step and drops the torn line, and
    says so; another rank neither touches the file nor says anything; a file with nothing to drop is left alone."""
    path = tmp_path / "metrics.jsonl"
    recs = [json.dumps({"step": s, "text_loss": 1.0}) for s in (1, 2, 3)]
    path.write_text("\n".join(recs) + '\n{"step": 4, "te')
    other = MetricsLogger(tmp_path, False, world=2)
    assert other.drop_after(1) is None and path.read_text().startswith(recs[0])
    assert len(path.read_text().splitlines()) == 4
    main = MetricsLogger(tmp_path, True, world=2)
    assert main.drop_after(2) == f"{path}: dropped 2 record(s) past step 2 or torn"
    assert path.read_text() == recs[0] + "\n" + recs[1] + "\n"
    assert main.drop_after(2) is None and path.read_text() == recs[0] + "\n" + recs[1] + "\n"


def test_mfu_appears_only_with_counted_flops_and_a_peak(tmp_path, clock):
    log = MetricsLogger(tmp_path, True, world=4, peak_tflops=100.0, stream=io.StringIO())
    log.start(0, 10)
    log.count(8, 1000)
    log.count(8, 1000)
    clock.t += 0.5
    rec = log.log(2, 10, LOSSES, flops=8e14)
    assert rec["step_s"] == pytest.approx(0.25)  # two steps counted, whatever the FLOPs
    assert rec["model_tflops_per_rank"] == pytest.approx(8e14 / 0.5 / 4 / 1e12)  # 400
    assert rec["mfu"] == pytest.approx(4.0)
    assert "mfu 400.0%" in log.stream.getvalue()


def test_a_cpu_run_has_no_gpu_keys(tmp_path, clock):  # even on a host with GPUs: NVML follows the device
    log = MetricsLogger(tmp_path, True, world=1, stream=io.StringIO())
    log.start(0, 1)
    log.count(1, 1)
    rec = log.log(1, 1, LOSSES)
    assert not [k for k in rec if k.startswith("gpu_") or k.startswith("mem_")]


def test_console_line_shows_the_split_memory_and_gpu(clock):
    rec = {
        **LOSSES,
        "step": 5,
        "samples_per_s": 3.0,
        "tokens_per_s_per_rank": 900.0,
        "data_wait_s": 0.01,
        "compute_s": 0.2,
        "ckpt_blocked_s": 0.05,
        "step_s": 0.3,
        "host_peak_rss_gib": 1.5,
        "mem_peak_allocated_gib": 10.0,
        "mem_peak_reserved_gib": 12.0,
        "gpu_util": 97,
        "gpu_power_w": 650.4,
        "gpu_sm_clock_mhz": 1980,
        "gpu_temp_c": 61,
        "gpu_mem_used_gib": 13.2,
    }
    line = metrics.format_line(rec, 10)
    assert "step 0.300 s (data_wait 0.010 + compute 0.200 + ckpt 0.050)" in line
    assert "mem peak 10.0/12.0 GiB alloc/res" in line and "rss 1.5 GiB" in line
    assert "gpu 97% 650 W 1980 MHz 61 C 13.2 GiB" in line
    bare = {k: v for k, v in rec.items() if k not in metrics.STEP_TIMES and not k.startswith(("gpu_", "mem_"))}
    assert metrics.format_line(bare, 10).endswith("| step 0.300 s | rss 1.5 GiB")


def test_tqdm_bar_with_eta_keeps_the_log_lines(tmp_path, clock):
    out = io.StringIO()
    log = MetricsLogger(tmp_path, True, world=1, progress=True, stream=out)
    log.start(2, 10)  # resumed at step 2
    for _ in range(3):
        clock.t += 1.0
        log.count(1, 1)
    log.say("train: hello")
    log.log(5, 10, LOSSES)
    log.bar.refresh()
    text = out.getvalue()
    assert "5/10" in text and "<" in text  # the bar: steps done of the run's, and its ETA
    assert "train: hello" in text and "step 5/10 | text_loss 2.5000" in text
    log.close()
    quiet = MetricsLogger(tmp_path / "b", False, world=1, progress=True, stream=io.StringIO())
    quiet.start(0, 10)
    assert quiet.bar is None  # other ranks: no bar


def scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("text_loss")}


def session_starts(run_dir) -> list[int]:
    """The steps of the SessionLog START events a writer with purge_step leaves (what tells a reader to drop later
    ones)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = []
    for f in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        steps += [e.step for e in EventFileLoader(str(f)).Load() if e.HasField("session_log")]
    return steps


def test_tensorboard_scalars_and_purge_on_resume(tmp_path, clock):
    log = MetricsLogger(tmp_path, True, world=1, loggers=["tensorboard"], stream=io.StringIO())
    log.start(0, 4)
    for step in range(1, 5):
        log.count(1, 1)
        log.log(step, 4, {**LOSSES, "text_loss": float(step)})
    log.close()
    assert scalars(tmp_path) == {1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0}
    # Resumed from a checkpoint of step 2: steps 3 and 4 run again with new values.
    log = MetricsLogger(tmp_path, True, world=1, loggers=["tensorboard"], stream=io.StringIO())
    log.start(2, 4)
    for step in (3, 4):
        log.count(1, 1)
        log.log(step, 4, {**LOSSES, "text_loss": 10.0 + step})
    log.close()
    assert session_starts(tmp_path) == [3]
    assert scalars(tmp_path) == {1: 1.0, 2: 2.0, 3: 13.0, 4: 14.0}


def test_wandb_offline_run_files_and_resumed_id(tmp_path, clock, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for first in (0, 2):  # a run, then its resume
        log = MetricsLogger(tmp_path, True, world=1, loggers=["wandb"], wandb_project="t", stream=io.StringIO())
        log.start(first, 4)
        for step in range(first + 1, first + 3):
            log.count(1, 1)
            log.log(step, 4, LOSSES)
        log.close()
    run_id = (tmp_path / "wandb_id").read_text().strip()
    # One folder per invocation (a "-1" suffix when they start in the same second), one run id.
    files = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}*/run-{run_id}.wandb"))
    assert len(files) == 2
    for f in files:  # each holds the logged history (protobuf records, keys as plain bytes)
        data = f.read_bytes()
        assert b"text_loss" in data and b"step_s" in data and b"host_peak_rss_gib" in data


def test_a_missing_extra_is_named(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    log = MetricsLogger(tmp_path, True, world=1, loggers=["wandb"], stream=io.StringIO())
    with pytest.raises(config.ConfigError, match=r"pip install 'fastross\[wandb\]'"):
        log.start(0, 1)


def test_config_rejects_bad_loggers_and_profile(tiny_models, tmp_path):
    base = [
        "model.vision_path=" + str(tiny_models / "vision"),
        "model.llm_path=" + str(tiny_models / "llm"),
        "data.shards=" + str(tmp_path),
    ]
    with pytest.raises(config.ConfigError, match=r"train.loggers\[0\] must be one of 'tensorboard', 'wandb'"):
        config.load(None, base + ["train.loggers=[mlflow]"])
    with pytest.raises(config.ConfigError, match="train.profile"):
        config.load(None, base + ["train.profile.active=-1"])
    cfg = config.load(None, base + ["train.loggers=[tensorboard, wandb]", "train.profile={active: 2, wait: 0}"])
    assert cfg.train.profile.active == 2 and cfg.train.profile.warmup == 1


def test_memory_snapshot_on_cpu_is_refused(tmp_path):
    from fastross.distributed import World
    from fastross.train import Trainer

    cfg = config.Config(train=config.TrainConfig(memory_snapshot=True, run_dir=str(tmp_path)))
    with pytest.raises(config.ConfigError, match="train.memory_snapshot.*cpu"):
        Trainer(cfg, World(0, 1, 0, torch.device("cpu")))


def test_profiler_writes_the_active_steps(tmp_path):
    prof = metrics.profiler(1, 1, 2, 1, tmp_path, rank=3, first_step=10, device=torch.device("cpu"))
    x = torch.randn(64, 64)
    with prof:
        for _ in range(6):
            x = (x @ x).tanh()
            prof.step()
    files = sorted(p.name for p in (tmp_path / "profile").iterdir())
    assert files == ["rank3_step14.json"]  # wait step 11, warm-up 12, active 13-14
    events = json.loads((tmp_path / "profile" / files[0]).read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert {"ProfilerStep#2", "ProfilerStep#3"} <= names and "ProfilerStep#1" not in names
    assert any("mm" in str(n) for n in names)


# ---------------------------------------------------------------- torchrun, 1 rank

from test_train import metrics as read_metrics, run, write_config  # noqa: E402


@pytest.mark.slow
def test_training_logs_the_split_tensorboard_profile_and_resumes(
    tiny_models, skewed_shards, four_steps_1rank, tmp_path
):
    """The session's four_steps_1rank run (test_train.FOUR_STEPS with TELEMETRY: TensorBoard, a profile of step 3),
    then a copy of it resumed as after a crash."""
    from test_train import FOUR_STEPS, TELEMETRY

    first = four_steps_1rank
    recs = read_metrics(first)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    for r in recs:
        parts = [r.get(k, 0.0) for k in metrics.STEP_TIMES]
        assert min(parts) >= 0 and r["data_wait_s"] > 0 and r["compute_s"] > 0, r
        assert sum(parts) <= r["step_s"] * 1.01, r  # the split is inside the step's wall time
        assert r["compute_s"] > 0.5 * r["step_s"], r  # on this CPU run, the step is the model's work
        assert r["host_peak_rss_gib"] > 0.1 and "mem_peak_allocated_gib" not in r
    assert [r["step"] for r in recs if "ckpt_blocked_s" in r] == [3]  # step 2's save, on the next record
    assert sorted(p.name for p in (first / "profile").iterdir()) == ["rank0_step3.json"]
    assert scalars(first) == {r["step"]: pytest.approx(r["text_loss"]) for r in recs}
    # A crash after step 4's record but before its checkpoint: the run resumes at 2 and logs 3 and 4 again.
    rd = tmp_path / "run"
    shutil.copytree(first, rd)
    cfg = write_config(tmp_path / "c.yaml", tiny_models, skewed_shards, rd, **FOUR_STEPS, **TELEMETRY)
    ckpts = rd / "checkpoints"
    shutil.rmtree(ckpts / "step_00000004")
    (ckpts / "latest").write_text("step_00000002\n")
    out = run(1, cfg, "train.profile.active=0")
    assert "at step 2" in out
    again = read_metrics(rd)
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    assert session_starts(rd) == [3]
    assert scalars(rd) == {r["step"]: pytest.approx(r["text_loss"]) for r in again}


@pytest.mark.gpu
def test_cuda_peaks_reset_at_each_record_and_the_profiler_sees_kernels(tmp_path):
    dev = torch.device("cuda")
    metrics.memory(dev)  # start from a reset peak
    x = torch.empty(2**28, dtype=torch.uint8, device=dev)  # 0.25 GiB
    first = metrics.memory(dev)
    assert first["mem_peak_allocated_gib"] >= 0.25 and first["mem_peak_reserved_gib"] >= first["mem_peak_allocated_gib"]
    del x
    assert metrics.memory(dev)["mem_peak_allocated_gib"] < 0.25  # the peak was reset by the previous record
    stats = metrics.GPUStats(dev).read()
    assert 0 <= stats["gpu_util"] <= 100 and stats["gpu_power_w"] > 0 and stats["gpu_sm_clock_mhz"] > 0
    assert 0 < stats["gpu_temp_c"] < 110 and stats["gpu_mem_used_gib"] > 0
    prof = metrics.profiler(0, 1, 1, 1, tmp_path, rank=0, first_step=0, device=dev)
    y = torch.randn(512, 512, device=dev)
    with prof:
        for _ in range(3):
            y = (y @ y).tanh()
            prof.step()
    events = json.loads((tmp_path / "profile" / "rank0_step2.json").read_text())["traceEvents"]
    assert any(e.get("cat") == "kernel" for e in events)
