"""Work-arounds for peft under DeepSpeed ZeRO-3 on a CPU accelerator (CI's 2-process gloo runs).

peft's ``TrainableTokensLayer._collect_token_weights`` (peft 0.21) gathers the
item-token rows of the ZeRO-3-partitioned embedding on rank 0 and broadcasts
them, but allocates the receive buffer with ``torch.device("cuda", ...)``
("right now, only CUDA is implemented"), so on CPU every rank but 0 fails with
"Torch not compiled with CUDA enabled". The replacement below is the same
algorithm with the buffer on the weight's own device; it is installed only
while ``apply_finetune_method`` runs and only when CUDA is unavailable.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


def _collect_token_weights_any_device(self, weight: torch.Tensor, rows, embed_dim: int) -> torch.Tensor:
    import torch.distributed as dist
    from peft.utils.integrations import gather_params_ctx

    src_rank = 0
    with gather_params_ctx([weight], modifier_rank=None):
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != src_rank:
            token_weights = torch.empty((len(rows), embed_dim), dtype=weight.dtype, device=weight.device)
        else:
            token_weights = weight[rows].clone()
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(token_weights, src=src_rank)
    return token_weights


@contextmanager
def cpu_safe_peft() -> Iterator[None]:
    if torch.cuda.is_available():
        yield
        return
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    original = TrainableTokensLayer._collect_token_weights
    TrainableTokensLayer._collect_token_weights = _collect_token_weights_any_device
    try:
        yield
    finally:
        TrainableTokensLayer._collect_token_weights = original
