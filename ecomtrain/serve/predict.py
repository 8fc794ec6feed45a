"""Multi-process ``ecomtrain recommend`` through Lightning's predict loop.

    ecomtrain recommend RUN --split test --k 20 --out recs.parquet --devices 2                 # 2 CPU processes (gloo)
    torchrun --nproc_per_node 2 -m ecomtrain.cli recommend RUN --split test --out recs.parquet --devices 2
    ecomtrain recommend RUN --split test --out recs.parquet --device cuda --devices 4           # 4 GPUs (nccl)

The users are cut into the same batches one process would score (``--batch-size``); batch j goes to
rank ``j mod world``, so every user is scored once, by the same ``Recommender.rank_batch`` call on the
same rows as in a single process (same lists, same scores). At the end of the loop the ranks
all-gather their rows (positions, scores, item columns; padded to one size), and rank 0 alone
assembles the frame in user order and writes it -- to a temporary file renamed when complete, so a
failure on any rank leaves no output file. Topology (DDP, gloo/nccl, timeout) comes from
``train.strategies.build_strategy``.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset


def _one(x):  # DataLoader(batch_size=None) hands over each dataset item as is
    return x


class _RankBatches(Dataset):
    """Item j: this rank's j-th batch (global batch ``rank + j * world``) as model tensors + positions."""

    def __init__(self, rec, histories: Sequence[Sequence[int]], batch_size: int, exclude_seen: bool, rank: int, world: int):
        self.rec, self.hist, self.bs, self.excl = rec, histories, batch_size, exclude_seen
        n_batches = math.ceil(len(histories) / batch_size)
        self.batches = list(range(rank, n_batches, world))

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, j: int) -> dict:
        s = self.batches[j] * self.bs
        rows = self.hist[s : s + self.bs]
        return {**self.rec.batch_tensors(rows, self.excl), "pos": torch.arange(s, s + len(rows))}


class RecommendModule(L.LightningModule):
    def __init__(self, rec, histories: Sequence[Sequence[int]], k: int, exclude_seen: bool,
                 allowed: Optional[torch.Tensor], batch_size: int):
        super().__init__()
        self.rec, self.net = rec, rec.net  # the net as a submodule: Lightning moves it to the rank's device
        self.hist, self.k, self.excl, self.bs = histories, k, exclude_seen, batch_size
        self.allowed = allowed
        self._parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.result: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # rank 0: [U, k] scores, columns

    def predict_dataloader(self) -> DataLoader:
        ds = _RankBatches(self.rec, self.hist, self.bs, self.excl, self.global_rank, self.trainer.world_size)
        return DataLoader(ds, batch_size=None, shuffle=False, collate_fn=_one)

    def predict_step(self, batch: dict, batch_idx: int):
        v, i = self.rec.rank_batch(batch, self.k, self.allowed)
        self._parts.append((batch["pos"].to(v.device), v, i))

    def on_predict_epoch_end(self) -> None:
        world = self.trainer.world_size
        n_batches = math.ceil(len(self.hist) / self.bs)
        rows = math.ceil(n_batches / world) * self.bs  # the most rows any rank can hold
        k = min(self.k, self.rec.num_items)
        pos = torch.full((rows,), -1, dtype=torch.long, device=self.device)
        val = torch.full((rows, k), float("-inf"), device=self.device)
        col = torch.zeros((rows, k), dtype=torch.long, device=self.device)
        at = 0
        for p, v, i in self._parts:
            pos[at : at + len(p)], val[at : at + len(p)], col[at : at + len(p)] = p, v, i
            at += len(p)
        self._parts = []
        g_pos, g_val, g_col = (self.all_gather(t) for t in (pos, val, col))
        if not self.trainer.is_global_zero:
            return
        g_pos, g_val, g_col = g_pos.reshape(-1).cpu(), g_val.reshape(-1, k).cpu(), g_col.reshape(-1, k).cpu()
        keep = g_pos >= 0
        order = torch.argsort(g_pos[keep])
        got = g_pos[keep][order]
        if not torch.equal(got, torch.arange(len(self.hist))):  # every user exactly once
            raise RuntimeError(f"recommend: gathered {len(got)} rows for {len(self.hist)} users")
        self.result = (g_val[keep][order], g_col[keep][order])


def predict_lists(rec, histories: Sequence[Sequence[int]], k: int, exclude_seen: bool, allowed: Optional[torch.Tensor],
                  batch_size: int, devices: int, num_nodes: int = 1, accelerator: str = "cpu"):
    """Run the predict loop on ``devices`` x ``num_nodes`` processes. Returns (is_rank_zero, result):
    rank 0 gets ([U, k] scores, [U, k] item columns) in user order, the other ranks None."""
    from ..config import TrainerConfig
    from ..train.strategies import build_strategy

    world = devices * num_nodes
    strategy = build_strategy(TrainerConfig.model_validate({"strategy": {"name": "ddp"}}), accelerator) if world > 1 else "auto"
    trainer = L.Trainer(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        use_distributed_sampler=False, precision="32-true")
    module = RecommendModule(rec, histories, k, exclude_seen, allowed, batch_size)
    with warnings.catch_warnings():  # predict_step keeps its rows itself and returns None on purpose
        warnings.filterwarnings("ignore", message="predict returned None")
        trainer.predict(module, return_predictions=False)
    return trainer.is_global_zero, module.result
