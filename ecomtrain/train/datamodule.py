"""LightningDataModule over built WebDataset shards (see data/stream.py)."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from ..config import Recipe
from ..data.build import load_manifest
from ..data.stream import EpochLoader, ShardStream


class ShardDataModule(L.LightningDataModule):
    def __init__(self, cfg: Recipe, task, manifest: dict | None = None):
        super().__init__()
        self.cfg = cfg
        self.task = task
        self.root = Path(cfg.data.path)
        self.manifest = manifest or load_manifest(self.root)
        self._train: ShardStream | None = None

    def _topology(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def train_dataloader(self):
        d = self.cfg.data
        rank, world = self._topology()
        self._train = ShardStream(
            self.root, "train", self.manifest, self.task.collate_train, d.batch_size,
            mode="train", rank=rank, world_size=world, num_workers=d.num_workers,
            shuffle_buffer=d.shuffle_buffer, seed=self.cfg.run.seed, max_corrupt_fraction=d.max_corrupt_fraction,
        )
        first_epoch = self.trainer.current_epoch if self.trainer is not None else 0
        return EpochLoader(self._train, num_workers=d.num_workers, first_epoch=first_epoch)

    def _eval_loader(self, split: str):
        d = self.cfg.data
        rank, world = self._topology()
        ds = ShardStream(
            self.root, split, self.manifest, self.task.collate_eval, d.eval_batch_size,
            mode="eval", rank=rank, world_size=world, max_corrupt_fraction=d.max_corrupt_fraction,
            pad_sample=self.task.pad_sample,
        )
        # eval streams are read in the main process: each sample exactly once
        return EpochLoader(ds, num_workers=0)

    def val_dataloader(self):
        return self._eval_loader("val")

    def test_dataloader(self):
        return self._eval_loader("test")
