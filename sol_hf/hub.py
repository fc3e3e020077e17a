"""Policy artifacts: save_pretrained / from_pretrained / push_to_hub for SolForCausalLM.

(Being implemented: see issue 3.)
"""

from __future__ import annotations


class SolHubMixin:
    """Hub I/O methods mixed into SolForCausalLM."""
