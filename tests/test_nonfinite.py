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
