"""LightningDataModule over built WebDataset shards (see data/stream.py).

Resume: the datamodule's state in a checkpoint is (epoch, batches consumed in that
epoch on this rank). On restore the train stream fast-forwards past exactly those
batches (``ShardStream.skip``; the order is a pure function of seed, epoch, rank and
worker), so a resumed run sees the same batches at the same steps as an
uninterrupted one.
"""

from __future__ import annotations

import multiprocessing
import queue
import threading
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from ..config import Recipe
from ..data.build import load_manifest
from ..data.stream import EpochLoader, ShardStream


class _ResumableLoader(EpochLoader):
    """EpochLoader whose epoch and skip are read at the first batch, not when iter() is called.

    Under DeepSpeed, Lightning creates the train iterator *before* it restores the checkpoint
    (the strategy restores after setup), so the resume position must still be settable then.
    ``wait_seconds`` accumulates the time the training loop spent waiting in ``next()``
    (read by train/throughput.py for the data-wait fraction).

    Read-ahead across epochs (in-process reading with ``prefetch`` > 0): when an epoch's last batch
    is handed out, the next epoch's reader starts at once in its prefetch thread -- filling the
    shuffle buffer and collating the first batches while Lightning closes the epoch and validates
    -- instead of when the training loop asks for that epoch's first batch. It is the very iterator
    the next epoch would create (same dataset, epoch, skip 0, loader generator), so the batch
    order is unchanged; any repositioning (a resume's epoch/skip) discards it.
    """

    wait_seconds = 0.0
    prefetch = 0
    read_ahead = True
    _ahead: "tuple[int, _Prefetcher] | None" = None

    def __iter__(self):
        def lazy():
            it = self._take_ahead()
            if it is None:
                self.dataset.set_epoch(self._next_epoch)
                it = DataLoader.__iter__(self)  # workers (if any) copy the dataset here
                if self.num_workers > 0:
                    # the workers took skip with their copy; the main-process copy must not skip again
                    # next epoch. (Without workers ShardStream clears skip itself on its first batch.)
                    self.dataset.skip = 0
                if self.num_workers == 0 and self.prefetch > 0:
                    it = _Prefetcher(it, self.prefetch)
            self._next_epoch += 1
            n, first = 0, 0
            try:
                while True:
                    t0 = time.perf_counter()
                    try:
                        batch = next(it)
                    except StopIteration:
                        return
                    self.wait_seconds += time.perf_counter() - t0
                    if n == 0:  # the stream applied (and cleared) a resume skip when it started
                        first = int(getattr(self.dataset, "applied_skip", 0) or 0) if self.num_workers == 0 else 0
                    n += 1
                    # Lightning knows len(loader) and never asks past the last batch: the read-ahead
                    # starts when that batch is handed out
                    if first + n == len(self.dataset):
                        self._start_ahead()
                    yield batch
            finally:
                if isinstance(it, _Prefetcher):
                    it.close()

        return lazy()

    def _start_ahead(self) -> None:
        if not (self.read_ahead and self.num_workers == 0 and self.prefetch > 0 and self.dataset.skip == 0):
            return
        self.drop_ahead()
        epoch = self._next_epoch
        self.dataset.set_epoch(epoch)
        self._ahead = (epoch, _Prefetcher(DataLoader.__iter__(self), self.prefetch))

    def _take_ahead(self) -> "_Prefetcher | None":
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return None
        epoch, reader = ahead
        if epoch == self._next_epoch and self.dataset.skip == 0:
            self.dataset.set_epoch(epoch)
            return reader
        reader.close()
        return None

    def drop_ahead(self) -> None:
        """Discard a read-ahead epoch (repositioning, teardown); stops its thread."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead[1].close()

    def seek(self, position: dict) -> None:
        self.drop_ahead()
        super().seek(position)


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


_DONE = object()


class _Prefetcher:
    """Read and collate the next ``depth`` batches in a background thread (``data.prefetch_batches``).

    Without loader workers, decoding and collating happen between optimizer steps and the
    training loop waits for them. torch releases the GIL inside its kernels, so a thread can
    prepare batch n+1 while batch n trains, at no extra process or core. The order is
    unchanged (one producer, FIFO), so resume and determinism are unaffected; an error in the
    reader is re-raised in the training loop; ``close()`` (end of epoch, max_steps, an
    exception) stops the thread. The thread starts at construction (read-ahead relies on it).
    """

    def __init__(self, it, depth: int):
        self._q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._it = it
        self._done = False
        self._worker = threading.Thread(target=self._produce, name="ecomtrain-prefetch", daemon=True)
        self._worker.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            for batch in self._it:
                if not self._put(batch):
                    return
            self._put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self._put(_Failed(exc))

    def __iter__(self):
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        item = self._q.get()
        if item is _DONE:
            self._done = True
            raise StopIteration
        if isinstance(item, _Failed):
            self._done = True
            raise item.exc
        return item

    def close(self) -> None:
        self._stop.set()
        self._worker.join(timeout=10)


class ShardDataModule(L.LightningDataModule):
    def __init__(self, cfg: Recipe, task, manifest: dict | None = None):
        super().__init__()
        self.cfg = cfg
        self.task = task
        self.root = Path(cfg.data.path)
        self.manifest = manifest or load_manifest(self.root)
        self._train: ShardStream | None = None
        self._resume: dict | None = None
        self._loader: _ResumableLoader | None = None

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        # batches are collated on the CPU: on a CPU device Lightning's generic move (a recursive
        # walk over the batch, ~0.2 ms a step) has nothing to do
        if device.type == "cpu":
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def _topology(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    # -- resume state (Lightning stores it in every checkpoint)
    def state_dict(self) -> dict:
        t = self.trainer
        if t is None:
            return {}
        # batches this rank has taken from the current epoch's stream (the one just trained included:
        # checkpoints are written from on_train_batch_end, before Lightning counts it completed)
        done = t.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": int(t.current_epoch), "batches_in_epoch": int(done), "world_size": int(t.world_size)}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self._resume = dict(state)
        if self._loader is not None:
            # DeepSpeed restores after setup, when the train loader already exists: move it now
            self._apply_resume(self._loader)

    def _apply_resume(self, loader: "_ResumableLoader") -> None:
        st, self._resume = self._resume, None
        loader.drop_ahead()
        if not st or self.trainer is None or self.trainer.state.fn != "fit":
            return
        world = self._topology()[1]
        if int(st.get("world_size", world)) != world:
            raise RuntimeError(
                f"resume: the checkpoint was written by {st['world_size']} ranks but this run has {world}; "
                "the data position inside the epoch cannot be mapped (resume with the same devices x num_nodes)"
            )
        epoch, skip = int(st.get("epoch", 0)), int(st.get("batches_in_epoch", 0))
        if skip >= len(loader.dataset):
            epoch, skip = epoch + 1, 0  # the checkpoint closed the epoch: the next one starts fresh
        loader._next_epoch = epoch
        loader.dataset.skip = skip

    def train_dataloader(self):
        d = self.cfg.data
        rank, world = self._topology()
        self._train = ShardStream(
            self.root, "train", self.manifest, self.task.collate_train, d.batch_size,
            mode="train", rank=rank, world_size=world, num_workers=d.num_workers,
            shuffle_buffer=d.shuffle_buffer, seed=self.cfg.run.seed, max_corrupt_fraction=d.max_corrupt_fraction,
            fields=self.task.train_fields(),
        )
        first_epoch = self.trainer.current_epoch if self.trainer is not None else 0
        # a DataLoader iterator draws its worker base seed from the *global* torch RNG (one int64 per
        # epoch), which would shift dropout masks after a resume; a private generator keeps it out
        gen = torch.Generator().manual_seed(self.cfg.run.seed * 1009 + rank)
        # worker processes start from a fork server, not by forking this process: this process runs
        # threads (W&B's, tqdm's monitor, the collective backends'), and a fork taken while one of them
        # holds an interpreter lock leaves the worker hung before it runs (seen: a ZeRO-3 rank waiting
        # forever for its first batch). The dataset and collate are pickled to the workers instead.
        ctx = "forkserver" if d.num_workers > 0 and "forkserver" in multiprocessing.get_all_start_methods() else None
        self._loader = _ResumableLoader(self._train, num_workers=d.num_workers, first_epoch=first_epoch, generator=gen,
                                        multiprocessing_context=ctx)
        self._loader.prefetch = d.prefetch_batches
        if self._resume is not None:
            self._apply_resume(self._loader)
        return self._loader

    def teardown(self, stage: str) -> None:
        if self._loader is not None:
            self._loader.drop_ahead()  # a read-ahead of the epoch after the last one

    def on_exception(self, exception: BaseException) -> None:
        self.teardown("exception")  # a run that fails after an epoch end leaves no reader thread behind

    def _eval_loader(self, split: str):
        d = self.cfg.data
        rank, world = self._topology()
        ds = ShardStream(
            self.root, split, self.manifest, self.task.collate_eval, d.eval_batch_size,
            mode="eval", rank=rank, world_size=world, max_corrupt_fraction=d.max_corrupt_fraction,
            pad_sample=self.task.pad_sample,
        )
        # eval streams are read in the main process: each sample exactly once
        return EpochLoader(ds, num_workers=0)

    def val_dataloader(self):
        return self._eval_loader("val")

    def test_dataloader(self):
        return self._eval_loader("test")
