"""Non-finite loss on one rank (injected by tests/faults.py: rank 1's loss becomes NaN at step 3) on 2 CPU processes.

- action=stop: every rank stops with the same clear error, nothing hangs, and no checkpoint
  of the poisoned state is written (step2 exists, step4 does not);
- action=skip: the update is dropped on every rank (Lightning skips backward under DDP; DeepSpeed's
  overflow check drops the step under ZeRO), training finishes, and every tensor of every checkpoint
  is finite.

    OMP_NUM_THREADS=1 pytest -m distributed tests/test_nonfinite.py -s
"""

from __future__ import annotations

import math

import pytest
import torch

from disthelp import step_losses, tiny_recipe, torchrun
from ecomtrain.train.checkpointing import complete_checkpoints, load_lightning_state

NAN_AT = "nan_at=3,nan_rank=1"  # tests/faults.py
STRATEGIES = {"ddp": ["trainer.strategy.name=ddp"], "zero2": ["trainer.strategy.name=deepspeed", "trainer.strategy.zero_stage=2"]}


def _assert_all_finite(ckpt_dir):
    found = complete_checkpoints(ckpt_dir)
    assert found
    for path in found:
        sd = load_lightning_state(path)["state_dict"]
        bad = [k for k, v in sd.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
        assert not bad, f"{path.name}: non-finite tensors {bad[:5]}"


@pytest.mark.distributed
@pytest.mark.timeout(900)  # several 2-process launches
def test_nonfinite_stop_ddp(tmp_path, tiny_dataset):
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(tmp_path / "r.yaml", tiny_dataset, run_dir, max_steps=6)
    proc, _ = torchrun(recipe, *STRATEGIES["ddp"], "trainer.checkpoint.every_n_steps=2", faults=NAN_AT, check=False, timeout=300)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "non-finite training loss (NaN/inf) on at least one rank at step 3" in out
    names = {p.name for p in complete_checkpoints(run_dir / "checkpoints")}
    assert "step2.ckpt" in names and "step4.ckpt" not in names, names
    assert not (run_dir / "metrics.json").exists()
    _assert_all_finite(run_dir / "checkpoints")


@pytest.mark.distributed
@pytest.mark.timeout(900)  # several 2-process launches
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_nonfinite_skip(tmp_path, tiny_dataset, name):
    run_dir = tmp_path / "run"
    recipe = tiny_recipe(tmp_path / "r.yaml", tiny_dataset, run_dir, max_steps=6)
    torchrun(recipe, *STRATEGIES[name], "trainer.checkpoint.every_n_steps=2", "trainer.nonfinite.action=skip",
             "trainer.nonfinite.max_skips=1", faults=NAN_AT)
    assert (run_dir / "metrics.json").is_file()
    losses = step_losses(run_dir)
    assert losses and all(math.isfinite(v) for v in losses.values())
    _assert_all_finite(run_dir / "checkpoints")


# ----------------------------------------------------------------- one process (default tier, ~10 s each)
def test_nonfinite_stop_single_process_one_line(tmp_path, tiny_dataset):
    """`ecomtrain train` whose loss turns NaN at step 2 (action=stop): exit 2, one 'error:' line naming the
    step and the knob, no traceback, the checkpoints before the step kept and none of the poisoned state."""
    import os
    import subprocess
    import sys

    from disthelp import FAULTY, REPO

    run_dir = tmp_path / "run"
    recipe = tiny_recipe(tmp_path / "r.yaml", tiny_dataset, run_dir, devices=1, max_steps=6)
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, FAULTY, "--faults", "nan_at=2", "train", str(recipe),
                           "trainer.checkpoint.every_n_steps=1", "trainer.checkpoint.keep_last=5"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: non-finite training loss (NaN/inf) on at least one rank at step 2"), errors
    assert "trainer.nonfinite.action=stop" in errors[0]
    names = {p.name for p in complete_checkpoints(run_dir / "checkpoints")}
    assert {"step1.ckpt", "step2.ckpt"} <= names and "step3.ckpt" not in names, names
    assert not (run_dir / "metrics.json").exists()
    _assert_all_finite(run_dir / "checkpoints")


def test_nonfinite_skip_single_process(tmp_path, tiny_dataset):
    """action=skip in one process: the NaN step's update is dropped, training finishes, all weights finite."""
    import yaml

    from ecomtrain.config import validate_tree
    from ecomtrain.train.runner import train
    from faults import FaultInjector

    run_dir = tmp_path / "run"
    tree = yaml.safe_load(tiny_recipe(tmp_path / "r.yaml", tiny_dataset, run_dir, devices=1, max_steps=5).read_text())
    tree["trainer"].update({"nonfinite": {"action": "skip", "max_skips": 1}, "checkpoint": {"every_n_steps": 1}})
    train(validate_tree(tree), log=lambda *_: None, callbacks=[FaultInjector(nan_at=2)])
    import csv

    losses = step_losses(run_dir)
    assert {0, 1, 3, 4} <= set(losses) and all(math.isfinite(v) for v in losses.values()), losses
    with open(run_dir / "logs" / "metrics.csv") as f:
        skipped = [(int(r["step"]), float(r["train/skipped_steps"])) for r in csv.DictReader(f) if r.get("train/skipped_steps")]
    # the poisoned step was the first skipped, and the only one (rows after it repeat the last value)
    assert skipped and skipped[0] == (2, 1.0) and {v for _, v in skipped} == {1.0}, skipped
    import json

    assert json.loads((run_dir / "metrics.json").read_text())["train/global_step"] == 5
    _assert_all_finite(run_dir / "checkpoints")
