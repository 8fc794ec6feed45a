"""LightningModule wrapping the item-token causal LM for a recommendation task.

The model is created in ``configure_model`` (not ``__init__``) so that
DeepSpeed ZeRO-3 can shard it as it is built. Metrics are torchmetrics
objects (synced across ranks by summing), logged once per epoch.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import lightning as L
import torch
from torch import nn

from ..config import Recipe
from ..model.adapters import adapter_regularization, apply_finetune_method, check_method_supported
from ..model.backbone import ItemLM, build_causal_lm
from ..tasks.base import Task, build_tasks, sub_batch, subtasks

#: manifest fields a module needs to rebuild its tasks from a checkpoint (saved in hparams)
_META = ("num_items", "event_types", "channels", "sample_fields", "source", "split")  # split: temporal -> day consistency


def make_task(cfg: Recipe, manifest, item_counts: Optional[list[int]] = None, catalog: Optional[dict] = None) -> Task:
    """The recipe's task(s) for a dataset (``manifest`` dict, or just the catalog size); see tasks/."""
    if isinstance(manifest, int):
        manifest = {"num_items": manifest}
    return build_tasks(cfg, manifest, item_counts, catalog)


def lr_lambda(step: int, total: int, warmup: int, kind: str, min_ratio: float) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return min_ratio + (1 - min_ratio) * (1 - progress)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def module_for_dataset(cfg: Recipe, manifest: dict, log=print, init_from_text: bool = True) -> "RecModule":
    """The RecModule for a built dataset: its catalog size, train-split popularity, cold items and
    (model.items text/hybrid, or a pretrained backbone's id init) the item text of model/item_text.py.

    ``init_from_text=False`` (weights come from a checkpoint): in id mode the item text would only
    initialise item rows that the checkpoint overwrites, so it is neither rendered nor encoded; nor is
    a cold head's ``cold_share: auto`` estimated (the checkpoint holds it)."""
    from pathlib import Path

    import polars as pl

    from ..config import redact
    from ..model.item_text import prepare

    path = Path(cfg.data.path) / manifest.get("item_file", "items.parquet")
    items = pl.read_parquet(path).sort("idx")
    counts = items["train_count"].to_list()
    # category codes (intra-list diversity) and titles (W&B sample table); both optional in a catalog
    cats = items["category"].cast(pl.Utf8).cast(pl.Categorical).to_physical().fill_null(-1).to_list() if "category" in items.columns else None
    titles = items["title"].cast(pl.Utf8).to_list() if "title" in items.columns else None
    cold = items["cold"].to_list() if "cold" in items.columns and items["cold"].any() else None
    meta = {k: manifest[k] for k in _META if k in manifest}
    share = None
    # (weights from a checkpoint: its own share buffer wins, so the validation split is not read for it)
    if cfg.model.item_text.cold_head and cfg.model.item_text.cold_share == "auto" and init_from_text:
        share = cold_target_share(cfg.data.path, manifest, counts, log)
    return RecModule(redact(cfg.model_dump(mode="json")), int(manifest["num_items"]), counts, data_meta=meta,
                     item_category=cats, item_titles=titles, channels=manifest.get("channels") or [],
                     item_text=prepare(cfg, manifest, log=log) if init_from_text or cfg.model.items != "id" else None, cold=cold,
                     cold_share=share)


def cold_target_share(data_path, manifest: dict, train_counts: list[int], log=print) -> float:
    """``model.item_text.cold_share: auto``: the share of validation targets that are items with no training
    occurrence, add-one smoothed ((k + 1) / (n + 2): never 0 or 1, so no item is ruled out)."""
    from ..data.shardio import iter_split_samples

    k = n = 0
    for s in iter_split_samples(data_path, manifest, "val"):
        t = int(s["target"])
        n += 1
        k += 0 < t <= len(train_counts) and train_counts[t - 1] == 0
    share = (k + 1) / (n + 2)
    log(f"cold head: {k} of {n} validation targets have no training occurrence; cold_share = {share:.4f}")
    return share


