"""Build output is swapped in atomically, leftovers of a killed build are recovered, and a
dataset's fingerprint decides whether `ecomtrain train` may reuse it (data.rebuild)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from data_helpers import cli

from ecomtrain.config import Recipe
from ecomtrain.data import build, importers, synth
from ecomtrain.data.importers import DataError
from ecomtrain.data.inspect import verify_shards


def _tree(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("raw")
    synth.write(d, num_users=80, num_items=30, num_categories=3, num_brands=5, seed=2)
    return d


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_rebuild_swaps_in_place_and_keeps_unrelated_files(tmp_path, raw):
    out = tmp_path / "ds"
    build.build(importers.load("synth", raw), out, shard_max_samples=10, log=lambda *_: None)
    old = json.loads((out / "manifest.json").read_text())
    n_old = len(old["splits"]["train"]["shards"])
    (out / "notes.tar").write_bytes(b"a user's archive")  # not ours: never touched
    (out / "sub").mkdir()
    (out / "sub" / "keep.txt").write_text("x")
    m = build.build(importers.load("synth", raw), out, shard_max_samples=1000, log=lambda *_: None)
    assert len(m["splits"]["train"]["shards"]) == 1 < n_old
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(["notes.tar"] + [s["name"] for sp in m["splits"].values() for s in sp["shards"]])
    assert (out / "notes.tar").read_bytes() == b"a user's archive" and (out / "sub" / "keep.txt").read_text() == "x"
    assert not verify_shards(out, m)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no OUT.tmp-* / OUT.old-* left


def test_failed_build_leaves_everything(tmp_path, raw):
    out = tmp_path / "ds"
    build.build(importers.load("synth", raw), out, log=lambda *_: None)
    (out / "mine.tar").write_bytes(b"keep")
    before = _tree(out)
    with pytest.raises(DataError, match="no user has 9999 or more events"):
        build.build(importers.load("synth", raw), out, min_user_events=9999, log=lambda *_: None)
    assert _tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_refuses_to_overwrite_files_it_did_not_write(tmp_path, raw):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "items.parquet").write_bytes(b"the user's own catalog")
    with pytest.raises(DataError, match=r"items\.parquet: not part of the dataset"):
        build.build(importers.load("synth", raw), out, log=lambda *_: None)
    assert (out / "items.parquet").read_bytes() == b"the user's own catalog"


@pytest.mark.parametrize("moved", [0, 1, 3, 100])
def test_reader_finishes_a_swap_killed_midway(tmp_path, raw, moved):
    """The state a SIGKILL inside the swap leaves (old manifest gone, some files traded) is finished by the next reader."""
    out = tmp_path / "ds"
    build.build(importers.load("synth", raw), out, shard_max_samples=10, log=lambda *_: None)
    (out / "notes.txt").write_text("mine")
    new_dir = tmp_path / "elsewhere"
    new = build.build(importers.load("synth", raw), new_dir, shard_max_samples=25, seed=7, log=lambda *_: None)
    token = f"{_dead_pid()}-abcd1234"
    tmp, old = tmp_path / f"ds.tmp-{token}", tmp_path / f"ds.old-{token}"
    shutil.move(str(new_dir), tmp)
    # replay roll_forward's first steps by hand, as a kill would leave them
    old.mkdir()
    os.replace(out / "manifest.json", old / "manifest.json")
    names = sorted(p.name for p in tmp.iterdir() if p.name != "manifest.json")
    for n in names[:moved]:
        os.replace(tmp / n, out / n)
    m = build.load_manifest(out)  # a reader
    assert m["build"]["fingerprint"] == new["build"]["fingerprint"]
    assert not verify_shards(out, m)
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    listed = {s["name"] for sp in m["splits"].values() for s in sp["shards"]}
    assert {p.name for p in out.glob("*.tar")} == listed  # no old shard left behind


def test_leftovers_of_a_build_killed_before_the_swap_are_removed(tmp_path, raw):
    out = tmp_path / "ds"
    build.build(importers.load("synth", raw), out, log=lambda *_: None)
    before = _tree(out)
    stale = tmp_path / f"ds.tmp-{_dead_pid()}-00ff00ff"
    (stale / ".work").mkdir(parents=True)
    (stale / ".work" / "x.parquet").write_bytes(b"half written")
    (out / ".work").mkdir()  # what ecomtrain < 0.2 left inside DIR (raw ids)
    assert cli("data", "build", "--source", "synth", "--input", str(raw), "--out", str(out), "--min-user-events", "3").returncode == 0
    assert not stale.exists() and not (out / ".work").exists()
    after = _tree(out)
    assert {k: v for k, v in after.items() if k != "manifest.json"} == {k: v for k, v in before.items() if k != "manifest.json"}


# ------------------------------------------------------------------ fingerprint
def _recipe(path: Path, raw: Path, rebuild: str = "error", **build_opts) -> Recipe:
    return Recipe.model_validate({"data": {"path": str(path), "rebuild": rebuild,
                                           "build": {"source": "synth", "input": str(raw), **build_opts}}})


def test_fingerprint_mismatch_errors_or_rebuilds(tmp_path, raw):
    from ecomtrain.train.runner import ensure_dataset

    ds = tmp_path / "ds"
    m1 = ensure_dataset(_recipe(ds, raw), log=lambda *_: None)
    assert ensure_dataset(_recipe(ds, raw), log=lambda *_: None)["build"] == m1["build"]  # reused as it is
    with pytest.raises(DataError) as e:
        ensure_dataset(_recipe(ds, raw, min_user_events=4, max_history=20), log=lambda *_: None)
    msg = str(e.value)
    assert "\n" not in msg and f"data.path {ds}" in msg
    assert "max_history: 200 -> 20" in msg and "min_user_events: 3 -> 4" in msg and "data.rebuild=auto" in msg
    assert json.loads((ds / "manifest.json").read_text())["build"] == m1["build"]  # untouched
    m2 = ensure_dataset(_recipe(ds, raw, "auto", min_user_events=4, max_history=20), log=lambda *_: None)
    assert m2["split"]["max_history"] == 20 and m2["build"]["fingerprint"] != m1["build"]["fingerprint"]
    assert not verify_shards(ds, m2)


def test_fingerprint_sees_a_changed_input_and_old_manifests(tmp_path, raw):
    from ecomtrain.train.runner import ensure_dataset

    src = tmp_path / "raw"
    shutil.copytree(raw, src)
    ds = tmp_path / "ds"
    ensure_dataset(_recipe(ds, src), log=lambda *_: None)
    synth.write(src, num_users=90, num_items=30, num_categories=3, num_brands=5, seed=3)  # new events, same path
    with pytest.raises(DataError, match=rf"input {src} changed"):
        ensure_dataset(_recipe(ds, src), log=lambda *_: None)
    m = json.loads((ds / "manifest.json").read_text())
    del m["build"]  # as written by ecomtrain < 0.2
    (ds / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="has no build fingerprint"):
        ensure_dataset(_recipe(ds, src), log=lambda *_: None)
    assert ensure_dataset(_recipe(ds, src, "auto"), log=lambda *_: None)["num_users"] > 0


def test_train_refuses_a_stale_dataset_cli(tmp_path, raw):
    """`ecomtrain train` on a data.path built with other options: exit 2, one line naming data.path and the options."""
    ds = tmp_path / "ds"
    assert cli("data", "build", "--source", "synth", "--input", str(raw), "--out", str(ds)).returncode == 0
    before = _tree(ds)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"run: {{name: t, out_dir: {tmp_path / 'runs'}}}\n"
        f"data:\n  path: {ds}\n  build: {{source: synth, input: {raw}, min_user_events: 4}}\n"
        "trainer: {accelerator: cpu, max_epochs: 1}\nlogging: {wandb: {enabled: false}}\n"
    )
    r = subprocess.run([sys.executable, "-m", "ecomtrain.cli", "train", str(recipe)], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: data.path {ds} holds a dataset built with other options"), r.stderr
    # exactly the one differing option: the input (same files, given as the same path) is not reported
    assert "than data.build: min_user_events: 3 -> 4; set data.rebuild=auto" in lines[0], lines[0]
    assert _tree(ds) == before and not (tmp_path / "runs").exists()
