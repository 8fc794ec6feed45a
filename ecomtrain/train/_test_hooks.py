"""Fault injection for the test suite only (off unless ECOMTRAIN_TEST_HOOKS is set).

    ECOMTRAIN_TEST_HOOKS="nan_at=3,nan_rank=1"   loss of rank 1 becomes NaN at global step 3
    ECOMTRAIN_TEST_HOOKS="crash_at=4"            every rank hard-exits (os._exit(17)) after step 4
                                                 completed and its checkpoints were written (preemption)
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


def maybe_crash(trainer) -> None:
    o = _opts()
    if "crash_at" in o and trainer.global_step == o["crash_at"]:
        os._exit(17)
