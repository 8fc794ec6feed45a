"""Shared fixtures: a tiny built dataset (200 users, 80 items) made once per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A built dataset folder (manifest.json, items.parquet, 4 train shards of <=50 samples)."""
    from ecomtrain.data import build, importers, synth

    root = tmp_path_factory.mktemp("tiny")
    synth.write(root / "raw", num_users=200, num_items=80, seed=0)
    build.build(importers.load("synth", root / "raw"), root / "ds", shard_max_samples=50, log=lambda *_: None)
    return root / "ds"
