"""Tasks: the one place that knows how a sample becomes tensors, a loss, predictions and metrics.

The registry is torch-free (recipe validation and ``--check`` stay instant): a built-in task's
module is imported only when its class is asked for. A new task is one module with a class
decorated ``@register_task("name")`` (listed in ``_BUILTIN`` or imported before use) and a
config class in ``config.py`` (see docs/tasks.md).

    from ecomtrain.tasks import task_class
    task_class("purchase_intent").monitor([10])   # ('val/purchase_intent/auc', 'max')
"""

from __future__ import annotations

import difflib
import importlib
from typing import Callable, Sequence

#: built-in tasks: name -> module that registers it on import
_BUILTIN = {
    "next_item": "ecomtrain.tasks.next_item",
    "purchase_intent": "ecomtrain.tasks.purchase_intent",
    "rating": "ecomtrain.tasks.rating",
    "candidate_ranking": "ecomtrain.tasks.candidate_ranking",
}
_REGISTRY: dict[str, type] = {}


def register_task(name: str) -> Callable[[type], type]:
    """Class decorator: make a Task subclass available to recipes as ``task: {name: NAME}``."""

    def deco(cls: type) -> type:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"task '{name}' is registered twice ({_REGISTRY[name].__module__} and {cls.__module__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def names() -> list[str]:
    return sorted(set(_BUILTIN) | set(_REGISTRY))


def task_class(name: str) -> type:
    if name not in _REGISTRY and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    if name not in _REGISTRY:
        guess = difflib.get_close_matches(name, names(), n=1, cutoff=0.5)
        hint = f"; did you mean '{guess[0]}'?" if guess else f"; known tasks: {', '.join(names())}"
        raise ValueError(f"task.name: unknown task '{name}'{hint}")
    return _REGISTRY[name]


def val_metrics(task: str, ks: Sequence[int]) -> list[str]:
    """Names the task logs on the validation split (what early stopping may monitor)."""
    return task_class(task).val_metrics(ks)


def monitor(task: str, ks: Sequence[int]) -> str:
    """The validation metric that picks the best checkpoint (its mode: ``task_class(t).monitor(ks)[1]``)."""
    return task_class(task).monitor(ks)[0]
