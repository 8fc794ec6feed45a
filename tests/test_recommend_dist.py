"""Distributed-correctness of evaluation and of multi-process ``ecomtrain recommend``.

- a 2-process DDP run's test metrics (each rank evaluates its share of users, torchmetrics all-reduces
  the sum states) equal a single-process ``ecomtrain eval`` of the same checkpoint, for every key:
  ranking, beyond-accuracy (coverage, Gini, ILD, novelty, buckets) and channel/time consistency;
- ``ecomtrain recommend --devices 2`` (Lightning's predict loop on 2 CPU processes, gloo; launched by
  Lightning itself and under torchrun) writes exactly the single-process file (same rows, same
  order, same scores), with uneven shares per rank and item filters; a rank that fails leaves no
  output file and no temporary file.

    OMP_NUM_THREADS=1 pytest -m distributed tests/test_recommend_dist.py -s
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from disthelp import tiny_recipe, torchrun

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.distributed
def test_ddp_eval_metrics_equal_single_process(tmp_path, tiny_dataset):
    from ecomtrain.train.evaluate import evaluate

    run_dir = tmp_path / "run"
    recipe = tiny_recipe(tmp_path / "r.yaml", tiny_dataset, run_dir, max_steps=4, test_ckpt="last")
    torchrun(recipe, "trainer.strategy.name=ddp")
    two = {k: v for k, v in json.loads((run_dir / "metrics.json").read_text()).items() if k.startswith("test/")}
    one = evaluate(str(run_dir), split="test", ckpt="last")
    for family in ("test/coverage@10", "test/gini@10", "test/ild@10", "test/novelty@10", "test/pop_tail/ndcg@10",
                   "test/user_heavy/hr@10", "test/consistency/time/jaccard@10", "test/consistency/channel/app~web/rbo@10"):
        assert family in two, family
    assert two.keys() == {k for k in one if k.startswith("test/")}
    for k, v in two.items():
        assert v == pytest.approx(one[k], abs=1e-5), k


@pytest.fixture(scope="module")
def rec_run(tmp_path_factory, tiny_dataset):
    from conftest import tiny_recipe as tree

    from ecomtrain.config import validate_tree
    from ecomtrain.train.runner import train

    return train(validate_tree(tree(tiny_dataset, tmp_path_factory.mktemp("recdist") / "run", trainer__max_epochs=1)),
                 log=lambda *_: None)


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _recommend(*args: str, under_torchrun: bool = False) -> subprocess.CompletedProcess:
    if under_torchrun:
        entry = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ecomtrain.cli"]
    else:
        entry = [sys.executable, "-m", "ecomtrain.cli"]
    return subprocess.run([*entry, "recommend", *args], capture_output=True, text=True, timeout=600, env=_env())


@pytest.mark.distributed
@pytest.mark.parametrize("launch", ["lightning", "torchrun"])
def test_two_process_recommend_equals_single_process(rec_run, tiny_dataset, tmp_path, launch):
    ids = pl.read_parquet(tiny_dataset / "items.parquet").sort("idx")["item"].to_list()
    (tmp_path / "deny.txt").write_text("\n".join(ids[:5]))
    # 300 test users in batches of 64: 5 batches, rank 0 scores 3 and rank 1 scores 2
    common = ["--split", "test", "--k", "20", "--batch-size", "64", "--deny", str(tmp_path / "deny.txt"), "--device", "cpu"]
    one = tmp_path / "one.parquet"
    r = _recommend(str(rec_run), *common, "--out", str(one))
    assert r.returncode == 0, r.stderr[-3000:]
    two = tmp_path / "two.parquet"
    r = _recommend(str(rec_run), *common, "--out", str(two), "--devices", "2", under_torchrun=launch == "torchrun")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("wrote ") == 1  # rank 0 alone writes and reports
    a, b = pl.read_parquet(one), pl.read_parquet(two)
    assert a.height == 20 * json.loads((tiny_dataset / "manifest.json").read_text())["splits"]["test"]["num_samples"]
    assert a.equals(b)  # same rows, same order, same scores
    assert not set(ids[:5]) & set(b["item"].to_list())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deny.txt", "one.parquet", "two.parquet"]


@pytest.mark.distributed
def test_failing_rank_leaves_no_output(rec_run, tmp_path):
    out = tmp_path / "recs.parquet"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(REPO / "tests" / "faulty_recommend.py"),
           "--fail-rank", "1", "recommend", str(rec_run), "--split", "test", "--batch-size", "32", "--device", "cpu",
           "--out", str(out), "--devices", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env())
    assert r.returncode != 0
    assert "injected failure on rank 1" in r.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []
