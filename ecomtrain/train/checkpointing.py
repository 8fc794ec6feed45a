"""Checkpoints that are never half-written, exact resume, and reading any checkpoint back.

Layout of RUN_DIR/checkpoints (a DeepSpeed checkpoint is a folder, any other a file):

    step<N>.ckpt           periodic (trainer.checkpoint.every_n_steps), newest keep_last kept
    best-epoch<E>-step<N>.ckpt   best on the task's monitor (val/ndcg@10 when eval.ks has 10)
    last.ckpt -> ...       symlink to the newest complete checkpoint
    .tmp-<name>            being written; never read, removed on the next save

Atomicity: every rank writes into ``.tmp-<name>``; after a barrier rank 0
``os.replace``-s it onto ``<name>`` (a rename within one folder is atomic on
POSIX, for files and for folders), then moves the ``last.ckpt`` symlink the same
way. A crash at any point leaves either the previous complete checkpoint or the
new one, never a partial one under a real name. Multi-node runs need RUN_DIR on a
shared filesystem (as DeepSpeed itself does for its sharded checkpoints).

Exact resume adds to Lightning's checkpoint (model, optimizer, scheduler, loop
progress) the RNG state of every rank (``ResumeState``) and the position inside
the epoch (``ShardDataModule.state_dict``).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

TMP_PREFIX = ".tmp-"
_STEP = re.compile(r"step(\d+)")


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish(tmp: Path, final: Path) -> None:
    """Atomically put the complete ``tmp`` (file or folder) at ``final``."""
    if tmp.is_file():
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)  # atomic overwrite of a file
    else:
        # os.replace cannot overwrite a non-empty folder: move the old one aside first (the
        # window in between only lacks this name; last.ckpt still points at a complete one)
        old = final.with_name(TMP_PREFIX + "old-" + final.name)
        _remove(old)
        if final.exists() and not final.is_symlink():
            os.replace(final, old)
        elif final.is_symlink():
            final.unlink()
        os.replace(tmp, final)
        _remove(old)
    _fsync_dir(final.parent)


def atomic_symlink(target: Path, link: Path) -> None:
    tmp = link.with_name(TMP_PREFIX + link.name)
    _remove(tmp)
    os.symlink(os.path.relpath(target, link.parent), tmp)
    if link.exists() and not link.is_symlink() and link.is_dir():
        shutil.rmtree(link)
    os.replace(tmp, link)
    _fsync_dir(link.parent)


def all_finite(trainer) -> bool:
    """Whether every parameter on every rank is finite (ZeRO-3 shards checked locally)."""
    bad = False
    for p in trainer.lightning_module.parameters():
        t = getattr(p, "ds_tensor", None)  # ZeRO-3: this rank's partition
        t = p.data if t is None else t
        if t.numel() and not torch.isfinite(t).all():
            bad = True
            break
    return not trainer.strategy.reduce_boolean_decision(bad, all=False)


class AtomicCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose writes go to a temporary name and are renamed when complete,
    which moves ``last.ckpt`` (a symlink) after each, and which refuses to write weights
    holding NaN/inf. ``save_last=True`` here means: make sure the newest state is on disk
    at each validation and at the end of training (as ``last-step<N>.ckpt``, one kept)."""

    def __init__(self, *args, link_last: bool = True, **kw):
        # same name = same state: overwrite (atomically) instead of writing name-v1
        kw.setdefault("enable_version_counter", False)
        super().__init__(*args, **kw)
        self.link_last = link_last
        self._last_only: Optional[Path] = None

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        final = Path(filepath)
        tmp = final.with_name(TMP_PREFIX + final.name)
        if not all_finite(trainer):
            raise RuntimeError(
                f"refusing to write checkpoint {final.name}: the model holds NaN/inf values at step "
                f"{trainer.global_step} (see trainer.nonfinite in the recipe)"
            )
        if trainer.is_global_zero:
            final.parent.mkdir(parents=True, exist_ok=True)
            _remove(tmp)
        trainer.strategy.barrier("ecomtrain.ckpt.pre")
        trainer.save_checkpoint(str(tmp), self.save_weights_only)  # every rank writes (DeepSpeed shards); ends with a barrier
        if trainer.is_global_zero:
            publish(tmp, final)
            if self.link_last:
                atomic_symlink(final, final.with_name("last.ckpt"))
        trainer.strategy.barrier("ecomtrain.ckpt.post")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(self)

    def _save_last_checkpoint(self, trainer, monitor_candidates) -> None:
        if not self.save_last or self._should_skip_saving_checkpoint(trainer):
            return
        ck = Path(self.dirpath)
        if any(step_of(p) == trainer.global_step for p in complete_checkpoints(ck)):
            return  # the newest state is already on disk (and last.ckpt points at it)
        final = ck / f"last-step{trainer.global_step}.ckpt"
        prev, self._last_only = self._last_only, final
        self._save_checkpoint(trainer, str(final))
        if prev is not None and prev != final and self._should_remove_checkpoint(trainer, str(prev), str(final)):
            self._remove_checkpoint(trainer, str(prev))

    def on_train_end(self, trainer, pl_module) -> None:
        # max_steps can end a run mid-epoch, after the last validation: keep that state too
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    @staticmethod
    def _link_checkpoint(trainer, filepath: str, linkpath: str) -> None:
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            atomic_symlink(Path(filepath), Path(linkpath))
        trainer.strategy.barrier()


