"""Helpers for the 2-process CPU tests: a tiny recipe and a torchrun launch of ``ecomtrain train``."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def tiny_recipe(path: Path, data: Path, run_dir: Path, **trainer) -> Path:
    tree = {
        "run": {"name": "t", "dir": str(run_dir), "seed": 3},
        "data": {"path": str(data), "max_history": 20, "batch_size": 16, "eval_batch_size": 64, "shuffle_buffer": 50},
        "model": {"backbone": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128}, "dropout": 0.1},
        "optim": {"lr": 3.0e-3, "warmup_ratio": 0.2},
        "trainer": {"accelerator": "cpu", "devices": 2, "max_steps": 8, "max_epochs": 10, "log_every_n_steps": 1, "progress_bar": False, **trainer},
        "logging": {"wandb": {"enabled": False}},
    }
    path.write_text(yaml.safe_dump(tree))
    return path


FAULTY = str(REPO / "tests" / "faulty_train.py")


def torchrun(recipe: Path, *overrides: str, nproc: int = 2, env: dict | None = None, timeout: int = 600, check: bool = True,
             faults: str | None = None):
    """Run ``torchrun --standalone -m ecomtrain.cli train RECIPE overrides``; returns (proc, seconds).
    ``faults``: a tests/faults.py spec (e.g. "crash_at=4"): runs tests/faulty_train.py instead."""
    entry = [FAULTY, "--faults", faults] if faults else ["-m", "ecomtrain.cli"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *entry, "train", str(recipe), *overrides]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                "WANDB_MODE": "disabled", **(env or {})}
    t0 = time.time()
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout, cwd=str(recipe.parent))
    took = time.time() - t0
    if check and proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
        raise AssertionError(f"torchrun failed (rc={proc.returncode}) after {took:.0f}s:\n{tail}")
    print(f"[timing] {' '.join(overrides) or recipe.name}: {took:.1f}s")
    return proc, took


def step_losses(run_dir: Path) -> dict[int, float]:
    """{step: train/loss} from RUN_DIR/logs/metrics.csv (the CSVLogger file); later rows win."""
    out: dict[int, float] = {}
    with open(run_dir / "logs" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            if row.get("train/loss"):
                out[int(row["step"])] = float(row["train/loss"])
    return out
