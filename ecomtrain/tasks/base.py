"""The Task interface, the context a task is built with, and the multi-task combination.

A task owns everything between a JSON sample and a number in ``metrics.json``:

- ``check_dataset(manifest)``: the fields it needs are there (one ``DataError`` naming task,
  field and dataset, raised before any model is built);
- ``collate_train`` / ``collate_eval`` / ``pad_sample``: samples -> tensors;
- ``make_head(net)``: its own trainable parameters (a binary or regression head), or None;
- ``loss(net, head, batch)``; ``evaluator(stage)``: an ``nn.Module`` holding its torchmetrics
  metrics and baselines with ``update(net, head, batch)``, ``compute() -> {name: value}``,
  ``reset()``; names follow ``{stage}/{prefix}{metric}`` and
  ``baseline/{baseline}/{stage}/{prefix}{metric}``;
- ``monitor(ks) -> (name, mode)``: the validation metric it proposes for model selection.

``train/module.py`` and ``train/runner.py`` only ever call these.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..data.importers import DataError


@dataclass
class TaskContext:
    """What every task may read about the dataset and the run (built once by ``build_tasks``)."""

    num_items: int
    max_history: int
    manifest: dict
    item_counts: list[int]  # training occurrences per item (index j = item j+1)
    ks: Sequence[int] = (5, 10, 20)
    exclude_seen: bool = False
    packing: bool = False
    seed: int = 0
    data_path: str = ""
    inputs: dict = field(default_factory=dict)  # model.inputs flags: event_types, channels, time_gaps
    eval_cfg: Any = None  # the recipe's EvalConfig (evaluators read their knobs from it)
    catalog: dict = field(default_factory=dict)  # optional per-item extras: 'category' codes, 'titles', 'cold' flags (index j = item j+1)
    # text prompts (task.input: text; tasks/prompts.py): the backbone folder whose tokenizer renders them, the
    # tokenizer once loaded (shared by the tasks of a run) and its context, tokens kept per item text
    pretrained: Optional[str] = None
    tokenizer: Any = None
    context: int = 0
    text_max_length: int = 64


def stable_hash(text: Any) -> int:
    """A process-independent 31-bit hash (Python's hash() is salted per process)."""
    return zlib.crc32(str(text).encode()) & 0x7FFFFFFF


def pad(rows: list[list], value=0, dtype=torch.long) -> torch.Tensor:
    width = max(1, max((len(r) for r in rows), default=1))
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows], dtype=dtype)