class ResumeState(Callback):
    """Saves the RNG state of every rank (python, numpy, torch) and restores each rank's own.

    Dropout draws from the torch RNG and ranks draw different amounts (batch shapes
    differ), so one rank's state is not enough for a bit-exact continuation.
    """

    def __init__(self):
        self._pending: Optional[dict] = None

    @staticmethod
    def _states() -> dict:
        import numpy as np

        name, keys, pos, has_gauss, gauss = np.random.get_state()
        # numpy arrays would make the checkpoint unreadable with torch.load(weights_only=True)
        npst = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
        st = {"python": random.getstate(), "numpy": npst, "torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            st["cuda"] = torch.cuda.get_rng_state()
        return st

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        mine = self._states()
        if trainer.world_size > 1:
            import torch.distributed as dist

            allst: list = [None] * trainer.world_size
            dist.all_gather_object(allst, mine)
        else:
            allst = [mine]
        checkpoint["ecomtrain_rng"] = allst

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        allst = checkpoint.get("ecomtrain_rng")
        if not allst:
            return
        if len(allst) != trainer.world_size:
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(
                f"checkpoint holds RNG states of {len(allst)} ranks but this run has {trainer.world_size}; "
                "continuing without restoring RNG (resume is not bit-exact)"
            )
            return
        self._pending = allst[trainer.global_rank]

    def on_train_start(self, trainer, pl_module) -> None:
        # restore as late as possible: model building and loader setup may draw numbers after load
        st, self._pending = self._pending, None
        if st is None:
            return
        # Defensive: make the optimizer's lr the restored scheduler's current lr, whatever the strategy's
        # optimizer restore did with param_groups (a no-op when they already agree, as measured for
        # DDP and ZeRO-2 here).
        for conf in trainer.lr_scheduler_configs:
            sched = conf.scheduler
            for group, lr in zip(sched.optimizer.param_groups, sched.get_last_lr()):
                group["lr"] = lr
        import numpy as np

        random.setstate(st["python"])
        name, keys, pos, has_gauss, gauss = st["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        torch.set_rng_state(st["torch"])
        if "cuda" in st and torch.cuda.is_available():
            torch.cuda.set_rng_state(st["cuda"])


# ----------------------------------------------------------------- finding checkpoints
def is_deepspeed_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / "latest").is_file()


def step_of(path: Path) -> int:
    m = _STEP.findall(path.name)
    return int(m[-1]) if m else -1


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints (never ``.tmp-*``), oldest step first."""
    if not ckpt_dir.is_dir():
        return []
    found = [
        p for p in ckpt_dir.iterdir()
        if not p.name.startswith(TMP_PREFIX) and not p.is_symlink() and p.name.endswith(".ckpt")
        and (p.is_file() or is_deepspeed_checkpoint(p))
    ]
    return sorted(found, key=lambda p: (step_of(p), p.name))


def find_resume(run_dir: Path) -> Optional[Path]:
    """The checkpoint ``trainer.resume=auto`` continues from: last.ckpt's target, else the newest step."""
    ck = run_dir / "checkpoints"
    last = ck / "last.ckpt"
    if last.is_symlink() and last.exists():
        return last.resolve()
    found = complete_checkpoints(ck)
    return found[-1] if found else None


def resolve_checkpoint(run_dir: Path, ckpt: str) -> Path:
    """``best``, ``last`` or a path -> an existing checkpoint (file or DeepSpeed folder)."""
    ck = run_dir / "checkpoints"
    if ckpt == "last":
        path = find_resume(run_dir) or ck / "last.ckpt"
    elif ckpt == "best":
        found = [p for p in complete_checkpoints(ck) if p.name.startswith("best-")]
        path = found[-1] if found else (find_resume(run_dir) or ck / "last.ckpt")
    else:
        path = Path(ckpt)
        if not path.exists():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        return path
    if not path.exists():
        raise FileNotFoundError(f"{run_dir}: no complete checkpoint in {ck} (--ckpt {ckpt}); the run saved none yet")
    return path


# ---------------------------------------------------------------- reading weights back
# Every checkpoint is read with torch.load(weights_only=True): tensors, plain containers and numbers
# only, so a crafted file cannot run code when unpickled. Our own checkpoints need nothing more (the
# numpy RNG state is stored as a tensor, see ResumeState); DeepSpeed's files add the few types below.
def _safe_types() -> list:
    import collections

    out: list = [collections.OrderedDict, collections.defaultdict, set, frozenset]
    try:
        # what DeepSpeed 0.19 pickles into zero_pp_rank_*_optim_states.pt besides tensors: plain
        # data classes (rebuilt field by field, no code of their own runs), found by loading
        # ZeRO-2/3 checkpoints of this repo with weights_only=True
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        out += [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    except ImportError:  # DeepSpeed not installed: no DeepSpeed checkpoints to read
        pass
    return out


def _unsafe_reason(exc: BaseException) -> str:
    text = str(exc)
    # torch names the offending global, e.g. "Unsupported global: GLOBAL posix.system"
    for line in text.splitlines():
        if "Unsupported global" in line or "Unsupported operand" in line or "unsupported" in line.lower():
            return line.strip().rstrip(".")
    return text.splitlines()[0].strip() if text else type(exc).__name__


def safe_load(path) -> Any:
    """``torch.load(path, weights_only=True)``; anything else -> one-line :class:`CheckpointError`."""
    import pickle

    from .errors import CheckpointError

    source = path  # a path, or a file object (DeepSpeed's engine hands torch.load a BytesIO)
    if isinstance(path, (str, os.PathLike)):
        path = source = Path(path)
        if path.is_file() and path.stat().st_size == 0:
            raise CheckpointError(f"{path}: empty file, not a checkpoint")
    else:
        path = getattr(source, "name", "<checkpoint stream>")
    try:
        with torch.serialization.safe_globals(_safe_types()):
            return _ORIG_LOAD(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc):
            raise CheckpointError(
                f"{path}: refused to load: the file holds code or objects beyond tensors and plain data "
                f"({_unsafe_reason(exc)}); ecomtrain reads only checkpoints it wrote"
            ) from None
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({str(exc).splitlines()[0]})") from None
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except Exception as exc:  # noqa: BLE001 (EOFError, zip errors, IndexError from a garbled pickle...)
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({first})") from None


_ORIG_LOAD = torch.load


class weights_only_loads:  # noqa: N801 (used as a context manager)
    """Within the block, every ``torch.load`` (DeepSpeed's engine and converter, and Lightning's
    converter, call it with ``weights_only=False``) goes through :func:`safe_load`."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    def __enter__(self):
        def load(f, map_location=None, *args, **kw):  # noqa: ARG001 (weights_only is fixed by safe_load)
            state = safe_load(f)
            if map_location is not None and str(map_location) != "cpu":
                state = _to_device(state, map_location)
            return state

        if self.enabled:
            torch.load = load
        return self

    def __exit__(self, *exc) -> None:
        torch.load = _ORIG_LOAD


def _to_device(obj: Any, device) -> Any:
    """Tensors of a loaded state moved to ``map_location`` (a device or its name; a callable
    map_location is DeepSpeed's keep-on-CPU ``lambda storage, loc: storage``)."""
    if callable(device):
        return obj
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, dict):
        out = obj.copy()  # keeps OrderedDict / defaultdict
        for k, v in obj.items():
            out[k] = _to_device(v, device)
        return out
    if type(obj) in (list, tuple):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def consolidate_deepspeed(ckpt_dir: Path, out_file: Path) -> Path:
    """A DeepSpeed checkpoint folder (ZeRO-1/2/3, any world size) -> one fp32 Lightning checkpoint file.
    Every file of the folder is read weights-only (see :func:`safe_load`)."""
    import contextlib
    import io

    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    with contextlib.redirect_stdout(io.StringIO()), weights_only_loads():  # it prints per tensor
        convert_zero_checkpoint_to_fp32_state_dict(str(ckpt_dir), str(out_file))
    return out_file


def load_lightning_state(path: Path) -> dict[str, Any]:
    """A checkpoint (file or DeepSpeed folder) -> dict with ``state_dict`` (fp32 for DeepSpeed) and
    ``hyper_parameters``, read weights-only: a file that would run code when unpickled, or that is
    not a checkpoint, raises :class:`~ecomtrain.train.errors.CheckpointError` (one line)."""
    from .errors import CheckpointError

    path = Path(path)
    if is_deepspeed_checkpoint(path):
        with tempfile.TemporaryDirectory() as td:
            out = consolidate_deepspeed(path, Path(td) / "consolidated.ckpt")
            state = safe_load(out)
    elif path.is_dir():
        raise CheckpointError(f"{path}: a folder but not a DeepSpeed checkpoint (no 'latest' file)")
    else:
        state = safe_load(path)
    if not isinstance(state, dict) or "state_dict" not in state:
        raise CheckpointError(f"{path}: not an ecomtrain checkpoint (no 'state_dict')")
    return state
