"""Fast (single-process, no training) checks of checkpoint discovery, atomic publish and strategy config."""

from __future__ import annotations

import os

import pytest

from ecomtrain.config import RecipeError, TrainerConfig, validate_tree
from ecomtrain.train.checkpointing import atomic_symlink, complete_checkpoints, find_resume, publish, resolve_checkpoint
from ecomtrain.train.strategies import build_strategy, deep_merge, deepspeed_config


def _ds_folder(path):
    (path / "checkpoint").mkdir(parents=True)
    (path / "latest").write_text("checkpoint")


def test_half_written_checkpoints_are_never_picked(tmp_path):
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    (ck / "step2.ckpt").write_bytes(b"x")
    _ds_folder(ck / "step4.ckpt")
    (ck / ".tmp-step6.ckpt").write_bytes(b"half")  # a crash while writing step 6
    _ds_folder(ck / ".tmp-step8.ckpt")
    (ck / "step10.ckpt").mkdir()  # a folder without DeepSpeed's 'latest' marker is incomplete
    assert [p.name for p in complete_checkpoints(ck)] == ["step2.ckpt", "step4.ckpt"]
    assert find_resume(tmp_path).name == "step4.ckpt"
    atomic_symlink(ck / "step2.ckpt", ck / "last.ckpt")
    assert find_resume(tmp_path).name == "step2.ckpt"  # last.ckpt wins when present
    assert resolve_checkpoint(tmp_path, "last").name == "step2.ckpt"
    with pytest.raises(FileNotFoundError):
        resolve_checkpoint(tmp_path, str(tmp_path / "nope.ckpt"))


def test_publish_replaces_files_and_folders(tmp_path):
    (tmp_path / ".tmp-a.ckpt").write_text("new")
    (tmp_path / "a.ckpt").write_text("old")
    publish(tmp_path / ".tmp-a.ckpt", tmp_path / "a.ckpt")
    assert (tmp_path / "a.ckpt").read_text() == "new" and not (tmp_path / ".tmp-a.ckpt").exists()
    _ds_folder(tmp_path / "b.ckpt")
    _ds_folder(tmp_path / ".tmp-b.ckpt")
    (tmp_path / ".tmp-b.ckpt" / "marker").write_text("new")
    publish(tmp_path / ".tmp-b.ckpt", tmp_path / "b.ckpt")
    assert (tmp_path / "b.ckpt" / "marker").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["a.ckpt", "b.ckpt"]


def test_deepspeed_config_from_recipe():
    tc = TrainerConfig.model_validate({
        "strategy": {"name": "deepspeed", "zero_stage": 3, "offload_optimizer": True, "offload_params": True,
                     "deepspeed_config": {"zero_optimization": {"reduce_bucket_size": 5e7}, "steps_per_print": 5}},
    })
    cfg = deepspeed_config(tc, micro_batch_size=16)
    z = cfg["zero_optimization"]
    assert z["stage"] == 3 and z["reduce_bucket_size"] == 5e7 and z["contiguous_gradients"] is True
    assert z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    assert cfg["train_micro_batch_size_per_gpu"] == 16 and cfg["steps_per_print"] == 5
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"b": 3}}) == {"a": {"b": 3, "c": 2}}
    bad = TrainerConfig.model_validate({"strategy": {"name": "deepspeed", "zero_stage": 2, "offload_params": True}})
    with pytest.raises(RecipeError, match="zero_stage: 3"):
        deepspeed_config(bad, 1)


def test_strategy_recipe_errors():
    with pytest.raises(RecipeError) as e:
        validate_tree({"data": {"path": "x"}, "trainer": {"strategy": {"name": "fsdp", "zero_stage": 4,
                       "deepspeed_config": {"gradient_accumulation_steps": 2}}, "nonfinite": {"action": "ignore"}}})
    msg = str(e.value)
    for key in ("trainer.strategy.name", "trainer.strategy.zero_stage", "trainer.strategy.deepspeed_config", "trainer.nonfinite.action"):
        assert key in msg, msg
    assert "accumulate_grad_batches" in msg


def test_build_strategy_cpu_backends():
    ddp = build_strategy(TrainerConfig.model_validate({"strategy": {"name": "ddp"}}), "cpu")
    assert ddp._process_group_backend == "gloo"
    ds = build_strategy(TrainerConfig.model_validate({"strategy": {"name": "deepspeed", "zero_stage": 1}}), "gpu", 8)
    assert ds._process_group_backend == "nccl" and ds.config["zero_optimization"]["stage"] == 1
    assert build_strategy(TrainerConfig(), "cpu") == "auto"
