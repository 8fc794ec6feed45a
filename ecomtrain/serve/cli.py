"""``ecomtrain recommend``: top-K lists for users of a split or a history file, one output file.

    ecomtrain recommend runs/quickstart-... --split test --k 20 --out recs.parquet
    ecomtrain recommend exported/ --histories users.csv --deny out_of_stock.txt --filter in_stock --out recs.csv

Every input is checked before the model is loaded; the output is written by this one process (with
``--devices N``: by rank 0, after the ranks' lists are gathered; serve/predict.py) to a temporary file
next to ``--out`` and renamed when complete, so a failure never leaves a partial file.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..data.importers import DataError


def add_parser(sub) -> None:
    r = sub.add_parser("recommend", help="top-K items per user (Parquet/CSV) from a run folder, checkpoint or export")
    r.add_argument("model", help="run folder, checkpoint file/folder inside one, or `ecomtrain export` folder")
    r.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the run's recipe (e.g. data.path=...)")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--split", choices=["train", "val", "test"], help="users of this split of the built shards")
    src.add_argument("--histories", help="Parquet/CSV/TSV/JSONL with `user` and `item` (list per user, or one row per event; optional ts)")
    r.add_argument("--out", required=True, help="output file: .parquet (default) or .csv")
    r.add_argument("--k", type=int, default=20, help="items per user (default 20)")
    r.add_argument("--include-seen", action="store_true", help="allow items already in the user's history (excluded by default)")
    r.add_argument("--allow", help="file of item ids (one per line) that may be recommended")
    r.add_argument("--deny", help="file of item ids (one per line) never to recommend")
    r.add_argument("--filter", help="catalog column filter: COLUMN (truthy, e.g. in_stock) or COLUMN=VALUE")
    r.add_argument("--batch-size", type=int, default=256, help="users scored together (default 256)")
    r.add_argument("--ckpt", default="last", help="for a run folder: last (default), best, or a path")
    r.add_argument("--data", help="built dataset folder for --split (default: the run's data.path)")
    r.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    r.add_argument("--devices", type=int, default=1,
                   help="processes (CPU, gloo) or GPUs (nccl) per node scoring shares of the users through Lightning's "
                        "predict loop; rank 0 writes the one output file (default 1: this process alone). Under torchrun: "
                        "the --nproc_per_node value")
    r.add_argument("--num-nodes", type=int, default=1, help="nodes for --devices (under torchrun/Slurm; default 1)")
    r.set_defaults(fn=run)


def _id_list(path: str, what: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{what} {p}: file not found")
    if p.suffix.lower() in (".parquet", ".csv"):
        import polars as pl

        df = pl.read_parquet(p) if p.suffix.lower() == ".parquet" else pl.read_csv(p, infer_schema_length=0)
        if "item" not in df.columns:
            raise DataError(f"{what} {p}: no 'item' column (found: {', '.join(df.columns)})")
        return [str(v) for v in df["item"].to_list()]
    return [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]


def _split_samples(data_dir: Path, split: str) -> tuple[list, list[list[int]]]:
    from ..data.build import load_manifest
    from ..data.stream import _iter_shard

    manifest = load_manifest(data_dir)
    users, hist = [], []
    for sh in manifest["splits"][split]["shards"]:
        for s in _iter_shard(data_dir / sh["name"]):
            users.append(s["user"])
            hist.append(s["items"])
    if not users:
        raise DataError(f"{data_dir}: split '{split}' has no users")
    return users, hist


def run(a: argparse.Namespace) -> int:
    from .recommend import Recommender, read_histories

    out = Path(a.out)
    if out.suffix.lower() not in (".parquet", ".csv"):
        raise DataError(f"--out {out}: use a .parquet or .csv file name")
    if not out.parent.is_dir():
        raise DataError(f"--out {out}: folder {out.parent} does not exist")
    if a.k <= 0 or a.batch_size <= 0:
        raise DataError(f"--k and --batch-size must be positive (got {a.k}, {a.batch_size})")
    if a.devices <= 0 or a.num_nodes <= 0:
        raise DataError(f"--devices and --num-nodes must be positive (got {a.devices}, {a.num_nodes})")
    users = hist = None
    if a.histories:
        users, hist = read_histories(a.histories)  # columns checked before the model loads
    allow = _id_list(a.allow, "--allow") if a.allow else None
    deny = _id_list(a.deny, "--deny") if a.deny else None

    rec = Recommender.from_pretrained(a.model, ckpt=a.ckpt, device=a.device, overrides=a.overrides)
    if a.k > rec.num_items:
        raise DataError(f"--k {a.k} is larger than the catalog ({rec.num_items} items)")
    mask = rec.item_mask(allow, deny, a.filter)
    if a.split:
        if a.data:
            data = Path(a.data)
        elif (Path(a.model) / "item_vocab.json").is_file():
            raise DataError("--split with an export folder needs --data DIR (the built dataset)")
        else:
            from ..config import load_recipe
            from .recommend import _run_dir_of

            data = Path(load_recipe(_run_dir_of(Path(a.model)) / "recipe.yaml", a.overrides).data.path)
        users, idx = _split_samples(data, a.split)
        n_unknown = 0
    else:
        idx, n_unknown, examples = rec.encode(hist)
        keep = [j for j, h in enumerate(idx) if h]
        if not keep:
            raise DataError(f"{a.histories}: none of its {len(idx)} users has an item id in the catalog "
                            f"({n_unknown} unknown ids, e.g. {examples})")
        if n_unknown or len(keep) < len(idx):
            print(f"note: {n_unknown} unknown item id(s) ignored (e.g. {examples}); "
                  f"{len(idx) - len(keep)} user(s) without a known item skipped", file=sys.stderr)
        users, idx = [users[j] for j in keep], [idx[j] for j in keep]
    if a.devices * a.num_nodes > 1:
        from .predict import predict_lists

        if a.k > rec.num_items:
            raise DataError(f"--k {a.k} is larger than the catalog ({rec.num_items} items)")
        accel = "cuda" if rec.device.type == "cuda" else "cpu"
        zero, result = predict_lists(rec, idx, a.k, not a.include_seen, mask, a.batch_size, a.devices, a.num_nodes, accel)
        if not zero:
            return 0  # rank 0 writes the file
        df = rec.to_frame(users, *result)
    else:
        df = rec.frame(users, idx, a.k, not a.include_seen, mask, a.batch_size)

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        df.write_csv(tmp) if out.suffix.lower() == ".csv" else df.write_parquet(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {df.height} rows ({len(users)} users, k={a.k}, seen items {'included' if a.include_seen else 'excluded'}) to {out}")
    return 0
