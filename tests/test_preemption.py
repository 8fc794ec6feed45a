"""Checkpoint-and-stop on SIGUSR1 in one process (the mechanism behind the Slurm requeue), ~15 s.

The run sends itself SIGUSR1 after step 2 (tests/faults.py): it must write a checkpoint for that step,
skip the final evaluation, exit with status 75, and a second run with trainer.resume=auto must
continue from that step to max_steps.
"""

from __future__ import annotations

import signal

import pytest

from ecomtrain.config import validate_tree
from faults import FaultInjector
from ecomtrain.train import preemption
from ecomtrain.train.checkpointing import find_resume, step_of
from launchhelp import metrics
from launchhelp import tiny_recipe as make_recipe


def _cfg(tiny_dataset, run_dir):
    import yaml

    path = make_recipe(run_dir.parent / "r.yaml", tiny_dataset, devices=1, strategy={"name": "auto"}, max_steps=6)
    tree = yaml.safe_load(path.read_text())
    tree["run"]["dir"] = str(run_dir)
    tree["trainer"]["resume"] = "auto"
    return validate_tree(tree)


def test_sigusr1_checkpoints_stops_and_resumes(tiny_dataset, tmp_path, monkeypatch):
    from ecomtrain.train.runner import train

    run_dir = tmp_path / "run"
    cfg = _cfg(tiny_dataset, run_dir)
    lines: list[str] = []
    old = signal.getsignal(signal.SIGUSR1)
    try:
        with pytest.raises(SystemExit) as exc:
            train(cfg, log=lines.append, callbacks=[FaultInjector(signal_at=2)])
        assert exc.value.code == preemption.EXIT_PREEMPTED
        stopped = [ln for ln in lines if ln.startswith("preempted at step")]
        assert stopped == ["preempted at step 3; exit 75 (resume with trainer.resume=auto)"], lines
        assert step_of(find_resume(run_dir)) == 3  # the checkpoint of the step it stopped at
        assert not (run_dir / "metrics.json").exists()  # no evaluation after the signal

        lines.clear()
        train(cfg, log=lines.append)
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert "training from global step 3 (restart 0)" in lines, lines
    assert metrics(run_dir)["train/global_step"] == 6
