"""Task ``purchase_intent``: given a user's history and one candidate item, will the user buy it?

Labels come from the logs, derived at collate time from the samples' ``items`` / ``events``
lists (no rebuild): a history step whose event is in ``positive_events`` (purchase) is a
positive; a step whose event is in ``negative_events`` (view, click, fav, cart) is a negative
unless the same item is bought elsewhere in the window; each such candidate also brings
``sampled_negatives`` items the user never touched in the window (seeded per sample).

Training (binary head): one pass over the window; the candidate of step t is scored from the
hidden state after step t-1, so every step of every window is a training example.
Training (yes_no head, TALLRec): rows ``history + [candidate]`` read the LM head's logits of
the two answer tokens at the candidate: logit = l(yes) - l(no), i.e. P(yes | {yes, no}).
Text (``input: text``, tasks/prompts.py): one prompt per (sample, candidate) -- the history as
titles with event / channel / gap words, then "Will the shopper buy <title>? Answer Yes or No."
-- answered the same way at the prompt's last token.
Eval: the val/test target (label = its event) plus ``sampled_negatives`` untouched items,
scored after the whole history; users are GAUC groups.

Baselines (fitted on the training windows): the item's purchase rate among its interactions
(smoothed towards the global rate, 1 pseudo-interaction) and its training popularity.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import RecipeError
from ..metrics_pointwise import BinaryMetrics
from . import register_task
from .base import Task, TaskEvaluator, pad
from .common import NegativeSampler, PairHead, history_codes, iter_train_samples, prev_code, rng_for, side_batch, user_key


@register_task("purchase_intent")
class PurchaseIntentTask(Task):
    prefix = "purchase_intent/"
    requires = ("events",)
    val_names = ("auc", "gauc", "logloss", "ece")
    monitor_metric = ("auc", "max")

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        ev = list(ctx.manifest.get("event_types") or [])
        self.event_types = ev
        self.pos = {i for i, e in enumerate(ev) if e in cfg.positive_events}
        self.neg = {i for i, e in enumerate(ev) if e in cfg.negative_events}
        self.r = cfg.sampled_negatives
        self.sampler = NegativeSampler(ctx.num_items, ctx.item_counts, cfg.negative_sampling)
        self.flags = dict(ctx.inputs)
        self.mode = cfg.head  # resolved against the tokenizer in make_head
        self._rates: Optional[torch.Tensor] = None
        self.text = getattr(cfg, "input", "items") == "text"
        if self.text:  # TALLRec in text: history + candidate as words, answered by logit(yes) - logit(no)
            from .prompts import builder_for, single_token_ids

            self.mode = "yes_no"
            self.prompts = builder_for(self, cfg.prompt)
            self.answer = torch.tensor(single_token_ids(self.prompts.tok, cfg.answer_tokens, "task.answer_tokens",
                                                        ctx.pretrained or "the backbone"))

    def check_dataset(self, manifest: dict) -> None:
        super().check_dataset(manifest)
        ev = manifest.get("event_types")
        if ev is not None and not self.pos:
            raise_data(self, f"events {self.cfg.positive_events}", manifest, f"its event types are {ev}; set task.positive_events")

    # -- labels
    def _candidates(self, s: dict, lo: int, hi: int) -> list[tuple[int, int, int, int]]:
        """(step, item, label, prev code) for steps lo+1..hi-1 of a window, sampled negatives included."""
        items, events = s["items"], s.get("events") or []
        bought = {items[t] for t in range(lo, hi) if t < len(events) and events[t] in self.pos}
        window = set(items[lo:hi])
        rng = rng_for(self.ctx.seed, s.get("user", ""), lo, hi, "train")
        seen = history_codes(items, events, 0, lo + 1)  # the history before step lo+1 (earlier windows' steps included)
        out = []
        for t in range(lo + 1, hi):
            e = events[t] if t < len(events) else -1
            if e in self.pos or (e in self.neg and items[t] not in bought):
                out.append((t, items[t], int(e in self.pos), prev_code(seen, items[t])))
                out += [(t, c, 0, 0) for c in self.sampler.draw(rng, self.r, window)]
            seen[items[t]] = e
        return out

    # -- tensors
    def collate_train(self, samples: list[dict]) -> dict:
        L = self.max_history
        if self.mode == "yes_no":
            return self._rows(samples, train=True)
        rows, bounds, row_i, col, cand, label, prev = [], [], [], [], [], [], []
        for b, s in enumerate(samples):
            n = len(s["items"])
            lo = max(0, n - (L + 1))
            rows.append(s["items"][lo: n - 1])
            bounds.append((lo, n - 1))
            for t, c, y, p in self._candidates(s, lo, n):
                row_i.append(b)
                col.append(t - lo - 1)  # hidden state after step t-1
                cand.append(c)
                label.append(y)
                prev.append(p)
        out = {"items": pad(rows), "row": torch.tensor(row_i, dtype=torch.long), "col": torch.tensor(col, dtype=torch.long),
               "cand": torch.tensor(cand, dtype=torch.long), "label": torch.tensor(label, dtype=torch.float32),
               "prev": torch.tensor(prev, dtype=torch.long)}
        side = side_batch(samples, bounds, self.flags)
        if side:
            out["side"] = side
        return out

    def _eval_candidates(self, s: dict) -> tuple[list[int], list[int], list[bool]]:
        hist = set(s["items"]) | {s["target"]}
        e = s.get("target_event", -1)
        valid = e in self.pos or e in self.neg
        rng = rng_for(self.ctx.seed, s.get("user", ""), len(s["items"]), "eval")
        negs = self.sampler.draw(rng, self.r, hist)
        negs += [1] * (self.r - len(negs))
        return [s["target"], *negs], [int(e in self.pos)] + [0] * self.r, [valid] + [True] * self.r

    def _rows(self, samples: list[dict], train: bool) -> dict:
        """Rows history + [candidate] (yes_no head, train and eval; binary head, eval)."""
        if self.text:
            return self._text_rows(samples, train)
        L = self.max_history
        hist, bounds, cands, labels, valid, prev = [], [], [], [], [], []
        for s in samples:
            n = len(s["items"])
            if train:  # the window's last step is the candidate, the steps before it the history
                lo, end = max(0, n - (L + 1)), n - 1
                t = {"items": s["items"][:end], "target": s["items"][end], "user": s.get("user", ""),
                     "target_event": (s.get("events") or [-1] * n)[end]}
            else:
                lo, end, t = max(0, n - L), n, s
            c, y, v = self._eval_candidates(t)
            seen = history_codes(s["items"], s.get("events") or [], 0, end)
            prev.append([prev_code(seen, i) for i in c])
            hist.append(s["items"][lo:end])
            bounds.append((lo, end))
            cands.append(c)
            labels.append(y)
            valid.append(v)
        out = {"items": pad(hist), "lengths": torch.tensor([max(1, len(h)) for h in hist]),
               "cands": torch.tensor(cands, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.float32),
               "valid": torch.tensor(valid, dtype=torch.bool), "prev": torch.tensor(prev, dtype=torch.long),
               "group": torch.tensor([user_key(s.get("user", "")) for s in samples], dtype=torch.long)}
        side = side_batch(samples, bounds, self.flags)
        if side:
            out["side"] = side
        return out

    def collate_eval(self, samples: list[dict]) -> dict:
        return self._rows(samples, train=False)

    def _text_rows(self, samples: list[dict], train: bool) -> dict:
        """One prompt per (sample, candidate): the most recent history steps as words, then the candidate.
        Train: the window's last step is the candidate (as in item-token mode); eval: the split's target."""
        from .prompts import pad_rows

        P = self.prompts
        rows, cands, labels, valid = [], [], [], []
        for s in samples:
            n = len(s["items"])
            end = n - 1 if train else n
            t = s if not train else {"items": s["items"][:end], "target": s["items"][end], "user": s.get("user", ""),
                                     "target_event": (s.get("events") or [-1] * n)[end]}
            c, y, v = self._eval_candidates(t)
            for item in c:
                rows.append(P.prompt(s, max(0, end - self.max_history), end, P.question_ids(candidate=item))[0])
            cands.append(c)
            labels.append(y)
            valid.append(v)
        ids, mask = pad_rows(rows, P.tok.pad_token_id)
        return {"ids": ids, "mask": mask, "last": mask.sum(1) - 1, "cands": torch.tensor(cands, dtype=torch.long),
                "labels": torch.tensor(labels, dtype=torch.float32), "valid": torch.tensor(valid, dtype=torch.bool),
                "group": torch.tensor([user_key(s.get("user", "")) for s in samples], dtype=torch.long)}

    # -- model
    def make_head(self, net) -> Optional[nn.Module]:
        if self.text:
            return None  # the LM head answers (self.answer): nothing of the task's own trains
        tok = getattr(net, "tokenizer", None)
        if self.mode == "auto":
            self.mode = "yes_no" if tok is not None else "binary"
        if self.mode == "binary":
            return PairHead(net.lm.config.hidden_size, num_events=len(self.event_types))
        if tok is None:
            raise RecipeError("task purchase_intent: head 'yes_no' needs a tokenizer (model.backbone.pretrained); use head: binary")
        ids = []
        for a in self.cfg.answer_tokens:
            got = tok(a, add_special_tokens=False)["input_ids"]
            if len(got) == 1 and got[0] == tok.unk_token_id:
                raise RecipeError(f"task purchase_intent: answer token '{a}' is not in the tokenizer's vocabulary "
                                  f"(it maps to the unknown token); choose answer_tokens the tokenizer knows")
            if len(got) != 1:
                raise RecipeError(
                    f"task purchase_intent: answer token '{a}' is {len(got)} tokens in the tokenizer of "
                    f"{net.lm.config.name_or_path or 'the backbone'} (ids {got}); choose answer_tokens that are single tokens"
                )
            ids.append(got[0])
        return YesNoHead(*ids)

    def _scores(self, net, head, batch: dict) -> torch.Tensor:
        """Logits [B, C] of each row's candidates after the whole history."""
        if "ids" in batch:  # text prompts: logit(yes) - logit(no) at the answer position
            from .prompts import lm_hidden, lm_logits

            h = lm_hidden(net, batch["ids"], batch["mask"])
            h = h[torch.arange(len(h), device=h.device), batch["last"]]
            l = lm_logits(net, h)[:, self.answer.to(h.device)].float()
            return (l[:, 0] - l[:, 1]).view(batch["cands"].shape)
        items, lengths, cands = batch["items"], batch["lengths"], batch["cands"]
        B, C = cands.shape
        if isinstance(head, YesNoHead):
            # one row per candidate: history, then the candidate's item token; read at the candidate
            rows = torch.cat([items, torch.zeros_like(items[:, :1])], 1).repeat_interleave(C, 0)
            at = (items > 0).sum(1).repeat_interleave(C)
            rows[torch.arange(B * C), at] = cands.flatten()
            side = {k: torch.cat([v, torch.zeros_like(v[:, :1])], 1).repeat_interleave(C, 0) for k, v in (batch.get("side") or {}).items()}
            h = net.hidden(rows, side=side or None)[torch.arange(B * C), at]
            return head(net, h).view(B, C)
        h = net.hidden(items, side=batch.get("side"))[torch.arange(B), lengths - 1]
        e = net.item_embeddings(cands)
        return head(h.unsqueeze(1).expand(-1, C, -1), e, batch.get("prev")).view(B, C)

    def loss(self, net, head, batch: dict) -> torch.Tensor:
        if "cands" in batch:  # yes_no rows
            logits = self._scores(net, head, batch)
            m = batch["valid"]
            return F.binary_cross_entropy_with_logits(logits[m].float(), batch["labels"][m])
        h = net.hidden(batch["items"], side=batch.get("side"))
        if len(batch["cand"]) == 0:
            return (h.sum() + sum(p.sum() for p in head.parameters())) * 0.0  # a batch without labelled steps: zero loss, same graph on every rank
        hs = h[batch["row"], batch["col"]]
        logits = head(hs, net.item_embeddings(batch["cand"]), batch.get("prev"))
        return F.binary_cross_entropy_with_logits(logits.float(), batch["label"])

    # -- baselines fitted on the training windows
    def purchase_rates(self) -> torch.Tensor:
        if self._rates is None:
            buys = torch.zeros(self.num_items + 1, dtype=torch.float64)
            seen = torch.zeros(self.num_items + 1, dtype=torch.float64)
            from ..data.build import load_manifest

            manifest = self.ctx.manifest if "splits" in self.ctx.manifest else load_manifest(self.ctx.data_path)
            for s in iter_train_samples(self.ctx.data_path, manifest):
                for i, e in zip(s["items"], s.get("events") or []):
                    if e in self.pos or e in self.neg:
                        seen[i] += 1
                        buys[i] += e in self.pos
            g = float(buys.sum() / seen.sum().clamp(min=1))
            self._rates = ((buys + g) / (seen + 1.0))[1:].float()
        return self._rates

    def evaluator(self, stage: str) -> nn.Module:
        return PurchaseEvaluator(self, stage)



