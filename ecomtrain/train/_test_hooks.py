"""Fault injection for the test suite only (off unless ECOMTRAIN_TEST_HOOKS is set).

    ECOMTRAIN_TEST_HOOKS="nan_at=3,nan_rank=1"   loss of rank 1 becomes NaN at global step 3
    ECOMTRAIN_TEST_HOOKS="crash_at=4"            every rank hard-exits (os._exit(17)) after step 4
                                                 completed and its checkpoints were written (preemption)
    ECOMTRAIN_TEST_HOOKS="crash_at=4,crash_rank=1,crash_attempt=0"
                                                 only rank 1 exits, and only on the first attempt
                                                 (TORCHELASTIC_RESTART_COUNT / SLURM_RESTART_COUNT = 0)
    ECOMTRAIN_TEST_HOOKS="pause_at=3"            first attempt waits at step 3 for the preemption signal
    ECOMTRAIN_TEST_HOOKS="signal_at=2"           first attempt sends itself SIGUSR1 after step 2
"""

from __future__ import annotations

import os

import torch

_ENV = "ECOMTRAIN_TEST_HOOKS"


def _opts() -> dict[str, int]:
    raw = os.environ.get(_ENV, "")
    return {k: int(v) for k, v in (kv.split("=", 1) for kv in raw.split(",") if "=" in kv)}


def maybe_nan(loss: torch.Tensor, trainer) -> torch.Tensor:
    o = _opts()
    if "nan_at" in o and trainer.global_step == o["nan_at"] and trainer.global_rank == o.get("nan_rank", 0):
        return loss * float("nan")
    return loss


def _attempt() -> int:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or os.environ.get("SLURM_RESTART_COUNT") or "0")


def maybe_pause(trainer, o: dict[str, int]) -> None:
    """pause_at=N: on the first attempt, hold at step N until the preemption signal arrives (max 300 s),
    so a test can signal a run that is certainly mid-training."""
    if "pause_at" in o and trainer.global_step == o["pause_at"] and _attempt() == 0:
        import time

        from .preemption import requested

        for _ in range(3000):
            if requested():
                return
            time.sleep(0.1)


def maybe_crash(trainer) -> None:
    o = _opts()
    maybe_pause(trainer, o)
    if "signal_at" in o and trainer.global_step == o["signal_at"] and _attempt() == 0:
        import signal

        signal.raise_signal(signal.SIGUSR1)  # as if Slurm's time-limit warning arrived now
    if "crash_at" in o and trainer.global_step == o["crash_at"]:
        if "crash_rank" in o and trainer.global_rank != o["crash_rank"]:
            return
        if "crash_attempt" in o and _attempt() != o["crash_attempt"]:
            return  # e.g. crash_attempt=0: only the first attempt dies, the restarted one runs through
        os._exit(17)
