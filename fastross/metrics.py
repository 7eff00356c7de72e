"""Step metrics: console lines (or a tqdm bar on a terminal), run_dir/metrics.jsonl, TensorBoard and W&B.

A record holds the losses the trainer passes, plus what is measured here over the steps since the
last record: throughput, the step time split into data wait / compute / checkpoint blocking
(per-step averages), peak memory, and NVML readings on GPUs. A reading that does not exist on this
machine (NVML without a driver, CUDA memory on CPU) is absent from the record, never zero.
"""

from __future__ import annotations

import json
import os
import resource
import secrets
import sys
import time
from pathlib import Path
from typing import TextIO

import torch

from fastross.config import ConfigError
from fastross.flops import mfu

GIB = 2**30
# Per-step averages of times the trainer adds (MetricsLogger.add) over the steps since the last record.
STEP_TIMES = ("data_wait_s", "compute_s", "ckpt_blocked_s")


class GPUStats:
    """Utilisation, memory, power, SM clock and temperature from NVML, for the CUDA device this rank trains on; empty
    on CPU runs and machines without an NVIDIA driver.

    NVML numbers the GPUs as the driver does, CUDA as CUDA_VISIBLE_DEVICES orders them, so the device is found by its
    UUID rather than by an index.
    """

    def __init__(self, device: torch.device):
        self.handle = None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            uuid = torch.cuda.get_device_properties(device).uuid
            self.handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
        except Exception:  # no driver, or an NVML that does not know the device: GPU metrics are simply absent
            self.handle = None

    def read(self) -> dict:
        if self.handle is None:
            return {}
        n, h = self.nvml, self.handle
        return {
            "gpu_util": n.nvmlDeviceGetUtilizationRates(h).gpu,  # % of the last sample period with a kernel running
            "gpu_mem_used_gib": n.nvmlDeviceGetMemoryInfo(h).used / GIB,  # all processes on the device
            "gpu_power_w": n.nvmlDeviceGetPowerUsage(h) / 1000,
            "gpu_sm_clock_mhz": n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM),
            "gpu_temp_c": n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU),
        }


