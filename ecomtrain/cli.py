"""The ``ecomtrain`` command.

    ecomtrain data synth --out data/raw
    ecomtrain data build --source synth --input data/raw --out data/quickstart
    ecomtrain data inspect data/quickstart
    ecomtrain train recipes/quickstart.yaml [dotted.key=value ...]
    ecomtrain eval runs/quickstart-... [--split test] [--ckpt best|last|PATH]
    ecomtrain export runs/quickstart-... --out exported/ [--ckpt last|best|PATH] [--merge]

Heavy imports (torch, lightning) happen inside the verbs so that ``--help``
and recipe validation answer at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _kv(text: str, what: str, cast=str) -> dict:
    """'a=x,b=y' -> {'a': 'x', 'b': 'y'} (values cast with ``cast``)."""
    out = {}
    for part in filter(None, (t.strip() for t in text.split(","))):
        if "=" not in part:
            from .data.importers import DataError

            raise DataError(f"{what}: '{part}' is not KEY=VALUE (e.g. {what} user=visitor_id,item=sku)")
        k, v = part.split("=", 1)
        out[k.strip()] = cast(v.strip())
    return out


def _add_build_args(p: argparse.ArgumentParser) -> None:
    """Flags mirror ecomtrain.config.BuildConfig (same names, dashes for underscores)."""
    p.add_argument("--source", default="synth", help="importer: synth, table, seq, movielens, amazon-reviews, retailrocket, taobao")
    p.add_argument("--input", help="input file, folder or glob for the importer")
    p.add_argument("--out", required=True, help="output folder (manifest.json, items.parquet, *.tar)")
    p.add_argument("--columns", help="table: field=column mapping, e.g. user=visitor,item=sku,ts=time,event=type,channel=app,value=price")
    p.add_argument("--items", help="item catalog file (table/amazon-reviews): item,title,category,brand,price")
    p.add_argument("--timestamp-format", help="strptime format when the timestamp column holds date strings")
    p.add_argument("--separator", help="table: CSV field separator (default ',' or tab for .tsv)")
    p.add_argument("--event-types", help="comma-separated event types to keep (default: all)")
    p.add_argument("--event-weights", help="per-type weights stored with each position, e.g. view=1,cart=2,purchase=4")
    p.add_argument("--min-user-events", type=int, default=3)
    p.add_argument("--kcore-users", type=int, default=0, help="k-core: users need at least this many events (0 = off)")
    p.add_argument("--kcore-items", type=int, default=0, help="k-core: items need at least this many events (0 = off)")
    p.add_argument("--max-history", type=int, default=200)
    p.add_argument("--no-collapse-repeats", action="store_true", help="keep consecutive events on the same item as separate positions")
    p.add_argument("--split", default="leave_one_out", choices=["leave_one_out", "temporal"])
    p.add_argument("--temporal-val-fraction", type=float, default=0.1, help="temporal: share of events (by time) in the val period")
    p.add_argument("--temporal-test-fraction", type=float, default=0.1, help="temporal: share of events (by time) in the test period")
    p.add_argument("--session-gap", type=int, help="start a new session after this many time units of inactivity (adds 'sessions')")
    p.add_argument("--pseudonymise-users", action="store_true", help="replace user ids by HMAC-SHA256 with the key in --pseudonym-key-env")
    p.add_argument("--pseudonym-key-env", default="ECOMTRAIN_PSEUDONYM_KEY", help="environment variable holding the HMAC key")
    p.add_argument("--shard-max-samples", type=int, default=5000)
    p.add_argument("--shard-max-bytes", type=int, default=64 * 1024 * 1024)
    p.add_argument("--partition-events", type=int, default=4_000_000, help="events per user hash partition (bounds memory)")
    p.add_argument("--seed", type=int, default=0)


def cmd_synth(a: argparse.Namespace) -> int:
    from .data import synth

    summary = synth.write(
        a.out, num_users=a.users, num_items=a.items, num_categories=a.categories, num_brands=a.brands,
        days=a.days, sessions_per_user=a.sessions, seed=a.seed,
    )
    print(json.dumps(summary, indent=2))
    return 0


def cmd_build(a: argparse.Namespace) -> int:
    from .data import build, importers

    if a.input is None:
        raise importers.DataError("--input is required (a file or folder for the importer)")
    imp = importers.load(
        a.source, a.input, columns=_kv(a.columns, "--columns") if a.columns else None, items=a.items,
        timestamp_format=a.timestamp_format, separator=a.separator,
    )
    m = build.build(
        imp, a.out, event_types=a.event_types.split(",") if a.event_types else None,
        event_weights=_kv(a.event_weights, "--event-weights", float) if a.event_weights else None,
        min_user_events=a.min_user_events, kcore_users=a.kcore_users, kcore_items=a.kcore_items,
        max_history=a.max_history, collapse_repeats=not a.no_collapse_repeats, split=a.split,
        temporal_val_fraction=a.temporal_val_fraction, temporal_test_fraction=a.temporal_test_fraction,
        session_gap=a.session_gap, pseudonymise_users=a.pseudonymise_users, pseudonym_key_env=a.pseudonym_key_env,
        shard_max_samples=a.shard_max_samples, shard_max_bytes=a.shard_max_bytes, partition_events=a.partition_events,
        seed=a.seed, source={"source": a.source, "input": str(a.input)},
    )
    print(f"manifest: {Path(a.out) / 'manifest.json'} ({m['num_users']} users, {m['num_items']} items)")
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    from .data.inspect import inspect_dataset

    return inspect_dataset(a.dir)


def cmd_train(a: argparse.Namespace) -> int:
    from .config import load_recipe

    cfg = load_recipe(a.recipe, a.overrides)  # all recipe errors surface here, before any model
    if a.check:
        print(f"{a.recipe}: valid")
        return 0
    from .train.runner import train

    train(cfg, callbacks=getattr(a, "callbacks", ()))
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from .train.evaluate import evaluate

    metrics = evaluate(a.run_dir, split=a.split, ckpt=a.ckpt, overrides=a.overrides)
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from .export import export

    out = export(a.run_dir, a.out, ckpt=a.ckpt, merge=a.merge, force=a.force, overrides=a.overrides)
    how = "transformers.AutoModelForCausalLM.from_pretrained"
    if (Path(out) / "adapter").is_dir() and not a.merge:
        how += f" + peft.PeftModel.from_pretrained(model, '{Path(out) / 'adapter'}')"
    print(f"exported: {out} (load with {how})")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with the house error format: one line on stderr, ``error: ...``, exit 2
    (argparse's default prints the whole usage first)."""

    def error(self, message: str):  # noqa: D102
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ecomtrain", description="Train LLM-based e-commerce recommenders.")
    sub = p.add_subparsers(dest="verb", required=True)

    data = sub.add_parser("data", help="generate, build and inspect datasets")
    dsub = data.add_subparsers(dest="data_verb", required=True)
    s = dsub.add_parser("synth", help="write a synthetic e-commerce event log (events.parquet, items.parquet)")
    s.add_argument("--out", required=True)
    s.add_argument("--users", type=int, default=2000)
    s.add_argument("--items", type=int, default=600)
    s.add_argument("--categories", type=int, default=12)
    s.add_argument("--brands", type=int, default=40)
    s.add_argument("--days", type=int, default=120)
    s.add_argument("--sessions", type=float, default=6.0, help="mean sessions per user")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_synth)
    b = dsub.add_parser("build", help="events -> per-user sequences -> leave-one-out splits -> WebDataset shards")
    _add_build_args(b)
    b.set_defaults(fn=cmd_build)
    i = dsub.add_parser("inspect", help="summarise a built dataset and verify every shard against manifest.json")
    i.add_argument("dir")
    i.set_defaults(fn=cmd_inspect)

    t = sub.add_parser("train", help="train, validate and test a recipe; writes RUN_DIR")
    t.add_argument("recipe", help="YAML recipe (see recipes/)")
    t.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. trainer.max_epochs=3")
    t.add_argument("--check", action="store_true", help="only validate the recipe and exit")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="evaluate a run's checkpoint on a split; prints metrics JSON")
    e.add_argument("run_dir")
    e.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the run's recipe (e.g. data.path=...)")
    e.add_argument("--split", default="test", choices=["val", "test"])
    e.add_argument("--ckpt", default="best", help="best, last, or a checkpoint path")
    e.set_defaults(fn=cmd_eval)

    x = sub.add_parser("export", help="write a Hugging Face folder (safetensors, tokenizer, item_vocab.json) from a run's checkpoint")
    x.add_argument("run_dir")
    x.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the run's recipe (e.g. data.path=...)")
    x.add_argument("--out", required=True, help="output folder (must not exist or be empty, unless --force)")
    x.add_argument("--ckpt", default="last", help="last (default), best, or a checkpoint path (file or DeepSpeed folder)")
    x.add_argument("--force", action="store_true", help="replace a non-empty --out")
    x.add_argument("--merge", action="store_true", help="adapter runs: fold the adapter into the weights (a plain model; adapter/ is still written)")
    x.set_defaults(fn=cmd_export)
    return p


def main(argv: list[str] | None = None, *, callbacks: tuple | list = ()) -> int:
    """Run one verb. ``callbacks``: extra Lightning callbacks for ``train`` (Python API only; the
    command line has no way to load code)."""
    args = parser().parse_args(argv)
    args.callbacks = list(callbacks)
    from .config import RecipeError
    from .data.importers import DataError
    from .train.errors import CheckpointError

    try:
        return args.fn(args)
    except (RecipeError, DataError, CheckpointError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:
        # trainer.nonfinite.action=stop (or too many skips): every rank stops at the same step
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
