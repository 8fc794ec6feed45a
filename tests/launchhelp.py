"""Helpers for the launch tests (torchrun.sh, slurm.sbatch): tiny data, a tiny 2-process recipe, log parsing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def tiny_data(root: Path) -> Path:
    """Build (once per folder) a 200-user / 80-item dataset with 4 train shards; returns the dataset folder."""
    ds = root / "ds"
    if not (ds / "manifest.json").is_file():
        from ecomtrain.data import build, importers, synth

        synth.write(root / "raw", num_users=200, num_items=80, seed=0)
        build.build(importers.load("synth", root / "raw"), ds, shard_max_samples=50, log=lambda *_: None)
    return ds


def tiny_recipe(path: Path, data: Path, **trainer) -> Path:
    """Qwen2 with 2 layers / hidden 64 on 2 CPU processes (DDP, gloo), checkpoint every 2 steps."""
    tree = {
        "run": {"name": "tiny", "seed": 3},
        "data": {"path": str(data), "max_history": 20, "batch_size": 16, "eval_batch_size": 64, "shuffle_buffer": 50},
        "model": {"backbone": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128}},
        "optim": {"lr": 3.0e-3, "warmup_ratio": 0.2},
        "trainer": {
            "accelerator": "cpu", "devices": 2, "strategy": {"name": "ddp"}, "max_steps": 8, "max_epochs": 10,
            "log_every_n_steps": 1, "progress_bar": False, "checkpoint": {"every_n_steps": 2}, **trainer,
        },
        "logging": {"wandb": {"enabled": False}},
    }
    path.write_text(yaml.safe_dump(tree))
    return path


def child_env(**extra: str) -> dict[str, str]:
    """Environment for launched processes: this checkout first on PYTHONPATH, 1 thread, no W&B."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "ECOMTRAIN": f"{PY} -m ecomtrain.cli", "PYTHON": PY}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")
    env["PATH"] = str(Path(PY).parent) + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env


def faulty_entry(spec: str) -> str:
    """Command words that run ``ecomtrain`` with tests/faults.py's injector (for ENTRY / ECOMTRAIN)."""
    return f"{REPO / 'tests' / 'faulty_train.py'} --faults {spec}"


_START = re.compile(r"training from global step (\d+) \(restart (\d+)\)")


def starts(log: str) -> list[tuple[int, int]]:
    """[(global step, restart count)] of every training attempt printed by rank 0."""
    return [(int(a), int(b)) for a, b in _START.findall(log)]


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)
