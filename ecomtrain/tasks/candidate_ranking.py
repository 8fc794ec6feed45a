"""Task ``candidate_ranking`` (LLaRA's setting): pick the next item among K candidates.

Each query holds the target and K-1 negatives (never the target nor, when the catalog
allows, an item of the history), drawn uniformly or by training popularity with a generator
seeded per sample, so every run and rank sees the same candidates. A candidate's score is
its item-token logit after the history (the likelihood the LM gives that item token);
training is a softmax cross-entropy over each step's K candidates (the target + K-1
negatives drawn per step), at every step of a window.

In ID mode the candidates are scored, not written into the prompt; a text prompt that
lists them is future work with the language branch (docs/tasks.md).

Metrics over the K candidates: HR@1, NDCG@K and MRR (metrics.RankingMetrics, exact under
ties); baselines: random order (HR@1 = 1/K exactly, ties) and popularity.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..metrics import RankingMetrics
from . import register_task
from .base import Task, pad
from .common import NegativeSampler, rng_for, side_batch


@register_task("candidate_ranking")
class CandidateRankingTask(Task):
    prefix = "candidate_ranking/"

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.K = cfg.num_candidates
        self.sampler = NegativeSampler(ctx.num_items, ctx.item_counts, cfg.negative_sampling)
        self.flags = dict(ctx.inputs)

    def check_dataset(self, manifest: dict) -> None:
        super().check_dataset(manifest)
        n = int(manifest["num_items"])
        if self.K > n:
            from ..data.importers import DataError

            raise DataError(f"task 'candidate_ranking': num_candidates {self.K} exceeds the catalog of {n} items "
                            f"in dataset {self.ctx.data_path or 'the dataset'}; set task.num_candidates <= {n}")

    def _negatives(self, rng, target: int, history: list[int]) -> list[int]:
        negs = self.sampler.draw(rng, self.K - 1, set(history) | {target})
        if len(negs) < self.K - 1:  # the history covers the catalog: allow history items, never the target
            negs += self.sampler.draw(rng, self.K - 1 - len(negs), {target, *negs})
        return negs

    # -- tensors
    def collate_train(self, samples: list[dict]) -> dict:
        L, N = self.max_history, self.num_items
        rows, labels, bounds = [], [], []
        for s in samples:
            n = len(s["items"])
            lo = max(0, n - (L + 1))
            rows.append(s["items"][lo: n - 1])
            labels.append(s["items"][lo + 1: n])
            bounds.append((lo, n - 1))
        lab = pad(labels)
        rng = rng_for(self.ctx.seed, *(s.get("user", "") for s in samples[:4]), len(samples), "train")
        shape = (*lab.shape, self.K - 1)
        if self.sampler.p is None:
            negs = rng.integers(1, N + 1, size=shape)
        else:
            negs = rng.choice(N, size=shape, p=self.sampler.p) + 1
        negs = torch.from_numpy(negs.astype(np.int64))
        clash = negs == lab.unsqueeze(-1)  # never the target: move a clash to the next item id
        negs = torch.where(clash, negs % N + 1, negs)
        out = {"items": pad(rows), "labels": lab, "cands": torch.cat([lab.unsqueeze(-1), negs], -1)}
        side = side_batch(samples, bounds, self.flags)
        if side:
            out["side"] = side
        return out

    def collate_eval(self, samples: list[dict]) -> dict:
        L = self.max_history
        cands, bounds = [], []
        for s in samples:
            rng = rng_for(self.ctx.seed, s.get("user", ""), len(s["items"]), "eval")
            cands.append([s["target"], *self._negatives(rng, s["target"], s["items"])])
            bounds.append((max(0, len(s["items"]) - L), len(s["items"])))
        hist = [s["items"][lo:hi] for s, (lo, hi) in zip(samples, bounds)]
        out = {"items": pad(hist), "lengths": torch.tensor([max(1, len(h)) for h in hist]),
               "cands": torch.tensor(cands, dtype=torch.long)}
        side = side_batch(samples, bounds, self.flags)
        if side:
            out["side"] = side
        return out

    # -- model
    def loss(self, net, head, batch: dict) -> torch.Tensor:
        mask = batch["labels"] > 0
        h = net.hidden(batch["items"], side=batch.get("side"))[mask]
        logits = net.item_logits(h).float().gather(1, batch["cands"][mask] - 1)
        return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))

    def scores(self, net, batch: dict) -> torch.Tensor:
        """[B, K] item-token logits of each query's candidates (column 0 = the target)."""
        h = net.hidden(batch["items"], side=batch.get("side"))
        h = h[torch.arange(len(h)), batch["lengths"] - 1]
        return net.item_logits(h).float().gather(1, batch["cands"] - 1)

    def evaluator(self, stage: str) -> nn.Module:
        return CandidateEvaluator(self, stage)

    @classmethod
    def val_metrics(cls, ks: Sequence[int]) -> list[str]:
        return [f"val/{cls.prefix}hr@1", f"val/{cls.prefix}mrr"]

    @classmethod
    def monitor(cls, ks: Sequence[int]) -> tuple[str, str]:
        return f"val/{cls.prefix}mrr", "max"


class CandidateEvaluator(nn.Module):
    def __init__(self, task: CandidateRankingTask, stage: str):
        super().__init__()
        self.task, self.stage = task, stage
        ks = sorted({1, task.K})
        self.model, self.random, self.pop = RankingMetrics(ks), RankingMetrics(ks), RankingMetrics(ks)
        self.register_buffer("popularity", torch.tensor(task.ctx.item_counts, dtype=torch.float32), persistent=False)

    @torch.no_grad()
    def update(self, net, head, batch: dict) -> None:
        s = self.task.scores(net, batch)
        target = torch.zeros(len(s), dtype=torch.long, device=s.device)
        w = batch.get("weight")
        self.model.update(s, target, w)
        self.random.update(torch.zeros_like(s), target, w)
        self.pop.update(self.popularity[batch["cands"] - 1], target, w)

    def compute(self) -> dict:
        st, px, K = self.stage, self.task.prefix, self.task.K
        keep = ("hr@1", f"ndcg@{K}", "mrr")
        out = {f"{st}/{px}{k}": v for k, v in self.model.compute().items() if k in keep}
        for name, m in (("random", self.random), ("popularity", self.pop)):
            out.update({f"baseline/{name}/{st}/{px}{k}": v for k, v in m.compute().items() if k in keep})
        return out

    def reset(self) -> None:
        for m in (self.model, self.random, self.pop):
            m.reset()
