"""Helpers shared by the data tests (not a test module)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

from ecomtrain.data.stream import _iter_shard


def read_split(root: Path, split: str) -> list[dict]:
    m = json.loads((Path(root) / "manifest.json").read_text())
    out = []
    for sh in m["splits"][split]["shards"]:
        out.extend(_iter_shard(Path(root) / sh["name"]))
    return out


def by_user(samples: list[dict]) -> dict:
    return {s["user"]: s for s in samples}


def catalog(root: Path) -> dict:
    import polars as pl

    cat = pl.read_parquet(Path(root) / "items.parquet")
    return {r["item"]: r for r in cat.iter_rows(named=True)}


def decode(root: Path, idx_list: list[int]) -> list[str]:
    """Item indices back to the source item ids."""
    import polars as pl

    cat = pl.read_parquet(Path(root) / "items.parquet").sort("idx")
    ids = cat["item"].to_list()
    return [ids[i - 1] for i in idx_list]


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "ecomtrain.cli", *args], capture_output=True, text=True, env=e)


def write_shard(path: Path, samples: list[dict], extra_members: dict | None = None) -> None:
    """A webdataset-layout tar of JSON samples (other members, if any, first)."""
    members = list((extra_members or {}).items()) + [(f"s{i:06d}.json", json.dumps(s).encode()) for i, s in enumerate(samples)]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
