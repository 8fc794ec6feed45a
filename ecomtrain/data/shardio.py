"""Shard formats: writing (build) and reading one shard (no torch import, so ``data inspect`` starts fast).

A shard is a tar in webdataset layout (``KEY.EXT`` members, members of one key together),
USTAR headers, mtime 0: the same input gives byte-identical shards (and sha256).

- schema 2, ``npy`` (default): a shard holds one or more *blocks* of up to
  ``BLOCK_SAMPLES`` samples. A block is the members of one key::

      KEY.meta.json      {"schema_version": 2, "num_samples": n, "lists": [...], "targets": [...]}
      KEY.len.npy        history length per sample
      KEY.user.npy       UTF-8 bytes of the user ids, concatenated (uint8)
      KEY.user_len.npy   bytes per user id
      KEY.<list>.npy     items, events, channels, ts [, sessions, weights, ratings]: all samples'
                         values concatenated (sample i owns the next len[i] values)
      KEY.<target>.npy   target, target_event, target_ts, target_channel [, target_weight,
                         target_rating]: one per sample (val / test)

  Each array is a ``.npy`` in the smallest dtype that holds the block's values (int8 ...
  int64; float32 when exact, else float64; ratings NaN = null), read with
  ``np.load(allow_pickle=False)``. About 10 bytes per history step instead of ~25 in JSON.
- schema 1, ``json`` (the format before; still read, still written with
  ``data.build.shard_format: json``): one ``KEY.json`` member per sample.

Both decode to the same dict per sample (``{"user": str, "items": [int], ...}``, see
docs/data.md). Any other member type (``.pyd``, ``.pickle``, ``.pth`` ...) is refused, never
decoded; a block of another schema version fails with a "rebuild" error naming both versions.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from .importers import DataError

SCHEMA_VERSION = 2            # what the npy format writes (manifest.json and every block)
JSON_SCHEMA_VERSION = 1       # one JSON member per sample
READABLE_SCHEMAS = (JSON_SCHEMA_VERSION, SCHEMA_VERSION)
BLOCK_SAMPLES = 8192          # most samples per block: bounds a reader's memory per block (~4 MB)
ALLOWED_MEMBERS = {"json"}    # schema 1; schema 2 members are checked against _BLOCK_MEMBERS
_LISTS = ("items", "events", "channels", "ts", "sessions", "weights", "ratings")
_TARGETS = ("target", "target_event", "target_ts", "target_channel", "target_weight", "target_rating")
_BLOCK_MEMBERS = {"meta.json", "len.npy", "user.npy", "user_len.npy"} | {f"{f}.npy" for f in _LISTS + _TARGETS}
_INTS = (np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64)


class ShardFormatError(DataError):
    """A shard this ecomtrain must not or cannot decode (pickle members, another schema version):
    fatal for a reader, unlike a damaged shard, which is skipped and counted."""


def rebuild_error(where: str, found, expected=SCHEMA_VERSION) -> ShardFormatError:
    return ShardFormatError(
        f"{where}: schema_version {found} is not supported (this ecomtrain reads {' and '.join(map(str, READABLE_SCHEMAS))}, "
        f"writes {expected}); rebuild the dataset with `ecomtrain data build` (or `data.rebuild: auto`)")


# ------------------------------------------------------------------ reading
class _Hashing:
    """A read-only file wrapper that hashes what is read (the tar reader reads every byte once)."""

    def __init__(self, f, h):
        self._f, self.h = f, h

    def read(self, n: int = -1) -> bytes:
        b = self._f.read(n)
        self.h.update(b)
        return b


def _iter_shard(path: Path, digest=None, fields: Optional[frozenset] = None) -> Iterator[dict]:
    """Samples of one tar shard (either schema).

    Read with the standard library's streaming tar reader (what webdataset's
    tar_file_iterator wraps): importing webdataset pulls in torch, ~6 s on a
    loaded 2-core machine, which ``data inspect`` does not need. With ``digest``
    (a hashlib object) every byte of the file is hashed as it is read, so the
    training reader checks the manifest's sha256 without a second pass. ``fields``
    (schema 2): the sample keys to materialise (see ``decode_block``); None = all.
    """
    with open(path, "rb") as raw:
        src = _Hashing(raw, digest) if digest is not None else raw
        yield from _members(path, src, fields)
        if digest is not None:  # the tar reader stops at the end-of-archive blocks: hash the rest too
            while src.read(1 << 16):
                pass


def iter_shard_samples(path: str | Path) -> Iterator[dict]:
    """The samples of one shard file, either schema, as dicts (the public form of ``_iter_shard``)."""
    return _iter_shard(Path(path))


def iter_split_samples(data_path: str | Path, manifest: dict, split: str) -> Iterator[dict]:
    """Every sample of one split of a built dataset, shard by shard in manifest order (never all in memory)."""
    root = Path(data_path)
    for sh in manifest.get("splits", {}).get(split, {}).get("shards", []):
        yield from _iter_shard(root / sh["name"])


def _members(path: Path, src, fields: Optional[frozenset] = None) -> Iterator[dict]:
    block: dict[str, bytes] = {}
    key = None
    with tarfile.open(fileobj=src, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = member.name.rsplit("/", 1)[-1]
            k, _, ext = name.partition(".")
            if ext not in ALLOWED_MEMBERS and ext not in _BLOCK_MEMBERS:
                raise ShardFormatError(f"{path}: member '{name}' has type '.{ext}'; only JSON samples and .npy blocks are read "
                                       f"(pickle is refused)")
            f = tar.extractfile(member)
            data = f.read() if f is not None else b""
            if len(data) != member.size:
                raise EOFError(f"{path}: member '{name}' is cut short ({len(data)} of {member.size} bytes)")
            if ext == "json":
                yield json.loads(data)
                continue
            if k != key and block:
                yield from decode_block(block, f"{path}: block '{key}'", fields)
                block = {}
            key = k
            block[ext] = data
        if block:
            yield from decode_block(block, f"{path}: block '{key}'", fields)


def decode_block(members: dict[str, bytes], where: str, fields: Optional[frozenset] = None) -> Iterator[dict]:
    """The samples of one schema-2 block (``members``: extension -> bytes), yielded lazily.

    ``fields``: the keys each sample dict gets (None = every key of the block). The training
    stream asks only for what its task's ``collate_train`` reads (``Task.train_fields``): the
    other lists are still loaded and length-checked, but never turned into per-sample Python
    lists, which is most of the decoding time of a block."""
    if "meta.json" not in members:
        raise ValueError(f"{where}: no meta.json member (damaged shard?)")
    meta = json.loads(members["meta.json"])
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise rebuild_error(where, meta.get("schema_version"))
    n = int(meta["num_samples"])

    def arr(name: str) -> np.ndarray:
        if f"{name}.npy" not in members:
            raise ValueError(f"{where}: member '{name}.npy' missing (damaged shard?)")
        return np.load(io.BytesIO(members[f"{name}.npy"]), allow_pickle=False)

    lens, user, user_len = arr("len"), arr("user"), arr("user_len")
    lists = {f: arr(f) for f in meta["lists"]}
    targets = {f: arr(f) for f in meta["targets"]}
    total = int(lens.sum())
    if len(lens) != n or len(user_len) != n or int(user_len.sum()) != len(user) or any(len(v) != total for v in lists.values()) \
            or any(len(v) != n for v in targets.values()):
        raise ValueError(f"{where}: array lengths disagree with meta.json (damaged shard?)")
    cum = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lens, out=cum[1:])
    ucum = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(user_len, out=ucum[1:])
    ub = user.tobytes() if fields is None or "user" in fields else None
    if fields is not None:
        lists = {k: v for k, v in lists.items() if k in fields}
        targets = {k: v for k, v in targets.items() if k in fields}
    tl = {k: _py(k, v) for k, v in targets.items()}
    # Python lists made per chunk of samples: one tolist() per field and chunk, then list slices
    step = 256
    for c0 in range(0, n, step):
        c1 = min(n, c0 + step)
        a0 = int(cum[c0])
        lc = {k: _py(k, v[a0:int(cum[c1])]) for k, v in lists.items()}
        for i in range(c0, c1):
            a, b = int(cum[i]) - a0, int(cum[i + 1]) - a0
            d = {"user": ub[ucum[i]:ucum[i + 1]].decode()} if ub is not None else {}
            for k, v in lc.items():
                d[k] = v[a:b]
            for k, v in tl.items():
                d[k] = v[i]
            yield d


def _py(name: str, a: np.ndarray) -> list:
    out = a.tolist()
    if name in ("ratings", "target_rating"):  # null ratings are stored as NaN
        out = [None if x != x else x for x in out]
    return out


def balance_shards(shards: list[dict], readers: int) -> list[list[dict]]:
    """Deal non-empty shards to readers, largest first, to the lightest reader."""
    buckets: list[list[dict]] = [[] for _ in range(readers)]
    loads = [0] * readers
    for sh in sorted((s for s in shards if s["num_samples"] > 0), key=lambda s: (-s["num_samples"], s["name"])):
        j = min(range(readers), key=lambda k: (loads[k], k))
        buckets[j].append(sh)
        loads[j] += sh["num_samples"]
    return buckets


# ------------------------------------------------------------------ writing
def narrow_dtype(a: np.ndarray) -> np.dtype:
    """The smallest dtype that holds ``a`` exactly (ints: by range; floats: float32 when lossless)."""
    if a.dtype.kind == "f":
        return np.dtype(np.float32) if np.array_equal(a.astype(np.float32).astype(a.dtype), a, equal_nan=True) else a.dtype
    if a.dtype.kind not in "iu" or a.dtype.itemsize == 1:
        return a.dtype
    if len(a) == 0:
        return np.dtype(np.int8)
    lo, hi = int(a.min()), int(a.max())
    return next(np.dtype(dt) for dt in _INTS + (a.dtype,) if np.iinfo(dt).min <= lo and hi <= np.iinfo(dt).max)


def narrow(a: np.ndarray, dtype: Optional[np.dtype] = None) -> np.ndarray:
    return a.astype(dtype or narrow_dtype(a), copy=False)


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


class _HashWriter:
    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.h.update(b)
        self.n += len(b)
        return self.f.write(b)

    def tell(self) -> int:
        return self.n


class _ShardFiles:
    """Numbered tar shards of one split (USTAR, mtime 0), sha256 computed while written."""

    def __init__(self, out: Path, split: str):
        self.out, self.split = out, split
        self.shards: list[dict] = []
        self.tar: Optional[tarfile.TarFile] = None
        self.count = 0
        self.total = 0

    def open(self) -> None:
        name = f"{self.split}-{len(self.shards):06d}.tar"
        self._file = open(self.out / name, "wb")
        self._hw = _HashWriter(self._file)
        # USTAR: webdataset's TarWriter would write PAX headers (~2x the per-member cost); names are short ASCII
        self.tar = tarfile.open(fileobj=self._hw, mode="w", format=tarfile.USTAR_FORMAT)
        self.shards.append({"name": name, "num_samples": 0})
        self.count = 0

    def add(self, name: str, data: bytes) -> None:
        ti = tarfile.TarInfo(name)
        ti.size, ti.mtime, ti.mode, ti.uname, ti.gname = len(data), 0, 0o444, "bigdata", "bigdata"
        self.tar.addfile(ti, io.BytesIO(data))

    def bytes(self) -> int:
        return self._hw.n

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self._file.close()
            self.tar = None
            self.shards[-1].update(num_samples=self.count, bytes=self._hw.n, sha256=self._hw.h.hexdigest())

    def finish(self) -> dict:
        self.close()
        return {"num_samples": self.total, "shards": self.shards}


class NpySink(_ShardFiles):
    """Schema-2 shards: blocks of samples, at most ``max_samples`` samples and about ``max_bytes`` bytes per shard."""

    def __init__(self, out: Path, split: str, max_samples: int, max_bytes: int):
        super().__init__(out, split)
        self.max_samples, self.max_bytes = max_samples, max_bytes

    def write(self, block) -> None:
        """Append a :class:`~ecomtrain.data.samples.Block` (split across shards as the limits require)."""
        # one dtype per field for the whole block: bytes per sample are then known before writing
        dts = {k: narrow_dtype(v) for k, v in (*block.lists.items(), *block.targets.items())}
        per_step = sum(dts[k].itemsize for k in block.lists)
        per_sample = sum(dts[k].itemsize for k in block.targets) + 8
        a = 0
        while a < len(block):
            if self.tar is None or self.count >= self.max_samples:
                self.close()
                self.open()
            m = min(len(block) - a, self.max_samples - self.count, BLOCK_SAMPLES)
            # bytes: values in their dtypes, ~1 KB of tar header + padding per member, 11 KB of tar end
            per = block.lens[a:a + m] * per_step + block.user_len[a:a + m] + per_sample
            room = self.max_bytes - self.bytes() - 1024 * (4 + len(dts)) - 11264
            fit = int(np.searchsorted(np.cumsum(per), room, side="right"))
            if fit == 0 and self.count:  # full: next shard
                self.close()
                continue
            m = max(1, min(m, fit))
            self._block(block.slice(a, a + m), dts)
            a += m

    def _block(self, b, dts: dict) -> None:
        key = f"s{self.total:010d}"
        meta = {"schema_version": SCHEMA_VERSION, "num_samples": len(b), "lists": list(b.lists), "targets": list(b.targets)}
        self.add(f"{key}.meta.json", json.dumps(meta, separators=(",", ":")).encode())
        self.add(f"{key}.len.npy", _npy(narrow(b.lens)))
        self.add(f"{key}.user.npy", _npy(b.user))
        self.add(f"{key}.user_len.npy", _npy(narrow(b.user_len)))
        for k, v in (*b.lists.items(), *b.targets.items()):
            self.add(f"{key}.{k}.npy", _npy(narrow(v, dts[k])))
        self.count += len(b)
        self.total += len(b)


class JsonSink(_ShardFiles):
    """Schema-1 shards: one JSON member per sample (the format before schema 2)."""

    def __init__(self, out: Path, split: str, max_samples: int, max_bytes: int):
        super().__init__(out, split)
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self._bytes = 0

    def write(self, block) -> None:
        for d in block.dicts():
            payload = json.dumps(d, separators=(",", ":")).encode()
            if self.tar is None or self.count >= self.max_samples or self._bytes + len(payload) > self.max_bytes:
                self.close()
                self.open()
                self._bytes = 0
            self.add(f"s{self.total:010d}.json", payload)
            self.count += 1
            self._bytes += len(payload) + 1024  # tar header + padding
            self.total += 1


SINKS = {"npy": NpySink, "json": JsonSink}
