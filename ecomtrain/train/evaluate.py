"""``ecomtrain eval RUN_DIR``: score a run's checkpoint on val or test."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

from ..config import RecipeError, load_recipe


def find_checkpoint(run_dir: Path, ckpt: str) -> Path:
    from .checkpointing import resolve_checkpoint

    return resolve_checkpoint(run_dir, ckpt)


def evaluate(run_dir: str, split: str = "test", ckpt: str = "best", overrides: Optional[list[str]] = None,
             against: Optional[str] = None) -> dict:
    """Metrics of ``ckpt`` on ``split``; with ``against`` (another run folder, checkpoint or export
    over the same catalog) also the agreement of the two models' top-K lists (run consistency)."""
    rd = Path(run_dir)
    if not (rd / "recipe.yaml").is_file():  # checked before the heavy imports: a wrong folder answers at once
        raise RecipeError(f"{rd}: not a run directory (no recipe.yaml)")
    cfg = load_recipe(rd / "recipe.yaml", overrides or [])

    import lightning as L

    from ..data.build import load_manifest
    from .checkpointing import consolidate_deepspeed, is_deepspeed_checkpoint, safe_load
    from .datamodule import ShardDataModule
    from .errors import CheckpointError
    from .module import module_for_dataset
    from .strategies import resolve_accelerator

    path = find_checkpoint(rd, ckpt)
    run_split = "validate" if split == "val" else "test"
    out: dict = {}
    with tempfile.TemporaryDirectory() as td:
        load = path
        if is_deepspeed_checkpoint(path):
            # a DeepSpeed folder (ZeRO-1/2/3, any world size) -> one fp32 file a single process can load
            load = consolidate_deepspeed(path, Path(td) / "consolidated.ckpt")  # read weights-only
        elif path.is_dir():
            raise CheckpointError(f"{path}: a folder but not a DeepSpeed checkpoint (no 'latest' file)")
        # weights-only, before Lightning touches it: a crafted or foreign file fails here in one line
        state = safe_load(load)
        if not isinstance(state, dict) or "state_dict" not in state:
            raise CheckpointError(f"{path}: not an ecomtrain checkpoint (no 'state_dict')")
        del state
        manifest = load_manifest(cfg.data.path)
        import sys

        # stdout: the metrics JSON only; weights come from the checkpoint, so no text init
        module = module_for_dataset(cfg, manifest, log=lambda *a: print(*a, file=sys.stderr), init_from_text=False)
        dm = ShardDataModule(cfg, module.task, manifest)
        trainer = L.Trainer(
            accelerator=resolve_accelerator(cfg.trainer), devices=1, logger=False, enable_progress_bar=False,
            enable_model_summary=False, precision=cfg.trainer.precision,
        )
        run = getattr(trainer, run_split)
        for res in run(module, datamodule=dm, ckpt_path=str(load), verbose=False, weights_only=True):
            out.update({k: float(v) for k, v in res.items()})
    if against:
        out.update(_run_agreement(rd, path, against, cfg, manifest, split, overrides))
    out["eval/exclude_seen"] = bool(cfg.eval.exclude_seen)
    out["eval/checkpoint"] = str(path)
    return dict(sorted(out.items()))


def _run_agreement(rd: Path, path: Path, against: str, cfg, manifest: dict, split: str, overrides) -> dict:
    from ..consistency import run_agreement
    from ..data.stream import _iter_shard
    from ..serve.recommend import Recommender

    hist = [s["items"] for sh in manifest["splits"][split]["shards"] for s in _iter_shard(Path(cfg.data.path) / sh["name"])]
    a = Recommender.from_pretrained(rd, ckpt=str(path), device="cpu", overrides=overrides)
    b = Recommender.from_pretrained(against, device="cpu", overrides=overrides)
    k = cfg.eval.consistency_k
    return {f"{split}/consistency/runs/{key}": v for key, v in run_agreement(a, b, hist, k).items()}
