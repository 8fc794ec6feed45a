"""Task ``candidate_ranking`` (LLaRA's setting): pick the next item among K candidates.

Each query holds the target and K-1 negatives (never the target nor, when the catalog
allows, an item of the history), drawn uniformly or by training popularity with a generator
seeded per sample, so every run and rank sees the same candidates. A candidate's score is
its item-token logit after the history (the likelihood the LM gives that item token);
training is a softmax cross-entropy over each step's K candidates (the target + K-1
negatives drawn per step), at every step of a window.

In ID mode the candidates are scored, not written into the prompt. With ``input: text`` the
prompt lists them (seeded random order, ``\n{index}. {title}``); ``text_scoring: likelihood`` ranks
them by the mean log-likelihood of each one's text (+ end of turn) after the prompt,
``generative`` decodes an answer greedily and parses it to a candidate (``valid_ratio``: answers
that name one of the K); training is the target's text after the prompt (teacher forcing).

Metrics over the K candidates: HR@1, NDCG@K and MRR (metrics.RankingMetrics, exact under
ties); baselines: random order (HR@1 = 1/K exactly, ties) and popularity.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from torchmetrics import MeanMetric

from ..metrics import RankingMetrics
from . import register_task
from .base import Task, TaskEvaluator, pad
from .common import NegativeSampler, rng_for, side_batch


@register_task("candidate_ranking")
class CandidateRankingTask(Task):
    prefix = "candidate_ranking/"
    val_names = ("hr@1", "mrr")
    monitor_metric = ("mrr", "max")

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.K = cfg.num_candidates
        self.sampler = NegativeSampler(ctx.num_items, ctx.item_counts, cfg.negative_sampling)
        self.flags = dict(ctx.inputs)
        self.text = getattr(cfg, "input", "items") == "text"
        if self.text:  # LLaRA in text: the K candidates listed in the prompt (in a seeded random order)
            from .prompts import builder_for

            self.prompts = builder_for(self, cfg.prompt, num_candidates=self.K)
            self.generative = cfg.text_scoring == "generative"

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

    # -- text prompts
    def _text(self, samples: list[dict], train: bool) -> dict:
        """Prompts listing the K candidates (seeded order), the answers' token ids (train: the target's;
        eval: every candidate's, column 0 = the target) and, for eval, the prompt order of the columns."""
        from .prompts import pad_rows

        P = self.prompts
        rows, answers, cands, order = [], [], [], []
        for s in samples:
            n = len(s["items"])
            end = n - 1 if train else n
            target = s["items"][end] if train else s["target"]
            rng = rng_for(self.ctx.seed, s.get("user", ""), end, "text" if train else "eval")
            c = [target, *self._negatives(rng, target, s["items"][:end])]
            o = rng.permutation(self.K).tolist()  # prompt position j shows column o[j]: the target is not always first
            rows.append(P.prompt(s, max(0, end - self.max_history), end, P.question_ids(candidates=[c[j] for j in o]))[0])
            answers.append([P.answer_ids(target)] if train else [P.answer_ids(x) for x in c])
            cands.append(c)
            order.append(o)
        ids, mask = pad_rows(rows, P.tok.pad_token_id)
        A = max(len(a) for r in answers for a in r)
        ans = torch.tensor([[a + [P.tok.pad_token_id] * (A - len(a)) for a in r] for r in answers], dtype=torch.long)
        out = {"ids": ids, "mask": mask, "ans": ans, "ans_len": torch.tensor([[len(a) for a in r] for r in answers])}
        if not train:
            out.update(cands=torch.tensor(cands, dtype=torch.long), order=torch.tensor(order, dtype=torch.long))
        return out

    def _answer_logprobs(self, net, batch: dict, rows: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p of each answer token [R, A], mask [R, A]) for prompt b + answer k, rows r = b * C + k."""
        from .prompts import lm_hidden, lm_logits

        ids, mask, ans, alen = batch["ids"], batch["mask"], batch["ans"], batch["ans_len"]
        B, C, A = ans.shape
        plen = mask.sum(1).repeat_interleave(C)
        ans, alen = ans.reshape(B * C, A), alen.reshape(B * C)
        if rows is not None:
            ids, mask, plen, ans, alen = ids[rows // C], mask[rows // C], plen[rows], ans[rows], alen[rows]
        else:
            ids, mask = ids.repeat_interleave(C, 0), mask.repeat_interleave(C, 0)
        R, T = ids.shape
        full = torch.cat([ids, torch.full((R, A), int(self.prompts.tok.pad_token_id), dtype=ids.dtype, device=ids.device)], 1)
        pos = plen.unsqueeze(1) + torch.arange(A, device=ids.device)
        full.scatter_(1, pos, ans)
        fmask = (torch.arange(T + A, device=ids.device) < (plen + alen).unsqueeze(1)).long()
        h = lm_hidden(net, full, fmask)
        h = h.gather(1, (pos - 1).unsqueeze(-1).expand(-1, -1, h.shape[-1]))  # the state before each answer token
        lp = lm_logits(net, h).float().log_softmax(-1).gather(-1, ans.unsqueeze(-1)).squeeze(-1)
        am = torch.arange(A, device=ids.device) < alen.unsqueeze(1)
        return lp * am, am

    def _generate(self, net, batch: dict) -> torch.Tensor:
        """[B, K] scores of the generative mode: 1 for the candidate the greedy answer names, 0 elsewhere
        (all 0 when the answer names none); counts valid answers in ``self.last_valid``."""
        from ..model.backbone import causal_core
        from .prompts import pad_rows

        P = self.prompts
        rows = [r[m.bool()].tolist() for r, m in zip(batch["ids"], batch["mask"])]
        ids, mask = pad_rows(rows, P.tok.pad_token_id, left=True)
        ids, mask = ids.to(batch["ids"].device), mask.to(batch["ids"].device)
        eos = P.tok.eos_token_id
        lm = causal_core(net.lm)
        # ZeRO-3: every forward pass gathers the partitioned weights from all ranks, so a rank whose
        # answers ended early must keep stepping until every rank's have (transformers' synced_gpus)
        synced = _zero3_partitioned(lm) and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
        out = lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=self.cfg.max_answer_tokens, do_sample=False,
                          pad_token_id=P.tok.pad_token_id, eos_token_id=eos, synced_gpus=synced)[:, ids.shape[1]:]
        texts = P.tok.batch_decode(out.tolist(), skip_special_tokens=True)
        return self.generated_scores(texts, batch)

    def generated_scores(self, answers: list[str], batch: dict) -> torch.Tensor:
        from .prompts import parse_choice

        P = self.prompts
        cands, order = batch["cands"].tolist(), batch["order"].tolist()
        scores = torch.zeros(len(cands), self.K)
        valid = []
        for b, a in enumerate(answers):
            shown = [cands[b][j] for j in order[b]]
            k = parse_choice(a, [P.decode(P.item_table("")[c]) for c in shown])
            valid.append(k >= 0)
            if k >= 0:
                scores[b, order[b][k]] = 1.0
        self.last_valid = torch.tensor(valid, dtype=torch.bool)
        return scores.to(batch["cands"].device)

    # -- tensors
    def collate_train(self, samples: list[dict]) -> dict:
        if self.text:
            return self._text(samples, train=True)
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
        if self.text:
            return self._text(samples, train=False)
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
        if "ids" in batch:  # the target's text after the prompt (teacher forcing): LLaRA's generative training
            lp, m = self._answer_logprobs(net, batch)
            return -lp.sum() / m.sum().clamp(min=1)
        mask = batch["labels"] > 0
        h = net.hidden(batch["items"], side=batch.get("side"))[mask]
        logits = net.item_logits(h).float().gather(1, batch["cands"][mask] - 1)
        return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))

    def scores(self, net, batch: dict) -> torch.Tensor:
        """[B, K] item-token logits of each query's candidates (column 0 = the target); text: the mean
        log-likelihood of each candidate's text after the prompt (in chunks of 64 rows), or the
        generative mode's pick."""
        if "ids" in batch:
            if self.generative:
                return self._generate(net, batch)
            B, C = batch["cands"].shape
            parts = []
            for lo in range(0, B * C, 64):
                lp, m = self._answer_logprobs(net, batch, torch.arange(lo, min(B * C, lo + 64), device=batch["ids"].device))
                parts.append(lp.sum(1) / m.sum(1).clamp(min=1))
            return torch.cat(parts).view(B, C)
        h = net.hidden(batch["items"], side=batch.get("side"))
        h = h[torch.arange(len(h)), batch["lengths"] - 1]
        return net.item_logits(h).float().gather(1, batch["cands"] - 1)

    def evaluator(self, stage: str) -> nn.Module:
        return CandidateEvaluator(self, stage)



