"""The weight-precision action (``SolConfig(quantize="weights")``): int8 copies read row by row.

Checked against: a dequantize-everything reference op, a base model whose weights were replaced
by hand with the dequantized copies, byte counts worked out by hand, and instrumented ops."""

import copy
import os

import pytest
import torch
from _tiny import FAMILIES, VOCAB, decode_and_teacher_forced_logits, left_padded_batch, tiny_model

from sol_hf import SolConfig, SolForCausalLM
from sol_hf.ops import HAS_TRITON, Int8Weight, dequantize_int8, int8_group_size, quantize_int8, use_backend
from sol_hf.ops.int8_linear import sparse_linear_int8, sparse_linear_int8_naive, sparse_linear_int8_rows
from sol_hf.ops.sparse_linear import sparse_linear_naive, sparse_linear_triton, topk_channels

requires_triton = pytest.mark.skipif(
    not (HAS_TRITON and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")),
    reason="needs triton, and on CPU TRITON_INTERPRET=1 set before sol_hf.ops is imported",
)
CONFIG = SolConfig.from_preset("int8-weights", page_size=4, sink_tokens=2, recent_tokens=4, policy_hidden_size=64)
WIDE = dict(intermediate_size=768)


def _ids(batch, length, seed=0):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# The ops
# --------------------------------------------------------------------------------------------


def test_group_sizes_and_quantization_by_hand():
    assert [int8_group_size(d) for d in (96, 512, 576, 3072, 6144, 28672, 1100, 4099)] == [96, 512, 576, 1536, 2048, 2048, 1100, 4099]
    # one group [-1, 0.1, 0.5, 1]: offset -1, scale 2/255; codes round((w + 1) * 127.5)
    w = torch.tensor([[-1.0, 0.1, 0.5, 1.0], [2.0, 2.0, 2.0, 2.0]])
    q = quantize_int8(w, group=4)
    assert q.packed.shape == (2, 12) and q.row_bytes == 12 and q.groups == 1
    assert q.packed[0, :4].tolist() == [0, 140, 191, 255]  # 140.25, 191.25 round down
    assert q.scale_offset[0].tolist() == pytest.approx([2 / 255, -1.0])
    assert q.packed[1, :4].tolist() == [0, 0, 0, 0] and q.scale_offset[1].tolist() == [1.0, 2.0]  # flat group
    # the packed row carries the same float32 scale and offset (fbgemm's layout)
    assert torch.equal(q.packed[:, 4:].contiguous().view(torch.float32), q.scale_offset)
    deq = dequantize_int8(q)
    assert deq[1].tolist() == [2.0] * 4
    assert (deq[0] - w[0]).abs().max() <= 1 / 255 + 1e-7  # half a step


@pytest.mark.parametrize("d_in,d_out", [(48, 96), (40, 1100), (64, 1536)])
def test_int8_rows_match_the_reference_and_read_only_kept_rows(d_in, d_out):
    g = torch.Generator().manual_seed(d_out)
    weight_t = torch.randn(d_in, d_out, generator=g) / d_in**0.5
    q = quantize_int8(weight_t)
    assert ((dequantize_int8(q) - weight_t).norm() / weight_t.norm()) < 0.01
    x, bias = torch.randn(3, d_in, generator=g), torch.randn(d_out, generator=g)
    idx, counts = topk_channels(x), torch.tensor([d_in, d_in // 2, 5])
    ref = sparse_linear_int8_naive(x, q, idx, counts, bias)
    # the reference is the float op on the dequantized weights, which differ from the originals
    assert not torch.allclose(ref, sparse_linear_naive(x, weight_t, idx, counts, bias), atol=1e-5)
    for use_fbgemm in (True, False):
        got = sparse_linear_int8_rows(x, q, idx, counts, bias, use_fbgemm=use_fbgemm)
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)
        # fixed-size bags (every row uses its 5 candidates)
        got = sparse_linear_int8_rows(x, q, idx[:, :5].contiguous(), None, bias, use_fbgemm=use_fbgemm)
        torch.testing.assert_close(got, sparse_linear_int8_naive(x, q, idx[:, :5], torch.full((3,), 5), bias), atol=2e-5, rtol=2e-5)
    # channels beyond a row's count are never read: poison the others' codes, row by row
    for r, c in [(1, d_in // 2), (2, 5)]:
        poisoned = q.packed.clone().view(d_in, -1)
        poisoned[idx[r, c:].long()] = 255
        bad = Int8Weight(poisoned.view_as(q.packed), q.scale_offset, q.d_out, q.group)
        for use_fbgemm in (True, False):
            got = sparse_linear_int8_rows(x[r : r + 1], bad, idx[r : r + 1], counts[r : r + 1], bias, use_fbgemm=use_fbgemm)
            torch.testing.assert_close(got, ref[r : r + 1], atol=2e-5, rtol=2e-5)
        everything = sparse_linear_int8_rows(x[r : r + 1], bad, idx[r : r + 1], None, bias)  # reads all: differs
        assert not torch.allclose(everything, sparse_linear_int8_rows(x[r : r + 1], q, idx[r : r + 1], None, bias))


@requires_triton
def test_triton_kernel_reads_int8_rows_where_flagged():
    g = torch.Generator().manual_seed(1)
    d_in, d_out = 40, 200
    device = "cuda" if torch.cuda.is_available() else "cpu"
    weight_t = (torch.randn(d_in, d_out, generator=g) / d_in**0.5).to(device)
    q = quantize_int8(weight_t, group=40)
    x, bias = torch.randn(4, d_in, generator=g).to(device), torch.randn(d_out, generator=g).to(device)
    idx, counts = topk_channels(x), torch.tensor([40, 20, 7, 1], device=device)
    flags = torch.tensor([True, False, False, True], device=device)
    expected = torch.where(flags[:, None], sparse_linear_int8_naive(x, q, idx, counts, bias),
                           sparse_linear_naive(x, weight_t, idx, counts, bias))
    for splits in (1, 3):
        got = sparse_linear_triton(x, weight_t, idx, counts, bias, int8=q, use_int8=flags, num_splits=splits, block_k=8, block_out=64)
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(sparse_linear_int8(x, q, idx, counts, bias, backend="triton"),
                               sparse_linear_int8_naive(x, q, idx, counts, bias), atol=2e-5, rtol=2e-5)
    args = (x, weight_t, q.packed, q.scale_offset, q.d_out, q.group, flags, idx, counts, bias)
    torch.library.opcheck(torch.ops.sol_hf.sparse_linear_int8.default, args, test_utils=("test_schema", "test_faketensor"))


# --------------------------------------------------------------------------------------------
# The config
# --------------------------------------------------------------------------------------------


def test_config_refuses_what_int8_copies_cannot_do():
    assert CONFIG.bits == (8, 16) and CONFIG.quantize == "weights" and CONFIG.num_actions == 32
    with pytest.raises(ValueError, match="4-bit weights are not supported"):
        SolConfig(bits=(4, 16), quantize="weights")
    with pytest.raises(ValueError, match="quantize must be one of"):
        SolConfig(quantize="kv")
    # a format-3 file knows nothing of `quantize`: its bits quantize activations, as they did
    old = SolConfig.from_preset("paper").to_dict()
    del old["quantize"]
    old["format_version"] = 3
    assert SolConfig.from_dict(old).quantize == "activations"


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


def _dequantized_base(base, model):
    """A copy of ``base`` whose pruned-site weights are replaced, by hand, with the values of the
    int8 copies the wrapped ``model`` made (fused sites split back into their projections)."""
    ref = copy.deepcopy(base)
    modules = dict(ref.named_modules())
    names = {id(m): n for n, m in model.base_model.named_modules()}
    for executor in model._layer_executors:
        for group in executor.groups:
            deq = dequantize_int8(group.int8)  # (Din, sum Dout)
            for projection, part in zip(group.projections, deq.split(group.widths, dim=1)):
                target = modules[names[id(projection)]]
                value = part if type(target).__name__ == "Conv1D" else part.t()
                target.weight.data.copy_(value.to(target.weight.dtype))
    return ref


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3"])
def test_int8_action_computes_with_the_int8_weights(family):
    base = tiny_model(family)
    model = SolForCausalLM(copy.deepcopy(base), CONFIG)
    ref = _dequantized_base(base, model)
    ids = _ids(2, 12)
    action = model.space.index_of(1.0, 1.0, 8)
    expected = ref(ids).logits
    assert not torch.allclose(expected, base(ids).logits, atol=1e-4)  # quantization changed the model
    got = model(ids, actions=torch.full_like(ids, action)).logits  # teacher-forced: the reference path
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    prefix = model(ids[:, :8], use_cache=True)  # prefill dense, then decode with the int8 op
    cache, steps = prefix.cache, []
    for t in range(8, 12):
        out = model(ids[:, t : t + 1], cache=cache, actions=torch.full((2, 1), action), use_cache=True)
        cache = out.cache
        steps.append(out.logits)
    # the reference: the full-precision base's cache for the prefix, the int8 weights after it
    dense_steps = ref(ids[:, 8:], past_key_values=base(ids[:, :8], use_cache=True).past_key_values).logits
    torch.testing.assert_close(torch.cat(steps, 1), dense_steps, atol=2e-5, rtol=1e-4)
    # 16 bits is still the base model, through the same wrapped model
    torch.testing.assert_close(model(ids, actions=torch.full_like(ids, model.space.dense_index)).logits,
                               base(ids).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_int8_rows_match_the_reference_per_row_in_padded_batches(family):
    """Random per-row actions over both precisions (mixed batches included), left padding."""
    model = SolForCausalLM(tiny_model(family, **WIDE), CONFIG)
    model.attention_overhead_bytes["cpu"] = 0.0
    steps = 6
    ids, mask, actions = left_padded_batch(40, steps, model.space.num_actions, action_seed=3)
    actions[:, 0] = model.space.index_of(0.25, 0.3, 8)  # every row int8 at one step
    actions[:, 1] = model.space.index_of(1.0, 1.0, 8)  # every row int8, every channel
    actions[0, 2], actions[1, 2] = model.space.index_of(1.0, 0.5, 8), model.space.index_of(1.0, 0.5, 16)  # mixed
    decoded, teacher_forced = decode_and_teacher_forced_logits(model, ids, mask, actions, 40 - steps)
    torch.testing.assert_close(decoded, teacher_forced, atol=2e-5, rtol=1e-4)


def test_int8_bytes_by_hand():
    """Tiny llama, hidden 64, intermediate 128, 2 layers, fp32. Per input channel the int8 copy
    holds one group per site here (widths below 512): q/k/v 128 codes + 8, o 64 + 8, gate/up
    256 + 8, down 64 + 8 bytes."""
    model = SolForCausalLM(tiny_model("llama"), SolConfig.from_preset("int8-weights", policy_hidden_size=64))
    b = model.cost_model.bytes
    assert [s.int8_row_bytes for s in b.sites] == [(136.0,) * 2, (72.0,) * 2, (264.0,) * 2, (72.0,) * 2]
    int8_copies = 2 * (64 * 136 + 64 * 72 + 64 * 264 + 128 * 72) + 2 * 2 * (64 + 64 + 64 + 128) * 4  # + scale copies
    assert model.prepared_weight_bytes == b.sparse_total + int8_copies
    length = torch.tensor([40])
    dense = model.cost_model.dense_bytes(length).item()
    table = model.cost_model.cost_table(length, with_policy=False)[0]
    # keep 0.5 at 8 bits: ceil(0.5 * 64) = 32 channels of q/k/v, o, gate/up; 64 of down's 128; every layer
    int8 = 2 * (32 * 136 + 32 * 72 + 32 * 264 + 64 * 72)
    expected = (b.fixed + int8 + model.cost_model.dense_kv_bytes(length).item()) / dense
    assert table[model.space.index_of(1.0, 0.5, 8)].item() == pytest.approx(expected, rel=1e-6)
    # keep 1.0 at 8 bits: every channel, a quarter of fp32's bytes and a bit more
    int8 = 2 * (64 * 136 + 64 * 72 + 64 * 264 + 128 * 72)
    expected = (b.fixed + int8 + model.cost_model.dense_kv_bytes(length).item()) / dense
    assert table[model.space.index_of(1.0, 1.0, 8)].item() == pytest.approx(expected, rel=1e-6)
    assert table[model.space.dense_index].item() == pytest.approx(1.0)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_triton)])
def test_report_counts_the_int8_rows_the_ops_read(backend, monkeypatch):
    from sol_hf import ops
    from sol_hf.ops import int8_linear

    model = SolForCausalLM(tiny_model("llama", **WIDE), CONFIG)
    cm = model.cost_model
    read = {"weights": 0.0, "steps": 0}

    def count(real, row_bytes):
        def wrapped(x, weight, channel_idx, channel_count, bias=None, **kw):
            rows = channel_idx.numel() if channel_count is None else int(channel_count.clamp(max=channel_idx.shape[1]).sum())
            read["weights"] += rows * row_bytes(weight, kw) + (0 if bias is None else bias.numel() * bias.element_size())
            return real(x, weight, channel_idx, channel_count, bias, **kw)
        return wrapped

    int8_row = lambda weight, kw: weight.row_bytes  # noqa: E731
    mixed_row = lambda weight, kw: kw["int8"].row_bytes  # noqa: E731  (every row is int8 below)
    monkeypatch.setattr(int8_linear, "sparse_linear_int8_rows", count(int8_linear.sparse_linear_int8_rows, int8_row))
    if HAS_TRITON:
        from sol_hf.ops import _library

        monkeypatch.setattr(_library, "sparse_linear_triton", count(ops.sparse_linear_triton, mixed_row))
    context, new = 24, 6
    with use_backend(backend):
        model.generate(_ids(1, context), max_new_tokens=new, do_sample=False, controller="uniform",
                       compute_budget={"activation": 0.5, "bits": 8})
    report = model.last_compute_report
    assert report.bits.item() == 8.0 and report.activation_keep.item() == pytest.approx(0.5)
    lengths = torch.arange(context + 1, context + new)
    expected = (cm.bytes.fixed * len(lengths) + read["weights"] + cm.dense_kv_bytes(lengths).sum()) / cm.dense_bytes(lengths).sum()
    assert read["weights"] > 0
    assert report.cost.item() == pytest.approx(float(expected), rel=0.02)
    assert report.cost.item() == pytest.approx(report.standalone_cost.item(), rel=0.02)


def test_int8_weights_reach_lower_budgets_and_unwrap_frees_the_copies():
    base = tiny_model("llama", **WIDE)
    plain = SolForCausalLM(copy.deepcopy(base), SolConfig(policy_hidden_size=64))
    model = SolForCausalLM(base, SolConfig.from_preset("int8-weights", policy_hidden_size=64))
    assert model.budget_range(256)[0] < plain.budget_range(256)[0] - 0.1
    out = model.generate(_ids(1, 16), max_new_tokens=8, do_sample=False, compute_budget=model.budget_range(16)[0] + 0.01)
    assert out.shape == (1, 24)
    groups = [g for e in model._layer_executors for g in e.groups]
    assert all(g.int8 is not None for g in groups)
    assert model.unwrap() is base
    assert all(g.int8 is None for g in groups)  # the copies are freed


def test_a_peft_base_is_refused_with_int8_weights():
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["gate_proj", "q_proj"]))
    with pytest.raises(TypeError, match="merge them first"):
        SolForCausalLM(lora, SolConfig.from_preset("int8-weights", policy_hidden_size=64))
