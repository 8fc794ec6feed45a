"""``ecomtrain data inspect DIR [--ranks N --workers W]``: summary + verification against manifest.json.

Exit 0 when every shard matches; otherwise every problem is printed (stdout) and
the command fails like any bad input: ``error: <first problem> (+N more)`` on
stderr, exit status 2.
"""

from __future__ import annotations

from pathlib import Path

from .build import SPLITS, load_manifest, sha256_file
from .importers import DataError


def verify_shards(root: Path, manifest: dict) -> list[str]:
    """Problems found (empty when every shard matches its sha256 and count)."""
    from .shardio import _iter_shard

    problems = []
    for split, info in manifest["splits"].items():
        total = 0
        for sh in info["shards"]:
            path = root / sh["name"]
            if not path.is_file():
                problems.append(f"{path}: missing")
                continue
            size, want = path.stat().st_size, sh.get("bytes")
            if want is not None and size != want:
                problems.append(f"{path}: {size} bytes, manifest.json says {want} (truncated or replaced)")
                continue
            if sha256_file(path) != sh.get("sha256"):
                problems.append(f"{path}: sha256 differs from manifest.json")
                continue
            try:
                n = sum(1 for _ in _iter_shard(path))
            except DataError as exc:  # a refused member (pickle): the message names shard and member
                problems.append(str(exc))
                continue
            except Exception as exc:  # noqa: BLE001 - report any unreadable shard
                problems.append(f"{path}: unreadable ({type(exc).__name__}: {exc})")
                continue
            if n != sh["num_samples"]:
                problems.append(f"{path}: {n} samples, manifest.json says {sh['num_samples']}")
            total += n
        if total != info["num_samples"] and not any(p.startswith(str(root / split)) for p in problems):
            problems.append(f"{root}: split '{split}' has {total} samples, manifest.json says {info['num_samples']}")
    return problems


def _fmt_counts(d: dict) -> str:
    total = sum(d.values()) or 1
    return ", ".join(f"{k} {v:,} ({100 * v / total:.1f}%)" for k, v in sorted(d.items(), key=lambda kv: -kv[1]))


def check_readers(root: Path, manifest: dict, ranks: int, workers: int = 1) -> list[str]:
    """Problems a training run on ``ranks`` x ``workers`` readers would meet: a train split with fewer
    samples than readers leaves some of them empty. (Fewer *shards* than readers is fine: the
    training reader then splits by sample, see data/stream.py.)"""
    readers = ranks * max(1, workers)
    problems = []
    info = manifest["splits"].get("train", {"shards": [], "num_samples": 0})
    n = int(info.get("num_samples", 0))
    if n < readers:
        problems.append(
            f"{root}: split 'train' is empty for some of {ranks} rank(s) x {max(1, workers)} worker(s): {n} sample(s) "
            f"in {len(info['shards'])} shard(s) for {readers} readers; train on fewer ranks or build more data"
        )
    for split in ("val", "test"):
        if manifest["splits"].get(split, {}).get("num_samples", 0) == 0:
            problems.append(f"{root}: split '{split}' is empty (0 samples)")
    return problems


def inspect_dataset(path: str, ranks: int = 1, workers: int = 1) -> int:
    """Print a summary, verify every shard; 0 when valid, DataError (exit 2) naming the first problem otherwise."""
    root = Path(path)
    m = load_manifest(root)
    st = m.get("stats", {})
    print(f"dataset {root}   ({m.get('created_by', '?')}, {m.get('created_at', '?')})")
    print(f"  source   {m.get('source', {})}")
    print(f"  users {m['num_users']:,}   items {m['num_items']:,}   events {m.get('num_events', 0):,}"
          + (f"   (input {st['input_events']:,}, exact duplicates dropped {st['duplicates_dropped']:,})" if "input_events" in st else ""))
    if st.get("events_by_type"):
        print(f"  events by type     {_fmt_counts(st['events_by_type'])}")
    if st.get("events_by_channel"):
        print(f"  events by channel  {_fmt_counts(st['events_by_channel'])}")
    if st.get("history_length"):
        h = st["history_length"]
        print("  history length     " + "  ".join(f"{k} {v}" for k, v in h.items()))
    sp = m.get("split", {})
    print("  split    " + ", ".join(f"{k}={v}" for k, v in sp.items() if v is not None))
    print(f"  user ids {m.get('privacy', {}).get('user_ids', 'raw')}   leakage check {m.get('leakage_check', 'not run')}")
    for s in SPLITS:
        info = m["splits"].get(s, {"num_samples": 0, "shards": []})
        print(f"  {s:5s} {info['num_samples']:>12,} samples in {len(info['shards'])} shards")
    problems = verify_shards(root, m)
    if ranks > 1 or workers > 1:
        problems += check_readers(root, m, ranks, workers)
    if problems:
        print(f"FAILED: {len(problems)} problem(s)")
        for p in problems:
            print(f"  - {p}")
        more = f" (+{len(problems) - 1} more problem(s), listed above)" if len(problems) > 1 else ""
        raise DataError(f"{problems[0]}{more}")
    print("OK: every shard matches manifest.json (sha256, sample counts)")
    return 0
