"""``ecomtrain data inspect DIR``: summary + verification against manifest.json."""

from __future__ import annotations

from pathlib import Path

from .build import SPLITS, load_manifest, sha256_file


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
            if sha256_file(path) != sh.get("sha256"):
                problems.append(f"{path}: sha256 differs from manifest.json")
                continue
            try:
                n = sum(1 for _ in _iter_shard(path))
            except Exception as exc:  # noqa: BLE001 - report any unreadable shard
                problems.append(f"{path}: unreadable ({exc})")
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


def inspect_dataset(path: str) -> int:
    """Print a summary, verify every shard; 0 when valid, 1 on any mismatch."""
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
    if problems:
        print(f"FAILED: {len(problems)} problem(s)")
        for p in problems:
            print(f"  - {p}")
        return 1
    print("OK: every shard matches manifest.json (sha256, sample counts)")
    return 0
