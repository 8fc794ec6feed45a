"""Recipe -> Lightning strategy (topology lives here, not in model code).

    trainer.strategy.name: auto | single | ddp | deepspeed   (+ zero_stage 1|2|3, offload, deepspeed_config)

One code path for CPU and CUDA: the process-group backend follows the
accelerator (gloo on CPU, nccl on CUDA). Lightning's ``DeepSpeedStrategy``
refuses a CPU accelerator, but DeepSpeed itself runs on CPU (its CPU
accelerator uses gloo), so ``_DeepSpeed`` below skips that check and gives
each rank ``cpu:<local_rank>`` as its device; with it ZeRO-1/2/3 run for real
in the 2-process CPU tests (tests/test_dist.py).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Iterator, Optional

from ..config import TrainerConfig


def resolve_accelerator(tc: TrainerConfig) -> str:
    import torch

    if tc.accelerator in ("gpu", "cuda"):
        return "gpu"
    if tc.accelerator == "cpu":
        return "cpu"
    return "gpu" if torch.cuda.is_available() else "cpu"


def cpu_has_bf16_kernels() -> bool:
    """Whether oneDNN has bf16 kernels on this CPU (AVX512 and newer); False on AVX2 or a build without oneDNN."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cpu_precision_warning(precision: str, accelerator: str) -> Optional[str]:
    """A warning when bf16 runs on a CPU where oneDNN has no bf16 kernels (below AVX512, e.g. AVX2):
    autocast then emulates every bf16 matmul: on an AVX2 CPU, one thread, a matmul took 8.5x and a training step
    of SmolLM2-shaped layers 11x the fp32 time (bench/cpu_precision.py, bench/results/cpu_precision.json).
    The recipe is kept as written; the warning names the key to change."""
    if accelerator != "cpu" or not precision.startswith("bf16") or cpu_has_bf16_kernels():
        return None
    import torch

    cap = torch.backends.cpu.get_cpu_capability()
    return (f"trainer.precision={precision} on a CPU without native bf16 ({cap}): every bf16 matmul is emulated "
            "(a training step measured 11x slower than fp32 on AVX2); set trainer.precision=32 for CPU runs")


def deep_merge(base: dict, extra: dict) -> dict:
    """``extra`` on top of ``base``; nested dicts merge, anything else replaces."""
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def deepspeed_config(tc: TrainerConfig, micro_batch_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict for a recipe (before Lightning adds precision,
    gradient_accumulation_steps and gradient_clipping from the Trainer flags)."""
    sc = tc.strategy
    if sc.offload_params and sc.zero_stage != 3:
        from ..config import RecipeError

        raise RecipeError("trainer.strategy.offload_params: parameter offload needs zero_stage: 3")
    zero: dict[str, Any] = {"stage": sc.zero_stage, "contiguous_gradients": True, "overlap_comm": False}
    if sc.offload_optimizer:
        zero["offload_optimizer"] = {"device": sc.offload_device, "nvme_path": sc.nvme_path, "pin_memory": False}
    if sc.offload_params:
        zero["offload_param"] = {"device": sc.offload_device, "nvme_path": sc.nvme_path, "pin_memory": False}
    cfg: dict[str, Any] = {
        "zero_optimization": zero,
        # the optimizer is the recipe's torch AdamW (configure_optimizers); DeepSpeed's own CPU Adam
        # would need its C++ op compiled, so allow the torch one under offload too
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        # set explicitly: Lightning's guess reads DataLoader.batch_sampler, which a streaming loader lacks
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "steps_per_print": 10**9,  # Lightning/W&B do the logging
        "wall_clock_breakdown": False,
    }
    return deep_merge(cfg, sc.deepspeed_config)


def _deepspeed_strategy_cls():
    import torch
    from lightning.pytorch.accelerators.cuda import CUDAAccelerator
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

    class _DeepSpeed(DeepSpeedStrategy):
        """DeepSpeedStrategy that also runs on a CPU accelerator (gloo)."""

        def setup_environment(self) -> None:
            if isinstance(self.accelerator, CUDAAccelerator):
                return super().setup_environment()
            # skip DeepSpeedStrategy's CUDA-only check; DDPStrategy's setup still calls setup_distributed
            DDPStrategy.setup_environment(self)

        def setup_distributed(self) -> None:
            if isinstance(self.accelerator, CUDAAccelerator):
                return super().setup_distributed()
            # as DeepSpeedStrategy.setup_distributed, minus the CUDA device-index check
            from lightning.fabric.utilities.seed import reset_seed

            reset_seed()
            self.set_world_ranks()
            self._init_deepspeed_distributed()

        @contextmanager
        def model_sharded_context(self) -> Iterator[None]:
            if not self.zero_stage_3:
                with super().model_sharded_context():
                    yield
                return
            # Lightning's zero.Init would partition the HF weights before transformers initialises
            # them (IndexError on the padding row). Registering the config with transformers instead
            # makes from_config/from_pretrained run zero.Init themselves with ZeRO-3-aware init.
            from transformers.integrations import HfDeepSpeedConfig

            self._init_config_if_needed()
            self._hf_ds_config = HfDeepSpeedConfig(self.config)  # transformers keeps only a weakref
            yield

        @property
        def root_device(self) -> torch.device:
            dev = self.parallel_devices[self.local_rank]
            # deepspeed.initialize reads root_device.index as the rank's device; "cpu" has none
            return torch.device("cpu", self.local_rank) if dev.type == "cpu" else dev

    return _DeepSpeed


def build_strategy(tc: TrainerConfig, accelerator: str, micro_batch_size: int = 1):
    sc = tc.strategy
    timeout = timedelta(seconds=sc.process_group_timeout_s)
    backend = "gloo" if accelerator == "cpu" else "nccl"
    if sc.name in ("auto", "single"):
        return "auto"
    if sc.name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(process_group_backend=backend, timeout=timeout, find_unused_parameters=sc.find_unused_parameters)
    if sc.name == "deepspeed":
        cls = _deepspeed_strategy_cls()
        return cls(config=deepspeed_config(tc, micro_batch_size), process_group_backend=backend, timeout=timeout)
    raise ValueError(f"trainer.strategy.name: unknown strategy '{sc.name}'")


def is_deepspeed(strategy: Optional[object]) -> bool:
    return type(strategy).__name__ == "_DeepSpeed" or "DeepSpeed" in type(strategy).__name__
