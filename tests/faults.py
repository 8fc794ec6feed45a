"""Fault injection for the test suite (never shipped in the package): a Lightning callback.

In-process tests pass it to ``ecomtrain.train.runner.train(cfg, callbacks=[...])``; subprocess tests
(torchrun, launch/torchrun.sh, Slurm) run ``tests/faulty_train.py --faults SPEC train RECIPE ...``,
which hands it to ``ecomtrain.cli.main(argv, callbacks=[...])``. SPEC is comma-separated:

    nan_at=3,nan_rank=1        the training loss of rank 1 becomes NaN at global step 3
    crash_at=4                 every rank hard-exits (os._exit(17)) after step 4 completed and its
                               checkpoints were written
    crash_at=4,crash_rank=1,crash_attempt=0
                               only rank 1 exits, and only on the first attempt
                               (TORCHELASTIC_RESTART_COUNT / SLURM_RESTART_COUNT = 0)
    pause_at=3                 the first attempt holds at step 3 until the preemption signal (max 300 s)
    signal_at=2                the first attempt sends itself SIGUSR1 after step 2
"""

from __future__ import annotations

import os
import signal
import time

from lightning.pytorch.callbacks import Checkpoint

EXIT_CRASH = 17
KEYS = ("nan_at", "nan_rank", "crash_at", "crash_rank", "crash_attempt", "pause_at", "signal_at")


def parse(spec: str) -> dict[str, int]:
    out = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, _, value = part.partition("=")
        if key not in KEYS or not value.lstrip("-").isdigit():
            raise ValueError(f"fault spec '{part}': expected one of {', '.join(KEYS)} = an integer")
        out[key] = int(value)
    return out


def attempt() -> int:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or os.environ.get("SLURM_RESTART_COUNT") or "0")


class FaultInjector(Checkpoint):
    """Subclasses ``Checkpoint`` only for ordering: Lightning runs checkpoint callbacks after all
    others, in list order, so placed after the run's own checkpoint callbacks this one acts once
    the step's checkpoints are on disk (what a crash "after step N" must mean)."""

    def __init__(self, **faults: int):
        unknown = set(faults) - set(KEYS)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}")
        self.f = faults
        self._orig_loss = None

    @classmethod
    def from_spec(cls, spec: str) -> "FaultInjector":
        return cls(**parse(spec))

    # -- NaN loss: wrap the task's loss for the one poisoned step
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        f = self.f
        if "nan_at" in f and trainer.global_step == f["nan_at"] and trainer.global_rank == f.get("nan_rank", 0):
            task = pl_module.task
            self._orig_loss = task.loss
            task.loss = lambda *a: self._orig_loss(*a) * float("nan")  # loss(net, batch) or loss(net, head, batch)

    def _restore_loss(self, pl_module) -> None:
        if self._orig_loss is not None:
            del pl_module.task.loss  # the instance attribute; the class method shows again
            self._orig_loss = None

    # -- crash / pause / signal after a completed step
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._restore_loss(pl_module)
        f, step = self.f, trainer.global_step
        if "pause_at" in f and step == f["pause_at"] and attempt() == 0:
            from ecomtrain.train.preemption import requested

            for _ in range(3000):
                if requested():
                    break
                time.sleep(0.1)
        if "signal_at" in f and step == f["signal_at"] and attempt() == 0:
            signal.raise_signal(signal.SIGUSR1)  # as if Slurm's time-limit warning arrived now
        if "crash_at" in f and step == f["crash_at"]:
            if "crash_rank" in f and trainer.global_rank != f["crash_rank"]:
                return
            if "crash_attempt" in f and attempt() != f["crash_attempt"]:
                return
            os._exit(EXIT_CRASH)
