"""Point-wise metrics on torchmetrics: binary (AUC, GAUC, log loss, ECE) and regression (RMSE, MAE).

    AUC     torchmetrics BinaryAUROC (exact: every distinct score is a threshold; ties count 1/2)
    GAUC    sum_u n_u * AUC_u / sum_u n_u over users u whose impressions hold both labels,
            n_u = the user's impressions (the weighting of Zhou et al., DIN, 2018)
    logloss mean of -[y log p + (1 - y) log(1 - p)], p clipped to [1e-7, 1 - 1e-7]
    ECE     torchmetrics BinaryCalibrationError (equal-width bins, L1): sum_b n_b/n |acc_b - conf_b|

Rows whose weight is 0 (padding of the last eval batch) are dropped before any update.
GAUC keeps every (score, label, user) triple in ``cat`` states, so under DDP the groups are
gathered from all ranks before any per-user AUC is taken: a user whose impressions are
split over ranks is scored once, on all of them (tests/test_tasks_dist.py checks 2 ranks ==
1 process).
"""

from __future__ import annotations

from typing import Optional

import torch
from torchmetrics import MeanAbsoluteError, MeanMetric, MeanSquaredError, Metric
from torchmetrics.classification import BinaryAUROC, BinaryCalibrationError
from torchmetrics.utilities import dim_zero_cat


def auc_exact(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Mann-Whitney AUC with average ranks for ties (nan without both labels)."""
    pos, n = int(labels.sum()), len(labels)
    if pos == 0 or pos == n:
        return float("nan")
    order = torch.argsort(scores, stable=True)
    s = scores[order].double()
    ranks = torch.empty(n, dtype=torch.float64)
    # average rank of each run of equal scores
    _, inv, counts = torch.unique_consecutive(s, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    avg = ends - (counts.double() - 1) / 2
    ranks[order] = avg[inv]
    r_pos = ranks[labels.bool()].sum()
    return float((r_pos - pos * (pos + 1) / 2) / (pos * (n - pos)))


class GroupAUC(Metric):
    full_state_update = False
    higher_is_better = True

    def __init__(self, **kw):
        super().__init__(**kw)
        for name in ("scores", "labels", "groups"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, scores: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> None:
        self.scores.append(scores.detach().double().flatten())
        self.labels.append(labels.detach().long().flatten())
        self.groups.append(groups.detach().long().flatten())

    def compute(self) -> torch.Tensor:
        if isinstance(self.scores, list) and len(self.scores) == 0:  # (after a DDP sync the states are tensors)
            return torch.tensor(float("nan"))
        s, y, g = (dim_zero_cat(x).cpu() for x in (self.scores, self.labels, self.groups))
        order = torch.argsort(g, stable=True)
        s, y, g = s[order], y[order], g[order]
        _, counts = torch.unique_consecutive(g, return_counts=True)
        num = den = 0.0
        lo = 0
        for c in counts.tolist():
            a = auc_exact(s[lo: lo + c], y[lo: lo + c])
            if a == a:  # users with one label only have no AUC
                num += c * a
                den += c
            lo += c
        return torch.tensor(num / den if den else float("nan"), dtype=torch.float64)


class BinaryMetrics(torch.nn.Module):
    """AUC, GAUC, log loss and ECE of probabilities ``p`` (or only AUC/GAUC of raw scores)."""

    def __init__(self, ece_bins: int = 15, probabilities: bool = True):
        super().__init__()
        self.probabilities = probabilities
        self.auc = BinaryAUROC(thresholds=None)
        self.gauc = GroupAUC()
        if probabilities:
            self.logloss = MeanMetric()
            self.ece = BinaryCalibrationError(n_bins=ece_bins, norm="l1")
        self.positives = MeanMetric()

    def update(self, scores: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor, keep: Optional[torch.Tensor] = None) -> None:
        if keep is not None:
            scores, labels, groups = scores[keep], labels[keep], groups[keep]
        if len(scores) == 0:
            return
        y = labels.long()
        self.auc.update(scores.float(), y)
        self.gauc.update(scores, y, groups)
        self.positives.update(y.float())
        if self.probabilities:
            p = scores.double().clamp(1e-7, 1 - 1e-7)
            self.logloss.update(-(y * p.log() + (1 - y) * (1 - p).log()))
            self.ece.update(scores.float(), y)

    def compute(self) -> dict[str, torch.Tensor]:
        out = {"auc": self.auc.compute(), "gauc": self.gauc.compute().float()}
        if self.probabilities:
            out.update(logloss=self.logloss.compute(), ece=self.ece.compute())
        out["positive_rate"] = self.positives.compute()
        return out

    def reset(self) -> None:
        for m in self.children():
            m.reset()


class RegressionMetrics(torch.nn.Module):
    """RMSE and MAE (torchmetrics MeanSquaredError(squared=False), MeanAbsoluteError)."""

    def __init__(self):
        super().__init__()
        self.rmse = MeanSquaredError(squared=False)
        self.mae = MeanAbsoluteError()

    def update(self, pred: torch.Tensor, target: torch.Tensor, keep: Optional[torch.Tensor] = None) -> None:
        if keep is not None:
            pred, target = pred[keep], target[keep]
        if len(pred):
            self.rmse.update(pred.float(), target.float())
            self.mae.update(pred.float(), target.float())

    def compute(self) -> dict[str, torch.Tensor]:
        return {"rmse": self.rmse.compute(), "mae": self.mae.compute()}

    def reset(self) -> None:
        self.rmse.reset()
        self.mae.reset()
