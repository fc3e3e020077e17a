"""A transformers cache layer that keeps per-page key bounds (Quest metadata) beside K/V.

:class:`PageBoundsLayer` is a :class:`transformers.cache_utils.DynamicLayer` that also holds, for
its keys ``(B, Hkv, S, D)``:

* ``valid`` (B, S) bool: which slots hold real tokens (False for padding);
* ``page_min`` / ``page_max`` (B, Hkv, NP, D) float32: per-page, per-channel key min / max over
  the valid slots of each page of ``page_size`` slots, zeros for a page without a valid slot
  (exactly :func:`sol_hf.ops.page_key_bounds_naive` of the cached keys);
* ``page_valid`` (B, NP) bool: pages holding at least one valid slot.

Appending tokens recomputes only the pages they touch (the last, partially filled page and any new
ones): ``O(page_size * D)`` work per appended token whatever the context length. When a new page
starts, the bound tensors grow by concatenation, like ``DynamicLayer``'s own K/V do every step.

Padding rule: new slots are valid unless the caller says otherwise, either with
``layer.update(k, v, valid=mask)`` or, through a model forward, the ``sol_cache_valid`` forward
kwarg (transformers hands the attention kwargs to ``Cache.update`` as ``kwargs=``). ``mask`` may be
(B, T) for the T new slots or the full (B, S) attention mask (its last T columns are used). After a
left-padded prefill without either, call :func:`set_cache_valid` (or ``layer.set_valid``) with the
2-D attention mask: it recomputes the bounds once.

``crop``, ``batch_repeat_interleave``, ``batch_select_indices``, ``reorder_cache``, ``reset``,
``offload`` and ``prefetch`` keep the extra state consistent (``DynamicIndexedLayer`` precedent).
"""

from __future__ import annotations

import functools

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from .ops.page_attention import page_key_bounds_naive

__all__ = ["PageBoundsLayer", "page_bounds_cache", "set_cache_valid", "VALID_KWARG"]

VALID_KWARG = "sol_cache_valid"


