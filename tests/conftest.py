"""Shared test fixtures: tiny synthetic shop data, built once per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A built dataset folder (200 users, 80 items) usable as ``data.path``."""
    from ecomtrain.data import build, importers, synth

    root = tmp_path_factory.mktemp("tiny_data")
    synth.write(root / "raw", num_users=200, num_items=80, seed=0)
    # 40 samples per shard: 5 shards per split, enough for 2 ranks x 2 readers
    build.build(importers.load("synth", root / "raw"), root / "built", seed=0, shard_max_samples=40, log=lambda *a: None)
    return root / "built"
