"""AdaLoRA rank allocation as a Lightning callback, once per optimizer step, under any strategy.

peft's ``AdaLoraModel.update_and_allocate(step)`` must run after every optimizer
step: it scores each singular triplet by |w * dL/dw| (EMA-smoothed), lowers the
total rank budget on a cubic schedule from ``init_r`` to ``target_r`` per module
and zeroes the lowest-scoring singular values (``lora_E``). Called as-is from a
Lightning hook it goes wrong three ways, which this callback handles:

1. micro-batches: with ``accumulate_grad_batches=k`` a per-batch hook would
   advance the schedule k times per step. Here the gradients are captured in
   ``on_before_optimizer_step`` only at an accumulation boundary (DeepSpeed calls
   that hook on every micro-batch, so its engine is asked) and the allocation runs
   in ``on_train_batch_end`` only when ``trainer.global_step`` moved.
2. ``total_step``: peft needs it up front; it is set from Lightning's
   ``estimated_stepping_batches`` (epochs x batches / accumulation, or max_steps).
3. DeepSpeed ZeRO-2/3: ``p.grad`` is None in Lightning's hooks (the reduced
   gradients live in DeepSpeed's partitioned buffers) and peft's ``update_ipt``
   raises a TypeError; under ZeRO-3 ``p`` itself is an empty partition. The
   full gradient is read with ``deepspeed.utils.safe_get_full_grad`` before the
   step (it is gone after), the full fp32 weight with ``safe_get_full_fp32_param``
   after it, and peft's own ``RankAllocator`` runs on those full copies. The
   masked ``lora_E`` is written back to both the fp32 master
   (``safe_set_full_fp32_param``) and the model weight, or DeepSpeed's next step
   would restore the pruned values from its master copy.

Every rank computes the same pattern from the same all-reduced gradients; the
callback checks that against rank 0 after each allocation (``divergences``
counts disagreements, rank 0 wins) so a silent split is impossible. The final
pattern lives in the peft config (``rank_pattern``), so ``save_pretrained``
writes it into ``adapter_config.json`` and trims the saved matrices to it; it
is also in this callback's checkpoint state for export from a checkpoint.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from lightning.pytorch.callbacks import Callback

from ..config import RecipeError
from ..model.adapters import adalora_tuner


class _FullView:
    """What peft's RankAllocator iterates: ``named_parameters`` of full fp32 copies with ``.grad`` set."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def named_parameters(self):
        return iter(self.tensors.items())


class _Access:
    """Full-tensor reads and writes of one parameter, per strategy (single/DDP, ZeRO-1/2, ZeRO-3)."""

    def __init__(self, trainer):
        from lightning.pytorch.strategies import DeepSpeedStrategy

        self.strategy = trainer.strategy
        self.deepspeed = isinstance(trainer.strategy, DeepSpeedStrategy)
        self.zero3 = self.deepspeed and bool(getattr(trainer.strategy, "zero_stage_3", False))

    def boundary(self, trainer) -> bool:
        # Lightning calls on_before_optimizer_step on every micro-batch under DeepSpeed
        # (it accumulates itself); elsewhere the hook only runs before a real step.
        engine = trainer.model if self.deepspeed else None
        check = getattr(engine, "is_gradient_accumulation_boundary", None)
        return bool(check()) if callable(check) else True

    def grad(self, p: torch.nn.Parameter) -> torch.Tensor:
        if self.deepspeed:
            from deepspeed.utils import safe_get_full_grad

            g = safe_get_full_grad(p)  # collective under ZeRO: all ranks, same order
        else:
            g = p.grad
        if g is None:  # a parameter that got no gradient this step
            return torch.zeros(self._shape(p), dtype=torch.float32, device=p.device)
        return g.detach().float().clone().reshape(self._shape(p))

    def param(self, p: torch.nn.Parameter) -> torch.Tensor:
        if self.deepspeed:
            from deepspeed.utils import safe_get_full_fp32_param

            full = safe_get_full_fp32_param(p)
            if full is not None:
                return full.detach().float().clone().reshape(self._shape(p))
        return p.detach().float().clone()

    def set_param(self, p: torch.nn.Parameter, value: torch.Tensor) -> None:
        if not self.deepspeed:
            with torch.no_grad():
                p.copy_(value)
            return
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param

        safe_set_full_fp32_param(p, value)  # the optimizer's fp32 master partition
        if self.zero3:
            # the (possibly bf16) model partition: gather, write on rank 0, re-partition
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if self.strategy.global_rank == 0:
                    with torch.no_grad():
                        p.copy_(value.reshape(p.shape))
        else:
            with torch.no_grad():
                p.copy_(value)

    @staticmethod
    def _shape(p: torch.nn.Parameter) -> torch.Size:
        return getattr(p, "ds_shape", p.shape)  # ZeRO-3 keeps the full shape in ds_shape


