"""Streaming reader of built shards: split by rank and worker, equal batches.

Nothing is loaded into RAM beyond a shuffle buffer. Guarantees:

- **train** (``mode="train"``): shards are dealt to the ``world_size x
  num_workers`` readers, balanced by sample count (empty shards are skipped).
  With fewer non-empty shards than readers (a small dataset built with the
  default 5,000 samples per shard, on 2+ ranks) the split is by sample instead:
  every reader reads all shards and keeps every ``readers``-th sample (a fixed,
  disjoint share). Any dataset trains on any world size; the cost, ``readers``
  x the decoding, only arises when the split is that small.
  Every rank yields exactly ``batches_per_rank = num_samples // (world * B)``
  batches per epoch: a reader that runs out of its shards starts them again
  (reshuffled), so uneven shards can never make one rank wait for another
  (which would hang a DDP all-reduce). Order is a pure function of
  (seed, epoch, rank, worker); ``EpochLoader.position`` / ``seek``
  ({epoch, batches, seed}) resume inside an epoch in the same order.
- **eval** (``mode="eval"``): every sample is seen exactly once across ranks
  (sample ``i`` goes to rank ``i % world``); ranks with fewer samples get
  padding rows with ``weight = 0`` so all ranks run the same number of batches.
- Only ``.json`` samples (schema 1) and ``.npy`` blocks (schema 2, read with
  ``allow_pickle=False``) are decoded (:mod:`ecomtrain.data.shardio`); anything else
  (``.pyd``, ``.pickle``...) is refused: shards never carry pickle.
- An unreadable shard, or one whose size / sample count / sha256 (hashed
  while read) differs from the manifest (truncated, altered), is skipped and counted once; beyond
  ``max_corrupt_fraction`` of the shards the reader fails naming the shard.
  Each reader counts the shards it reads, so the limit applies per reader.
"""

from __future__ import annotations

import hashlib
import random
import tarfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .importers import DataError
from .shardio import ALLOWED_MEMBERS, ShardFormatError, _iter_shard, balance_shards  # noqa: F401  (re-exported)


