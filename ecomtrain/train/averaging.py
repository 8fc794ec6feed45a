"""``trainer.weight_averaging``: an EMA or SWA of the weights, on Lightning's ``WeightAveraging``.

Lightning's callback keeps an ``AveragedModel`` beside the module, swaps the average in for each
validation (so early stopping and the best checkpoint judge the average), writes the average as
the checkpoint's ``state_dict`` (the live weights go to ``current_model_state``, restored on
resume) and copies the average into the module when training ends. This subclass adds what the
runner needs around it:

- only parameters are averaged and swapped; buffers (item text tables, index maps, a cold
  head's share) are constants of the run that follow the live module;
- after ``fit`` the average is dropped, so the final ``validate``/``test`` and ``recommend``/
  ``export`` load a checkpoint's ``state_dict`` (the average) as it is. (Lightning's callback
  would restore ``current_model_state``, the live weights, into a test run.)
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.callbacks import WeightAveraging


class RecipeWeightAveraging(WeightAveraging):
    """``kind='ema'``: average updated after every optimizer step with ``decay``; ``kind='swa'``:
    equal-weight average of the weights at the end of each epoch from ``start_epoch`` on."""

    def __init__(self, kind: str, decay: float = 0.999, start_epoch: int = 0) -> None:
        from torch.optim.swa_utils import get_ema_multi_avg_fn

        if kind not in ("ema", "swa"):
            raise ValueError(f"trainer.weight_averaging.kind: {kind!r} is not ema or swa")
        kwargs: dict[str, Any] = {"multi_avg_fn": get_ema_multi_avg_fn(decay)} if kind == "ema" else {}
        super().__init__(use_buffers=False, **kwargs)
        self.kind, self.decay, self.start_epoch = kind, decay, start_epoch

    def setup(self, trainer, pl_module, stage: str) -> None:
        import warnings

        with warnings.catch_warnings():
            # our configure_model builds the whole model (sharding is refused for averaging in the recipe)
            warnings.filterwarnings("ignore", message=".*WeightAveraging callback with a model that overrides the configure_model.*")
            super().setup(trainer, pl_module, stage)

    def should_update(self, step_idx=None, epoch_idx=None) -> bool:
        if self.kind == "ema":
            return step_idx is not None
        return epoch_idx is not None and epoch_idx >= self.start_epoch

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            self._average_model = None  # the module holds the average now (on_train_end); checkpoints hold it too

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self._average_model is None:
            return  # validate/test/predict: the checkpoint's state_dict is the average, already loaded
        super().on_load_checkpoint(trainer, pl_module, checkpoint)

    def _swap_models(self, pl_module) -> None:
        assert self._average_model is not None
        with torch.no_grad():
            for avg, cur in zip(self._average_model.module.parameters(), pl_module.parameters()):
                tmp = avg.detach().clone()
                avg.copy_(cur.detach())
                cur.copy_(tmp)

    def _copy_average_to_current(self, pl_module) -> None:
        assert self._average_model is not None
        with torch.no_grad():
            for avg, cur in zip(self._average_model.module.parameters(), pl_module.parameters()):
                cur.copy_(avg.detach())

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self._average_model is not None:
            # buffers are the live module's: copy them over so the saved average is a complete, current model
            with torch.no_grad():
                for avg, cur in zip(self._average_model.module.buffers(), pl_module.buffers()):
                    if avg.shape == cur.shape:
                        avg.copy_(cur)
        super().on_save_checkpoint(trainer, pl_module, checkpoint)


def make_weight_averaging(cfg) -> list:
    """The callback for ``cfg.trainer.weight_averaging`` (an empty list when off)."""
    wa = cfg.trainer.weight_averaging
    if wa.kind == "none":
        return []
    return [RecipeWeightAveraging(wa.kind, decay=wa.decay, start_epoch=wa.start_epoch)]


__all__ = ["RecipeWeightAveraging", "make_weight_averaging"]
