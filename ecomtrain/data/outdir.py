"""Atomic build output: OUT is the old dataset or the new one, never a mix.

    build() -> tmp = OUT.tmp-<pid>-<token> (written, manifest.json last)
            -> roll_forward(tmp, OUT, OUT.old-<pid>-<token>)

Holds: ``listed`` (the files a dataset owns, from its manifest), ``check_out``
(refuse an OUT whose files the build would overwrite without having written
them), ``roll_forward`` (the swap; idempotent), ``recover`` (finish or undo
what a killed build left beside OUT; called by every build and by
``load_manifest`` when OUT has no manifest). See docs/data.md, "Atomic output".
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
from pathlib import Path

from .importers import DataError

SHARD_NAME = re.compile(r"^(train|val|test)-\d{6}\.tar$")


def listed(d: Path) -> set[str]:
    """Names the dataset whose manifest.json is in ``d`` owns (empty without one)."""
    mf = d / "manifest.json"
    try:
        m = json.loads(mf.read_text())
    except (OSError, ValueError):
        return set()
    names = {"manifest.json", m.get("item_file", "items.parquet")}
    for info in (m.get("splits") or {}).values():
        names.update(sh["name"] for sh in info.get("shards", []))
    return names


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers cannot be in use: a build cleans up when it returns
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _siblings(out: Path, kind: str) -> dict[str, Path]:
    """token -> folder for OUT.<kind>-<pid>-<token> of builds that are not running any more."""
    found = {}
    for p in out.parent.glob(f"{glob.escape(out.name)}.{kind}-*-*"):
        m = re.fullmatch(re.escape(out.name) + rf"\.{kind}-(\d+)-([0-9a-f]+)", p.name)
        if m and p.is_dir() and not _alive(int(m.group(1))):
            found[f"{m.group(1)}-{m.group(2)}"] = p
    return found


def _move(src: Path, dst: Path) -> None:
    try:
        os.replace(src, dst)
    except FileNotFoundError:  # a concurrent recovery moved it already
        pass


def roll_forward(tmp: Path, out: Path, old: Path) -> None:
    """Move the finished dataset in ``tmp`` into ``out``; the old one goes to ``old`` (then removed).

    Idempotent, so a build killed anywhere in here is finished by the next
    build or reader (:func:`recover`). ``out/manifest.json`` leaves first and
    the new one arrives last (the commit point): while the two folders trade
    files (milliseconds: renames only) OUT has no manifest and no reader takes
    it for a dataset. Files OUT holds that neither manifest lists stay put.
    """
    new = listed(tmp)
    out.mkdir(parents=True, exist_ok=True)
    old.mkdir(exist_ok=True)
    if (out / "manifest.json").exists():
        _move(out / "manifest.json", old / "manifest.json")
    for n in sorted(listed(old) - new - {"manifest.json"}):
        if (out / n).exists():
            _move(out / n, old / n)
    for n in sorted(new - {"manifest.json"}):
        if (tmp / n).exists():
            _move(tmp / n, out / n)
    _move(tmp / "manifest.json", out / "manifest.json")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def recover(out: str | Path, log=print) -> None:
    """Finish or undo what a killed build left next to ``out`` (OUT.tmp-*, OUT.old-*, OUT/.work)."""
    out = Path(out).resolve()
    if not out.parent.is_dir():
        return
    olds, tmps = _siblings(out, "old"), _siblings(out, "tmp")
    for tok, old in olds.items():
        tmp = tmps.pop(tok, None)
        if tmp is not None and (tmp / "manifest.json").is_file():
            log(f"finishing an interrupted dataset swap into {out}")
            roll_forward(tmp, out, old)  # the swap had started: finish it
        else:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)  # the swap had finished: only cleanup remained
    for tmp in tmps.values():  # a build that never reached the swap: OUT is untouched
        shutil.rmtree(tmp, ignore_errors=True)
    # written by ecomtrain < 0.2 inside OUT (it held raw user ids)
    shutil.rmtree(out / ".work", ignore_errors=True)
    if (out / "manifest.json.tmp").is_file():
        (out / "manifest.json.tmp").unlink()


def check_out(out: Path) -> None:
    """Refuse, before any work, an OUT whose files the build would overwrite but did not write."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: exists and is not a folder")
    if not out.is_dir():
        return
    if (out / "manifest.json").exists() and not listed(out):
        raise DataError(f"{out / 'manifest.json'}: not a readable ecomtrain manifest; move it away (the build will not overwrite it)")
    owned = listed(out)
    for p in sorted(out.iterdir()):
        if p.name not in owned and (SHARD_NAME.match(p.name) or p.name == "items.parquet"):
            raise DataError(f"{p}: not part of the dataset in {out} (manifest.json does not list it); "
                            f"move it away, the build never overwrites files it did not write")
