"""Text windows for training and evaluation, and the offline Python-documentation corpus.

Documents are tokenized one by one and cut into non-overlapping windows that never cross a
document boundary (the authors' code concatenates documents without separators).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads in the functions that make tensors: the CLI parser reads the constants
    import torch

__all__ = [
    "PYTHON_DOCS_ROOT",
    "TRAIN_SECTIONS",
    "EVAL_SECTIONS",
    "python_docs_texts",
    "text_windows",
    "evenly_spaced",
    "load_windows",
]

PYTHON_DOCS_ROOT = "/usr/share/doc/python3.11/html/_sources"
TRAIN_SECTIONS = ("library", "howto", "whatsnew")
EVAL_SECTIONS = ("tutorial", "faq", "reference")


def python_docs_texts(sections: Sequence[str], root: str = PYTHON_DOCS_ROOT) -> list[str]:
    """Texts of the ``*.rst.txt`` files under ``root/<section>`` for each section, in sorted order.

    The corpus comes from Debian's ``python3.11-doc`` package (``apt-get install python3.11-doc``).
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"{root} not found: the Python documentation corpus comes from Debian's python3.11-doc package "
            f"(apt-get install python3.11-doc), or pass another root"
        )
    texts = []
    for section in sections:
        files = sorted(glob.glob(os.path.join(root, section, "**", "*.rst.txt"), recursive=True))
        if not files:
            raise FileNotFoundError(f"no *.rst.txt files under {os.path.join(root, section)}")
        for path in files:
            with open(path, encoding="utf-8", errors="replace") as f:
                texts.append(f.read())
    return texts


def text_windows(
    texts: Iterable[str],
    tokenizer,
    window_length: int,
    max_windows: int | None = None,
    add_bos: bool = True,
) -> torch.Tensor:
    """Cut each text into non-overlapping windows of ``window_length`` tokens.

    Args:
        texts: documents; a window never spans two documents, and a document's tail shorter
            than a window is dropped.
        tokenizer: a Hugging Face tokenizer.
        add_bos: start every window with the tokenizer's BOS token when it has one.
        max_windows: stop after this many windows.
    Returns:
        (N, window_length) int64.
    """
    import torch

    if window_length < 2:
        raise ValueError(f"window_length must be >= 2, got {window_length}")
    bos = tokenizer.bos_token_id if add_bos else None
    body = window_length - (1 if bos is not None else 0)
    windows: list[list[int]] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids) - body + 1, body):
            chunk = ids[start : start + body]
            windows.append(([bos] if bos is not None else []) + chunk)
            if max_windows is not None and len(windows) >= max_windows:
                return torch.tensor(windows, dtype=torch.long)
    if not windows:
        raise ValueError(f"no text was long enough for a window of {window_length} tokens")
    return torch.tensor(windows, dtype=torch.long)


def evenly_spaced(windows: torch.Tensor, count: int | None) -> torch.Tensor:
    """``count`` of the (N, L) windows, evenly spaced over all of them (deterministic), so every
    section or document range is represented; all of them when ``count`` is None or >= N."""
    import torch

    if count is None or count >= windows.shape[0]:
        return windows
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    return windows[torch.linspace(0, windows.shape[0] - 1, count).round().long()]


def load_windows(path: str, window_length: int, count: int | None = None) -> torch.Tensor:
    """Windows saved as a safetensors file with a ``windows`` (N, L) tensor (as ``train_policy``
    writes its validation windows), cut to their first ``window_length`` tokens, then
    :func:`evenly_spaced`."""
    from safetensors.torch import load_file

    windows = load_file(path).get("windows")
    if windows is None or windows.dim() != 2:
        raise ValueError(f"{path} holds no (N, L) 'windows' tensor")
    if windows.shape[1] < window_length:
        raise ValueError(f"{path} holds windows of {windows.shape[1]} tokens; {window_length} are needed")
    return evenly_spaced(windows[:, :window_length], count)
