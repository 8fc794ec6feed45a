"""Preemption: checkpoint and stop on a signal, so a requeued or restarted job loses no work.

Slurm sends a warning signal before the time limit (``#SBATCH --signal=B:USR1@120`` in
launch/slurm.sbatch: SIGUSR1 to the batch shell 120 s before the end). The batch shell forwards
it to ``srun``, which forwards it to every task. Then, in each training process:

1. the handler installed by :func:`install` only sets a flag (no I/O or collectives inside a
   signal handler: the signal lands at an arbitrary point, possibly inside an all-reduce);
2. at the end of the next training batch, :class:`StopOnSignal` ORs the flag over all ranks
   (one 1-element all-reduce per step, ~0.1 ms on gloo/NCCL), so every rank stops at the *same*
   step even when the signal reached them at different steps;
3. all ranks write a checkpoint through the run's ``AtomicCheckpoint`` (temporary name, rename,
   ``last.ckpt`` moved to it) and raise :class:`Preempted`, which ends ``fit`` at once (no
   validation, which ``trainer.should_stop`` would run first);
4. the runner skips the final evaluation and the process exits with :data:`EXIT_PREEMPTED` (75,
   BSD ``EX_TEMPFAIL``: "try again later"); the batch script sees it and runs
   ``scontrol requeue``. The requeued job has the same ``SLURM_JOB_ID``, hence the same RUN_DIR,
   and ``trainer.resume=auto`` continues from ``last.ckpt``.

Under torchrun, a non-zero exit makes the elastic agent restart the workers when
``--max-restarts`` > 0, which resumes the same way.

Lightning's own SLURM auto-requeue (a checkpoint written *inside* the signal handler, then
``scontrol requeue`` from rank 0) is switched off by :func:`cluster_plugins`: with it, two
handlers would both requeue, and its checkpoint is not atomic.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Optional

from lightning.pytorch.callbacks import Callback

#: exit status of a run that stopped on the preemption signal after writing its checkpoint
EXIT_PREEMPTED = 75

_requested = threading.Event()


def _on_signal(signum, frame) -> None:  # noqa: ARG001 (signal handler signature)
    _requested.set()


def install(signame: str) -> None:
    """Route ``signame`` (e.g. ``SIGUSR1``) to the preemption flag; ``none`` leaves signals alone.

    Called at the very start of ``train`` so that a signal during data building or model setup
    is remembered instead of killing the process (SIGUSR1's default action is to terminate).
    """
    _requested.clear()
    if signame == "none" or threading.current_thread() is not threading.main_thread():
        return
    signal.signal(getattr(signal, signame), _on_signal)


def requested() -> bool:
    return _requested.is_set()


def restart_count() -> int:
    """How many times this job was restarted (Slurm requeue or torchrun restart); 0 on the first run."""
    for var in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def cluster_plugins() -> list:
    """Lightning plugins for the cluster: under Slurm, SLURMEnvironment without its own requeue."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if SLURMEnvironment.detect():
        return [SLURMEnvironment(auto_requeue=False)]
    return []


def _save_now(trainer) -> Optional[Path]:
    """Write the current state as ``last-step<N>.ckpt`` (atomically; last.ckpt follows) on every rank."""
    from .checkpointing import AtomicCheckpoint, complete_checkpoints, step_of

    cbs = [c for c in trainer.callbacks if isinstance(c, AtomicCheckpoint) and c.link_last and c.dirpath]
    if not cbs:
        return None
    cb = cbs[0]
    ck = Path(cb.dirpath)
    done = [p for p in complete_checkpoints(ck) if step_of(p) == trainer.global_step]
    if done:  # this step is already on disk; every rank sees the same folder (saves end in a barrier)
        return done[-1]
    final = ck / f"last-step{trainer.global_step}.ckpt"
    cb._save_checkpoint(trainer, str(final))
    return final


class StopOnSignal(Callback):
    """Checkpoint and stop, all ranks at the same step, once any rank got the preemption signal."""

    def __init__(self, log=print):
        self._print = log
        self.stopped_at: Optional[int] = None
        self.checkpoint: Optional[Path] = None

    def on_train_start(self, trainer, pl_module) -> None:
        # after the checkpoint restore: the step printed here is where this attempt starts
        if trainer.is_global_zero:
            self._print(f"training from global step {trainer.global_step} (restart {restart_count()})")
            sys.stdout.flush()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not trainer.strategy.reduce_boolean_decision(requested(), all=False):
            return
        self.stopped_at = trainer.global_step
        self.checkpoint = _save_now(trainer)
        if trainer.is_global_zero:
            self._print(f"preemption signal: checkpoint at step {self.stopped_at} -> {self.checkpoint}; stopping")
            sys.stdout.flush()
        # not trainer.should_stop: Lightning would then run a full validation before stopping,
        # which can overrun the 120 s left before the time limit
        raise Preempted(self.stopped_at)


class Preempted(Exception):
    """Raised by StopOnSignal on every rank once the checkpoint is written; ``train`` exits 75 on it."""
