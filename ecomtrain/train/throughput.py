"""Throughput in every run: samples/s, real tokens/s, data-wait fraction and (CUDA) MFU.

Logged to every logger (W&B panels ``perf/*``) every ``trainer.log_every_n_steps``
optimizer steps and summarised into ``metrics.json`` by the runner.

- step time: wall time between consecutive ``on_train_batch_start`` calls of this rank,
  so it includes forward, backward, the optimizer, callbacks and the data fetch;
- CPU time: this process's CPU seconds over the same window (all threads, the prefetch
  thread's decoding and collating included): ``perf/samples_per_cpu_s`` is robust to other jobs
  on a shared machine, where wall-clock rates are not;
- data wait: time spent inside the train loader's ``next()`` (the loader in
  ``train/datamodule.py`` accumulates it in ``wait_seconds``); the fraction is
  wait / step time over the same window;
- tokens: real (non-padding) input tokens as counted by the task
  (``task.batch_tokens(batch) -> (samples, real, slots)``; packed rows hold several samples), so padding never inflates tokens/s;
- MFU (CUDA only): (6 x trainable-or-not parameters x tokens + 12 x layers x hidden x
  seq x tokens) / elapsed / peak, against the device's dense bf16 peak from the table below
  or ``trainer.peak_tflops``. On CPU it is not reported (there is no meaningful peak).

Every figure is this rank's; with data parallelism the global rate is about world_size x.
No per-step device synchronisation is added: CUDA timings are averaged over a window of
``log_every_n_steps`` steps, long enough for queued kernels to be accounted for.
"""

from __future__ import annotations

import time
from typing import Any, Optional

from lightning.pytorch.callbacks import Callback

# dense bf16 peak TFLOP/s (no sparsity), by substring of torch.cuda.get_device_name()
PEAK_TFLOPS = {
    "H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0,
    "A100": 312.0, "A10G": 125.0, "A10": 125.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0,
    "V100": 125.0, "T4": 65.0, "RTX 4090": 165.0, "RTX 3090": 71.0,
}


def device_peak_tflops(name: str) -> Optional[float]:
    for key, val in PEAK_TFLOPS.items():
        if key in name:
            return val
    return None


class ThroughputMonitor(Callback):
    def __init__(self, peak_tflops: Optional[float] = None, log_every_n_steps: int = 10, skip_first: int = 2):
        self.peak_tflops = peak_tflops
        self.every = max(1, log_every_n_steps)
        self.skip_first = skip_first  # the first batches include compilation, worker start, caches
        self.reset()

    def reset(self) -> None:
        self._last_start: Optional[float] = None
        self._last_wait = 0.0
        self._last_cpu = 0.0
        self._win = {"time": 0.0, "cpu": 0.0, "wait": 0.0, "samples": 0, "tokens": 0, "slots": 0, "batches": 0}
        self.total = dict(self._win)
        self._seen = 0
        self._n_params: Optional[int] = None
        self._shape: Optional[tuple[int, int]] = None
        self._pending = (0, 0, 0)

    # -- helpers
    @staticmethod
    def _loader_wait(trainer) -> float:
        loader = getattr(trainer, "train_dataloader", None)
        return float(getattr(loader, "wait_seconds", 0.0) or 0.0)

    @staticmethod
    def _batch_counts(pl_module, batch: Any) -> tuple[int, int, int]:
        task = getattr(pl_module, "task", None)
        counter = getattr(task, "batch_tokens", None)
        if counter is not None:
            n, real, slots = counter(batch)
            return int(n), int(real), int(slots)
        first = next(iter(batch.values())) if isinstance(batch, dict) and batch else None
        return (int(first.shape[0]) if hasattr(first, "shape") and first.ndim else 0), 0, 0

    def _flops_per_token(self, pl_module) -> Optional[tuple[float, float]]:
        """(dense FLOPs per token, attention FLOPs per token per context position)."""
        if self._n_params is None:
            self._n_params = sum(p.numel() for p in pl_module.parameters())
            core = getattr(getattr(pl_module, "net", None), "lm", None)
            conf = getattr(core, "config", None)
            if conf is not None:
                self._shape = (int(getattr(conf, "num_hidden_layers", 0)), int(getattr(conf, "hidden_size", 0)))
        if not self._n_params:
            return None
        layers, hidden = self._shape or (0, 0)
        return 6.0 * self._n_params, 12.0 * layers * hidden

    # -- hooks
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._last_start = None  # the gap across an epoch boundary holds validation

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        wait = self._loader_wait(trainer)
        if self._last_start is not None:
            self._seen += 1
            if self._seen > self.skip_first:
                for acc in (self._win, self.total):
                    acc["time"] += now - self._last_start
                    acc["cpu"] += cpu - self._last_cpu
                    acc["wait"] += max(0.0, wait - self._last_wait)
                    acc["batches"] += 1
                    for k, v in zip(("samples", "tokens", "slots"), self._pending):
                        acc[k] += v
        self._last_start, self._last_wait, self._last_cpu = now, wait, cpu
        self._pending = self._batch_counts(pl_module, batch)
        if self._win["batches"] >= self.every:
            self._write(trainer, self._rates(self._win, pl_module))
            self._win = dict.fromkeys(self._win, 0)
            self._win["time"] = self._win["wait"] = self._win["cpu"] = 0.0

    @staticmethod
    def _write(trainer, figures: dict[str, float]) -> None:
        """Straight to the loggers from rank 0, at Lightning's own step counter (as its LearningRateMonitor
        does). These are window averages that need no reduction; ``LightningModule.log_dict`` spent ~28 ms per
        call on them under cProfile (a result-collection entry per key and call), though wall-clock runs did
        not resolve the difference (docs/perf.md)."""
        if not trainer.is_global_zero or not trainer.loggers:
            return
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        for logger in trainer.loggers:
            logger.log_metrics(figures, step=step)

    def _rates(self, acc: dict, pl_module) -> dict[str, float]:
        t = max(acc["time"], 1e-9)
        out = {
            "perf/samples_per_s": acc["samples"] / t,
            "perf/data_wait_fraction": acc["wait"] / t,
        }
        if acc["cpu"] > 0:
            out["perf/samples_per_cpu_s"] = acc["samples"] / acc["cpu"]
        if acc["slots"]:
            out["perf/tokens_per_s"] = acc["tokens"] / t
            out["perf/token_efficiency"] = acc["tokens"] / acc["slots"]
        mfu = self._mfu(acc, pl_module)
        if mfu is not None:
            out["perf/mfu"] = mfu
        return out

    def _mfu(self, acc: dict, pl_module) -> Optional[float]:
        dev = getattr(pl_module, "device", None)
        if dev is None or dev.type != "cuda" or not acc["tokens"]:
            return None
        import torch

        peak = self.peak_tflops or device_peak_tflops(torch.cuda.get_device_name(dev))
        per_tok = self._flops_per_token(pl_module)
        if not peak or per_tok is None:
            return None
        dense, attn = per_tok
        seq = acc["slots"] / max(1, acc["samples"])
        flops = (dense + attn * seq) * acc["tokens"]
        return flops / max(acc["time"], 1e-9) / (peak * 1e12)

    def summary(self, pl_module=None) -> dict[str, float]:
        """Run-level figures for metrics.json (this rank; steady state after the first batches)."""
        if not self.total["batches"]:
            return {}
        out = self._rates(self.total, pl_module) if pl_module is not None else {}
        out["perf/measured_batches"] = float(self.total["batches"])
        return {k: round(float(v), 6) for k, v in out.items()}