def memory(device: torch.device) -> dict:
    """Peak memory since the last call: the CUDA caching allocator's (then reset) on GPU; the process's peak RSS
    always."""
    out = {}
    if device.type == "cuda":
        out["mem_peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        out["mem_peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
        torch.cuda.reset_peak_memory_stats(device)
    # ru_maxrss is in KiB on Linux and the peak of the whole run (the kernel cannot reset it).
    out["host_peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    return out


class TensorBoardSink:
    """Scalars under run_dir/tensorboard; a resumed run purges the events past its checkpoint (they run again)."""

    def __init__(self, run_dir: Path, resume_step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ConfigError(
                "train.loggers has 'tensorboard', but tensorboard is not installed: pip install 'fastross[tensorboard]'"
            ) from e
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def write(self, step: int, rec: dict) -> None:
        for k, v in rec.items():
            if k != "step":
                self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """A W&B run under run_dir/wandb whose id is kept in run_dir/wandb_id, so that a resumed run continues it.

    Offline or online as W&B's own settings say (WANDB_MODE=offline: nothing leaves the machine).
    """

    def __init__(self, run_dir: Path, project: str, config: dict):
        try:
            import wandb
        except ImportError as e:
            raise ConfigError(
                "train.loggers has 'wandb', but wandb is not installed: pip install 'fastross[wandb]'"
            ) from e
        id_file = run_dir / "wandb_id"
        if id_file.exists():
            run_id = id_file.read_text().strip()
        else:
            run_id = secrets.token_hex(4)  # W&B run ids: 8 characters of [a-z0-9]
            id_file.write_text(run_id + "\n")
        self.run = wandb.init(
            project=project, id=run_id, resume="allow", dir=str(run_dir), config=config, name=run_dir.name
        )

    def write(self, step: int, rec: dict) -> None:
        self.run.log({k: v for k, v in rec.items() if k != "step"}, step=step)

    def close(self) -> None:
        import wandb

        self.run.finish()
        wandb.teardown()  # waits for W&B's service to finish writing: the run's files are complete on return


class MetricsLogger:
    """The records of rank 0 (enabled); other ranks only keep the counters so that every rank runs the same code.

    loggers: the backends beside metrics.jsonl ("tensorboard", "wandb"); progress: a tqdm bar (rank 0 on a
    terminal); peak_tflops: the device's peak, for MFU when the trainer counts model FLOPs.
    """

    def __init__(
        self,
        run_dir: str | Path,
        enabled: bool,
        world: int,
        *,
        device: torch.device = torch.device("cpu"),
        loggers: list[str] | None = None,
        wandb_project: str = "",
        config: dict | None = None,
        progress: bool = False,
        peak_tflops: float | None = None,
        stream: TextIO | None = None,
    ):
        self.enabled, self.world, self.device = enabled, world, device
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.gpu = GPUStats(device) if enabled else None
        self.loggers, self.wandb_project, self.config = loggers or [], wandb_project, config or {}
        self.peak_tflops = peak_tflops
        self.stream = stream or sys.stdout
        self.progress, self.bar, self.sinks = enabled and progress, None, []
        self._reset()

    def _reset(self) -> None:
        self._t = time.perf_counter()
        self._steps = self._samples = self._tokens = 0
        self._pending: dict[str, float] = {}

    def start(self, step: int, total_steps: int) -> None:
        """The loop begins at `step` (a resumed run: its checkpoint's): restart the clock (model loading is no
        step's time), open the backends and the bar."""
        self._reset()
        if not self.enabled:
            return
        if "tensorboard" in self.loggers:
            self.sinks.append(TensorBoardSink(self.run_dir, step))
        if "wandb" in self.loggers:
            self.sinks.append(WandbSink(self.run_dir, self.wandb_project, self.config))
        if self.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=step, unit="step", file=self.stream, dynamic_ncols=True)

    def add(self, key: str, value: float) -> None:
        """Add seconds to one of STEP_TIMES; the next record holds the sum divided by its steps."""
        self._pending[key] = self._pending.get(key, 0.0) + value

    def count(self, samples: int, tokens: int) -> None:
        """One step's global samples and tokens, host numbers known before the step."""
        self._steps += 1
        self._samples += samples
        self._tokens += tokens
        if self.bar is not None:
            self.bar.update(1)

    def say(self, msg: str) -> None:
        """A console line that does not break the bar."""
        if self.bar is not None:
            self.bar.write(msg, file=self.stream)
        else:
            print(msg, file=self.stream, flush=True)

    def log(self, step: int, total_steps: int, values: dict, flops: float = 0.0) -> dict | None:
        """flops: the model FLOPs of the global batches since the last record (0: unknown, no MFU)."""
        now = time.perf_counter()
        dt, steps = max(now - self._t, 1e-9), max(self._steps, 1)
        rec = {
            "step": step,
            **values,
            **{k: v / steps for k, v in self._pending.items()},
            "step_s": dt / steps,  # wall time per step since the last record: the three STEP_TIMES and the rest
            "samples_per_s": self._samples / dt,
            "tokens_per_s_per_rank": self._tokens / dt / self.world,
        }
        if flops:
            rec["model_tflops_per_rank"] = flops / dt / self.world / 1e12
            if self.peak_tflops:
                rec["mfu"] = mfu(flops, dt, self.world, self.peak_tflops)
        rec.update(memory(self.device))
        self._reset()
        if not self.enabled:
            return None
        rec.update(self.gpu.read())
        append_line(self.path, json.dumps(rec))
        for sink in self.sinks:
            sink.write(step, rec)
        self.say(format_line(rec, total_steps))
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{rec['text_loss']:.4f}", refresh=False)
        return rec

    def log_eval(self, step: int, values: dict, seconds: float) -> dict | None:
        """A held-out evaluation's record: {"step", "eval": true, **values, "eval_s"} in metrics.jsonl, `eval/KEY` in
        the backends, one console line. Its seconds are no training step's: the step clock skips them."""
        self._t += seconds
        if not self.enabled:
            return None
        rec = {"step": step, "eval": True, **values, "eval_s": seconds}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        for sink in self.sinks:
            sink.write(step, {f"eval/{k}": v for k, v in values.items()})
        self.say(
            f"eval: step {step} "
            + " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
            + f" ({seconds:.1f} s)"
        )
        return rec

    def drop_after(self, step: int) -> str | None:
        """A run that starts at `step` (its checkpoint's, 0 without one): metrics.jsonl keeps the records up to it,
        as `trim` does (the later steps run again; torn lines go). Returns what was dropped, to say, or None."""
        if not self.enabled:
            return None
        dropped = trim(self.path, step)
        return f"{self.path}: dropped {dropped} record(s) past step {step} or torn" if dropped else None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        for sink in self.sinks:
            sink.close()
        self.bar, self.sinks = None, []


def append_line(path: Path, line: str) -> None:
    """Append one line whole, or nothing: when the write fails (a full disk) the file is cut back to its last whole
    line, and the error names the file. A line torn anyway (killed mid-write) is dropped by `trim` on resume."""
    data = memoryview((line + "\n").encode())
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            while data:
                data = data[os.write(fd, data) :]
        except OSError as e:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass  # the torn line stays; trim() drops it when the run resumes
            raise OSError(
                e.errno,
                f"could not append a record to {path}: {e.strerror}. Free space and start the "
                "run again: it resumes from its last checkpoint",
            ) from e
    finally:
        os.close(fd)


def trim(path: Path, step: int) -> int:
    """Keep the records of steps up to `step` (a resumed run's checkpoint, 0 without one: the later steps run again)
    and drop any line that does not parse (torn by a crash or a full disk), never failing on one. Returns the number
    of lines dropped; the file is replaced atomically."""
    if not path.exists():
        return 0
    lines = path.read_text(errors="replace").splitlines()
    keep = []
    for ln in lines:
        try:
            if json.loads(ln)["step"] <= step:
                keep.append(ln)
        except (ValueError, KeyError, TypeError):
            pass
    if len(keep) < len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        os.replace(tmp, path)
    return len(lines) - len(keep)


def format_line(rec: dict, total_steps: int) -> str:
    """The console line of one record: losses, throughput, the step time split, memory and the GPU's state."""
    parts = [
        f"step {rec['step']}/{total_steps}",
        f"text_loss {rec['text_loss']:.4f}",
        f"recon_loss {rec['recon_loss']:.4f}",
        f"lr {rec['lr']:.2e}",
        f"grad_norm {rec['grad_norm']:.3f}",
        f"samples/s {rec['samples_per_s']:.1f}",
        f"tokens/s/rank {rec['tokens_per_s_per_rank']:.0f}",
    ]
    if "mfu" in rec:
        parts.append(f"mfu {rec['mfu']:.1%}")
    split = " + ".join(
        f"{k.removesuffix('_s').replace('ckpt_blocked', 'ckpt')} {rec[k]:.3f}" for k in STEP_TIMES if k in rec
    )
    parts.append(f"step {rec['step_s']:.3f} s" + (f" ({split})" if split else ""))
    if "mem_peak_allocated_gib" in rec:
        parts.append(f"mem peak {rec['mem_peak_allocated_gib']:.1f}/{rec['mem_peak_reserved_gib']:.1f} GiB alloc/res")
    parts.append(f"rss {rec['host_peak_rss_gib']:.1f} GiB")
    if "gpu_util" in rec:
        parts.append(
            f"gpu {rec['gpu_util']}% {rec['gpu_power_w']:.0f} W {rec['gpu_sm_clock_mhz']} MHz "
            f"{rec['gpu_temp_c']} C {rec['gpu_mem_used_gib']:.1f} GiB"
        )
    return " | ".join(parts)


def profiler(
    wait: int, warmup: int, active: int, repeat: int, run_dir: Path, rank: int, first_step: int, device: torch.device
) -> torch.profiler.profile:
    """torch.profiler over the step loop on this rank: after `wait` steps and `warmup` traced-and-dropped ones,
    `active` steps go to run_dir/profile/rank{R}_step{S}.json (a Chrome / Perfetto trace; S: its last run step),
    `repeat` times (0: until the run ends). The trainer calls .step() once per optimizer step."""
    out = run_dir / "profile"
    out.mkdir(parents=True, exist_ok=True)

    def write(prof: torch.profiler.profile) -> None:
        prof.export_chrome_trace(str(out / f"rank{rank}_step{first_step + prof.step_num}.json"))

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(
        activities=activities,
        on_trace_ready=write,
        schedule=torch.profiler.schedule(wait=wait, warmup=warmup, active=active, repeat=repeat),
    )
