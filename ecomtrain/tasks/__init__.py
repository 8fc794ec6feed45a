"""Tasks: what each one logs and monitors, torch-free so that recipe validation (``--check``) stays instant.

The task classes themselves (``next_item.NextItemTask``) import torch; they call :func:`monitor`.
"""

from __future__ import annotations

from typing import Sequence

#: metric families every ranking task logs per K, and once
_PER_K = ("hr", "ndcg")
_ONCE = ("mrr", "auc")


def val_metrics(task: str, ks: Sequence[int]) -> list[str]:
    """Names the task logs on the validation split (what early stopping may monitor)."""
    if task == "next_item":
        return [f"val/{m}@{k}" for k in ks for m in _PER_K] + [f"val/{m}" for m in _ONCE]
    raise ValueError(f"task.name: unknown task '{task}'")


def monitor(task: str, ks: Sequence[int]) -> str:
    """The metric that picks the best checkpoint: NDCG@10 (the field's headline cut-off) when 10 is
    among ``eval.ks``, else NDCG at the largest K evaluated."""
    if not ks:
        raise ValueError("eval.ks: needs at least one K")
    if task == "next_item":
        return f"val/ndcg@{10 if 10 in ks else max(ks)}"
    raise ValueError(f"task.name: unknown task '{task}'")
