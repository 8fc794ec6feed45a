"""bench/quality.py's machine note is computed from the load at the start, not a fixed claim."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _quality():
    spec = importlib.util.spec_from_file_location("bench_quality", REPO / "bench" / "quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_load_note_follows_the_start_load():
    q = _quality()
    idle, busy = q.load_note((0.03, 0.1, 0.2)), q.load_note((3.9, 4.0, 4.1))
    assert idle.startswith("machine idle at start") and "0.03" in idle
    assert busy.startswith("machine shared with other jobs") and "3.90" in busy
