"""Reading one shard: JSON members only (no torch import, so ``data inspect`` starts fast)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Iterator

from .importers import DataError

ALLOWED_MEMBERS = {"json"}


class _Hashing:
    """A read-only file wrapper that hashes what is read (the tar reader reads every byte once)."""

    def __init__(self, f, h):
        self._f, self.h = f, h

    def read(self, n: int = -1) -> bytes:
        b = self._f.read(n)
        self.h.update(b)
        return b


def _iter_shard(path: Path, digest=None) -> Iterator[dict]:
    """Samples of one tar shard (webdataset layout: KEY.json members).

    Any other member type (``.pyd``, ``.pickle``, ``.pth`` ...) is refused
    rather than decoded: shards never carry pickle. Read with the standard
    library's streaming tar reader (what webdataset's tar_file_iterator wraps):
    importing webdataset pulls in torch, ~6 s on a loaded 2-core machine, which
    ``data inspect`` does not need. With ``digest`` (a hashlib object) every
    byte of the file is hashed as it is read, so the training reader checks the
    manifest's sha256 without a second pass.
    """
    with open(path, "rb") as raw:
        src = _Hashing(raw, digest) if digest is not None else raw
        yield from _members(path, src)
        if digest is not None:  # the tar reader stops at the end-of-archive blocks: hash the rest too
            while src.read(1 << 16):
                pass


def _members(path: Path, src) -> Iterator[dict]:
    with tarfile.open(fileobj=src, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = member.name.rsplit("/", 1)[-1]
            key, _, ext = name.partition(".")
            if ext not in ALLOWED_MEMBERS:
                raise DataError(f"{path}: member '{name}' has type '.{ext}'; only JSON samples are read (pickle is refused)")
            f = tar.extractfile(member)
            data = f.read() if f is not None else b""
            if len(data) != member.size:
                raise EOFError(f"{path}: member '{name}' is cut short ({len(data)} of {member.size} bytes)")
            yield json.loads(data)


def balance_shards(shards: list[dict], readers: int) -> list[list[dict]]:
    """Deal non-empty shards to readers, largest first, to the lightest reader."""
    buckets: list[list[dict]] = [[] for _ in range(readers)]
    loads = [0] * readers
    for sh in sorted((s for s in shards if s["num_samples"] > 0), key=lambda s: (-s["num_samples"], s["name"])):
        j = min(range(readers), key=lambda k: (loads[k], k))
        buckets[j].append(sh)
        loads[j] += sh["num_samples"]
    return buckets
