"""A recipe that really holds a secret-looking value never leaks it, and ``logging.wandb.mode: auto``
respects WANDB_MODE=offline even with WANDB_API_KEY set. One real single-process run with a real
(offline) W&B logger, ~15 s.

    OMP_NUM_THREADS=1 pytest tests/test_secrets_wandb.py
"""

from __future__ import annotations

import pytest

from conftest import tiny_recipe
from ecomtrain.config import redact, validate_tree
from ecomtrain.train.runner import wandb_mode

SECRET = "sk-live-0123456789abcdef"  # what a user might paste into a recipe


def test_wandb_mode_auto():
    assert wandb_mode("auto", {}) == "offline"
    assert wandb_mode("auto", {"WANDB_API_KEY": "k"}) == "online"
    assert wandb_mode("auto", {"WANDB_API_KEY": "k", "WANDB_MODE": "offline"}) == "offline"
    assert wandb_mode("auto", {"WANDB_API_KEY": "k", "WANDB_MODE": "disabled"}) == "disabled"
    assert wandb_mode("online", {"WANDB_MODE": "offline"}) == "online"  # an explicit recipe value wins


def test_redact_replaces_secret_values_only():
    tree = {"a": {"api_key": SECRET, "wandb_token": SECRET, "password": "", "keys": [1], "monkey": "ok"}}
    assert redact(tree) == {"a": {"api_key": "<redacted>", "wandb_token": "<redacted>", "password": "", "keys": [1], "monkey": "ok"}}


def test_secret_never_reaches_run_dir_checkpoint_or_wandb(tmp_path, tiny_dataset, monkeypatch):
    from ecomtrain.train.checkpointing import complete_checkpoints, safe_load
    from ecomtrain.train.runner import train

    monkeypatch.setenv("WANDB_API_KEY", "fake-key-must-not-be-used-" + "0" * 14)
    monkeypatch.setenv("WANDB_MODE", "offline")
    tree = tiny_recipe(tiny_dataset, tmp_path / "run", trainer__max_steps=2)
    tree["logging"] = {"wandb": {"enabled": True, "mode": "auto", "project": "redact-test"}}
    # deepspeed_config is free-form: the one place a recipe can carry a credential-looking key
    tree["trainer"]["strategy"] = {"name": "auto", "deepspeed_config": {"wandb_api_key": SECRET, "comms": {"token": SECRET}}}
    cfg = validate_tree(tree)
    assert cfg.trainer.strategy.deepspeed_config["wandb_api_key"] == SECRET  # the recipe really holds it
    run_dir = train(cfg, log=lambda *_: None)

    saved = (run_dir / "recipe.yaml").read_text()
    assert "wandb_api_key: <redacted>" in saved and "token: <redacted>" in saved
    offline = sorted((run_dir / "wandb").glob("wandb/offline-run-*")) or sorted((run_dir / "wandb").glob("offline-run-*"))
    assert offline, f"no offline W&B run under {run_dir / 'wandb'}: mode auto went online despite WANDB_MODE=offline"
    logs = list(offline[0].glob("run-*.wandb"))  # an offline run keeps its config in this record log
    assert logs and b"<redacted>" in logs[0].read_bytes() and b"redact-test" in logs[0].read_bytes()
    ckpts = complete_checkpoints(run_dir / "checkpoints")
    assert ckpts
    for ck in ckpts:
        hp = safe_load(ck)["hyper_parameters"]
        assert hp["recipe"]["trainer"]["strategy"]["deepspeed_config"]["wandb_api_key"] == "<redacted>"
    leaks = [str(p) for p in run_dir.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaks, leaks
