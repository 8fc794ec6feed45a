"""Top-K recommendations from a trained model: the Python API behind ``ecomtrain recommend``.

    from ecomtrain.serve import Recommender
    rec = Recommender.from_pretrained("runs/quickstart-...")      # run folder, checkpoint or export
    df = rec.recommend({"u1": ["SKU000012", "SKU000140"]}, k=20)  # polars: user, rank, item, score[, title]

Scoring goes through ``serve.topk.rank_catalog`` (the routine ``eval`` uses): item chunks sized
from ``score_memory_mb``, a running top-K, no batch x catalog matrix. Histories are raw item ids
(mapped through the catalog; unknown ids are dropped and counted in ``last_stats``), oldest first;
the last ``max_history`` items feed the model, all of them are excluded when ``exclude_seen``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import torch

from ..data.importers import DataError
from .topk import HiddenScorer, chunk_for_budget, last_hidden, rank_catalog


def _pad(rows: Sequence[Sequence[int]]) -> torch.Tensor:
    width = max(1, max((len(r) for r in rows), default=1))
    out = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            out[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
    return out


def _text_item_net(cfg, manifest: dict, state: dict, run_dir: Path):
    """model.items text/hybrid: the run's ItemLM with its item tower (text table, adapter, cold head), as training built it."""
    from ..config import RecipeError
    from ..train.module import module_for_dataset

    module = module_for_dataset(cfg, manifest, log=lambda *_: None, init_from_text=False)
    module.configure_model()
    missing, unexpected = module.load_state_dict(state["state_dict"], strict=False)
    missing = [k for k in missing if k.startswith("net.") and not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RecipeError(f"{run_dir}: checkpoint does not match the recipe's model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return module.net.eval()


def _run_dir_of(path: Path) -> Optional[Path]:
    for p in [path, *path.parents]:
        if (p / "recipe.yaml").is_file():
            return p
    return None


class Recommender:
    def __init__(self, net, catalog, max_history: int, score_memory_mb: float = 256.0, device: str | torch.device = "cpu"):
        import polars as pl

        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.catalog = catalog.sort("idx")
        self.num_items = self.catalog.height
        if self.num_items != net.vocab.num_items:
            raise DataError(f"catalog has {self.num_items} items but the model scores {net.vocab.num_items}")
        self.max_history = max_history
        self.score_memory_mb = score_memory_mb
        self.item_ids = self.catalog["item"].to_list()
        self._index = {str(v): i + 1 for i, v in enumerate(self.item_ids)}
        self.titles = self.catalog["title"].cast(pl.Utf8).to_list() if "title" in self.catalog.columns else None
        self.last_stats: dict = {}

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: Union[str, Path], ckpt: str = "last", device: Optional[str] = None,
                        overrides: Optional[list[str]] = None, score_memory_mb: Optional[float] = None) -> "Recommender":
        """A run folder (``recipe.yaml`` + ``checkpoints/``), a checkpoint inside one, or an
        ``ecomtrain export`` folder (``item_vocab.json``)."""
        import polars as pl

        from ..config import RecipeError

        path = Path(path)
        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if path.is_dir() and (path / "item_vocab.json").is_file():
            return cls._from_export(path, dev, score_memory_mb or 256.0)
        run_dir = _run_dir_of(path) if path.exists() else None
        if run_dir is None:
            raise RecipeError(f"{path}: not a run folder (recipe.yaml), a checkpoint inside one, or an export folder (item_vocab.json)")
        if path != run_dir:
            ckpt = str(path)
        elif not (run_dir / "checkpoints").is_dir() or not any((run_dir / "checkpoints").iterdir()):
            raise RecipeError(f"{run_dir}: run folder has no checkpoint (checkpoints/ is missing or empty); train it first")
        from ..data.build import load_manifest
        from ..export import load_run_state, load_trained_lm
        from ..model.backbone import ItemLM

        run = load_run_state(run_dir, ckpt, overrides)
        cfg, _, state, _ = run
        if "next_item" not in [t.name for t in cfg.task]:  # only next_item trains the item-token ranking
            raise RecipeError(f"{run_dir}: recommend ranks the catalog with a next_item model; this run trained "
                              f"{', '.join(t.name for t in cfg.task)} (use `ecomtrain eval` for its metrics)")
        manifest = load_manifest(cfg.data.path)
        catalog = pl.read_parquet(Path(cfg.data.path) / manifest.get("item_file", "items.parquet"))
        if cfg.model.items != "id":  # text/hybrid: the module builds its LM and item tower once, from this state
            net = _text_item_net(cfg, manifest, state, run_dir)
        else:
            lm, vocab, tok, *_ = load_trained_lm(run_dir, ckpt, overrides, loaded=run)
            net = ItemLM(lm, vocab, tokenizer=tok)
        return cls(net, catalog, cfg.data.max_history, score_memory_mb or cfg.eval.score_memory_mb, dev)

    @classmethod
    def _from_export(cls, path: Path, device: str, score_memory_mb: float) -> "Recommender":
        import polars as pl

        from ..export import load_exported

        meta = json.loads((path / "ecomtrain_export.json").read_text()) if (path / "ecomtrain_export.json").is_file() else {}
        # id, text or hybrid (item table and cold head), plain or with a non-merged adapter
        net = load_exported(path, dtype=torch.float32)
        vocab = net.vocab
        if (path / "items.parquet").is_file():
            catalog = pl.read_parquet(path / "items.parquet")
        else:
            iv = json.loads((path / "item_vocab.json").read_text())  # a catalog from the vocab alone
            first = vocab.offset
            ids = [iv["token_id_to_item_id"][str(first + j)] for j in range(vocab.num_items)]
            catalog = pl.DataFrame({"item": [str(i) for i in ids], "idx": list(range(1, vocab.num_items + 1))})
        return cls(net, catalog, int(meta.get("max_history") or 50), score_memory_mb, device)

    # ------------------------------------------------------------------ inputs
    def encode(self, histories: Iterable[Sequence]) -> tuple[list[list[int]], int, list]:
        """Raw item ids -> item indices (unknown ids dropped): (indices, #unknown, a few unknown ids)."""
        out, unknown, examples = [], 0, []
        for h in histories:
            row = []
            for raw in h:
                i = self._index.get(str(raw))
                if i is None:
                    unknown += 1
                    if len(examples) < 3:
                        examples.append(raw)
                else:
                    row.append(i)
            out.append(row)
        return out, unknown, examples

    def item_mask(self, allow: Optional[Iterable] = None, deny: Optional[Iterable] = None, where: Optional[str] = None) -> Optional[torch.Tensor]:
        """bool [num_items] of recommendable items: allow-list, deny-list, catalog column filter
        (``where`` = ``COLUMN`` for a truthy column such as in_stock, or ``COLUMN=VALUE``)."""
        import polars as pl

        if allow is None and deny is None and not where:
            return None
        mask = torch.ones(self.num_items, dtype=torch.bool)
        if allow is not None:
            idx, unknown, _ = self.encode([list(allow)])
            if not idx[0]:
                raise DataError(f"allow list: none of its {unknown} item ids is in the catalog")
            keep = torch.zeros(self.num_items, dtype=torch.bool)
            keep[torch.tensor(idx[0]) - 1] = True
            mask &= keep
        if deny is not None:
            idx, _, _ = self.encode([list(deny)])
            if idx[0]:
                mask[torch.tensor(idx[0]) - 1] = False
        if where:
            col, _, value = where.partition("=")
            col = col.strip()
            if col not in self.catalog.columns:
                raise DataError(f"--filter: catalog has no column '{col}' (columns: {', '.join(self.catalog.columns)})")
            s = self.catalog[col]
            if value:
                ok = s.cast(pl.Utf8) == value.strip()
            elif s.dtype == pl.Boolean:
                ok = s
            else:
                ok = s.cast(pl.Utf8).is_in(["1", "true", "True", "yes", "1.0"])
            mask &= torch.tensor(ok.fill_null(False).to_list(), dtype=torch.bool)
        if not bool(mask.any()):
            raise DataError("the item filters leave no recommendable item")
        return mask

    # ------------------------------------------------------------------ ranking
    def batch_tensors(self, rows: Sequence[Sequence[int]], exclude_seen: bool = True) -> dict:
        """One batch of index histories (1-based) -> model input (the last ``max_history`` items,
        right-padded), lengths, and the whole history to exclude (None with ``exclude_seen`` off)."""
        return {"items": _pad([r[-self.max_history:] for r in rows]),
                "lengths": torch.tensor([max(1, min(len(r), self.max_history)) for r in rows]),
                "seen": _pad(rows) if exclude_seen else None}

    @torch.no_grad()
    def rank_batch(self, batch: dict, k: int, allowed: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores [b, k], item columns [b, k]) of a ``batch_tensors`` batch, on the model's device;
        -inf = no item. The one scoring step of ``rank_indices`` and of the multi-process predict loop."""
        dev = next(self.net.parameters()).device
        items, lengths = batch["items"].to(dev), batch["lengths"].to(dev)
        seen = batch["seen"].to(dev) if batch.get("seen") is not None else None
        h = last_hidden(self.net, items, lengths)
        chunk = chunk_for_budget(len(items), self.score_memory_mb, self.num_items, device=dev)
        res = rank_catalog(HiddenScorer(self.net, h), len(items), self.num_items, k, chunk, seen=seen,
                           allowed=allowed.to(dev) if allowed is not None else None, device=dev)
        return res.values, res.indices

    def rank_indices(self, histories: Sequence[Sequence[int]], k: int, exclude_seen: bool = True,
                     allowed: Optional[torch.Tensor] = None, batch_size: int = 256) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Per batch of index histories (1-based): (scores [b, k], item columns [b, k]); -inf = no item."""
        if k > self.num_items:
            raise DataError(f"--k {k} is larger than the catalog ({self.num_items} items)")
        allowed = allowed.to(self.device) if allowed is not None else None
        for s in range(0, len(histories), batch_size):
            v, i = self.rank_batch(self.batch_tensors(histories[s : s + batch_size], exclude_seen), k, allowed)
            yield v.cpu(), i.cpu()

    def recommend(self, histories, k: int = 20, exclude_seen: bool = True, allow=None, deny=None,
                  where: Optional[str] = None, batch_size: int = 256, users: Optional[Sequence] = None):
        """Top-``k`` per user as a polars DataFrame ``user, rank, item, score[, title]``.

        ``histories``: ``{user: [raw item ids]}``, a list of id lists (users 0..n-1, or ``users``),
        or a DataFrame with ``user`` and ``item`` (a list per user, or one row per event in order).
        """
        import polars as pl

        if isinstance(histories, dict):
            users, histories = list(histories.keys()), list(histories.values())
        elif not isinstance(histories, (list, tuple)):
            users, histories = frame_histories(histories)
        users = list(users) if users is not None else list(range(len(histories)))
        idx, unknown, examples = self.encode(histories)
        keep = [j for j, h in enumerate(idx) if h]
        self.last_stats = {"users": len(idx), "users_without_known_items": len(idx) - len(keep),
                           "unknown_item_ids": unknown, "unknown_examples": examples}
        if not keep:
            raise DataError(f"no user has an item id that is in the catalog ({unknown} unknown ids, e.g. {examples})")
        return self.frame([users[j] for j in keep], [idx[j] for j in keep], k, exclude_seen,
                           self.item_mask(allow, deny, where), batch_size)

    def frame(self, users: list, idx: list[list[int]], k: int, exclude_seen: bool, allowed, batch_size: int):
        """Top-k DataFrame for users whose histories are already item indices (1-based)."""
        import polars as pl

        vals, inds = [], []
        for v, i in self.rank_indices(idx, k, exclude_seen, allowed, batch_size):
            vals.append(v)
            inds.append(i)
        return self.to_frame(users, torch.cat(vals) if vals else torch.empty(0, k), torch.cat(inds) if inds else torch.empty(0, k, dtype=torch.long))

    def to_frame(self, users: Sequence, values: torch.Tensor, indices: torch.Tensor):
        """[U, k] scores and item columns (-inf = no item; they sort last) -> ``user, rank, item,
        score[, title]``, built column-wise (no per-row Python loop: 100 k users x 20 = 2 M rows)."""
        import numpy as np
        import polars as pl

        v, i = values.float().numpy(), indices.numpy()
        n, k = v.shape
        keep = np.isfinite(v).ravel()
        pos = np.repeat(np.arange(n), k)[keep]
        col = i.ravel()[keep]
        cols = {
            "user": pl.Series("user", list(users)).gather(pos),
            "rank": pl.Series("rank", np.tile(np.arange(1, k + 1, dtype=np.int32), n)[keep]),
            "item": self.catalog["item"].gather(col),
            "score": pl.Series("score", v.ravel()[keep], dtype=pl.Float32),
        }
        if self.titles is not None:
            cols["title"] = self.catalog["title"].cast(pl.Utf8).gather(col)
        return pl.DataFrame(cols)


def frame_histories(df) -> tuple[list, list[list]]:
    """A DataFrame (polars or pandas) -> (users, raw-id histories). ``item`` may be a list column
    (one row per user) or a scalar column (one row per event, kept in file order, or by ``ts``)."""
    import polars as pl

    if not isinstance(df, pl.DataFrame):
        df = pl.from_pandas(df)
    col = "item" if "item" in df.columns else ("items" if "items" in df.columns else None)
    missing = [c for c, ok in (("user", "user" in df.columns), ("item", col is not None)) if not ok]
    if missing:
        raise DataError(f"histories: missing column(s) {', '.join(missing)} (found: {', '.join(df.columns) or 'none'}); "
                        "need 'user' and 'item' (a list per user, or one row per event)")
    if isinstance(df.schema[col], pl.List):
        return df["user"].to_list(), df[col].to_list()
    if "ts" in df.columns:
        df = df.with_row_index("_row").sort(["ts", "_row"])
    g = df.group_by("user", maintain_order=True).agg(pl.col(col))
    return g["user"].to_list(), g[col].to_list()


def read_histories(path: Union[str, Path]) -> tuple[list, list[list]]:
    """Parquet / CSV / TSV / JSONL file of histories -> (users, raw-id histories)."""
    import polars as pl

    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: history file not found")
    suf = p.suffix.lower()
    try:
        if suf == ".parquet":
            df = pl.read_parquet(p)
        elif suf in (".csv", ".tsv"):
            df = pl.read_csv(p, separator="\t" if suf == ".tsv" else ",", infer_schema_length=0)  # ids stay strings
        elif suf in (".jsonl", ".ndjson", ".json"):
            df = pl.read_ndjson(p)
        else:
            raise DataError(f"{p}: unknown history file type '{suf}' (use .parquet, .csv, .tsv or .jsonl)")
    except DataError:
        raise
    except Exception as exc:  # a malformed file: one line naming it
        raise DataError(f"{p}: cannot read histories ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    return frame_histories(df)
