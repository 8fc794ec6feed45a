"""SIGKILL `ecomtrain data build` at 10 random moments (seeded) over a previous good dataset.

    .venv/bin/python -m pytest tests/test_kill_build.py -q

After every kill: DIR loads (`ecomtrain data inspect DIR` exits 0: every shard
matches manifest.json's sha256) and is either exactly the previous dataset or
exactly the new one; a user's file in DIR is byte-identical; and, with
pseudonymisation on, no raw user id (synth's "U0000123") is in any file under
DIR's parent, work files of the killed build included. The kill moments are
random fractions of a measured build time: which phases they hit varies with
the machine, the properties asserted do not.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from ecomtrain.data import synth

RAW_ID = re.compile(rb"U\d{7}")
KEY = {"ECOMTRAIN_PSEUDONYM_KEY": "kill-test-key"}


def _tree(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def raw_ids_in(folder: Path) -> list[str]:
    """Files under ``folder`` holding a raw synth user id: in their bytes, or in any string column of a Parquet file."""
    hits = []
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        if RAW_ID.search(p.read_bytes()):
            hits.append(str(p))
            continue
        if p.suffix == ".parquet":  # compressed pages hide strings from a byte search
            try:
                df = pl.read_parquet(p)
            except Exception:  # noqa: BLE001 - a file cut by the kill: its bytes were searched above
                continue
            for c in df.columns:
                if df[c].dtype == pl.Utf8 and df[c].str.contains(r"^U\d{7}$").any():
                    hits.append(f"{p}:{c}")
    return hits


def _cmd(raw: Path, out: Path, seed: int) -> list[str]:
    return [sys.executable, "-m", "ecomtrain.cli", "data", "build", "--source", "synth", "--input", str(raw), "--out", str(out),
            "--pseudonymise-users", "--shard-max-samples", "300", "--partition-events", "20000", "--seed", str(seed)]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **KEY})


# ~1 min on 2 cores (12 builds, 10 inspects as subprocesses): in the marked tier that .ci/run executes
@pytest.mark.distributed
def test_sigkill_build_keeps_previous_dataset_and_leaks_no_raw_id(tmp_path):
    raw = tmp_path / "input" / "raw"  # the raw ids live here, outside DIR's parent
    synth.write(raw, num_users=2000, num_items=300, num_categories=8, num_brands=20, seed=5)
    parent = tmp_path / "data"
    out = parent / "ds"
    assert raw_ids_in(raw), "the detector must see the raw ids of the input (else it proves nothing)"

    r = _run(_cmd(raw, out, seed=0))
    assert r.returncode == 0, r.stderr
    (out / "notes.txt").write_text("a user's file in DIR\n")

    t0 = time.monotonic()
    r = _run(_cmd(raw, parent / "measure", seed=99))  # a full build's wall time, process start included
    full = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    assert not raw_ids_in(parent)

    rng = random.Random(20261126)
    outcomes = []
    for k in range(1, 11):
        before = _tree(out)
        p = subprocess.Popen(_cmd(raw, out, seed=k), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **KEY})
        time.sleep(rng.uniform(0.05, 1.1) * full)
        p.send_signal(signal.SIGKILL)
        rc = p.wait()
        outcomes.append(rc)
        # nothing raw anywhere next to DIR, leftovers of the killed build included (before any recovery)
        assert not raw_ids_in(parent), (k, raw_ids_in(parent))
        # DIR loads (a reader finishes an interrupted swap) and is the old or the new dataset, never a mix
        ins = subprocess.run([sys.executable, "-m", "ecomtrain.cli", "data", "inspect", str(out)], capture_output=True, text=True)
        assert ins.returncode == 0, (k, ins.stdout[-1500:], ins.stderr)
        after = _tree(out)
        m = json.loads((out / "manifest.json").read_text())
        if after != before:
            # it changed: then it is the complete new dataset of this build (seed k)
            assert m["split"] and m["stats"] and m["privacy"]["user_ids"] == "hmac-sha256"
            assert m.get("build", {}).get("options", {}).get("seed") == k, (k, m.get("build"))
        assert (out / "notes.txt").read_text() == "a user's file in DIR\n"
        assert not (out / ".work").exists()
    # the next build starts by clearing what the killed ones left beside DIR
    r = _run(_cmd(raw, out, seed=0))
    assert r.returncode == 0, r.stderr
    assert sorted(x.name for x in parent.iterdir()) == ["ds", "measure"]
    assert not raw_ids_in(parent)
    assert (out / "notes.txt").read_text() == "a user's file in DIR\n"
    print(f"full build {full:.1f} s; exit codes of the killed builds: {outcomes}")
    assert any(rc == -signal.SIGKILL for rc in outcomes)


def test_detector_sees_raw_ids_in_an_unpseudonymised_dataset(tmp_path):
    """Control: the same detector flags a dataset built without pseudonymisation (so the kill test can fail)."""
    raw = tmp_path / "input" / "raw"
    synth.write(raw, num_users=50, num_items=20, num_categories=3, num_brands=5, seed=1)
    out = tmp_path / "data" / "ds"
    cmd = [c for c in _cmd(raw, out, seed=0) if c != "--pseudonymise-users"]
    assert _run(cmd).returncode == 0
    assert raw_ids_in(tmp_path / "data")