class ShardStream(IterableDataset):
    """Yields collated batches (use with ``DataLoader(batch_size=None)``)."""

    def __init__(
        self,
        root: str | Path,
        split: str,
        manifest: dict,
        collate: Callable[[list[dict]], dict],
        batch_size: int,
        *,
        mode: str = "train",
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        shuffle_buffer: int = 0,
        seed: int = 0,
        max_corrupt_fraction: float = 0.0,
        pad_sample: Optional[dict] = None,
        fields: Optional[Iterable[str]] = None,
    ):
        self.root = Path(root)
        self.split = split
        info = manifest["splits"].get(split)
        if info is None:
            raise DataError(f"{self.root}/manifest.json: no split '{split}'")
        self.shards = info["shards"]
        self.num_samples = int(info["num_samples"])
        if self.num_samples == 0:
            raise DataError(f"{self.root}: split '{split}' is empty (0 samples); rebuild with more data or a different split")
        self.collate = collate
        self.batch_size = batch_size
        self.mode = mode
        self.rank, self.world_size = rank, world_size
        self.num_workers = max(1, num_workers)
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.max_corrupt_fraction = max_corrupt_fraction
        self.pad_sample = pad_sample
        # the sample keys ``collate`` reads (Task.train_fields); None = every key. Schema-2 blocks
        # then skip building per-sample lists nobody reads (data/shardio.py decode_block)
        self.fields = frozenset(fields) if fields is not None else None
        self.epoch = 0
        self.skip = 0  # batches to skip at the start of the next epoch (resume)
        self.corrupt_shards: list[str] = []  # names skipped as unreadable (this process)
        self.applied_skip = 0  # the skip the last in-process epoch started with
        for sh in self.shards:
            if not (self.root / sh["name"]).is_file():
                raise DataError(f"{self.root}: shard '{sh['name']}' listed in manifest.json is missing")
        if mode == "train":
            readers = self.world_size * self.num_workers
            self.assignment = balance_shards(self.shards, readers)
            # fewer non-empty shards than readers: split by sample (see the module docstring)
            self.sample_split = any(not b for b in self.assignment)
            self.batches_per_rank = self.num_samples // (self.world_size * self.batch_size)
            if self.batches_per_rank == 0:
                raise DataError(
                    f"{self.root}: split '{split}' has {self.num_samples} samples, fewer than one batch of "
                    f"{self.batch_size} per rank on {self.world_size} ranks"
                )
        else:
            per_rank = -(-self.num_samples // self.world_size)
            self.batches_per_rank = -(-per_rank // self.batch_size)

    # -- epoch / resume state
    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "skip": self.skip, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.skip = int(state["epoch"]), int(state.get("skip", 0))

    def __len__(self) -> int:
        return self.batches_per_rank

    # -- iteration
    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        if info is None:
            return 0, 1
        if info.num_workers != self.num_workers:
            raise DataError(f"ShardStream built for {self.num_workers} workers but the DataLoader has {info.num_workers}")
        return info.id, info.num_workers

    def _samples(self, shards: list[dict], rng: random.Random, cycle: bool) -> Iterator[dict]:
        bad: set[str] = set()  # a shard re-read on a later cycle is counted once
        limit = self.max_corrupt_fraction * len(self.shards)
        while True:
            order = list(shards)
            if self.mode == "train":
                rng.shuffle(order)
            yielded = False
            for sh in order:
                path = self.root / sh["name"]
                if sh["name"] in bad:
                    continue
                try:
                    # a tar cut at a member boundary reads as a shorter, "valid" tar:
                    # the manifest's byte size and sample count catch that
                    size, want = path.stat().st_size, sh.get("bytes")
                    if want is not None and size != want:
                        raise ValueError(f"{size} bytes, manifest.json says {want} (truncated?)")
                    n = 0
                    digest = hashlib.sha256() if sh.get("sha256") else None
                    for s in _iter_shard(path, digest, self.fields):
                        n += 1
                        yielded = True
                        yield s
                    if n != sh["num_samples"]:
                        raise ValueError(f"{n} samples, manifest.json says {sh['num_samples']} (truncated?)")
                    # hashed while read (no second pass): a same-size shard with other bytes
                    # fails here, after its samples went out (a run with
                    # max_corrupt_fraction=0, the default, stops on it)
                    if digest is not None and digest.hexdigest() != sh["sha256"]:
                        raise ValueError("sha256 differs from manifest.json")
                except (tarfile.TarError, OSError, ValueError, EOFError) as exc:
                    if isinstance(exc, ShardFormatError):  # pickle members, another schema version: never skipped
                        raise
                    bad.add(sh["name"])
                    self.corrupt_shards = sorted(bad)
                    if len(bad) > limit:
                        raise DataError(
                            f"{path}: unreadable shard ({type(exc).__name__}: {exc}); {len(bad)} bad shard(s) exceed "
                            f"data.max_corrupt_fraction={self.max_corrupt_fraction} of {len(self.shards)}"
                        ) from None
                    print(f"[ecomtrain] warning: skipped unreadable shard {path} ({len(bad)} so far)")
            if not cycle:
                return
            if not yielded:
                raise DataError(f"{self.root}: no readable sample in shards {[s['name'] for s in shards]}")

    def _sample_share(self, reader: int, readers: int, rng: random.Random) -> Iterator[dict]:
        """Sample-level split (fewer shards than readers), cycled: sample j of a shard belongs to reader
        (offset of the shard in manifest order + j) % readers, a fixed share disjoint from the others'."""
        shards = [s for s in self.shards if s["num_samples"] > 0]
        offsets, acc = {}, 0
        for sh in shards:
            offsets[sh["name"]], acc = acc, acc + sh["num_samples"]
        while True:
            order = list(shards)
            rng.shuffle(order)
            yielded = False
            for sh in order:
                base = offsets[sh["name"]]
                for j, s in enumerate(self._samples([sh], rng, cycle=False)):
                    if (base + j) % readers == reader:
                        yielded = True
                        yield s
            if not yielded:
                raise DataError(f"{self.root}: no readable sample for reader {reader} of {readers} in split '{self.split}'")

    def _shuffled(self, it: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        if self.shuffle_buffer <= 1:
            yield from it
            return
        buf: list[dict] = []
        for s in it:
            if len(buf) < self.shuffle_buffer:
                buf.append(s)
                continue
            j = rng.randrange(len(buf))
            buf[j], s = s, buf[j]
            yield s
        rng.shuffle(buf)
        yield from buf

    def __iter__(self) -> Iterator[dict]:
        # A generator: ``skip`` is read at the first batch, not at iter(). Under
        # DeepSpeed, Lightning restores the datamodule (which sets ``skip``) after
        # the train iterator exists; in workers the copy made at iter() is read.
        wid, nw = self._worker()
        skip, self.skip = self.skip, 0  # a resume skip applies to one epoch only
        self.applied_skip = skip
        yield from self._iterate(wid, nw, skip)

    def _iterate(self, wid: int, nw: int, skip_total: int) -> Iterator[dict]:
        if self.mode == "train":
            # The DataLoader takes batches from workers round-robin starting at
            # worker 0. After skipping k batches the next one belongs to the
            # reader role k % nw, so worker w plays role (w + k) % nw: a resumed
            # epoch continues in exactly the uninterrupted order.
            role = (wid + skip_total) % nw
            reader = self.rank * nw + role
            rng = random.Random(hash((self.seed, self.epoch, reader)) & 0xFFFFFFFF)
            # this role's share of the rank's batches
            n_batches = self.batches_per_rank // nw + (1 if role < self.batches_per_rank % nw else 0)
            if self.sample_split:
                stream = self._shuffled(self._sample_share(reader, self.world_size * nw, rng), rng)
            else:
                stream = self._shuffled(self._samples(self.assignment[reader], rng, cycle=True), rng)
            skip = skip_total // nw + (1 if role < skip_total % nw else 0)
            for b in range(n_batches):
                batch = [next(stream) for _ in range(self.batch_size)]
                if b < skip:
                    continue
                yield self.collate(batch)
            return
        # eval: sample-level split, padded to the same batch count on every rank
        reader, readers = self.rank * nw + wid, self.world_size * nw
        rng = random.Random(0)
        mine = (s for i, s in enumerate(self._samples(self.shards, rng, cycle=False)) if i % readers == reader)
        n_batches = self.batches_per_rank // nw + (1 if wid < self.batches_per_rank % nw else 0)
        for _ in range(n_batches):
            batch = []
            for s in mine:
                batch.append(s)
                if len(batch) == self.batch_size:
                    break
            weights = [1.0] * len(batch)
            while len(batch) < self.batch_size and self.pad_sample is not None:
                batch.append(self.pad_sample)
                weights.append(0.0)
            if not batch:  # no pad sample: this rank has nothing more (single-process eval only)
                return
            out = self.collate(batch)
            out["weight"] = torch.tensor(weights)
            yield out


class EpochLoader(DataLoader):
    """A DataLoader that tells its ShardStream which epoch starts at each iter(),
    and knows its position inside the epoch for mid-epoch resume.

    Lightning only calls ``set_epoch`` on samplers; an IterableDataset copied
    into workers would otherwise replay epoch 0 forever. ``position()`` =
    {epoch, batches handed out in it, seed}; ``seek(position)`` makes the next
    iter() continue that epoch after those batches, in the uninterrupted order
    (any number of workers). Setting ``dataset.skip`` and ``_next_epoch``
    directly (as train/datamodule.py does from its checkpoint state) works too.
    These are deliberately not named state_dict/load_state_dict: Lightning
    would then also save and restore the loader itself, a second resume path
    next to the datamodule's.
    """

    def __init__(self, dataset: ShardStream, num_workers: int = 0, first_epoch: int = 0, **kw):
        super().__init__(dataset, batch_size=None, num_workers=num_workers, persistent_workers=False, **kw)
        self._next_epoch = first_epoch
        self._epoch = first_epoch
        self._consumed = 0

    def __iter__(self):
        self._epoch = self._next_epoch
        self.dataset.set_epoch(self._epoch)
        self._next_epoch += 1
        self._consumed = self.dataset.skip
        it = super().__iter__()  # workers copy the dataset, skip included, here
        base = None
        if self.num_workers > 0:
            base, self.dataset.skip = self.dataset.skip, 0  # the copies skip; this one must not next epoch
        return self._count(it, base)

    def _count(self, it, base):
        first = True
        for batch in it:
            if first:  # in-process the stream read (and cleared) skip at this first batch
                self._consumed, first = (base if base is not None else self.dataset.applied_skip), False
            self._consumed += 1
            yield batch

    def position(self) -> dict:
        return {"epoch": self._epoch, "batches": self._consumed, "seed": self.dataset.seed}

    def seek(self, position: dict) -> None:
        if int(position.get("seed", self.dataset.seed)) != self.dataset.seed:
            raise DataError(f"resume: data order seed {position['seed']} differs from run.seed {self.dataset.seed}")
        epoch, done = int(position["epoch"]), int(position["batches"])
        # a position taken after the last batch of an epoch resumes at the next one
        if done >= len(self.dataset):
            epoch, done = epoch + 1, 0
        self._next_epoch, self.dataset.skip = epoch, done

    def __len__(self) -> int:
        return len(self.dataset)
