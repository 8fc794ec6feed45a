"""The monitored metric follows the task and eval.ks: a recipe with eval.ks [5, 20] (no 10) trains
through with early stopping on, picks its best checkpoint on val/ndcg@20, and --check rejects a
monitor the recipe never logs. ~15 s.

    OMP_NUM_THREADS=1 pytest tests/test_monitor.py
"""

from __future__ import annotations

import json

import pytest

from conftest import tiny_recipe
from ecomtrain.config import RecipeError, validate_tree
from ecomtrain.tasks import monitor


def test_monitor_from_ks():
    assert monitor("next_item", [5, 10, 20]) == "val/ndcg@10"
    assert monitor("next_item", [5, 20]) == "val/ndcg@20"
    assert monitor("next_item", [3]) == "val/ndcg@3"


def test_ks_without_10_trains_through(tmp_path, tiny_dataset):
    from ecomtrain.train.runner import train

    tree = tiny_recipe(tiny_dataset, tmp_path / "run", trainer__max_epochs=2,
                       trainer__early_stopping={"enabled": True, "patience": 1})
    tree["eval"] = {"ks": [5, 20]}
    run_dir = train(validate_tree(tree), log=lambda *_: None)
    m = json.loads((run_dir / "metrics.json").read_text())
    assert "test/ndcg@20" in m and "test/ndcg@10" not in m and m["eval/checkpoint"] == "best"
    assert list((run_dir / "checkpoints").glob("best-*.ckpt"))  # chosen on val/ndcg@20


def test_unlogged_monitor_is_a_recipe_error(tmp_path):
    tree = tiny_recipe(tmp_path, tmp_path / "run", trainer__early_stopping={"enabled": True, "monitor": "val/ndcg@10"})
    tree["eval"] = {"ks": [5, 20]}
    with pytest.raises(RecipeError, match=r"trainer.early_stopping.monitor: 'val/ndcg@10' is not logged"):
        validate_tree(tree)
