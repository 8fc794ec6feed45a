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


# ------------------------------------------------------------------ SIGKILL at random steps
KILL_SEED = 2026


def _descendants(pid: int) -> list[int]:
    """pid and every process below it (torchrun's agent starts the workers as its children)."""
    import os

    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _run_and_kill(recipe, overrides: list[str], run_dir, kill_after: int) -> int:
    """Launch the 2-process run; SIGKILL the launcher and both workers as soon as a checkpoint of step
    >= kill_after is complete (the kill lands wherever the run is then: mid-step, mid-write...).
    Returns the step of the newest complete checkpoint left behind."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from disthelp import REPO
    from ecomtrain.train.checkpointing import complete_checkpoints, step_of

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ecomtrain.cli",
           "train", str(recipe), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=str(recipe.parent))
    deadline = time.time() + 600
    try:
        while proc.poll() is None and time.time() < deadline:
            if any(step_of(p) >= kill_after for p in complete_checkpoints(run_dir / "checkpoints")):
                for pid in _descendants(proc.pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                break
            time.sleep(0.05)
    finally:
        proc.wait(timeout=60)
        time.sleep(0.5)  # let the killed workers' pids go
    assert proc.returncode == -signal.SIGKILL, f"the run ended on its own (rc={proc.returncode}) before step {kill_after}"
    return max(step_of(p) for p in complete_checkpoints(run_dir / "checkpoints"))


@pytest.mark.distributed
@pytest.mark.timeout(1800)  # 5 launches of a 2-process run
def test_sigkill_at_random_steps_then_resume_matches_uninterrupted(tmp_path, tiny_dataset):
    """A DDP run SIGKILLed (launcher and both ranks) at 3 seeded random steps, each time resumed with
    trainer.resume=auto, ends with the same metrics.json numbers and the same per-step losses as an
    uninterrupted run. Checkpoints every step, so a kill may land mid-write (atomic rename keeps the
    previous one)."""
    import random

    manifest = json.loads((tiny_dataset / "manifest.json").read_text())
    per_epoch = manifest["splits"]["train"]["num_samples"] // (2 * 16)
    total = per_epoch + 3  # crosses an epoch boundary (and its validation)
    kills = sorted(random.Random(KILL_SEED).sample(range(1, total - 1), 3))
    common = [*STRATEGIES["ddp"], f"trainer.max_steps={total}", "trainer.checkpoint.every_n_steps=1",
              "trainer.checkpoint.keep_last=2"]
    full, part = tmp_path / "full", tmp_path / "part"
    torchrun(tiny_recipe(tmp_path / "full.yaml", tiny_dataset, full), *common)
    recipe = tiny_recipe(tmp_path / "part.yaml", tiny_dataset, part)
    left = []
    for k in kills:
        left.append(_run_and_kill(recipe, [*common, "trainer.resume=auto"], part, kill_after=k))
        assert not (part / "metrics.json").exists()
    print(f"[kill] kill points {kills}; newest complete checkpoint after each kill: steps {left}")
    assert left == sorted(left) and left[0] >= kills[0]
    torchrun(recipe, *common, "trainer.resume=auto")

    a, b = json.loads((full / "metrics.json").read_text()), json.loads((part / "metrics.json").read_text())
    numbers = [k for k in a if k.startswith(("val/", "test/", "baseline/")) and isinstance(a[k], float)]
    assert numbers and "test/ndcg@10" in numbers
    diffs = {k: abs(a[k] - b[k]) for k in numbers}
    assert max(diffs.values()) <= TOL, {k: v for k, v in diffs.items() if v > TOL}
    assert a["train/global_step"] == b["train/global_step"] == total
    # the CSV log restarts with each attempt: it holds the steps of the last one (from its checkpoint on)
    la, lb = step_losses(full), step_losses(part)
    assert set(range(left[-1], total)) <= set(lb), sorted(lb)
    assert max(abs(la[s] - lb[s]) for s in range(left[-1], total)) <= TOL
