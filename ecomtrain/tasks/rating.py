"""Task ``rating``: the explicit rating a user gives the next rated item.

Needs the samples' ``ratings`` list (built from 'rating' / 'review' events' values: MovieLens,
Amazon reviews, the synthetic log with ``ratings: true``) and, for eval, ``target_rating``.

Model: the history's items, each with its own past rating as an input embedding (rounded to
the scale's steps; 0 = unrated), runs through the backbone; the rating of the item at step t
is regressed from the hidden state after step t-1, the item's embedding, whether the item is
already in the history (and its last event) and the channel of the rated interaction itself
(known when the rating is given; ``target_channel`` in eval samples): an MLP head that
predicts the residual over a bias model mu + b_i + b_u (lam_i = 5, lam_u = 3, b_u from the
ratings before the rated step only, so the target never feeds its own offset), trained with MSE at every rated step of a window and
clipped to [min_rating, max_rating] for evaluation.

Text (``input: text``, tasks/prompts.py): a prompt per rated step asks for the score; the answer
is the expected value over the answer tokens ("1".."5" by default, one per scale step), trained
with cross-entropy on the true score's token (one prompt per training sample: its last rated step).

Baselines (fitted on the training windows): the global mean, and the user+item bias model
mu + b_i + b_u with b_i = sum(r - mu) / (lam_i + n_i) over training ratings and
b_u = sum(r - mu - b_i) / (lam_u + n_u) over the user's history; reported at the best
(lam_i, lam_u) of the grid {1, 3, 10, 25}^2 *on the split itself*, which flatters the baseline.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..metrics_pointwise import RegressionMetrics
from . import register_task
from .base import Task, TaskEvaluator, pad
from .common import PairHead, history_codes, iter_train_samples, prev_code, side_batch

LAMBDAS = (1.0, 3.0, 10.0, 25.0)
LAM_I, LAM_U = 5.0, 3.0  # the head's own bias offsets (the reported baseline takes the best of LAMBDAS^2)


def _chan(channels, t: int) -> int:
    """Channel index + 1 of step t (0 = unknown)."""
    c = channels[t] if channels is not None and t < len(channels) else None
    return c + 1 if c is not None and c >= 0 else 0


@register_task("rating")
class RatingTask(Task):
    prefix = "rating/"
    requires = ("ratings",)
    val_names = ("rmse", "mae")
    monitor_metric = ("rmse", "min")

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.lo, self.hi = cfg.min_rating, cfg.max_rating
        self.levels = int(round(self.hi - self.lo)) + 1
        self.flags = dict(ctx.inputs)
        self.pad_sample = {**self.pad_sample, "ratings": [None], "target_rating": None}
        self._stats: Optional[tuple] = None
        self.text = getattr(cfg, "input", "items") == "text"
        if self.text:  # a verbalised score: one answer token per scale step, read at the answer position
            from .prompts import builder_for, single_token_ids

            scale = (int(self.lo), int(self.hi))
            self.prompts = builder_for(self, cfg.prompt, scale=scale)
            answers = cfg.answer_tokens or [str(v) for v in range(scale[0], scale[1] + 1)]
            self.answer = torch.tensor(single_token_ids(self.prompts.tok, answers, "task.answer_tokens", ctx.pretrained or "the backbone"))
            self.values = torch.arange(scale[0], scale[1] + 1, dtype=torch.float32)

    def _level(self, r) -> int:
        return 0 if r is None else 1 + min(self.levels - 1, max(0, int(round(r - self.lo))))

    def _rows(self, samples, bounds):
        rows = [s["items"][lo:hi] for s, (lo, hi) in zip(samples, bounds)]
        levels = [[self._level(r) for r in (s.get("ratings") or [None] * len(s["items"]))[lo:hi]] for s, (lo, hi) in zip(samples, bounds)]
        out = {"items": pad(rows), "levels": pad(levels)}
        side = side_batch(samples, bounds, self.flags)
        if side:
            out["side"] = side
        return out

    def _text(self, samples: list[dict], asks: list[tuple[int, int]]) -> dict:
        """Prompts asking for the rating of step/target ``t`` (item ``i``) after the steps before it."""
        from .prompts import pad_rows

        P = self.prompts
        rows = [P.prompt(s, max(0, t - self.max_history), t, P.question_ids(candidate=i))[0] for s, (t, i) in zip(samples, asks)]
        ids, mask = pad_rows(rows, P.tok.pad_token_id)
        return {"ids": ids, "mask": mask, "last": mask.sum(1) - 1}

    def collate_train(self, samples: list[dict]) -> dict:
        L = self.max_history
        if self.text:  # one prompt per sample: its last rated step, after the steps before it
            keep, asks, value = [], [], []
            for s in samples:
                rs = s.get("ratings") or []
                t = next((t for t in range(min(len(rs), len(s["items"])) - 1, 0, -1) if rs[t] is not None), None)
                if t is not None:
                    keep.append(s)
                    asks.append((t, s["items"][t]))
                    value.append(float(rs[t]))
            w = [1.0] * len(keep)
            if not keep:  # no rated step in the batch: one weight-0 prompt keeps the graph the same on every rank
                keep, asks, value, w = samples[:1], [(len(samples[0]["items"]) - 1, samples[0]["items"][-1])], [self.lo], [0.0]
            out = self._text(keep, asks)
            out["level"] = torch.tensor([self._level(v) - 1 for v in value], dtype=torch.long)
            out["w"] = torch.tensor(w)
            return out
        self.train_stats()
        bounds, row, col, cand, value, prev, chan, base = [], [], [], [], [], [], [], []
        for b, s in enumerate(samples):
            n = len(s["items"])
            lo = max(0, n - (L + 1))
            bounds.append((lo, n - 1))
            rs, ev = s.get("ratings") or [], s.get("events") or []
            seen = history_codes(s["items"], ev, 0, lo + 1)
            res_sum, res_n = self._residual(s["items"][: lo + 1], rs[: lo + 1])
            for t in range(lo + 1, n):
                if t < len(rs) and rs[t] is not None:
                    base.append(self._base(s["items"][t], res_sum, res_n))
                    row.append(b)
                    col.append(t - lo - 1)
                    cand.append(s["items"][t])
                    value.append(float(rs[t]))
                    prev.append(prev_code(seen, s["items"][t]))
                    chan.append(_chan(s.get("channels"), t))
                seen[s["items"][t]] = ev[t] if t < len(ev) else None
                if t < len(rs) and rs[t] is not None:
                    res_sum += rs[t] - self._mu - self._bi[s["items"][t]]
                    res_n += 1
        out = self._rows(samples, bounds)
        out.update(row=torch.tensor(row, dtype=torch.long), col=torch.tensor(col, dtype=torch.long),
                   cand=torch.tensor(cand, dtype=torch.long), value=torch.tensor(value, dtype=torch.float32),
                   prev=torch.tensor(prev, dtype=torch.long), chan=torch.tensor(chan, dtype=torch.long),
                   base=torch.tensor(base, dtype=torch.float32))
        return out

    def collate_eval(self, samples: list[dict]) -> dict:
        L = self.max_history
        bounds = [(max(0, len(s["items"]) - L), len(s["items"])) for s in samples]
        out = self._rows(samples, bounds)
        tr = [s.get("target_rating") for s in samples]
        self.train_stats()
        base = [self._base(s["target"], *self._residual(s["items"], s.get("ratings") or [])) for s in samples]
        out.update(lengths=torch.tensor([max(1, hi - lo) for lo, hi in bounds]),
                   target=torch.tensor([s["target"] for s in samples], dtype=torch.long),
                   value=torch.tensor([float(r) if r is not None else 0.0 for r in tr], dtype=torch.float32),
                   valid=torch.tensor([r is not None for r in tr], dtype=torch.bool),
                   base=torch.tensor(base, dtype=torch.float32),
                   chan=torch.tensor([_chan([s.get("target_channel")], 0) for s in samples], dtype=torch.long),
                   prev=torch.tensor([prev_code(history_codes(s["items"], s.get("events") or [], 0, len(s["items"])), s["target"]) for s in samples]),
                   # the user's history ratings (items, values) for the bias baseline
                   hist_items=pad([[i for i, r in zip(s["items"], s.get("ratings") or []) if r is not None] for s in samples]),
                   hist_values=pad([[float(r) for r in (s.get("ratings") or []) if r is not None] for s in samples], 0.0, torch.float32))
        if self.text:
            out.update(self._text(samples, [(len(s["items"]), s["target"]) for s in samples]))
        return out

    def _residual(self, items: list[int], ratings: list) -> tuple[float, int]:
        """Sum of (r - mu - b_i) over the rated steps given, and their count (the user's offset)."""
        tot, n = 0.0, 0
        for i, r in zip(items, ratings):
            if r is not None:
                tot += r - self._mu - self._bi[i]
                n += 1
        return tot, n

    def _base(self, item: int, res_sum: float, res_n: int) -> float:
        return self._mu + self._bi[item] + res_sum / (LAM_U + res_n)

    # -- model
    def make_head(self, net) -> Optional[nn.Module]:
        if self.text:
            return None  # the LM head answers over the answer tokens
        m = self.ctx.manifest
        return RatingHead(net.lm.config.hidden_size, self.levels, len(m.get("event_types") or []), len(m.get("channels") or []))

    def _hidden(self, net, head, batch):
        return net.hidden(batch["items"], side=batch.get("side"), extra=head.value_emb(batch["levels"]))

    def _answer_logits(self, net, batch) -> torch.Tensor:
        """[R, levels] LM logits of the answer tokens (one per scale step) at the answer position."""
        from .prompts import lm_hidden, lm_logits

        h = lm_hidden(net, batch["ids"], batch["mask"])
        h = h[torch.arange(len(h), device=h.device), batch["last"]]
        return lm_logits(net, h)[:, self.answer.to(h.device)].float()

    def predict(self, net, head, batch) -> torch.Tensor:
        if "ids" in batch:  # verbalised: the expected score over the answer tokens' distribution
            p = self._answer_logits(net, batch).softmax(-1)
            return p @ self.values.to(p.device)
        h = self._hidden(net, head, batch)
        hs = h[torch.arange(len(h)), batch["lengths"] - 1]
        return (batch["base"] + head(hs, net.item_embeddings(batch["target"]), batch["prev"], batch["chan"])).clamp(self.lo, self.hi)

    def loss(self, net, head, batch: dict) -> torch.Tensor:
        if "ids" in batch:  # cross-entropy on the true score's answer token
            ce = F.cross_entropy(self._answer_logits(net, batch), batch["level"], reduction="none")
            return (ce * batch["w"]).sum() / batch["w"].sum().clamp(min=1.0)
        h = self._hidden(net, head, batch)
        if len(batch["cand"]) == 0:
            return (h.sum() + sum(p.sum() for p in head.parameters())) * 0.0  # no rated step in this batch: zero loss, same graph on every rank
        pred = batch["base"] + head(h[batch["row"], batch["col"]], net.item_embeddings(batch["cand"]), batch["prev"], batch["chan"])
        return F.mse_loss(pred.float(), batch["value"])

    # -- baselines
    def train_stats(self) -> tuple[float, torch.Tensor, torch.Tensor]:
        """(global mean, per-item sum of (r - mean), per-item count) over the training windows."""
        if self._stats is None:
            from ..data.build import load_manifest

            manifest = self.ctx.manifest if "splits" in self.ctx.manifest else load_manifest(self.ctx.data_path)
            s_ = torch.zeros(self.num_items + 1, dtype=torch.float64)
            n_ = torch.zeros(self.num_items + 1, dtype=torch.float64)
            for s in iter_train_samples(self.ctx.data_path, manifest):
                for i, r in zip(s["items"], s.get("ratings") or []):
                    if r is not None:
                        s_[i] += r
                        n_[i] += 1
            mu = float(s_.sum() / n_.sum().clamp(min=1)) if n_.sum() else (self.lo + self.hi) / 2
            self._stats = (mu, s_ - mu * n_, n_)
            self._mu = mu
            self._bi = ((s_ - mu * n_) / (LAM_I + n_)).tolist()
        return self._stats

    def evaluator(self, stage: str) -> nn.Module:
        return RatingEvaluator(self, stage)



class RatingHead(nn.Module):
    def __init__(self, hidden: int, levels: int, num_events: int = 0, num_channels: int = 0):
        super().__init__()
        self.chan_emb = nn.Embedding(num_channels + 1, hidden, padding_idx=0)  # channel of the rated interaction
        self.value_emb = nn.Embedding(levels + 1, hidden, padding_idx=0)
        nn.init.normal_(self.value_emb.weight, std=0.02)
        with torch.no_grad():
            self.value_emb.weight[0].zero_()
        self.pair = PairHead(hidden, num_events=num_events)

    def forward(self, h: torch.Tensor, e: torch.Tensor, prev=None, chan=None) -> torch.Tensor:
        if chan is not None:
            e = e + self.chan_emb(chan).to(e.dtype)
        return self.pair(h, e, prev).float()  # the residual over the bias model (batch['base'])


class RatingEvaluator(TaskEvaluator):
    def __init__(self, task: RatingTask, stage: str):
        super().__init__(task, stage)
        self.model, self.mean = RegressionMetrics(), RegressionMetrics()
        self.bias = nn.ModuleList([RegressionMetrics() for _ in LAMBDAS for _ in LAMBDAS])

    @torch.no_grad()
    def update(self, net, head, batch: dict) -> None:
        B = len(batch["target"])
        keep = batch["valid"] & (batch.get("weight", torch.ones(B, device=batch["value"].device)) > 0)
        y = batch["value"]
        self.model.update(self.task.predict(net, head, batch), y, keep)
        mu, dev, cnt = self.task.train_stats()
        dev, cnt = dev.to(y.device), cnt.to(y.device)
        self.mean.update(torch.full_like(y, mu), y, keep)
        hi, hv = batch["hist_items"], batch["hist_values"].double()
        rated = hi > 0
        k = 0
        for li in LAMBDAS:
            b_i = dev / (li + cnt)
            resid = ((hv - mu - b_i[hi]) * rated).sum(1)
            for lu in LAMBDAS:
                b_u = resid / (lu + rated.sum(1))
                pred = (mu + b_i[batch["target"]] + b_u).clamp(self.task.lo, self.task.hi)
                self.bias[k].update(pred.float(), y, keep)
                k += 1

    def compute(self) -> dict:
        out = self.named(self.model.compute())
        out.update(self.named(self.mean.compute(), "global_mean"))
        best = min((m.compute() for m in self.bias), key=lambda d: float(d["rmse"]))
        out.update(self.named(best, "user_item_bias"))
        return out
