"""``ecomtrain data inspect DIR``: summary + verification against manifest.json."""

from __future__ import annotations

from pathlib import Path

from .build import SPLITS, load_manifest, sha256_file


def verify_shards(root: Path, manifest: dict) -> list[str]:
    """Problems found (empty when every shard matches its sha256 and count)."""
    from .stream import _iter_shard

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


def inspect_dataset(path: str) -> int:
    root = Path(path)
    m = load_manifest(root)
    print(f"dataset {root}")
    print(f"  users {m['num_users']:,}   items {m['num_items']:,}   events {m.get('num_events', 0):,}")
    print(f"  split: {m.get('split', {})}")
    for s in SPLITS:
        info = m["splits"].get(s, {"num_samples": 0, "shards": []})
        print(f"  {s:5s} {info['num_samples']:>10,} samples in {len(info['shards'])} shards")
    problems = verify_shards(root, m)
    if problems:
        print(f"FAILED: {len(problems)} problem(s)")
        for p in problems:
            print(f"  - {p}")
        return 1
    print("OK: every shard matches manifest.json (sha256, sample counts)")
    return 0
