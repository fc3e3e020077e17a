"""PageBoundsLayer: per-page key min/max kept equal to page_key_bounds_naive of the cached keys."""

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from sol_hf.cache import PageBoundsLayer, page_bounds_cache, set_cache_valid
from sol_hf.ops.page_attention import page_key_bounds_naive


def kv(batch, length, heads=2, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, heads, length, dim, generator=g), torch.randn(batch, heads, length, dim, generator=g)


def check(layer):
    """The layer's bounds equal the reference computed from scratch on its keys and slot mask."""
    assert layer.valid.shape == layer.keys.shape[:1] + layer.keys.shape[2:3]
    mn, mx = page_key_bounds_naive(layer.keys, layer.valid, layer.page_size)
    assert torch.equal(layer.page_min, mn) and torch.equal(layer.page_max, mx)
    n_pages = mn.shape[2]
    padded = torch.nn.functional.pad(layer.valid, (0, n_pages * layer.page_size - layer.valid.shape[1]))
    assert torch.equal(layer.page_valid, padded.view(padded.shape[0], n_pages, -1).any(-1))


def filled(page_size, prefill, steps, batch=2, valid=None, seed=0):
    layer = PageBoundsLayer(page_size=page_size)
    k, v = kv(batch, prefill, seed=seed)
    layer.update(k, v, valid=valid)
    for step in range(steps):
        k1, v1 = kv(batch, 1, seed=seed + 100 + step)
        layer.update(k1, v1)
    return layer


@pytest.mark.parametrize("page_size,prefill,steps", [(4, 5, 23), (16, 16, 40), (16, 3, 30), (8, 1, 17)])
def test_bounds_after_prefill_and_single_token_appends(page_size, prefill, steps):
    layer = PageBoundsLayer(page_size=page_size)
    k, v = kv(2, prefill)
    layer.update(k, v)
    check(layer)
    for step in range(steps):
        k1, v1 = kv(2, 1, seed=100 + step)
        keys, values = layer.update(k1, v1)
        assert keys.shape[2] == prefill + step + 1
        check(layer)


def test_padding_through_update_and_set_valid():
    valid = torch.ones(2, 13, dtype=torch.bool)
    valid[1, :9] = False  # left padding: the first two pages of row 1 have no valid slot
    layer = filled(4, 13, 6, valid=valid)
    check(layer)
    assert not layer.page_valid[1, :2].any() and torch.all(layer.page_min[1, :, :2] == 0)
    # Same cache filled without a mask, then fixed with the full attention mask after the fact.
    other = filled(4, 13, 6)
    full_mask = torch.cat([valid, torch.ones(2, 6, dtype=torch.bool)], dim=1).long()
    set_cache_valid(type("C", (), {"layers": [other]})(), full_mask)
    check(other)
    assert torch.equal(other.page_min, layer.page_min) and torch.equal(other.page_valid, layer.page_valid)


def test_valid_through_nested_attention_kwargs():
    layer = PageBoundsLayer(page_size=4)
    k, v = kv(1, 6)
    layer.update(k, v, kwargs={"sol_cache_valid": torch.tensor([[0, 0, 1, 1, 1, 1]])})
    assert layer.valid.tolist() == [[False, False, True, True, True, True]]
    check(layer)


@pytest.mark.parametrize("remove", [1, 3, 4, 9])
def test_crop(remove):
    layer = filled(4, 10, 7)
    layer.crop(-remove)
    assert layer.keys.shape[2] == 17 - remove
    check(layer)
    layer.update(*kv(2, 1, seed=7))  # and keeps working after the crop
    check(layer)


def test_crop_everything_then_refill():
    layer = filled(4, 5, 0)
    layer.crop(-5)
    assert layer.get_seq_length() == 0 and layer.page_min is None
    layer.update(*kv(2, 6, seed=3))
    check(layer)


def test_batch_repeat_interleave_select_and_reorder():
    layer = filled(4, 9, 3)
    layer.batch_repeat_interleave(3)
    assert layer.page_min.shape[0] == 6 and layer.valid.shape[0] == 6
    check(layer)
    layer.batch_select_indices(torch.tensor([0, 4, 5]))
    check(layer)
    layer.reorder_cache(torch.tensor([2, 0, 1]))
    check(layer)
    layer.update(*kv(3, 1, seed=11))
    check(layer)


def test_reset():
    layer = filled(4, 9, 2)
    layer.reset()
    assert layer.get_seq_length() == 0 and layer.page_min is None
    layer.update(*kv(1, 5, seed=5))
    check(layer)


def test_page_bounds_cache_with_a_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    cache = page_bounds_cache(config, page_size=4)
    assert all(isinstance(layer, PageBoundsLayer) for layer in cache.layers)
    ids = torch.randint(0, 64, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad():
        out = model(ids, attention_mask=mask, cache=cache, use_cache=True)
        set_cache_valid(cache, mask)
        for step in range(6):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
            out = model(out.logits[:, -1:].argmax(-1), attention_mask=mask, cache=cache, use_cache=True)
    for layer in cache.layers:
        assert layer.keys.shape[2] == 13
        check(layer)
        assert not layer.valid[1, :3].any() and layer.valid[1, 3:].all() and layer.valid[0].all()


def test_valid_mask_through_model_forward_kwarg():
    """``sol_cache_valid=`` on the model forward reaches the layers through the attention kwargs."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    )
    model = LlamaForCausalLM(config).eval()
    cache = page_bounds_cache(config, page_size=4)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :5] = 0
    with torch.no_grad():
        model(torch.randint(0, 64, (2, 9)), attention_mask=mask, cache=cache, sol_cache_valid=mask)
    layer = cache.layers[0]
    assert torch.equal(layer.valid, mask.bool())
    check(layer)
    assert layer.page_valid[0].tolist() == [False, True, True]


def test_page_bounds_cache_without_config_and_sliding_layers_kept():
    cache = page_bounds_cache(page_size=8)
    cache.update(*kv(1, 3), layer_idx=1)
    assert len(cache.layers) == 2 and all(isinstance(layer, PageBoundsLayer) for layer in cache.layers)
    from transformers import MistralConfig

    config = MistralConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, sliding_window=16)
    layers = page_bounds_cache(config).layers
    assert all(type(layer) is not DynamicLayer for layer in layers)
