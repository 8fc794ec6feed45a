"""``ecomtrain data inspect DIR --task NAME``: what a task reads from a few samples and what it is asked.

ID mode: each history step as ``item (title) event@channel +gap``, then the task's question
(next item; the candidates and labels of purchase intent; the rating to predict; the K
candidates). Text prompts rendered with a chat template come with the language branch.
"""

from __future__ import annotations

from pathlib import Path

from ..model.side_inputs import gap_bucket


def _titles(root: Path, manifest: dict) -> dict:
    import polars as pl

    p = root / manifest.get("item_file", "items.parquet")
    cols = pl.read_parquet_schema(p)
    if "title" not in cols:
        return {}
    df = pl.read_parquet(p, columns=["idx", "title"])
    return dict(zip(df["idx"].to_list(), df["title"].to_list()))


def describe(root: str | Path, manifest: dict, name: str, n: int = 3, show_steps: int = 8) -> list[str]:
    from ..config import validate_tree
    from .base import build_tasks
    import io
    import json
    import tarfile

    root = Path(root)
    cfg = validate_tree({"data": {"path": str(root)}, "task": {"name": name}})
    task = build_tasks(cfg, manifest)
    titles = _titles(root, manifest)
    ev, ch = manifest.get("event_types") or [], manifest.get("channels") or []

    def item(i: int) -> str:
        t = titles.get(i)
        return f"{i} ({t})" if t else str(i)

    samples = []
    for sh in manifest["splits"].get("val", {}).get("shards", []):
        with tarfile.open(root / sh["name"]) as tar:
            for m in tar:
                if m.isfile() and m.name.endswith(".json"):
                    samples.append(json.load(io.TextIOWrapper(tar.extractfile(m), encoding="utf-8")))
                    if len(samples) == n:
                        break
        if len(samples) == n:
            break
    out = [f"task {name}: {len(samples)} val sample(s), last {show_steps} history steps each"]
    for s in samples:
        its, es, cs, ts = s["items"], s.get("events") or [], s.get("channels") or [], s.get("ts") or []
        k0 = max(0, len(its) - show_steps)
        out.append(f"- user {s.get('user', '?')}: {len(its)} steps")
        for k in range(k0, len(its)):
            e = ev[es[k]] if k < len(es) and 0 <= (es[k] or 0) < len(ev) else "?"
            c = ch[cs[k]] if k < len(cs) and cs[k] is not None and 0 <= cs[k] < len(ch) else "?"
            gap = f" gap-bucket {gap_bucket(ts[k] - ts[k - 1])}" if 0 < k < len(ts) else ""
            r = (s.get("ratings") or [None] * len(its))[k] if k < len(s.get("ratings") or []) else None
            out.append(f"    {item(its[k])}  {e}@{c}{gap}" + (f"  rated {r:g}" if r is not None else ""))
        b = task.collate_eval([s])
        if name == "purchase_intent":
            pairs = ", ".join(f"{item(int(c))} -> {'buy' if y else 'no'}" for c, y in zip(b["cands"][0], b["labels"][0]))
            out.append(f"  asked: will the user buy ... {pairs}" + ("" if bool(b["valid"][0, 0]) else "  (target event not labelled: skipped)"))
        elif name == "rating":
            tr = s.get("target_rating")
            out.append(f"  asked: the rating of {item(s['target'])}: " + (f"{tr:g}" if tr is not None else "unrated (skipped)"))
        elif name == "candidate_ranking":
            out.append("  asked: which one next? " + ", ".join(("*" if j == 0 else "") + item(int(c)) for j, c in enumerate(b["cands"][0])) + "  (* = the target)")
        else:
            out.append(f"  asked: the next item over the catalog (target {item(s['target'])})")
    return out
