"""Shared fixtures: tiny synthetic datasets and recipes (no downloads, seconds to build)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# 2-core machines: keep each test process to one intra-op thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _no_wandb_key(monkeypatch):
    # tests must never reach W&B servers: without a key the runner goes offline
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


@pytest.fixture(scope="session")
def synth_raw(tmp_path_factory) -> Path:
    from ecomtrain.data import synth

    out = tmp_path_factory.mktemp("synth_raw")
    synth.write(out, num_users=300, num_items=80, num_categories=5, num_brands=10, seed=1)
    return out


@pytest.fixture(scope="session")
def signal_dataset(tmp_path_factory) -> Path:
    """300 users with planted behaviour/channel signals and ratings (seconds to build); read-only,
    shared by the task and prompt tests."""
    from ecomtrain.data import build, importers, synth

    root = tmp_path_factory.mktemp("sig")
    synth.write(root / "raw", num_users=300, num_items=60, num_categories=4, num_brands=8, seed=2,
                behaviour_signal=True, channel_signal=True, ratings=True)
    build.build(importers.load("synth", root / "raw"), root / "ds", shard_max_samples=100, log=lambda *_: None)
    return root / "ds"


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, synth_raw) -> Path:
    from ecomtrain.data import build, importers

    out = tmp_path_factory.mktemp("tiny_ds")
    build.build(importers.load("synth", synth_raw), out, shard_max_samples=50, log=lambda *_: None)
    return out


def tiny_recipe(data_path: Path, run_dir: Path, **over) -> dict:
    """A recipe tree for a 2-layer, 64-wide Qwen2 that trains in seconds."""
    tree = {
        "run": {"name": "t", "dir": str(run_dir), "seed": 0},
        "data": {"path": str(data_path), "max_history": 20, "batch_size": 16, "eval_batch_size": 64, "shuffle_buffer": 50},
        "model": {"backbone": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "intermediate_size": 128}, "dropout": 0.1},
        "optim": {"lr": 3e-3},
        "trainer": {"accelerator": "cpu", "max_epochs": 1, "progress_bar": False, "log_every_n_steps": 1},
        "logging": {"wandb": {"enabled": False}},
    }
    for dotted, value in over.items():
        node = tree
        *parents, last = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return tree