class AdaLoraAllocator(Callback):
    """Drive peft AdaLoRA's budget schedule once per optimizer step (see module docstring)."""

    def __init__(self) -> None:
        self._grads: Optional[dict[str, torch.Tensor]] = None
        self._last_step: Optional[int] = None
        self._pending: Optional[dict] = None
        self.history: list[dict] = []  # {"step", "budget", "rank"} per allocation (for tests / logs)
        self.divergences = 0
        self._module = None  # the RecModule, for state_dict()

    # ---------------------------------------------------------------- helpers
    @staticmethod
    def _tuner(pl_module):
        tuner = adalora_tuner(pl_module.net.lm)
        if tuner is None:
            raise RecipeError("AdaLoraAllocator needs finetune.method=adalora")
        return tuner

    @staticmethod
    def _params(tuner):
        name = tuner.rankallocator.adapter_name
        # the same filter peft's RankAllocator.update_ipt uses
        return [(n, p) for n, p in tuner.model.named_parameters() if "lora_" in n and name in n]

    def _config(self, tuner):
        return tuner.peft_config[tuner.rankallocator.adapter_name]

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer, pl_module) -> None:
        tuner = self._tuner(pl_module)
        cfg = self._config(tuner)
        total = int(trainer.estimated_stepping_batches)
        if cfg.tinit >= total - cfg.tfinal:
            raise RecipeError(
                f"finetune.adalora: tinit ({cfg.tinit}) + tfinal ({cfg.tfinal}) leave no pruning steps in this run's "
                f"{total} optimizer steps (epochs x batches / trainer.accumulate_grad_batches); lower them"
            )
        tuner.rankallocator.set_total_step(total)
        self._module = pl_module
        self._last_step = trainer.global_step
        if self._pending:  # restored before fit start (single/DDP); DeepSpeed restores after it
            self._apply_state(self._pending)
            self._pending = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        acc = _Access(trainer)
        if not acc.boundary(trainer):
            return
        self._grads = {n: acc.grad(p) for n, p in self._params(self._tuner(pl_module))}

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self._grads is None or step == self._last_step:
            return  # accumulating: no optimizer step since the last call
        self._last_step = step
        grads, self._grads = self._grads, None
        budget, rank = self.allocate(trainer, pl_module, step, grads)
        self.history.append({"step": step, "budget": budget, "rank": rank})
        pl_module.log_dict({"adalora/budget": float(budget), "adalora/rank": float(rank)}, on_step=True, on_epoch=False)

    def on_fit_end(self, trainer, pl_module) -> None:
        # stopped before the final allocation (early stopping, max_steps): fix the pattern now
        tuner = self._tuner(pl_module)
        cfg = self._config(tuner)
        if tuner.rankallocator.exp_avg_ipt and self._last_step is not None and self._last_step < cfg.total_step - cfg.tfinal:
            self.allocate(trainer, pl_module, cfg.total_step - cfg.tfinal, grads=None)

    # ------------------------------------------------------------- allocation
    def allocate(self, trainer, pl_module, step: int, grads: Optional[dict]) -> tuple[int, int]:
        """peft's AdaLoraModel.update_and_allocate(step), on full fp32 copies; returns (budget, total rank)."""
        tuner = self._tuner(pl_module)
        alloc, cfg = tuner.rankallocator, self._config(tuner)
        acc = _Access(trainer)
        params = self._params(tuner)
        full = {}
        for n, p in params:
            t = acc.param(p)
            t.grad = grads[n] if grads is not None else torch.zeros_like(t)
            full[n] = t
        view = _FullView(full)
        end = cfg.total_step - cfg.tfinal
        if step < end:
            budget, pattern = alloc.update_and_allocate(view, step)
            if pattern:
                cfg.rank_pattern = self._agree(acc, pattern, alloc, view)
        elif step == end or cfg.rank_pattern is None:
            budget, pattern = alloc.update_and_allocate(view, step, force_mask=True)
            cfg.rank_pattern = self._agree(acc, pattern, alloc, view)
            alloc.reset_ipt()
        else:
            budget = alloc.target_bgt
            alloc.mask_using_rank_pattern(view, cfg.rank_pattern)
        for n, p in params:
            if ".lora_E." in n or n.startswith("lora_E."):
                acc.set_param(p, full[n])
        rank = sum(sum(v) for v in cfg.rank_pattern.values()) if cfg.rank_pattern else alloc.init_bgt
        return int(budget), int(rank)

    def _agree(self, acc: _Access, pattern: dict, alloc, view: _FullView) -> dict:
        """Rank 0's pattern on every rank; counts (and repairs) any rank that computed another."""
        if acc.strategy.world_size <= 1:
            return pattern
        ref = acc.strategy.broadcast(pattern, src=0)
        if ref != pattern:
            self.divergences += 1
            alloc.mask_using_rank_pattern(view, ref)
        return ref

    # ------------------------------------------------------------- checkpoint
    @property
    def state_key(self) -> str:
        return "AdaLoraAllocator"  # fixed (subclasses too): export looks the rank pattern up by it

    def state_dict(self) -> dict:
        if self._module is None:
            return {}
        tuner = self._tuner(self._module)
        alloc, cfg = tuner.rankallocator, self._config(tuner)
        state: dict = {"rank_pattern": cfg.rank_pattern, "total_step": cfg.total_step}
        for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            state[key] = {n: t.detach().cpu() for n, t in getattr(alloc, key).items()}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        if self._module is not None:
            self._apply_state(state_dict)
        else:
            self._pending = dict(state_dict)

    def _apply_state(self, state: dict) -> None:
        """Resume: the rank pattern and the importance EMAs the schedule had reached."""
        tuner = self._tuner(self._module)
        self._config(tuner).rank_pattern = state.get("rank_pattern")
        alloc = tuner.rankallocator
        params = self._params(tuner)
        device = params[0][1].device if params else torch.device("cpu")  # saved on CPU; scores live with the grads
        for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            setattr(alloc, key, {n: t.to(device).clone() for n, t in (state.get(key) or {}).items()})
        self._last_step = None  # the restored global_step is read at the next batch end


def rank_pattern_from_checkpoint(checkpoint: dict) -> Optional[dict]:
    """The AdaLoRA rank pattern a run's checkpoint holds (None when it has none)."""
    state = (checkpoint.get("callbacks") or {}).get("AdaLoraAllocator")
    return state.get("rank_pattern") if isinstance(state, dict) else None
