"""trainer.weight_averaging: the EMA/SWA that checkpoints, validation and the final test see.

Real runs of the tiny model on the tiny synthetic dataset (seconds each); the average is checked
against one computed by hand from the live weights recorded after every optimizer step."""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from conftest import tiny_recipe
from ecomtrain.config import RecipeError, validate_tree
from ecomtrain.train.checkpointing import safe_load
from ecomtrain.train.evaluate import evaluate
from ecomtrain.train.runner import train


class _Record(Callback):
    """The live trainable weights after each optimizer step, and at each epoch's end."""

    def __init__(self):
        self.steps: list[dict] = []
        self.epochs: list[dict] = []

    @staticmethod
    def _snap(m):
        return {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}

    def on_train_batch_end(self, trainer, pl_module, *a):
        self.steps.append(self._snap(pl_module))

    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs.append(self._snap(pl_module))


def _run(tmp_path, dataset, **over):
    tree = tiny_recipe(dataset, tmp_path / "run", **{"trainer__max_epochs": 2, **over})
    rec = _Record()
    run_dir = train(validate_tree(tree), log=lambda *_: None, callbacks=[rec])
    return run_dir, rec


def _last(run_dir):
    return safe_load(run_dir / "checkpoints" / "last.ckpt")


def test_ema_checkpoint_holds_the_average_and_the_live_weights(tmp_path, tiny_dataset):
    decay = 0.5
    run_dir, rec = _run(tmp_path, tiny_dataset, trainer__weight_averaging={"kind": "ema", "decay": decay})
    ck = _last(run_dir)
    assert len(rec.steps) == ck["global_step"] > 2
    expect = {n: v.clone() for n, v in rec.steps[0].items()}  # the first update copies the weights
    for snap in rec.steps[1:]:
        for n in expect:
            expect[n].mul_(decay).add_(snap[n], alpha=1 - decay)
    names = list(expect)
    assert names
    for n in names:
        torch.testing.assert_close(ck["state_dict"][n], expect[n], rtol=0, atol=1e-6)
        torch.testing.assert_close(ck["current_model_state"][n], rec.steps[-1][n], rtol=0, atol=0)
    assert any(not torch.equal(ck["state_dict"][n], ck["current_model_state"][n]) for n in names)


def test_swa_averages_epoch_ends_from_start_epoch(tmp_path, tiny_dataset):
    run_dir, rec = _run(tmp_path, tiny_dataset, trainer__max_epochs=3,
                        trainer__weight_averaging={"kind": "swa", "start_epoch": 1})
    ck = _last(run_dir)
    assert len(rec.epochs) == 3
    for n, v in rec.epochs[1].items():
        torch.testing.assert_close(ck["state_dict"][n], (v + rec.epochs[2][n]) / 2, rtol=0, atol=1e-6)


def test_final_test_and_eval_score_the_average(tmp_path, tiny_dataset):
    """metrics.json's test figures are the checkpoint's average (as `ecomtrain eval` scores it),
    not the live weights that ride along for resume."""
    run_dir, _ = _run(tmp_path, tiny_dataset, trainer__weight_averaging={"kind": "ema", "decay": 0.5})
    metrics = json.loads((run_dir / "metrics.json").read_text())
    again = evaluate(str(run_dir), split="test", ckpt="best")
    assert again["test/ndcg@10"] == pytest.approx(metrics["test/ndcg@10"], abs=1e-6)
    assert again["test/mrr"] == pytest.approx(metrics["test/mrr"], abs=1e-6)
    # the same figures from the live weights differ: the check above can tell them apart
    ck_path = next((run_dir / "checkpoints").glob("best-*.ckpt"))
    ck = safe_load(ck_path)
    live = dict(ck, state_dict=ck["current_model_state"])
    for k in ("current_model_state", "averaging_state"):
        live.pop(k)
    live_path = tmp_path / "live.ckpt"
    torch.save(live, live_path)
    other = evaluate(str(run_dir), split="test", ckpt=str(live_path))
    assert other["test/mrr"] != pytest.approx(metrics["test/mrr"], abs=1e-6)


def test_weight_averaging_refuses_deepspeed(tmp_path, tiny_dataset):
    tree = tiny_recipe(tiny_dataset, tmp_path / "run", trainer__weight_averaging={"kind": "ema"},
                       trainer__strategy={"name": "deepspeed", "zero_stage": 2})
    with pytest.raises(RecipeError, match=r"trainer.weight_averaging.kind: ema .*deepspeed"):
        validate_tree(tree)


def test_weight_averaging_keys_are_checked(tmp_path, tiny_dataset):
    for bad, key in (({"kind": "ema", "decay": 1.0}, "decay"), ({"kind": "polyak"}, "kind")):
        tree = tiny_recipe(tiny_dataset, tmp_path / "run", trainer__weight_averaging=bad)
        with pytest.raises(RecipeError, match=rf"trainer.weight_averaging.{key}"):
            validate_tree(tree)


class _CrashAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, *a):
        if trainer.global_step == self.step:
            raise RuntimeError(f"injected crash at step {self.step}")


def test_resume_continues_the_same_average(tmp_path, tiny_dataset):
    """A run stopped in step 5 and resumed from step 4 (trainer.resume=auto) ends with the same average and live
    weights as an uninterrupted one: the checkpoint carries both."""
    over = {"trainer__max_steps": 8, "trainer__checkpoint": {"every_n_steps": 2},
            "trainer__weight_averaging": {"kind": "ema", "decay": 0.7}}
    full = train(validate_tree(tiny_recipe(tiny_dataset, tmp_path / "full", **over)), log=lambda *_: None)
    part_tree = tiny_recipe(tiny_dataset, tmp_path / "part", **over)
    # Lightning runs checkpoint callbacks last: the crash in step 5 comes after step4.ckpt is written
    with pytest.raises(RuntimeError, match="injected crash at step 5"):
        train(validate_tree(part_tree), log=lambda *_: None, callbacks=[_CrashAt(5)])
    assert (tmp_path / "part" / "checkpoints" / "step4.ckpt").exists()
    part_tree["trainer"]["resume"] = "auto"
    part = train(validate_tree(part_tree), log=lambda *_: None)
    a, b = safe_load(full / "checkpoints" / "step8.ckpt"), safe_load(part / "checkpoints" / "step8.ckpt")
    for key in ("state_dict", "current_model_state"):
        assert a[key].keys() == b[key].keys()
        for n in a[key]:
            torch.testing.assert_close(a[key][n], b[key][n], rtol=0, atol=1e-6, msg=f"{key}[{n}]")
    assert any(not torch.equal(a["state_dict"][n], a["current_model_state"][n]) for n in a["state_dict"])