class RecModule(L.LightningModule):
    def __init__(self, recipe: dict, num_items: int, item_counts: Optional[list[int]] = None, data_meta: Optional[dict] = None,
                 item_category: Optional[list[int]] = None, item_titles: Optional[list] = None, channels: Optional[list] = None,
                 item_text=None, cold: Optional[list[bool]] = None, cold_share: Optional[float] = None):
        super().__init__()
        # only the (secret-free) recipe, vocabulary size and the dataset's event/channel vocabularies go into checkpoints
        hp = {"recipe": recipe, "num_items": num_items}
        if data_meta:
            hp["data_meta"] = data_meta
        self.save_hyperparameters(hp)
        self.cfg = Recipe.model_validate(recipe)
        check_method_supported(self.cfg)  # e.g. qlora without CUDA: fail before any model is built
        self.num_items = num_items
        self.data_meta = {"num_items": num_items, **(data_meta or {})}
        if channels is not None and "channels" not in self.data_meta:
            self.data_meta["channels"] = list(channels)
        # catalog extras for evaluators (category codes: diversity; titles: the W&B sample table; cold items)
        self.task = make_task(self.cfg, self.data_meta, item_counts, {"category": item_category, "titles": item_titles, "cold": cold})
        counts = torch.tensor(item_counts if item_counts is not None else [0] * num_items, dtype=torch.float32)
        self.register_buffer("popularity", counts, persistent=False)
        self.item_text = item_text  # model/item_text.ItemText or None (text table: a buffer of net.tower)
        # cold items (data.build.cold_items): column j is item j+1
        cold_t = torch.tensor(cold, dtype=torch.bool) if cold is not None else torch.zeros(num_items, dtype=torch.bool)
        self.register_buffer("cold", cold_t, persistent=False)
        self.has_cold = cold is not None
        # model.item_text.cold_head: the prior share of cold targets (module_for_dataset resolves 'auto'; a checkpoint's own
        # wins, so a module built to load one leaves it unresolved here)
        cs = self.cfg.model.item_text.cold_share
        self.cold_share = float(cs) if cs != "auto" else (cold_share if cold_share is not None else 0.0)
        self.net: Optional[ItemLM] = None
        self.heads = nn.ModuleDict()  # per-task heads, built with the model (configure_model)
        self.primary_excludes_seen = self.cfg.eval.exclude_seen
        # one evaluator (torchmetrics metrics + baselines) per task and stage
        self.metrics = nn.ModuleDict(
            {f"{stage}_{t.name}": t.evaluator(stage) for stage in ("val", "test") for t in subtasks(self.task)}
        )

    # -- model
    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning sets _current_fx_name before and after every hook, ~40 times a training step
        # (trainer/call.py). It is a plain str/None, never a parameter, submodule or buffer, so
        # nn.Module.__setattr__'s bookkeeping (its isinstance checks) is skipped for it: the largest
        # own-time entry of Lightning's per-step loop against a hand-written one (bench/train_throughput.py --profile)
        if name == "_current_fx_name":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def configure_model(self) -> None:
        if self.net is not None:
            return
        mc = self.cfg.model
        texts = self.item_text.texts if self.item_text is not None else None
        lm, vocab, tok = build_causal_lm(mc, self.num_items, texts, self.cfg.data.item_text.max_length)
        init_std = float(getattr(lm.config, "initializer_range", 0.02))  # the scale of a fresh ID embedding
        # id mode built for a checkpoint's weights has no item text (module_for_dataset(init_from_text=False))
        if mc.item_text.id_init == "text" and mc.items != "text" and self.item_text is not None:
            from ..model.backbone import set_item_rows
            from ..model.items import text_pca_rows

            if self.item_text.table is None:
                raise ValueError("model.item_text.id_init=text: no item text table (module_for_dataset prepares it)")
            set_item_rows(lm, vocab.offset, text_pca_rows(self.item_text.table, lm.config.hidden_size, init_std, self.cfg.run.seed))
            if mc.items == "id":  # the table only initialised the rows: do not hold a 1 M-item table for nothing
                self.item_text.table = None
        if self.cfg.model.activation_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        from .peft_compat import cpu_safe_peft

        with cpu_safe_peft():  # peft's ZeRO-3 path for item-token rows assumes CUDA
            lm = apply_finetune_method(lm, self.cfg, vocab)
        tower = None
        if mc.items != "id":
            from ..model.items import ItemTower

            if self.item_text is None or self.item_text.table is None:
                raise ValueError(f"model.items={mc.items}: no item text table (module_for_dataset prepares it)")
            # items with no training occurrence are scored by text alone in hybrid mode
            id_free = torch.cat([torch.zeros(1, dtype=torch.bool), self.popularity.cpu() == 0])
            out_std = {"matched": init_std, "zero": 0.0}.get(mc.item_text.adapter_init)
            tower = ItemTower(self.item_text.table, lm.config.hidden_size, mc.item_text.adapter, id_free, out_std=out_std,
                              cold_head=mc.item_text.cold_head, cold_share=self.cold_share)
        side = None
        flags = mc.inputs.model_dump()
        if any(flags.values()):
            from ..model.side_inputs import SideInputs

            side = SideInputs(lm.config.hidden_size, len(self.data_meta.get("event_types") or []), len(self.data_meta.get("channels") or []), flags)
        self.net = ItemLM(lm, vocab, mc.dropout, tok, hidden_dropout=mc.hidden_dropout, mode=mc.items, tower=tower,
                          id_dropout=mc.item_text.id_dropout, side=side)
        for t in subtasks(self.task):
            head = t.make_head(self.net)
            if head is not None:
                self.heads[t.name] = head

    # -- steps
    def _head(self, task: Task):
        return self.heads[task.name] if task.name in self.heads else None

    def training_step(self, batch: dict, batch_idx: int) -> Optional[torch.Tensor]:
        tasks = subtasks(self.task)
        losses = {t.name: t.loss(self.net, self._head(t), sub_batch(self.task, t, batch)) for t in tasks}
        loss = losses[tasks[0].name] if len(tasks) == 1 else sum(t.weight * losses[t.name] for t in tasks)
        if not self._loss_finite_everywhere(loss):
            return self._nonfinite(loss)
        # per-step figures are handed to Lightning in on_train_batch_end, and only on the steps its
        # logger connector writes out (see _log_step)
        logs = {"train/loss": loss.detach()}
        if len(tasks) > 1:
            for name, value in losses.items():
                logs[f"train/loss/{name}"] = value.detach()
        for t in tasks:  # a task's own training figures (e.g. a regulariser's value)
            logs.update(t.train_logs())
        reg = adapter_regularization(self.net.lm)  # AdaLoRA's orthogonality penalty; None otherwise
        if reg is not None:
            logs["train/orth_reg"] = reg.detach()
            loss = loss + reg
        self._step_logs = (logs, self.task.batch_size(batch))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self._log_step()

    def _log_step(self) -> None:
        """Log this step's training figures when Lightning will write them to the loggers.

        ``self.log`` costs ~0.5 ms a call on CPU (Lightning moves and checks its result
        collection each time), 1-3 % of a small model's step when called every step, while the
        loggers only receive every ``trainer.log_every_n_steps``-th value. The same values reach
        the CSV/W&B rows at the same steps as before; the progress bar shows the last written
        loss. Called from ``on_train_batch_end``, which runs after the callbacks' (so a stop
        request made there, which makes Lightning write that step, is seen) and right before
        Lightning's step write-out.
        """
        pending, self._step_logs = getattr(self, "_step_logs", None), None
        if pending is None:
            return
        trainer = self.trainer
        conn = getattr(trainer, "_logger_connector", None)
        if conn is not None and not (conn.should_update_logs or trainer.fast_dev_run):
            return
        logs, bs = pending
        self.log("train/loss", logs.pop("train/loss"), prog_bar=True, on_step=True, on_epoch=False, batch_size=bs)
        for name, value in logs.items():
            self.log(name, value, on_step=True, on_epoch=False, batch_size=bs)

    def _loss_finite_everywhere(self, loss: torch.Tensor) -> bool:
        # one scalar all-reduce per step, so every rank takes the same branch below (a rank that
        # skipped alone would leave the others waiting in the gradient all-reduce)
        bad = not bool(torch.isfinite(loss.detach()).all())
        return not self.trainer.strategy.reduce_boolean_decision(bad, all=False)

    def _nonfinite(self, loss: torch.Tensor) -> Optional[torch.Tensor]:
        nf = self.cfg.trainer.nonfinite
        step = self.trainer.global_step
        self._skipped = getattr(self, "_skipped", 0) + 1
        if nf.action == "stop" or self._skipped > nf.max_skips:
            why = "trainer.nonfinite.action=stop" if nf.action == "stop" else f"more than trainer.nonfinite.max_skips={nf.max_skips} skipped steps"
            raise FloatingPointError(
                f"non-finite training loss (NaN/inf) on at least one rank at step {step} ({why}); "
                "the run stops and no checkpoint of this state is written. Lower optim.lr, use "
                "precision bf16-mixed instead of 16-mixed, check the data, or set trainer.nonfinite.action=skip."
            )
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(f"non-finite training loss at step {step}: update skipped ({self._skipped}/{nf.max_skips})")
        self.log("train/skipped_steps", float(self._skipped), on_step=True, on_epoch=False, batch_size=1)
        # Lightning refuses a None training_step under DDP/DeepSpeed, so backward runs (every rank
        # agreed above, so the gradient all-reduce stays in step) and the update is dropped:
        # on_before_optimizer_step clears the gradients (torch AdamW skips parameters without one);
        # under DeepSpeed, whose gradients live in its own buffers, DeepSpeed's overflow check
        # discards a step whose gradient norm is NaN/inf.
        self._skip_update = True
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        if getattr(self, "_skip_update", False):
            self._skip_update = False
            if type(self.trainer.strategy).__name__ == "_DeepSpeed":
                return  # DeepSpeed owns the gradients (see _nonfinite)
            for p in self.parameters():
                p.grad = None  # the whole accumulated step is dropped

    def _eval_step(self, batch: dict, stage: str) -> None:
        for t in subtasks(self.task):
            self.metrics[f"{stage}_{t.name}"].update(self.net, self._head(t), sub_batch(self.task, t, batch))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def monitor(self) -> tuple[str, str]:
        """(metric, mode) that selects checkpoints: the primary (first) task's proposal."""
        return subtasks(self.task)[0].monitor(self.cfg.eval.ks)

    def _log_eval(self, stage: str) -> None:
        out: dict[str, Any] = {}
        for t in subtasks(self.task):
            m = self.metrics[f"{stage}_{t.name}"]
            values = m.compute()
            if self.trainer.is_global_zero and hasattr(m, "log_extra"):  # tables / charts (rank 0 only)
                m.log_extra(self.loggers, values, int(self.trainer.global_step))
            out.update(values)
            m.reset()
        # values are already reduced across ranks by torchmetrics
        shown = {k: out.pop(k) for k in (self.monitor()[0],) if k in out}
        self.log_dict(out, sync_dist=False)
        self.log_dict(shown, prog_bar=True, sync_dist=False)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    # -- optimisation
    def configure_optimizers(self):
        oc = self.cfg.optim
        decay, no_decay, tower_decay, tower_no_decay = [], [], [], []
        named = list(self.net.named_parameters()) + [(f"heads.{n}", p) for n, p in self.heads.named_parameters()]
        for name, p in named:
            if not p.requires_grad:
                continue
            # no weight decay on biases, norms (1-d) and embeddings (side-input tables included)
            nd = p.ndim < 2 or "embed" in name or name.startswith("side.")
            # the text adapter: its own learning rate (model.item_text.adapter_lr). Only when it differs, so runs
            # (and their checkpoints' optimizer states) without it keep the two groups they always had
            # (the cold head is not part of it: it trains at optim.lr)
            if name.startswith("tower.") and not name.startswith("tower.cold_adapter.") and self.cfg.model.item_text.adapter_lr != 1.0:
                (tower_no_decay if nd else tower_decay).append(p)
            else:
                (no_decay if nd else decay).append(p)
        tower_lr = oc.lr * self.cfg.model.item_text.adapter_lr
        groups = [{"params": decay, "weight_decay": oc.weight_decay}, {"params": no_decay, "weight_decay": 0.0},
                  {"params": tower_decay, "weight_decay": oc.weight_decay, "lr": tower_lr},
                  {"params": tower_no_decay, "weight_decay": 0.0, "lr": tower_lr}]
        params = [p for g in groups for p in g["params"]]
        # torch's fused AdamW kernel: one kernel per tensor instead of ~12 (0.24 vs 0.99 ms a step for
        # the quickstart model's 170 k parameters on one CPU core). Not under DeepSpeed, which steps
        # its own flattened partitions, and not under Lightning's mixed-precision (AMP) plugin with gradient
        # clipping, which refuses any optimizer that could unscale gradients itself (fused ones declare so).
        from lightning.pytorch.plugins.precision import MixedPrecision

        from .strategies import is_deepspeed

        amp_clip = isinstance(self.trainer.precision_plugin, MixedPrecision) and bool(self.trainer.gradient_clip_val)
        fused = not is_deepspeed(self.trainer.strategy) and not amp_clip and all(
            p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
        opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=oc.lr, betas=oc.betas, eps=oc.eps, fused=fused or None)
        total = int(self.trainer.estimated_stepping_batches)
        warmup = int(oc.warmup_ratio * total)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_lambda(s, total, warmup, oc.scheduler, oc.min_lr_ratio)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