class CandidateEvaluator(TaskEvaluator):
    def __init__(self, task: CandidateRankingTask, stage: str):
        super().__init__(task, stage)
        ks = sorted({1, task.K})
        self.model, self.random, self.pop = RankingMetrics(ks), RankingMetrics(ks), RankingMetrics(ks)
        self.gen = task.text and task.generative
        if self.gen:  # fraction of answers that name one of the K candidates (summed over ranks)
            self.valid = MeanMetric()
        self.register_buffer("popularity", torch.tensor(task.ctx.item_counts, dtype=torch.float32), persistent=False)

    @torch.no_grad()
    def update(self, net, head, batch: dict) -> None:
        s = self.task.scores(net, batch)
        target = torch.zeros(len(s), dtype=torch.long, device=s.device)
        w = batch.get("weight")
        self.model.update(s, target, w)
        if self.gen:
            v = self.task.last_valid.float().to(s.device)
            self.valid.update(v, w if w is not None else torch.ones_like(v))
        self.random.update(torch.zeros_like(s), target, w)
        self.pop.update(self.popularity[batch["cands"] - 1], target, w)

    def compute(self) -> dict:
        keep = ("hr@1", f"ndcg@{self.task.K}", "mrr")
        out = self.named(self.model.compute(), keep=keep)
        for name, m in (("random", self.random), ("popularity", self.pop)):
            out.update(self.named(m.compute(), name, keep))
        if self.gen:
            out.update(self.named({"valid_ratio": self.valid.compute()}))
        return out


def _zero3_partitioned(module: nn.Module) -> bool:
    """True when DeepSpeed ZeRO-3 has partitioned the module's parameters (they carry ``ds_id``)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())