def raise_data(task: Task, what: str, manifest: dict, why: str):
    from ..data.importers import DataError

    raise DataError(task.missing(what, manifest, why))


class YesNoHead(nn.Module):
    """TALLRec's answer: logit = l(yes) - l(no) of the LM head at the candidate's position."""

    def __init__(self, yes: int, no: int):
        super().__init__()
        self.register_buffer("ids", torch.tensor([yes, no]), persistent=False)

    def forward(self, net, h: torch.Tensor) -> torch.Tensor:
        from ..model.backbone import causal_core

        w = causal_core(net.lm).get_output_embeddings()
        l = F.linear(h, w.weight[self.ids], None if getattr(w, "bias", None) is None else w.bias[self.ids])
        return (l[..., 0] - l[..., 1]).float()


class PurchaseEvaluator(TaskEvaluator):
    def __init__(self, task: PurchaseIntentTask, stage: str):
        super().__init__(task, stage)
        self.model = BinaryMetrics(task.cfg.ece_bins)
        self.rate = BinaryMetrics(task.cfg.ece_bins)
        self.pop = BinaryMetrics(probabilities=False)
        self.register_buffer("popularity", torch.tensor(task.ctx.item_counts, dtype=torch.float32), persistent=False)

    @torch.no_grad()
    def update(self, net, head, batch: dict) -> None:
        logits = self.task._scores(net, head, batch)
        B, C = logits.shape
        keep = batch["valid"] & (batch.get("weight", torch.ones(B, device=logits.device)) > 0).unsqueeze(1)
        y, g = batch["labels"], batch["group"].unsqueeze(1).expand(B, C)
        cands = batch["cands"] - 1
        self.model.update(torch.sigmoid(logits.float()), y, g, keep)
        self.rate.update(self.task.purchase_rates().to(logits.device)[cands], y, g, keep)
        self.pop.update(self.popularity[cands], y, g, keep)

    def compute(self) -> dict:
        out = self.named(self.model.compute())
        for name, m in (("item_purchase_rate", self.rate), ("popularity", self.pop)):
            out.update(self.named({k: v for k, v in m.compute().items() if k != "positive_rate"}, name))
        return out