class Task:
    name = "task"
    #: metric namespace under {stage}/; next_item keeps the contract's bare names (test/ndcg@10)
    prefix = ""
    #: sample fields (besides items) that must be present in the dataset
    requires: tuple[str, ...] = ()

    def __init__(self, cfg, ctx: TaskContext):
        self.cfg = cfg
        self.ctx = ctx
        self.num_items = ctx.num_items
        self.max_history = ctx.max_history
        self.weight = float(getattr(cfg, "weight", 1.0))
        self.pad_sample = {"user": "", "items": [1], "events": [0], "channels": [0], "ts": [0], "target": 1, "target_event": 0}

    # -- dataset
    def check_dataset(self, manifest: dict) -> None:
        """Raise one DataError naming the task, the field and the dataset if a needed field is absent."""
        fields = manifest.get("sample_fields")
        if fields is None and self.requires and self.ctx.data_path:
            fields = _peek_fields(self.ctx.data_path, manifest)  # datasets built before sample_fields existed
        for f in self.requires:
            if fields is not None and f not in fields:
                raise DataError(self.missing(f, manifest, "samples carry no such field"))
        # model.inputs asks for a per-step field the log never filled (all null)
        for flag, key in (("event_types", "event_types"), ("channels", "channels")):
            if self.ctx.inputs.get(flag) and key in manifest and not manifest[key]:
                raise DataError(self.missing(key, manifest, f"no event carries a {key[:-1].replace('_', ' ')}; set model.inputs.{flag}: false"))

    def missing(self, what: str, manifest: dict, why: str) -> str:
        src = manifest.get("source") or {}
        where = src.get("input") or src.get("description") or self.ctx.data_path or "the dataset"
        return f"task '{self.name}' needs '{what}' but dataset {self.ctx.data_path or where} ({src.get('source', '?')}: {where}) has none: {why}"

    # -- tensors
    def collate_train(self, samples: list[dict]) -> dict:
        raise NotImplementedError

    def train_fields(self) -> Optional[set[str]]:
        """The sample keys ``collate_train`` reads; the training stream decodes only these
        (data/shardio.py ``decode_block``). None (the default) = every key: a task that does not
        declare its fields gets whole samples."""
        return None

    def collate_eval(self, samples: list[dict]) -> dict:
        raise NotImplementedError

    def make_head(self, net) -> Optional[nn.Module]:
        return None

    def loss(self, net, head, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def evaluator(self, stage: str) -> nn.Module:
        raise NotImplementedError

    def train_logs(self) -> dict:
        """Extra per-step training figures of the last loss() call ({name: tensor}), logged by the module."""
        return {}

    @staticmethod
    def batch_tokens(batch: dict) -> tuple[int, int, int]:
        """(samples, real input tokens, slots) of a training batch, for throughput figures."""
        if "ids" in batch:  # text prompts: one row per (sample, candidate)
            return len(batch["ids"]), int(batch["mask"].sum()), int(batch["mask"].numel())
        items = batch["items"]
        real = items > 0
        pos = batch.get("position_ids")
        samples = int(((pos == 0) & real).sum()) if pos is not None else len(items)
        return samples, int(real.sum()), int(items.numel())

    @staticmethod
    def batch_size(batch: dict) -> int:
        return len(batch["group"] if "ids" in batch and "group" in batch else batch.get("items", batch.get("ids")))

    # -- model selection: a task lists its validation metrics (``val_names``) and the one that selects
    # checkpoints (``monitor_metric``, mode), or overrides these two (next_item: names depend on eval.ks)
    val_names: tuple[str, ...] = ()
    monitor_metric: Optional[tuple[str, str]] = None

    @classmethod
    def val_metrics(cls, ks: Sequence[int]) -> list[str]:
        if not cls.val_names:
            raise NotImplementedError
        return [f"val/{cls.prefix}{m}" for m in cls.val_names]

    @classmethod
    def monitor(cls, ks: Sequence[int]) -> tuple[str, str]:
        if cls.monitor_metric is None:
            raise NotImplementedError
        return f"val/{cls.prefix}{cls.monitor_metric[0]}", cls.monitor_metric[1]


class TaskEvaluator(nn.Module):
    """Scaffolding of a task's evaluator: metric names ``{stage}/{prefix}{metric}`` and
    ``baseline/{name}/{stage}/{prefix}{metric}``, and ``reset()`` of every torchmetrics child."""

    def __init__(self, task: Task, stage: str):
        super().__init__()
        self.task, self.stage = task, stage

    def named(self, values: dict, baseline: Optional[str] = None, keep: Optional[Sequence[str]] = None) -> dict:
        head = f"{self.stage}/{self.task.prefix}" if baseline is None else f"baseline/{baseline}/{self.stage}/{self.task.prefix}"
        return {f"{head}{k}": v for k, v in values.items() if keep is None or k in keep}

    def reset(self) -> None:
        for m in self.children():  # the metrics (a ModuleList of them too: rating's bias grid)
            for x in (m if isinstance(m, nn.ModuleList) else [m]):
                if hasattr(x, "reset"):
                    x.reset()


def _peek_fields(data_path: str, manifest: dict) -> Optional[list[str]]:
    """The keys of the first stored sample (val first: it carries the target fields too)."""
    import tarfile
    from pathlib import Path

    from ..data.shardio import iter_shard_samples

    for split in ("val", "test", "train"):
        for sh in manifest.get("splits", {}).get(split, {}).get("shards", []):
            try:
                for sample in iter_shard_samples(Path(data_path) / sh["name"]):
                    return list(sample)
            except (OSError, tarfile.TarError, ValueError, EOFError):
                continue
    return None


class MultiTask(Task):
    """Several tasks over one shared backbone: each collates its own view of the same samples,
    the loss is ``sum(weight_i * loss_i)``; every task keeps its own metrics and heads. The
    first task is the primary one: its monitor selects checkpoints."""

    name = "multi"

    def __init__(self, tasks: list[Task]):
        self.tasks = tasks
        self.ctx = tasks[0].ctx
        self.weight = 1.0
        pad_sample: dict = {}
        for t in tasks:
            pad_sample.update(t.pad_sample)
        self.pad_sample = pad_sample

    def check_dataset(self, manifest: dict) -> None:
        for t in self.tasks:
            t.check_dataset(manifest)

    def collate_train(self, samples):
        return {t.name: t.collate_train(samples) for t in self.tasks}

    def train_fields(self):
        want = [t.train_fields() for t in self.tasks]
        return None if any(w is None for w in want) else set().union(*want)

    def collate_eval(self, samples):
        return {t.name: t.collate_eval(samples) for t in self.tasks}

    def batch_tokens(self, batch):
        return self.tasks[0].batch_tokens(batch[self.tasks[0].name])

    def batch_size(self, batch):
        return self.tasks[0].batch_size(batch[self.tasks[0].name])

    @property
    def primary(self) -> Task:
        return self.tasks[0]


def subtasks(task: Task) -> list[Task]:
    return task.tasks if isinstance(task, MultiTask) else [task]


def sub_batch(task: Task, sub: Task, batch: dict) -> dict:
    """The part of a (multi-task) batch that belongs to ``sub``; eval padding weights are shared."""
    if not isinstance(task, MultiTask):
        return batch
    out = batch[sub.name]
    if "weight" in batch:
        out = {**out, "weight": batch["weight"]}
    return out


def build_tasks(cfg, manifest: dict, item_counts: Optional[list[int]] = None, catalog: Optional[dict] = None) -> Task:
    """The recipe's task(s) for a built dataset (checked against it): one Task or a MultiTask."""
    from . import task_class

    ctx = TaskContext(
        num_items=int(manifest["num_items"]), max_history=cfg.data.max_history, manifest=manifest,
        item_counts=list(item_counts) if item_counts is not None else [0] * int(manifest["num_items"]),
        ks=tuple(cfg.eval.ks), exclude_seen=cfg.eval.exclude_seen, packing=cfg.data.packing, seed=cfg.run.seed,
        data_path=str(cfg.data.path), inputs=cfg.model.inputs.model_dump(), eval_cfg=cfg.eval,
        catalog={k: v for k, v in (catalog or {}).items() if v is not None},
        pretrained=cfg.model.backbone.pretrained, text_max_length=cfg.data.item_text.max_length,
    )
    tasks = [task_class(tc.name)(tc, ctx) for tc in cfg.task]
    out = tasks[0] if len(tasks) == 1 else MultiTask(tasks)
    out.check_dataset(manifest)
    return out
