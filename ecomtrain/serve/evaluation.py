"""Everything one evaluation stage (val or test) measures, from one chunked pass per protocol.

Per batch: the hidden state at each user's last position, then ``topk.rank_catalog`` with and
without the user's history masked (counts -> HR/NDCG/MRR/AUC, running top-K -> lists), the
popularity baseline through the same routine, beyond-accuracy metrics of the primary lists,
HR/NDCG by item-popularity and user-activity bucket, channel/time consistency (test), and a few
sample rows for the W&B table. No tensor of batch x catalog is built when the catalog exceeds
the ``eval.score_memory_mb`` budget.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..consistency import ConsistencyMetric, comparison_names, update_from_batch
from ..metrics import RankingMetrics
from ..metrics_beyond import POP_BUCKETS, USER_BUCKETS, BeyondAccuracy, activity_buckets, popularity_buckets
from .topk import HiddenScorer, VectorScorer, chunk_for_budget, last_hidden, rank_catalog


class EvalSuite(nn.Module):
    def __init__(self, ev, num_items: int, max_history: int, popularity: torch.Tensor, stage: str,
                 category: Optional[torch.Tensor] = None, channels: Sequence[str] = (), titles: Optional[list] = None,
                 cold: Optional[torch.Tensor] = None, days: bool = False):
        super().__init__()
        self.ev, self.num_items, self.max_history, self.stage = ev, num_items, max_history, stage
        self.ks = tuple(ev.ks)
        self.main, self.alt, self.pop = RankingMetrics(self.ks), RankingMetrics(self.ks), RankingMetrics(self.ks)
        # data.build.cold_items: the primary protocol again, split by whether the target is a cold item
        self.has_cold = cold is not None
        self.register_buffer("cold", cold if cold is not None else torch.zeros(num_items, dtype=torch.bool), persistent=False)
        self.cold_m = RankingMetrics(self.ks) if self.has_cold else None
        self.warm_m = RankingMetrics(self.ks) if self.has_cold else None
        self.register_buffer("pop_bucket", popularity_buckets(popularity), persistent=False)
        self.beyond = BeyondAccuracy(num_items, self.ks, popularity, category) if ev.beyond_accuracy else None
        self.by_pop = nn.ModuleList([RankingMetrics(self.ks, report_count=True) for _ in POP_BUCKETS]) if ev.beyond_accuracy else None
        self.by_user = nn.ModuleList([RankingMetrics(self.ks, report_count=True) for _ in USER_BUCKETS]) if ev.beyond_accuracy else None
        self.channels = list(channels)
        # days: consecutive-day consistency, for datasets built with the global temporal split
        self.days = days
        self.cons = ConsistencyMetric(comparison_names(self.channels, days), ev.consistency_k) if (stage == "test" and ev.consistency) else None
        self.titles = titles
        self.samples: list[list] = []

    def _name(self, idx: int) -> str:
        t = self.titles[idx] if self.titles is not None and idx < len(self.titles) else None
        return f"{idx + 1}: {t}" if t else str(idx + 1)

    @torch.no_grad()
    def update(self, net, batch: dict, popularity: torch.Tensor) -> None:
        target, seen = batch["target"] - 1, batch["seen"]
        B, N = len(target), self.num_items
        w = batch.get("weight")
        w = torch.ones(B, device=target.device) if w is None else w
        chunk = chunk_for_budget(B, self.ev.score_memory_mb, N, device=target.device)
        kmax = max([*self.ks, self.ev.consistency_k, 10])
        scorer = HiddenScorer(net, last_hidden(net, batch["items"], batch["lengths"], batch.get("side")))
        excl = rank_catalog(scorer, B, N, kmax, chunk, seen=seen, target=target)
        incl = rank_catalog(scorer, B, N, kmax, chunk, target=target)
        main, alt = (excl, incl) if self.ev.exclude_seen else (incl, excl)
        for m, r in ((self.main, main), (self.alt, alt)):
            m.update_counts(r.greater, r.equal, r.n_finite, r.target_masked, N, w)
        if self.has_cold:
            is_cold = self.cold[target].to(w.dtype)
            self.cold_m.update_counts(main.greater, main.equal, main.n_finite, main.target_masked, N, w * is_cold)
            self.warm_m.update_counts(main.greater, main.equal, main.n_finite, main.target_masked, N, w * (1 - is_cold))
        pop = rank_catalog(VectorScorer(popularity, B), B, N, 1, chunk, seen=seen if self.ev.exclude_seen else None, target=target)
        self.pop.update_counts(pop.greater, pop.equal, pop.n_finite, pop.target_masked, N, w)
        if self.beyond is not None:
            self.beyond.update(main.indices, main.values, w)
            tb, ub = self.pop_bucket[target], activity_buckets((seen > 0).sum(1))
            for b in range(len(POP_BUCKETS)):
                self.by_pop[b].update_counts(main.greater, main.equal, main.n_finite, main.target_masked, N, w * (tb == b))
            for b in range(len(USER_BUCKETS)):
                self.by_user[b].update_counts(main.greater, main.equal, main.n_finite, main.target_masked, N, w * (ub == b))
        if self.cons is not None:
            def top_lists(items: torch.Tensor, excl_seen: torch.Tensor):
                lengths = (items > 0).sum(1).clamp(min=1)
                sc = HiddenScorer(net, last_hidden(net, items, lengths))
                return rank_catalog(sc, len(items), N, self.ev.consistency_k, chunk_for_budget(len(items), self.ev.score_memory_mb, N, device=items.device), seen=excl_seen, device=items.device)

            update_from_batch(self.cons, top_lists, batch, self.channels, self.max_history, w, days=self.days)
        need = self.ev.sample_users - len(self.samples)
        for r in range(min(need, B)):
            if float(w[r]) == 0:
                continue
            hist = [i - 1 for i in seen[r].tolist() if i > 0][-10:]
            top = main.indices[r, :10].tolist()
            t = int(target[r])
            self.samples.append([
                " | ".join(self._name(i) for i in hist),
                " | ".join(("*" if i == t else "") + self._name(i) for i in top),
                self._name(t), int(t in top),
            ])

    def compute(self, stage: str) -> dict[str, torch.Tensor]:
        alt_name = "incl_seen" if self.ev.exclude_seen else "excl_seen"
        out: dict[str, torch.Tensor] = {}
        for m, prefix in ((self.main, f"{stage}/"), (self.alt, f"{stage}/{alt_name}/"), (self.pop, f"baseline/popularity/{stage}/")):
            out.update({prefix + k: v for k, v in m.compute().items()})
        if self.has_cold:
            for m, prefix in ((self.cold_m, f"{stage}_cold/"), (self.warm_m, f"{stage}_warm/")):
                out.update({prefix + k: v for k, v in m.compute().items()})
        if self.beyond is not None:
            out.update({f"{stage}/{k}": v for k, v in self.beyond.compute().items()})
            for group, names, ms in (("pop", POP_BUCKETS, self.by_pop), ("user", USER_BUCKETS, self.by_user)):
                for name, m in zip(names, ms):
                    vals = m.compute()
                    # "users" from compute(): the all-reduced count (m.count is this rank's share)
                    out.update({f"{stage}/{group}_{name}/{k}": vals[k] for k in vals if k.startswith(("hr@", "ndcg@")) or k == "users"})
        if self.cons is not None:
            out.update({f"{stage}/{k}": v for k, v in self.cons.compute().items()})
        return out

    def reset(self) -> None:
        for m in self.modules():
            if m is not self and hasattr(m, "reset") and hasattr(m, "_defaults"):
                m.reset()
        self.samples = []


def log_to_wandb(loggers, stage: str, suite: EvalSuite, values: dict, step: int) -> None:
    """A table of sample users and bar charts of HR/NDCG by bucket, in every W&B run (offline too)."""
    wl = [lg for lg in loggers if type(lg).__name__ == "WandbLogger"]
    if not wl:
        return
    import wandb

    payload: dict = {}
    if suite.samples:
        payload[f"{stage}/sample_users"] = wandb.Table(columns=["history (last 10)", "top-10 (* = target)", "target", "hit@10"], data=suite.samples)
    k = 10 if 10 in suite.ks else suite.ks[0]
    for group, names in (("pop", POP_BUCKETS), ("user", USER_BUCKETS)):
        rows = [[n, float(values[f"{stage}/{group}_{n}/ndcg@{k}"])] for n in names if f"{stage}/{group}_{n}/ndcg@{k}" in values]
        if rows:
            tbl = wandb.Table(columns=["bucket", f"ndcg@{k}"], data=rows)
            payload[f"{stage}/ndcg@{k}_by_{group}_bucket"] = wandb.plot.bar(tbl, "bucket", f"ndcg@{k}", title=f"{stage} NDCG@{k} by {group} bucket")
    if payload:
        for lg in wl:
            lg.experiment.log({**payload, "trainer/global_step": step})
