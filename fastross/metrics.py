"""Step metrics: console lines, run_dir/metrics.jsonl, throughput, and NVML readings on GPUs."""

from __future__ import annotations

import json
import time
from pathlib import Path


class GPUStats:
    """Clocks, power and utilisation from NVML; empty on machines without an NVIDIA driver."""

    def __init__(self, local_rank: int):
        self.handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(local_rank)
        except Exception:  # no driver / no GPU: GPU metrics are simply absent
            self.handle = None

    def read(self) -> dict:
        if self.handle is None:
            return {}
        n = self.nvml
        util = n.nvmlDeviceGetUtilizationRates(self.handle)
        return {
            "gpu_util": util.gpu,
            "gpu_power_w": n.nvmlDeviceGetPowerUsage(self.handle) / 1000,
            "gpu_sm_clock_mhz": n.nvmlDeviceGetClockInfo(self.handle, n.NVML_CLOCK_SM),
        }


class MetricsLogger:
    def __init__(self, run_dir: str | Path, enabled: bool, world: int, local_rank: int = 0):
        self.enabled = enabled
        self.world = world
        self.path = Path(run_dir) / "metrics.jsonl"
        self.gpu = GPUStats(local_rank) if enabled else None
        self._t = time.perf_counter()
        self._samples = 0
        self._tokens = 0
        self._pending: dict[str, float] = {}

    def add(self, key: str, value: float) -> None:
        """Add `value` to a field of the next logged record (`ckpt_blocked_s`: summed over the saves since the last)."""
        self._pending[key] = self._pending.get(key, 0.0) + value

    def count(self, samples: int, tokens: int) -> None:
        """Add one step's global samples and tokens (host integers known before the step)."""
        self._samples += samples
        self._tokens += tokens

    def log(self, step: int, total_steps: int, values: dict) -> dict | None:
        now = time.perf_counter()
        dt = max(now - self._t, 1e-9)
        rec = {
            "step": step,
            **values,
            **self._pending,
            "samples_per_s": self._samples / dt,
            "tokens_per_s_per_rank": self._tokens / dt / self.world,
        }
        self._t, self._samples, self._tokens, self._pending = now, 0, 0, {}
        if not self.enabled:
            return None
        rec.update(self.gpu.read())
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(
            f"step {step}/{total_steps} | text_loss {rec['text_loss']:.4f} | recon_loss {rec['recon_loss']:.4f}"
            f" | lr {rec['lr']:.2e} | grad_norm {rec['grad_norm']:.3f} | samples/s {rec['samples_per_s']:.1f}"
            f" | tokens/s/rank {rec['tokens_per_s_per_rank']:.0f}",
            flush=True,
        )
        return rec
