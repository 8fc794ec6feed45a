"""One rank of the 2-process AdaLoRA tests (launched by tests/test_peft_dist.py via torchrun).

    torchrun --nproc_per_node 2 tests/peft_dist_worker.py DATA_DIR OUT_DIR ddp|zero2|zero3

Fits a tiny Qwen2 with finetune.method=adalora, accumulate_grad_batches=2, then
writes OUT_DIR/rank<R>.json (allocation history, final rank pattern,
divergences, optimizer steps), a final checkpoint OUT_DIR/final.ckpt and
OUT_DIR/recipe.yaml (so OUT_DIR is a run directory for ``ecomtrain export``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def recipe(data: str, strategy: str) -> dict:
    name, stage = ("deepspeed", int(strategy[-1])) if strategy.startswith("zero") else (strategy, 2)
    return {
        "run": {"seed": 0},
        "data": {"path": data, "batch_size": 8, "shuffle_buffer": 0},
        "model": {"backbone": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64}, "dropout": 0.0},
        "finetune": {"method": "adalora", "adalora": {"init_r": 4, "target_r": 2, "tinit": 1, "tfinal": 1, "orth_reg_weight": 0.1}},
        "trainer": {
            "accelerator": "cpu", "devices": 2, "max_epochs": 1, "accumulate_grad_batches": 2, "progress_bar": False,
            "strategy": {"name": name, "zero_stage": stage},
        },
        "logging": {"wandb": {"enabled": False}},
    }


def checked_allocator():
    """AdaLoraAllocator that also checks, at the first step, that the gradient it scored is the one the
    optimizer applied: AdamW's first update is -lr * sign(g) (+ tiny decay), so sign(w1 - w0) == -sign(g)."""
    import torch

    from ecomtrain.train.adalora import AdaLoraAllocator, _Access

    class Checked(AdaLoraAllocator):
        sign_agree = sign_total = 0

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            super().on_before_optimizer_step(trainer, pl_module, optimizer)
            if self._grads is not None and trainer.global_step == 0:
                acc = _Access(trainer)
                self._before = {n: acc.param(p) for n, p in self._params(self._tuner(pl_module))}

        def allocate(self, trainer, pl_module, step, grads):
            if step == 1 and grads is not None:
                acc = _Access(trainer)
                for n, p in self._params(self._tuner(pl_module)):
                    moved, g = acc.param(p) - self._before[n], grads[n]
                    real = g.abs() > 1e-12
                    self.sign_agree += int(((torch.sign(moved) == -torch.sign(g)) & real).sum())
                    self.sign_total += int(real.sum())
            return super().allocate(trainer, pl_module, step, grads)

    return Checked()


def main(data: str, out: str, strategy: str) -> None:
    import lightning as L
    import polars as pl

    from ecomtrain.config import validate_tree
    from ecomtrain.data.build import load_manifest
    from ecomtrain.train.datamodule import ShardDataModule
    from ecomtrain.train.module import RecModule, make_task
    from ecomtrain.train.strategies import build_strategy

    tree = recipe(data, strategy)
    cfg = validate_tree(tree)
    manifest = load_manifest(data)
    n = int(manifest["num_items"])
    counts = pl.read_parquet(Path(data) / "items.parquet", columns=["idx", "train_count"]).sort("idx")["train_count"].to_list()
    L.seed_everything(0, verbose=False)
    module = RecModule(tree, n, counts)
    alloc = checked_allocator()
    tc = cfg.trainer
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=build_strategy(tc, "cpu", cfg.data.batch_size), max_epochs=1,
        accumulate_grad_batches=tc.accumulate_grad_batches, gradient_clip_val=tc.gradient_clip_val,
        limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[alloc],
    )
    trainer.fit(module, datamodule=ShardDataModule(cfg, make_task(cfg, n), manifest))
    trainer.save_checkpoint(str(Path(out) / "final.ckpt"))  # collective under DeepSpeed
    tuner = module.net.lm.base_model
    pc = tuner.peft_config["default"]
    report = {
        "history": alloc.history, "divergences": alloc.divergences, "global_step": trainer.global_step,
        "total_step": pc.total_step, "init_bgt": tuner.rankallocator.init_bgt, "target_bgt": tuner.rankallocator.target_bgt,
        "rank_pattern": pc.rank_pattern,
        "sign_agree": alloc.sign_agree, "sign_total": alloc.sign_total,
    }
    Path(out, f"rank{trainer.global_rank}.json").write_text(json.dumps(report))
    if trainer.global_rank == 0:  # makes OUT_DIR a run directory for `ecomtrain export`
        from ecomtrain.config import dump_recipe

        dump_recipe(cfg, Path(out) / "recipe.yaml")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(*sys.argv[1:4])
