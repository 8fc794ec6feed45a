"""Distributed-correctness of the evaluation suite: a 2-process DDP run's test metrics (each rank
evaluates its share of users, torchmetrics all-reduces the sum states) equal a single-process
``ecomtrain eval`` of the same checkpoint, for every key: ranking, beyond-accuracy (coverage, Gini,
ILD, novelty, buckets) and channel/time consistency.

    OMP_NUM_THREADS=1 pytest -m distributed tests/test_recommend_dist.py -s
"""

from __future__ import annotations

import json

import pytest

from disthelp import tiny_recipe, torchrun


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
