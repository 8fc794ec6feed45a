"""Recipe -> Lightning strategy (topology lives here, not in model code)."""

from __future__ import annotations

from ..config import TrainerConfig


def resolve_accelerator(tc: TrainerConfig) -> str:
    import torch

    if tc.accelerator in ("gpu", "cuda"):
        return "gpu"
    if tc.accelerator == "cpu":
        return "cpu"
    return "gpu" if torch.cuda.is_available() else "cpu"


def build_strategy(tc: TrainerConfig, accelerator: str):
    sc = tc.strategy
    if sc.name in ("auto", "single"):
        return "auto"
    if sc.name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(process_group_backend="gloo" if accelerator == "cpu" else "nccl")
    raise NotImplementedError(f"trainer.strategy.name '{sc.name}' is not available yet in this build")
