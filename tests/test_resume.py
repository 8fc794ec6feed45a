"""Exact resume on 2 CPU processes: a run killed at step 4 and resumed with trainer.resume=auto
logs the same train/loss at every later step as an uninterrupted run with the same seed.

Dropout is on (0.1) and the run goes 3 steps past an epoch boundary, so model, optimizer,
LR scheduler, step, per-rank RNG and in-epoch data position must all be restored. Tolerance: 1e-6 absolute (gloo on CPU is deterministic; the diffs measured are 0.0).

    OMP_NUM_THREADS=1 pytest -m distributed tests/test_resume.py -s
"""

from __future__ import annotations

import json

import pytest

from disthelp import step_losses, tiny_recipe, torchrun
from ecomtrain.train.checkpointing import find_resume

TOL = 1e-6
STRATEGIES = {
    "ddp": ["trainer.strategy.name=ddp"],
    "zero2": ["trainer.strategy.name=deepspeed", "trainer.strategy.zero_stage=2"],
}


@pytest.mark.distributed
@pytest.mark.timeout(900)  # several 2-process launches
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_resume_matches_uninterrupted(tmp_path, tiny_dataset, name):
    manifest = json.loads((tiny_dataset / "manifest.json").read_text())
    per_epoch = manifest["splits"]["train"]["num_samples"] // (2 * 16)  # batches per rank (2 ranks x 16)
    total = per_epoch + 3
    assert per_epoch > 4
    common = [*STRATEGIES[name], f"trainer.max_steps={total}", "trainer.checkpoint.every_n_steps=2"]
    full, part = tmp_path / "full", tmp_path / "part"
    torchrun(tiny_recipe(tmp_path / "full.yaml", tiny_dataset, full), *common)

    recipe = tiny_recipe(tmp_path / "part.yaml", tiny_dataset, part)
    proc, _ = torchrun(recipe, *common, faults="crash_at=4", check=False)
    assert proc.returncode != 0, "the injected crash at step 4 did not stop the run"
    assert find_resume(part).name == "step4.ckpt"
    assert not (part / "metrics.json").exists()

    proc, _ = torchrun(recipe, *common, "trainer.resume=auto")
    assert "resuming from" in proc.stdout + proc.stderr

    a, b = step_losses(full), step_losses(part)
    assert sorted(a) == list(range(total))
    later = list(range(4, total))
    assert set(later) <= set(b), sorted(b)
    diffs = {s: abs(a[s] - b[s]) for s in later}
    print(f"[resume {name}] max |loss diff| over steps 4..{total - 1}: {max(diffs.values()):.3g}")
    assert max(diffs.values()) <= TOL, diffs
    assert not [p for p in (part / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
