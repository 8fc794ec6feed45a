"""``ecomtrain data inspect DIR --task NAME``: what a task reads from a few samples and what it is asked.

ID mode: each history step as ``item (title) event@channel +gap``, then the task's question
(next item; the candidates and labels of purchase intent; the rating to predict; the K
candidates). Text mode (``--recipe`` with ``task.input: text``): each sample's prompt decoded from
the token ids the model reads (chat template included) and how it is answered.
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


def describe(root: str | Path, manifest: dict, name: str, n: int = 3, show_steps: int = 8, recipe: str | None = None) -> list[str]:
    from ..config import RecipeError, load_recipe, validate_tree
    from .base import build_tasks

    root = Path(root)
    if recipe:  # the recipe's task settings (text mode: its prompt and its backbone's tokenizer) on this dataset
        cfg = load_recipe(recipe, [f"data.path={root}"])
        tcs = [t for t in cfg.task if t.name == name]
        if not tcs:
            raise RecipeError(f"--task {name}: {recipe} has no such task (its tasks: {', '.join(t.name for t in cfg.task)})")
        cfg = cfg.model_copy(update={"task": tcs})
    else:
        cfg = validate_tree({"data": {"path": str(root)}, "task": {"name": name}})
    task = build_tasks(cfg, manifest)
    if getattr(task, "text", False):
        return _prompts(task, name, _val_samples(root, manifest, n))
    titles = _titles(root, manifest)
    ev, ch = manifest.get("event_types") or [], manifest.get("channels") or []

    def item(i: int) -> str:
        t = titles.get(i)
        return f"{i} ({t})" if t else str(i)

    samples = _val_samples(root, manifest, n)
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


def _val_samples(root: Path, manifest: dict, n: int) -> list[dict]:
    from ..data.shardio import iter_split_samples

    samples: list[dict] = []
    for sample in iter_split_samples(root, manifest, "val"):
        samples.append(sample)
        if len(samples) == n:
            break
    return samples


def _prompts(task, name: str, samples: list[dict]) -> list[str]:
    """Text mode: each sample's first prompt exactly as the model reads it (decoded ids) and its answer(s)."""
    P = task.prompts
    out = [f"task {name} (input: text): {len(samples)} val sample(s); prompts rendered with the backbone's tokenizer "
           f"({'chat template' if P.chat else 'no chat template'}; max_prompt_tokens {P.max_tokens}, max_steps {P.max_steps})"]
    for s in samples:
        b = task.collate_eval([s])
        n = int(b["mask"][0].sum())
        out.append(f"- user {s.get('user', '?')}: {len(s['items'])} history steps, prompt {n} tokens")
        out.append("  " + P.decode(b["ids"][0][:n]).replace("\n", "\n  "))
        if name == "purchase_intent":
            words = task.cfg.answer_tokens
            lab = ", ".join(f"{P.decode(P.item_table('')[int(c)])} -> {words[0] if y else words[1]}" for c, y in zip(b["cands"][0], b["labels"][0]))
            out.append(f"  answered by logit('{words[0]}') - logit('{words[1]}') at the last token; one prompt per candidate: {lab}")
        elif name == "rating":
            tr = s.get("target_rating")
            out.append("  answer: the expected score over the answer tokens; true rating " + (f"{tr:g}" if tr is not None else "none (skipped)"))
        elif name == "candidate_ranking":
            out.append(f"  answer (the target): {P.decode(P.answer_ids(int(b['cands'][0, 0])))}  [{task.cfg.text_scoring}]")
    return out