class PageBoundsLayer(DynamicLayer):
    """``DynamicLayer`` plus per-page key min/max, kept up to date on every append."""

    def __init__(self, page_size: int = 16, **kwargs):
        super().__init__()
        if page_size < 1:
            raise ValueError(f"page_size must be a positive int, got {page_size}")
        self.page_size = int(page_size)
        self._clear_bounds()

    def _clear_bounds(self) -> None:
        self.valid: torch.Tensor | None = None
        self.page_min: torch.Tensor | None = None
        self.page_max: torch.Tensor | None = None
        self.page_valid: torch.Tensor | None = None

    def __repr__(self):
        return f"{self.__class__.__name__}(page_size={self.page_size})"

    # ------------------------------------------------------------------ updates
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, valid: torch.Tensor | None = None, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``key_states``/``value_states`` (B, Hkv, T, D) and refresh the touched pages.

        ``valid``: optional (B, T) or (B, S_total) bool/int mask of real tokens (see module doc).
        """
        if valid is None:
            nested = kwargs.get("kwargs")
            if isinstance(nested, dict):
                valid = nested.get(VALID_KWARG)
        start = self.get_seq_length()
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        batch, new = key_states.shape[0], key_states.shape[-2]
        if new == 0:
            return keys, values
        if valid is None:
            new_valid = torch.ones(batch, new, dtype=torch.bool, device=keys.device)
        else:
            new_valid = valid[:, -new:].to(device=keys.device, dtype=torch.bool)
            if new_valid.shape != (batch, new):
                raise ValueError(f"valid must be (B, T) = ({batch}, {new}) or (B, S_total); got {tuple(valid.shape)}")
        self.valid = new_valid if start == 0 or self.valid is None else torch.cat([self.valid, new_valid], dim=1)
        self._refresh_from(start // self.page_size)
        return keys, values

    def set_valid(self, valid: torch.Tensor) -> None:
        """Replace the slot mask with ``valid`` (B, S) (e.g. the 2-D attention mask after a padded
        prefill; its last S columns are used) and recompute every page's bounds."""
        if self.get_seq_length() == 0:
            return
        seq_len = self.keys.shape[-2]
        self.valid = valid[:, -seq_len:].to(device=self.keys.device, dtype=torch.bool).clone()
        self._clear_pages()
        self._refresh_from(0)

    def recompute_bounds(self) -> None:
        """Recompute all bounds from the cached keys and ``valid`` (O(S))."""
        if self.get_seq_length() > 0:
            self._clear_pages()
            self._refresh_from(0)

    def _clear_pages(self) -> None:
        self.page_min = self.page_max = self.page_valid = None

    def _refresh_from(self, first_page: int) -> None:
        """Recompute pages ``first_page ..`` from the keys; earlier pages are left untouched."""
        size = self.page_size
        seq_len = self.keys.shape[-2]
        n_pages = -(-seq_len // size)
        first_page = min(first_page, n_pages)
        if self.page_min is None:
            first_page = 0
        s0 = first_page * size
        tail_keys, tail_valid = self.keys[:, :, s0:], self.valid[:, s0:]
        mn, mx = page_key_bounds_naive(tail_keys, tail_valid, size)
        pad = (n_pages - first_page) * size - tail_valid.shape[1]
        padded = torch.nn.functional.pad(tail_valid, (0, pad), value=False)
        pv = padded.view(padded.shape[0], -1, size).any(dim=-1)
        if first_page == 0:
            self.page_min, self.page_max, self.page_valid = mn, mx, pv
        elif self.page_min.shape[2] == n_pages:  # no new page: overwrite the touched ones in place
            self.page_min[:, :, first_page:] = mn
            self.page_max[:, :, first_page:] = mx
            self.page_valid[:, first_page:] = pv
        else:
            self.page_min = torch.cat([self.page_min[:, :, :first_page], mn], dim=2)
            self.page_max = torch.cat([self.page_max[:, :, :first_page], mx], dim=2)
            self.page_valid = torch.cat([self.page_valid[:, :first_page], pv], dim=1)

    # ------------------------------------------------------------ cache surgery
    def _has_bounds(self) -> bool:
        return self.page_min is not None and self.get_seq_length() > 0

    def _map_state(self, fn) -> None:
        if self._has_bounds():
            self.valid, self.page_min, self.page_max, self.page_valid = (
                fn(t) for t in (self.valid, self.page_min, self.page_max, self.page_valid)
            )

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if tokens_to_remove == 0 or self.valid is None or not self.is_initialized:
            return
        seq_len = self.keys.shape[-2]
        n_pages = -(-seq_len // self.page_size)
        self.valid = self.valid[:, :seq_len]
        if seq_len == 0:
            self._clear_bounds()
            return
        self.page_min = self.page_min[:, :, :n_pages]
        self.page_max = self.page_max[:, :, :n_pages]
        self.page_valid = self.page_valid[:, :n_pages]
        if seq_len % self.page_size:  # the last page lost slots: recompute it
            self.page_min, self.page_max = self.page_min.clone(), self.page_max.clone()
            self.page_valid = self.page_valid.clone()
            self._refresh_from(seq_len // self.page_size)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_state(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_state(lambda t: t[indices, ...])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_state(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def reset(self) -> None:
        super().reset()
        self._clear_bounds()

    def offload(self):
        super().offload()
        self._map_state(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        super().prefetch()
        if self._has_bounds() and self.page_min.device != self.device:
            self._map_state(lambda t: t.to(self.device, non_blocking=True))


def page_bounds_cache(config=None, page_size: int = 16) -> DynamicCache:
    """A ``DynamicCache`` whose full-attention layers are :class:`PageBoundsLayer`.

    With a model ``config``, the layer types come from transformers (``DynamicCache(config=...)``)
    and every plain ``DynamicLayer`` is replaced; sliding-window and other special layers are kept
    as they are (their keys are a moving window, so page bounds would not line up with slots).
    Without a config, layers are created lazily as ``PageBoundsLayer(page_size)``.
    """
    if config is None:
        cache = DynamicCache()
        cache.layer_class_to_replicate = functools.partial(PageBoundsLayer, page_size=page_size)
        return cache
    cache = DynamicCache(config=config)
    cache.layers = [
        PageBoundsLayer(page_size=page_size) if type(layer) is DynamicLayer else layer for layer in cache.layers
    ]
    return cache


def set_cache_valid(cache, valid: torch.Tensor) -> None:
    """Call :meth:`PageBoundsLayer.set_valid` on every page-bounds layer of ``cache`` with the 2-D
    mask ``valid`` (B, S) (1/True = real token), e.g. the attention mask after a padded prefill."""
    for layer in cache.layers:
        if isinstance(layer, PageBoundsLayer):
            layer.set_valid(valid)
