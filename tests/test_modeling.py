"""SolForCausalLM against the base model, brute-force definitions and numbers worked out by hand."""

import copy
import itertools
import math
import sys

import pytest
import torch
from _tiny import FAMILIES, VOCAB, decode_and_teacher_forced_logits, left_padded_batch, tiny_model, tiny_pair

from sol_hf import SolConfig, SolForCausalLM
from sol_hf.ops import HAS_TRITON
from sol_hf.runtime.attention import shift_to_row_start, sparse_decode_attention
from sol_hf.policy import Controller

requires_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

# The paper's axes (MLP-input sparsity, activation bits) and the default (sparsity on every projection).
SMALL = SolConfig.from_preset("paper", page_size=4, sink_tokens=2, recent_tokens=4, policy_hidden_size=64)
WIDE = dict(intermediate_size=768)
WIDE_CONFIG = SolConfig(page_size=4, sink_tokens=2, recent_tokens=4, policy_hidden_size=64)


def _ids(batch, length, seed=0):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


class FixedController(Controller):
    """Always the same action (for exactness checks of the controlled path)."""

    def __init__(self, space, action):
        super().__init__(space)
        self.action = action

    def decide(self, ctx):
        return torch.full((ctx.cost_table.shape[0],), self.action, dtype=torch.long)


# --------------------------------------------------------------------------------------------
# Exactness
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["paper", "default"])
@pytest.mark.parametrize("family", FAMILIES)
def test_full_budget_reproduces_base(family, preset):
    base, ref = tiny_pair(family)
    model = SolForCausalLM(base, SMALL if preset == "paper" else WIDE_CONFIG)
    ids = _ids(2, 30)
    kw = dict(max_new_tokens=16, do_sample=False, output_scores=True, return_dict_in_generate=True)
    expected = ref.generate(ids, **kw)
    for budget in (None, 1.0, torch.ones(2), {"attention": 1.0, "activation": 1.0, "bits": 16}):
        got = model.generate(ids, compute_budget=budget, **kw)  # (a full budget never runs a controlled step)
        assert torch.equal(got.sequences, expected.sequences), budget
        for a, b in zip(got.scores, expected.scores):
            torch.testing.assert_close(a, b)
    # The controlled path itself, with every position on the dense action, is the base model.
    out = model(ids, actions=torch.full_like(ids, model.space.dense_index))
    torch.testing.assert_close(out.logits, ref(ids).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_neox"])
def test_dense_action_every_step_matches_base_tokens(family):
    base, ref = tiny_pair(family)
    model = SolForCausalLM(base, SMALL)
    ids = _ids(2, 25)
    expected = ref.generate(ids, max_new_tokens=20, do_sample=False)
    dense = FixedController(model.space, model.space.dense_index)
    got = model.generate(ids, max_new_tokens=20, do_sample=False, compute_budget=0.9, controller=dense)
    assert torch.equal(got, expected)
    assert model.last_compute_report.controlled_steps == 19
    torch.testing.assert_close(model.last_compute_report.cost, torch.ones(2))


def _all_hooks(module):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def test_unwrap_restores_base_bit_identically():
    base, ref = tiny_pair("llama")
    original_impl = base.config._attn_implementation
    hooks_before = _all_hooks(base)
    model = SolForCausalLM(base, SMALL)
    ids = _ids(2, 20)
    model.generate(ids, max_new_tokens=8, do_sample=False, compute_budget=0.85)
    restored = model.unwrap()
    assert restored is base
    assert restored.config._attn_implementation == original_impl
    assert _all_hooks(restored) == hooks_before
    assert not any("_sol_runtime" in m.__dict__ for m in restored.modules())
    assert all(p.requires_grad for p in restored.parameters())  # as before wrapping
    for (name, a), (_, b) in zip(restored.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(restored(ids).logits, ref(ids).logits)
    SolForCausalLM(restored, SMALL)  # can be wrapped again


def test_wrapping_twice_is_refused():
    base = tiny_model("llama")
    SolForCausalLM(base, SMALL)
    with pytest.raises(ValueError, match="already wrapped"):
        SolForCausalLM(base, SMALL)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2"])
@pytest.mark.parametrize("budget", [1.0, 0.55])
def test_left_padded_batch_matches_rows_alone(family, budget):
    model = SolForCausalLM(tiny_model(family, **WIDE), WIDE_CONFIG)
    prompts = [_ids(1, n, seed=n)[0] for n in (37, 22, 30)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    kw = dict(max_new_tokens=24, do_sample=False, compute_budget=budget, controller="uniform")
    batched = model.generate(ids, attention_mask=mask, **kw)
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long), **kw)
        assert torch.equal(alone[0, len(p) :], batched[i, width:]), f"row {i}"


def test_teacher_forced_forward_equals_step_by_step_decode():
    model = SolForCausalLM(tiny_model("llama"), SMALL)
    ids = _ids(2, 40)
    actions = torch.randint(0, model.space.num_actions, (2, 12), generator=torch.Generator().manual_seed(3))
    prefix = model(ids[:, :28], use_cache=True)
    parallel = model(ids[:, 28:], cache=prefix.cache, actions=actions, use_cache=True)
    prefix = model(ids[:, :28], use_cache=True)
    cache, logits, costs = prefix.cache, [], []
    for t in range(12):
        out = model(ids[:, 28 + t : 29 + t], cache=cache, actions=actions[:, t : t + 1], use_cache=True)
        cache = out.cache
        logits.append(out.logits)
        costs.append(out.step_cost)
    torch.testing.assert_close(parallel.logits, torch.cat(logits, 1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(parallel.step_cost, torch.cat(costs, 1))


# --------------------------------------------------------------------------------------------
# Each action against a brute-force computation of its definition
# --------------------------------------------------------------------------------------------


def _brute_force_attention(q, k, v, valid, keep, page, sinks, recent, scaling, quest=True):
    """Loops over rows and KV heads: pages counted from the row's first valid slot."""
    rows, q_heads, dim = q.shape
    kv_heads, seq = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    out = torch.zeros(rows, q_heads, dim)
    for r in range(rows):
        slots = [s for s in range(seq) if valid[r, s]]
        n = len(slots)
        first = slots[0]
        pages = {}
        for s in slots:
            pages.setdefault((s - first) // page, []).append(s)
        forced = {(s - first) // page for s in slots[:sinks] + slots[max(0, n - recent) :]}
        wanted = math.ceil(math.ceil(keep[r] * n) / page) if keep[r] < 1 else len(pages)
        count = min(max(wanted, len(forced)), len(pages))
        for h in range(kv_heads):
            qs = q[r, h * group : (h + 1) * group]
            scores = {}
            for p, members in pages.items():
                kp = k[r, h, members]
                if quest:
                    scores[p] = float(torch.maximum(qs[:, None] * kp.max(0).values, qs[:, None] * kp.min(0).values).sum())
                else:
                    scores[p] = p
            order = sorted(pages, key=lambda p: (p not in forced, -scores[p], p))
            chosen = [s for p in order[:count] for s in pages[p]]
            logits = qs @ k[r, h, chosen].T * scaling
            out[r, h * group : (h + 1) * group] = torch.softmax(logits, -1) @ v[r, h, chosen]
    return out


@pytest.mark.parametrize("selection", ["quest", "recency"])
@pytest.mark.parametrize("group", [1, 2])
def test_sparse_attention_matches_brute_force(selection, group):
    torch.manual_seed(0)
    rows, kv_heads, seq, dim, page = 3, 2, 29, 8, 4
    q = torch.randn(rows, kv_heads * group, dim)
    k, v = torch.randn(rows, kv_heads, seq, dim), torch.randn(rows, kv_heads, seq, dim)
    valid = torch.ones(rows, seq, dtype=torch.bool)
    valid[1, :5] = False  # left padding, pages start at the row's first token
    valid[2, :2] = False
    keep = torch.tensor([0.3, 0.5, 1.0])
    config = SolConfig(page_size=page, sink_tokens=2, recent_tokens=3, selection=selection)
    start = valid.int().argmax(-1)
    ks, vs, vals = shift_to_row_start(k, v, valid, start)
    for reference in (True, False):  # the masked reference and the executed ops (gather of the selected pages)
        got, _ = sparse_decode_attention(q, ks, vs, vals, keep, config, 0.35, None, reference=reference)
        want = _brute_force_attention(q, k, v, valid, keep.tolist(), page, 2, 3, 0.35, quest=selection == "quest")
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


LLAMA_SITES = {
    "attention_input": ("self_attn", ("q_proj", "k_proj", "v_proj")),
    "attention_output": ("self_attn", ("o_proj",)),
    "mlp_input": ("mlp", ("gate_proj", "up_proj")),
    "mlp_output": ("mlp", ("down_proj",)),
}


def _manual_pruned_model(family, keep_fraction, bits, sites):
    """A reference copy whose projections at ``sites`` see their input with only the top-k |x|
    channels kept (a Python sort per token), and whose MLP output is quantized by explicit
    per-token arithmetic. One KV head per head: with grouped-query attention a row's first
    attention output repeats values, and ties make "the top k" ambiguous."""
    ref = tiny_model(family, num_key_value_heads=4)

    def prune(module, args):
        x = args[0].clone()
        k = math.ceil(keep_fraction * x.shape[-1])
        for idx in itertools.product(*(range(n) for n in x.shape[:-1])):
            order = sorted(range(x.shape[-1]), key=lambda c: (-abs(float(x[idx][c].detach())), c))
            drop = order[k:]
            x[idx][drop] = 0.0
        return (x,)

    def quantize(module, args, out):
        if bits >= 16:
            return out
        qmax = 2 ** (bits - 1) - 1
        scale = out.abs().amax(-1, keepdim=True) / qmax
        return torch.clamp(torch.round(out / scale), -qmax, qmax) * scale

    for layer in ref.model.layers:
        for site in sites:
            owner, names = LLAMA_SITES[site]
            for name in names:
                getattr(getattr(layer, owner), name).register_forward_pre_hook(prune)
        layer.mlp.register_forward_hook(quantize)
    return ref


@pytest.mark.parametrize(
    "sites,activation_keep,bits",
    [(("mlp_input",), 0.6, 16), (("mlp_input",), 1.0, 8), (("mlp_input",), 0.4, 5),
     (("attention_input", "attention_output", "mlp_input", "mlp_output"), 0.4, 16),
     (("attention_input", "attention_output"), 0.6, 8), (("mlp_output",), 0.4, 16)],
)
def test_activation_actions_match_brute_force(sites, activation_keep, bits):
    config = SolConfig(page_size=4, sink_tokens=2, recent_tokens=4, policy_hidden_size=64, activation_keep=(0.4, 0.6, 1.0),
                       bits=(5, 8, 16), sparse_inputs=sites)
    model = SolForCausalLM(tiny_model("llama", num_key_value_heads=4), config)
    ref = _manual_pruned_model("llama", activation_keep, bits, sites)
    ids = _ids(2, 9)
    action = model.space.index_of(1.0, activation_keep, bits)
    expected = ref(ids).logits
    got = model(ids, actions=torch.full_like(ids, action)).logits  # teacher-forced: the masked reference
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    # Decode steps one token at a time run the executed ops (kept weight rows): same logits.
    prefix = model(ids[:, :5], actions=torch.full((2, 5), action), use_cache=True)
    cache, steps = prefix.cache, []
    for t in range(5, 9):
        out = model(ids[:, t : t + 1], cache=cache, actions=torch.full((2, 1), action), use_cache=True)
        cache = out.cache
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), expected[:, 5:], atol=2e-5, rtol=1e-4)
    if activation_keep < 1.0:
        assert not torch.allclose(got, tiny_model("llama", num_key_value_heads=4)(ids).logits, atol=1e-3)  # the action acted


# --------------------------------------------------------------------------------------------
# Budgets and the cost model
# --------------------------------------------------------------------------------------------


def test_cost_model_matches_hand_count():
    # tiny llama: hidden 64, intermediate 128, 2 layers, 4 heads, 2 KV heads, head_dim 16, vocab 96, fp32.
    # The paper preset prunes the MLP input only: q, k, v, o and down are fixed.
    model = SolForCausalLM(tiny_model("llama"), SMALL)
    b = model.cost_model.bytes
    per_layer_fixed = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 128 * 64 + 2 * 64  # q, k, v, o, down, two norms
    fixed = 2 * per_layer_fixed + 96 * 64 + 64 + 64  # layers, lm_head, final norm, one embedding row
    assert b.fixed == fixed * 4
    (site,) = b.sites
    assert (site.name, site.total) == ("mlp_input", 2 * (2 * 64 * 128) * 4)
    assert site.widths == (64, 64) and site.row_bytes == (2 * 128 * 4,) * 2  # gate + up rows of one input channel
    assert b.kv_per_token == (2 * 2 * 16 * 4,) * 2
    fixed = fixed - 2 * 128 * 64  # below, the MLP output projections are counted apart (65536 bytes)
    action = model.space.index_of(0.5, 0.6, 8)
    # At 40 tokens: dense = weights + 40 tokens of K/V in both layers (activation bits save nothing).
    dense = fixed * 4 + 131072 + 65536 + 2 * 40 * 256
    # Nominal (an ideal kernel): activation keep 0.6 of the input weights; keep 0.5 -> ceil(20 / 4) = 5 of
    # 10 pages read plus 10 pages of Quest bounds.
    nominal = fixed * 4 + 0.6 * 131072 + 65536 + 2 * 20 * 256 + 2 * 10 * 256
    nominal_table = model.cost_model.nominal_cost_table(torch.tensor([40]), with_policy=False)
    assert nominal_table[0, action].item() == pytest.approx(nominal / dense, rel=1e-6)
    # Executed: ceil(0.6 * 64) = 39 kept rows of 1024 bytes per layer. On CPU the sparse attention
    # path's fixed overhead (1e6 bytes, about 3900 tokens of this model's K/V) outweighs what 40
    # tokens could save: attention runs dense and the attention action is credited nothing.
    executed = fixed * 4 + 2 * 39 * 1024 + 65536 + 2 * 40 * 256
    table = model.cost_model.cost_table(torch.tensor([40]), with_policy=False)
    assert table[0, action].item() == pytest.approx(executed / dense, rel=1e-6)
    assert table[0, model.space.dense_index].item() == pytest.approx(1.0)
    # With no overhead, skipping pages pays: the executed table charges the pages read + bounds.
    model.attention_overhead_bytes["cpu"] = 0.0
    sparse = fixed * 4 + 2 * 39 * 1024 + 65536 + 2 * 20 * 256 + 2 * 10 * 256
    table = model.cost_model.cost_table(torch.tensor([40]), with_policy=False)
    assert table[0, action].item() == pytest.approx(sparse / dense, rel=1e-6)
    # forward(actions) reports the table's cost of each position.
    ids = _ids(1, 40)
    prefix = model(ids[:, :39], use_cache=True)
    out = model(ids[:, 39:], cache=prefix.cache, actions=torch.tensor([[action]]))
    assert out.step_cost.item() == pytest.approx(sparse / dense, rel=1e-6)


def test_default_sites_by_hand():
    """The default prunes the inputs of q/k/v (fused: 64 + 32 + 32 outputs per input channel),
    o, gate/up and down; what stays fixed is norms, the LM head and the embedding row."""
    model = SolForCausalLM(tiny_model("llama"), SolConfig(policy_hidden_size=64))
    b = model.cost_model.bytes
    assert [(s.name, s.widths, s.row_bytes) for s in b.sites] == [
        ("attention_input", (64, 64), (128 * 4,) * 2),
        ("attention_output", (64, 64), (64 * 4,) * 2),
        ("mlp_input", (64, 64), (256 * 4,) * 2),
        ("mlp_output", (128, 128), (64 * 4,) * 2),
    ]
    assert b.fixed == (2 * 2 * 64 + 96 * 64 + 64 + 64) * 4
    assert b.sparse_total == 2 * (64 * 128 + 64 * 64 + 64 * 256 + 128 * 64) * 4
    # Hand-made transposed copies: every site's weights once (nn.Linear layouts).
    assert model.prepared_weight_bytes == b.sparse_total


@pytest.mark.parametrize("family", FAMILIES)
def test_executed_ops_match_the_reference_per_row_in_padded_batches(family):
    """Decode steps run the executed ops (kept weight rows, gathered pages); a teacher-forced
    call runs the masked reference. Same per-row actions, left-padded rows: same logits."""
    model = SolForCausalLM(tiny_model(family, **WIDE), WIDE_CONFIG)
    model.attention_overhead_bytes["cpu"] = 0.0  # page-sparse attention runs wherever it saves bytes
    steps = 6
    ids, mask, actions = left_padded_batch(40, steps, model.space.num_actions)
    actions[0, :3] = model.space.index_of(0.1, min(model.space.activation_keep), 16)  # row 0: sparsest pages, most pruned
    decoded, teacher_forced = decode_and_teacher_forced_logits(model, ids, mask, actions, 40 - steps)
    torch.testing.assert_close(decoded, teacher_forced, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_triton)])
@pytest.mark.parametrize("activation", [0.4, 1.0], ids=["pruned", "every_channel"])
def test_report_counts_the_bytes_the_executed_ops_read(backend, activation, monkeypatch):
    """The report's cost is what the ops read: counted here independently by instrumenting the
    executed MLP op (weight rows handed to it), the dense projections of the pruned sites (their
    weights, whole) and the attention op (pages it reads). At activation keep 1.0 every step's
    projections run their own forward (on CPU without SOL's per-call path: the step is charged
    their bytes in one sum when it is made), so only the dense count moves."""
    import torch.nn.functional as F

    from sol_hf import ops
    from sol_hf.ops import use_backend
    from sol_hf.runtime import projections

    model = SolForCausalLM(tiny_model("llama", **WIDE), WIDE_CONFIG)
    model.attention_overhead_bytes["cpu"] = 0.0
    cm = model.cost_model
    read = {"activation": 0.0, "kv": 0.0}
    token_bytes = cm.bytes.kv_per_token[0]
    sites = {id(p.weight): p for e in model._layer_executors for g in e.groups for p in g.projections}
    real_linear, real_outputs, per_call = F.linear, projections._PrunedProjections.outputs, [0]

    def count_dense(x, weight, bias=None):
        if id(weight) in sites and model._runtime.step is not None:  # a controlled step's, not the prefill's
            read["activation"] += weight.numel() * weight.element_size() + (0 if bias is None else bias.numel() * bias.element_size())
        return real_linear(x, weight, bias)

    def count_calls(self, x, step):
        per_call[0] += 1
        return real_outputs(self, x, step)

    monkeypatch.setattr(F, "linear", count_dense)
    monkeypatch.setattr(projections._PrunedProjections, "outputs", count_calls)

    def count_mlp(real):
        def wrapped(x, weight_t, channel_idx, channel_count, bias=None, **kw):
            # channel_count None: every row uses all its candidate channels
            rows = channel_idx.numel() if channel_count is None else int(channel_count.clamp(max=channel_idx.shape[1]).sum())
            read["activation"] += rows * weight_t.shape[1] * weight_t.element_size() + (0 if bias is None else bias.numel() * bias.element_size())
            return real(x, weight_t, channel_idx, channel_count, bias, **kw)
        return wrapped

    def count_attention(real, per_row):
        def wrapped(query, key, value, page_ids, page_count, valid, page_size, scaling, softcap=None, **kw):
            n_valid = valid.sum(-1)
            pages = page_count[:, 0] if per_row else page_count.max().expand(page_count.shape[0])
            slots = torch.minimum(pages * page_size, n_valid) + -(-n_valid // page_size)  # pages read + their bounds
            read["kv"] += float(slots.sum()) * token_bytes
            return real(query, key, value, page_ids, page_count, valid, page_size, scaling, softcap, **kw)
        return wrapped

    monkeypatch.setattr(ops, "sparse_linear", count_mlp(ops.sparse_linear))
    # where the dispatcher finds them: the torch gather in its module, the kernel behind torch.ops.sol_hf
    attention_module = sys.modules["sol_hf.ops.page_attention"]
    monkeypatch.setattr(attention_module, "page_attention_gather", count_attention(ops.page_attention_gather, per_row=False))
    if HAS_TRITON:
        from sol_hf.ops import _library

        monkeypatch.setattr(_library, "page_attention_triton", count_attention(ops.page_attention_triton, per_row=True))
    context, new = 48, 7
    with use_backend(backend):
        model.generate(_ids(1, context), max_new_tokens=new, do_sample=False, controller="uniform",
                       compute_budget={"attention": 0.25, "activation": activation})  # 0.4: keeps 0.3 and 0.5, both sparse
    report = model.last_compute_report
    if activation == 1.0:
        assert report.activation_keep.item() == 1.0 and report.attention_keep.item() < 1.0
        assert (per_call[0] == 0) == (backend == "torch"), per_call  # Triton steps plan nothing on the host
    lengths = torch.arange(context + 1, context + new)  # the controlled steps' context lengths
    dense = cm.dense_bytes(lengths)
    fixed = cm.bytes.fixed * len(lengths)  # every step reads the fixed weights; MLP and KV were counted above
    expected = (fixed + read["activation"] + read["kv"]) / dense.sum()
    assert read["activation"] > 0 and read["kv"] > 0
    # the report averages per-step fractions; the steps' dense bytes differ by < 1 %
    assert report.cost.item() == pytest.approx(float(expected), rel=0.02)
    assert report.cost.item() == pytest.approx(report.standalone_cost.item(), rel=0.02)
    assert report.cost.item() < report.nominal_cost.item() + 0.05


def _calibrate_on_a_byte_clock(model, monkeypatch, sparse_time, selection_time: float = 0.0) -> dict:
    """``model.calibrate_sparse_read_factor`` with a clock instead of time: the dense projection
    takes one unit per weight byte, the kept-row op ``sparse_time(kept bytes)``, each top-k
    channel selection ``selection_time``."""
    import torch.nn.functional as F

    from sol_hf import ops
    from sol_hf.runtime import calibrate

    clock = [0.0]
    real_linear, real_sparse, real_topk = F.linear, ops.sparse_linear, torch.topk

    def topk(*args, **kwargs):
        clock[0] += selection_time
        return real_topk(*args, **kwargs)

    def linear(x, weight, bias=None):
        clock[0] += weight.numel() * weight.element_size()
        return real_linear(x, weight, bias)

    def sparse(x, weight_t, idx, count, bias=None):
        clock[0] += sparse_time(idx.shape[1] * weight_t.shape[1] * weight_t.element_size())
        return real_sparse(x, weight_t, idx, count, bias)

    monkeypatch.setattr(F, "linear", linear)
    monkeypatch.setattr(ops, "sparse_linear", sparse)
    monkeypatch.setattr(torch, "topk", topk)
    monkeypatch.setattr(calibrate.time, "perf_counter", lambda: clock[0])
    result = model.calibrate_sparse_read_factor(repeats=3)
    monkeypatch.undo()
    return result


def test_calibration_measures_the_read_factor_and_moves_path_choice_and_costs(monkeypatch):
    """calibrate_sparse_read_factor times decode steps with the kept-row op against dense ones on
    the model's own weights. With a clock that charges the dense op one unit per weight byte and
    the sparse op two per kept byte, every level's time ratio is twice its byte fraction, and the
    factor is where that reaches 0.9 (``PAYS_BELOW``): 1 / 0.45. It is stored for the weights'
    dtype, and from then on keeps with keep x factor >= 1 run the masked dense projection and
    cost what dense costs, while lower keeps still run the kept-row op."""
    from sol_hf.runtime.calibrate import PAYS_BELOW

    assert PAYS_BELOW == 0.9
    model = SolForCausalLM(tiny_model("llama", **WIDE), WIDE_CONFIG)  # activation keeps 0.3 / 0.5 / 0.7
    result = _calibrate_on_a_byte_clock(model, monkeypatch, lambda kept_bytes: 2 * kept_bytes)
    assert result["key"] == "cpu:float32" and result["factor"] == pytest.approx(1 / 0.45, rel=1e-3)
    for keep, level in result["levels"].items():
        assert level["time_ratio"] == pytest.approx(2 * level["byte_fraction"], rel=1e-3), keep
    assert model.sparse_linear_read_factor["cpu:float32"] == pytest.approx(1 / 0.45, rel=1e-3)

    calls = []
    real_bag = torch.nn.functional.embedding_bag
    monkeypatch.setattr(torch.nn.functional, "embedding_bag", lambda *a, **k: calls.append(1) or real_bag(*a, **k))
    ids = _ids(1, 40)
    prefix = model(ids[:, :39], use_cache=True)
    dense_cost = model.cost_model.cost_table(torch.tensor([40]), False)[0, model.space.dense_index].item()
    for keep, runs_sparse in ((0.7, False), (0.5, False), (0.3, True)):  # 0.5 / 0.45 > 1: above the width
        calls.clear()
        action = model.space.index_of(1.0, keep, 16)
        out = model(ids[:, 39:], cache=copy.deepcopy(prefix.cache), actions=torch.tensor([[action]]))
        assert bool(calls) == runs_sparse, keep
        assert (out.step_cost.item() < dense_cost - 1e-6) == runs_sparse, keep


def test_calibration_runs_the_kept_row_op_at_every_keep_where_it_measured_faster(monkeypatch):
    """A kept-row op with a fixed cost per call: its time is the kept bytes plus 0.15 of the dense
    pass, so it takes 0.9 of the dense time (``PAYS_BELOW``) at 75 % of the bytes. The factor is
    1 / 0.75 (the largest time-per-byte ratio, 0.45 / 0.3 at keep 0.3, would keep 0.7 off the op
    although it measured 0.85 of the dense time), and keep 0.7 runs the kept-row op."""
    model = SolForCausalLM(tiny_model("llama", **WIDE), WIDE_CONFIG)  # activation keeps 0.3 / 0.5 / 0.7
    groups = [g for executor in model._layer_executors for g in executor.groups]
    per_call = 0.15 * sum(g.width * g.row_bytes for g in groups) / len(groups)
    result = _calibrate_on_a_byte_clock(model, monkeypatch, lambda kept_bytes: kept_bytes + per_call)
    assert result["levels"][0.7]["time_ratio"] == pytest.approx(0.15 + result["levels"][0.7]["byte_fraction"], rel=1e-3)
    assert result["levels"][0.3]["factor"] > 1 / 0.7  # the old rule's figure
    assert result["factor"] == pytest.approx(1 / 0.75, rel=1e-3)
    calls = []
    real_bag = torch.nn.functional.embedding_bag
    monkeypatch.setattr(torch.nn.functional, "embedding_bag", lambda *a, **k: calls.append(1) or real_bag(*a, **k))
    ids = _ids(1, 40)
    prefix = model(ids[:, :39], use_cache=True)
    model(ids[:, 39:], cache=prefix.cache, actions=torch.tensor([[model.space.index_of(1.0, 0.7, 16)]]))
    assert calls


def test_calibration_times_the_channel_selection_with_the_kept_row_op(monkeypatch):
    """The alternative to a pruned keep is the dense action, which selects nothing, so the
    calibration times each pruned site as a decode step runs it: its top-k channel selection
    too. An op as fast per byte as dense (alone it would pay at 90 % of the bytes: factor 1 / 0.9)
    whose selections cost 0.3 of the dense pass reaches 0.9 of the dense time (``PAYS_BELOW``)
    at 60 % of the bytes: factor 1 / 0.6, so keep 0.5 still runs the kept-row op and keep 0.7
    runs (and is charged) dense."""
    model = SolForCausalLM(tiny_model("llama", **WIDE), WIDE_CONFIG)  # activation keeps 0.3 / 0.5 / 0.7
    groups = [g for executor in model._layer_executors for g in executor.groups]
    per_selection = 0.3 * sum(g.width * g.row_bytes for g in groups) / len(groups)
    alone = _calibrate_on_a_byte_clock(model, monkeypatch, lambda kept_bytes: kept_bytes)["factor"]
    assert alone == pytest.approx(1 / 0.9, rel=1e-3)
    result = _calibrate_on_a_byte_clock(model, monkeypatch, lambda kept_bytes: kept_bytes, selection_time=per_selection)
    for keep, level in result["levels"].items():
        assert level["time_ratio"] == pytest.approx(level["byte_fraction"] + 0.3, rel=1e-3), keep
    assert result["factor"] == pytest.approx(1 / 0.6, rel=1e-3)
    table = model.cost_model.cost_table(torch.tensor([40]), False)[0]
    dense = table[model.space.dense_index].item()
    assert table[model.space.index_of(1.0, 0.5, 16)].item() < dense - 1e-6
    assert table[model.space.index_of(1.0, 0.7, 16)].item() == pytest.approx(dense)


def test_break_even_factor_flips_the_path_where_the_op_measured_slower():
    from sol_hf.runtime.calibrate import break_even_factor

    assert break_even_factor([(0.3, 0.6), (0.5, 1.0), (0.7, 1.4)]) == pytest.approx(2.0)  # meets dense at 0.5
    assert break_even_factor([(0.5, 0.7), (0.3, 0.5), (0.7, 0.9)]) == pytest.approx(1.25)  # extrapolated: 0.8
    assert break_even_factor([(0.3, 1.2), (0.5, 1.5)]) == pytest.approx(4.0)  # never faster: no level pays
    assert 0.3 * break_even_factor([(0.3, 1.2), (0.5, 1.5)]) >= 1.0
    assert break_even_factor([(0.3, 0.5)]) == pytest.approx(0.5 / 0.3)  # one level: through the origin
    assert break_even_factor([(0.3, 0.3), (0.5, 0.45), (0.7, 0.6)]) == 1.0  # never slower: at least 1.0
    # with a margin: the op runs where it takes at most 0.9 of the dense time
    assert break_even_factor([(0.3, 0.6), (0.5, 1.0), (0.7, 1.4)], pays_below=0.9) == pytest.approx(1 / 0.45)
    assert break_even_factor([(0.3, 0.95), (0.5, 1.5)], pays_below=0.9) == pytest.approx(0.95 / (0.3 * 0.9))  # none pays
    assert 0.3 * break_even_factor([(0.3, 0.95), (0.5, 1.5)], pays_below=0.9) >= 1.0
    noisy = break_even_factor([(0.3, 0.5), (0.5, 1.05), (0.7, 0.95)])  # 0.5 measured slower: 0.7 is not trusted
    assert 0.3 * noisy < 1.0 <= 0.5 * noisy


def test_activation_keeps_whose_sparse_op_would_be_slower_run_dense_and_are_credited_nothing(monkeypatch):
    """Hidden 64: keeps 0.6 / 0.8 keep 39 / 52 channels. At the CPU read factor 1.35, reading 52
    rows sparsely is slower than 64 densely, so keep 0.8 runs the masked dense projection and
    costs what dense costs; keep 0.6 runs the sparse op. Factor 1.0: both run sparse."""
    model = SolForCausalLM(tiny_model("llama"), SMALL)
    assert model.sparse_linear_read_factor["cpu"] == pytest.approx(1.35)
    calls = []
    real = torch.nn.functional.embedding_bag
    monkeypatch.setattr(torch.nn.functional, "embedding_bag", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = _ids(1, 40)
    prefix = model(ids[:, :39], use_cache=True)

    def run(keep):
        calls.clear()
        action = model.space.index_of(1.0, keep, 16)
        out = model(ids[:, 39:], cache=copy.deepcopy(prefix.cache), actions=torch.tensor([[action]]))
        return len(calls), out.step_cost.item()

    dense_cost = model.cost_model.cost_table(torch.tensor([40]), False)[0, model.space.dense_index].item()
    n, cost = run(0.8)
    assert n == 0 and cost == pytest.approx(dense_cost)
    n, cost = run(0.6)
    assert n == 2 and cost < dense_cost  # one sparse op per layer, gate and up fused
    model.sparse_linear_read_factor["cpu"] = 1.0
    n, cost = run(0.8)
    assert n == 2 and cost < dense_cost


@pytest.mark.parametrize("target", [0.55, 0.7, 0.9])
def test_uniform_controller_meets_budget(target):
    model = SolForCausalLM(tiny_model("llama", **WIDE), WIDE_CONFIG)
    model.generate(_ids(2, 30), max_new_tokens=70, do_sample=False, compute_budget=target, controller="uniform")
    report = model.last_compute_report
    assert report.controlled_steps == 69
    # Each row's own actions meet the target; the batch executed them together (report.cost).
    assert torch.all((report.standalone_cost - target).abs() <= 0.02 * target), report.standalone_cost
    assert torch.all(report.cost >= report.standalone_cost - 1e-6)


def test_per_row_budgets_and_per_axis_budgets():
    model = SolForCausalLM(tiny_model("llama", **WIDE), WIDE_CONFIG)
    ids = _ids(3, 30)
    model.generate(ids, max_new_tokens=66, do_sample=False, compute_budget=torch.tensor([0.6, 0.8, 1.0]), controller="uniform")
    cost = model.last_compute_report.standalone_cost
    assert cost[0].item() == pytest.approx(0.6, rel=0.02)
    assert cost[1].item() == pytest.approx(0.8, rel=0.02)
    assert cost[2].item() == pytest.approx(1.0)  # a full-budget row runs dense
    model.generate(ids, max_new_tokens=66, do_sample=False, compute_budget={"attention": 0.4, "activation": 0.7}, controller="uniform")
    report = model.last_compute_report
    torch.testing.assert_close(report.attention_keep, torch.full((3,), 0.4), atol=0.01, rtol=0)
    torch.testing.assert_close(report.activation_keep, torch.full((3,), 0.7), atol=0.01, rtol=0)
    torch.testing.assert_close(report.bits, torch.full((3,), 16.0))


def test_random_controller_meets_budget_and_depends_on_seed():
    model = SolForCausalLM(tiny_model("llama", **WIDE), WIDE_CONFIG)
    ids = _ids(2, 30)
    out = {}
    for seed in (0, 1):
        model.generate(ids, max_new_tokens=70, do_sample=False, compute_budget=0.7, controller="random", controller_kwargs={"seed": seed})
        out[seed] = model.last_compute_report
        assert torch.all((out[seed].standalone_cost - 0.7).abs() <= 0.02 * 0.7)
    assert not torch.equal(out[0].activation_keep, out[1].activation_keep) or not torch.equal(out[0].attention_keep, out[1].attention_keep)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "budget,error,match",
    [
        (0.0, ValueError, r"compute_budget must lie in \(0, 1\]"),
        (-0.2, ValueError, r"compute_budget must lie in \(0, 1\]"),
        (1.5, ValueError, r"compute_budget must lie in \(0, 1\]"),
        (float("nan"), ValueError, r"compute_budget must lie in \(0, 1\]"),
        ("0.5", TypeError, "compute_budget must be .* got the string"),
        (True, TypeError, "compute_budget must be a number"),
        ({"attn": 0.5}, ValueError, r"unknown axes \['attn'\]"),
        ({}, ValueError, "dict is empty"),
        ({"bits": 40}, ValueError, r"compute_budget\['bits'\] must lie in \[2, 16\]"),
        ({"activation": 0.0}, ValueError, r"compute_budget\['activation'\] must lie in \(0, 1\]"),
        (torch.tensor([0.5, 0.6, 0.7]), ValueError, r"shape \(2,\), one budget per batch row"),
        (torch.tensor([0.5, float("nan")]), ValueError, r"values must lie in \(0, 1\]"),
        (0.05, ValueError, r"below the cheapest reachable cost .*budget_range"),
    ],
)
def test_bad_budgets_are_refused_clearly(budget, error, match):
    model = SolForCausalLM(tiny_model("llama", **WIDE), WIDE_CONFIG)
    with pytest.raises(error, match=match):
        model.generate(_ids(2, 10), max_new_tokens=3, compute_budget=budget, controller="uniform")


def test_unsupported_architecture_names_the_supported_ones():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("bloom", hidden_size=32, n_layer=1, n_head=2, vocab_size=50)
    with pytest.raises(ValueError, match=r"does not support model_type='bloom'.*attention interface.*gemma2.*gpt2.*llama.*qwen3"):
        SolForCausalLM(AutoModelForCausalLM.from_config(cfg), SMALL)


def test_bad_controllers_are_refused():
    model = SolForCausalLM(tiny_model("llama", **WIDE), WIDE_CONFIG)
    with pytest.raises(ValueError, match="controller must be 'policy', 'uniform', 'random'"):
        model.generate(_ids(1, 10), max_new_tokens=2, compute_budget=0.8, controller="greedy")
    with pytest.raises(ValueError, match=r"uniform controller takes no options.*\['seed'\]"):
        model.generate(_ids(1, 10), max_new_tokens=2, compute_budget=0.8, controller="uniform", controller_kwargs={"seed": 1})
    with pytest.raises(TypeError):
        model.generate(_ids(1, 10), max_new_tokens=2, compute_budget=0.8, controller="random", controller_kwargs={"sed": 1})


def test_bad_actions_are_refused():
    model = SolForCausalLM(tiny_model("llama"), SMALL)
    ids = _ids(1, 5)
    with pytest.raises(ValueError, match="actions must have the shape of input_ids"):
        model(ids, actions=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="integer action indices"):
        model(ids, actions=torch.zeros(1, 5))


# --------------------------------------------------------------------------------------------
# No host syncs in the decode step
# --------------------------------------------------------------------------------------------

_STEP_FUNCTIONS = {"_before_base_forward", "_after_base_forward", "sol_attention", "hook", "forward", "outputs", "decide", "account"}
_SYNC_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "nonzero")


def _sync_guard(monkeypatch, violations):
    """Record every host read of a tensor made, directly or through torch, by a function of the
    controlled step. Calls made by the Triton interpreter (which emulates the kernels on CPU;
    on a GPU the launch reads nothing back) are not the step's."""

    def guard(name, original):
        def wrapped(self, *args, **kwargs):
            frame = sys._getframe(1)
            while frame is not None:
                filename = frame.f_code.co_filename
                if "/triton/" in filename:
                    break
                if "sol_hf" in filename and frame.f_code.co_name in _STEP_FUNCTIONS:
                    violations.append(f"Tensor.{name} in {frame.f_code.co_name}")
                    break
                frame = frame.f_back
            return original(self, *args, **kwargs)

        return wrapped

    for name in _SYNC_METHODS:
        monkeypatch.setattr(torch.Tensor, name, guard(name, getattr(torch.Tensor, name)))


@requires_triton
def test_decode_step_makes_no_host_sync(monkeypatch):
    """With the Triton ops (as on CUDA) a controlled step never reads a tensor back to the host:
    sizes stay on the device and the paths are chosen from shapes."""
    from sol_hf.ops import use_backend

    model = SolForCausalLM(tiny_model("llama", **WIDE), WIDE_CONFIG)
    model.attention_overhead_bytes["cpu"] = 0.0  # page-sparse attention runs too
    ids = _ids(1, 30)
    violations = []
    with use_backend("triton"):
        _sync_guard(monkeypatch, violations)
        for controller in ("uniform", "random", "policy"):
            budget = 0.95 if controller == "policy" else 0.6
            model.generate(ids, max_new_tokens=4, do_sample=False, compute_budget=budget, controller=controller)
            assert model.last_compute_report.controlled_steps == 3
        monkeypatch.undo()
    assert not violations, sorted(set(violations))


@requires_triton
def test_the_guard_catches_a_sync(monkeypatch):
    """The sync detector above must be able to fail: a step that calls .item() is caught."""
    from sol_hf.ops import use_backend
    from sol_hf.runtime import projections

    model = SolForCausalLM(tiny_model("llama", **WIDE), WIDE_CONFIG)
    original = projections._PrunedProjections.counts

    def syncing(self, device):
        counts = original(self, device)
        counts.max().item()
        return counts

    monkeypatch.setattr(projections._PrunedProjections, "counts", syncing)
    violations = []
    with use_backend("triton"):
        _sync_guard(monkeypatch, violations)
        model.generate(_ids(1, 20), max_new_tokens=3, do_sample=False, compute_budget=0.6, controller="uniform")
    monkeypatch.undo()
    assert violations and set(violations) == {"Tensor.item in outputs"}


# --------------------------------------------------------------------------------------------
# The real pretrained model
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_full_budget_is_exact_and_budgets_are_met(smollm2_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    ref = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    model = SolForCausalLM(AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval(), SolConfig(sparse_inputs=("mlp_input", "mlp_output")))
    batch = tokenizer(["The capital of France is", "Once upon a time, there was a little"], return_tensors="pt", padding=True, padding_side="left")
    kw = dict(max_new_tokens=12, do_sample=False, output_scores=True, return_dict_in_generate=True)
    expected = ref.generate(**batch, **kw)
    got = model.generate(**batch, compute_budget=1.0, **kw)
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.scores, expected.scores):
        torch.testing.assert_close(a, b)
    assert "Paris" in tokenizer.decode(got.sequences[0])
    model.generate(**batch, max_new_tokens=40, do_sample=False, compute_budget=0.75, controller="uniform")
    report = model.last_compute_report
    assert report.controlled_steps == 39
    assert torch.all((report.standalone_cost - 0.75).abs() <= 0.02 * 0.75), report
    for row in range(2):  # decoded alone, the bytes its ops read are the budget it asked for
        alone = {k: v[row : row + 1, batch["attention_mask"][row].bool()] for k, v in batch.items()}
        model.generate(**alone, max_new_tokens=40, do_sample=False, compute_budget=0.75, controller="uniform")
        report = model.last_compute_report
        assert abs(report.cost.item() - 0.75) <= 0.02 * 0.75, report
        assert report.cost.item() == pytest.approx(report.standalone_cost.item(), rel=0.02)


def test_sampling_streamer_and_eos_under_a_budget():
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.clone())

        def end(self):
            self.chunks.append(None)

    model = SolForCausalLM(tiny_model("llama", **WIDE), WIDE_CONFIG)
    ids = _ids(1, 20)
    kw = dict(max_new_tokens=15, do_sample=True, top_k=20, compute_budget=0.7, controller="uniform")
    torch.manual_seed(7)
    first = model.generate(ids, **kw)
    torch.manual_seed(7)
    streamer = Collect()
    second = model.generate(ids, streamer=streamer, **kw)
    assert torch.equal(first, second)  # sampling is reproducible under a seed
    streamed = torch.cat([c.reshape(-1) for c in streamer.chunks[1:-1]])
    assert torch.equal(streamed, second[0, 20:]) and streamer.chunks[-1] is None
    # eos stops generation early, as in the base model
    eos = int(first[0, 24])
    torch.manual_seed(7)
    stopped = model.generate(ids, eos_token_id=eos, **kw)
    assert stopped.shape[1] <= 25 and int(stopped[0, -1]) == eos


def test_page_bounds_without_a_mask_equal_bounds_with_an_all_true_mask():
    from sol_hf.ops import page_key_bounds_naive

    key = torch.randn(2, 3, 37, 8)
    lo, hi = page_key_bounds_naive(key, None, 4)
    lo_ref, hi_ref = page_key_bounds_naive(key, torch.ones(2, 37, dtype=torch.bool), 4)
    assert torch.equal(lo, lo_ref) and torch.equal(hi, hi_ref)


def test_uniform_keeps_attention_dense_where_sparsity_would_not_save_bytes():
    model = SolForCausalLM(tiny_model("llama", **WIDE), WIDE_CONFIG)
    # 6 tokens: every page is forced or its metadata costs more than it saves.
    model.generate(_ids(1, 6), max_new_tokens=8, do_sample=False, compute_budget=0.6, controller="uniform")
    short = model.last_compute_report
    assert short.attention_keep.item() == 1.0 and short.attention_read.item() <= 1.0
    # 300 tokens: skipping pages pays (on a backend without fixed overhead; on CPU the sparse path's
    # ops cost as much as about 3900 tokens of this tiny model's K/V), and the ladder uses it.
    model.attention_overhead_bytes["cpu"] = 0.0
    model.generate(_ids(1, 300), max_new_tokens=8, do_sample=False, compute_budget=0.6, controller="uniform")
    long = model.last_compute_report
    assert long.attention_keep.item() < 1.0 and long.attention_read.item() < 1.0


def test_episodes_read_quest_bounds_from_the_cache_and_match_recomputed_bounds(monkeypatch):
    from transformers.cache_utils import DynamicCache

    from sol_hf import episodes, modeling
    from sol_hf.budget import parse_compute_budget
    from sol_hf.policy import RandomController

    model = SolForCausalLM(tiny_model("llama", **WIDE), WIDE_CONFIG)
    model.attention_overhead_bytes["cpu"] = 0.0  # page-sparse attention pays even at 30 tokens
    windows = _ids(3, 50)
    targets = parse_compute_budget(0.6, 3)
    recomputed = []
    original = modeling.ops.page_key_bounds

    def counting(*args, **kwargs):
        recomputed.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(modeling.ops, "page_key_bounds", counting)
    cached = episodes.run_episodes(model, windows, 30, RandomController(model.space, seed=1), targets, repeats=2)
    assert not recomputed  # every controlled step found its bounds in the cache
    monkeypatch.setattr(episodes, "page_bounds_cache", lambda *a, **k: DynamicCache())
    plain = episodes.run_episodes(model, windows, 30, RandomController(model.space, seed=1), targets, repeats=2)
    assert recomputed  # plain cache: bounds recomputed from the keys
    assert torch.equal(cached.actions, plain.actions)
    torch.testing.assert_close(cached.token_log_probs, plain.token_log_probs, atol=1e-6, rtol=0)
    torch.testing.assert_close(cached.step_cost, plain.step_cost)



@pytest.mark.parametrize("family", ["llama", "gemma3_text", "mistral", "gpt2"])
def test_a_static_cache_decodes_the_dynamic_caches_tokens(family):
    """``cache_implementation="static"`` under a budget: the same actions, tokens and scores as the
    dynamic cache, in a left-padded batch with page-sparse attention running (slot i of the
    preallocated buffer holds position i; sliding-window layers hold a window), and the report
    charges at least what the dynamic run read (dense attention reads the whole buffer)."""
    model = SolForCausalLM(tiny_model(family, **WIDE), WIDE_CONFIG)
    model.attention_overhead_bytes["cpu"] = 0.0  # page-sparse attention runs wherever it saves bytes
    ids = _ids(3, 40)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    mask[2, :15] = 0
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, output_scores=True, return_dict_in_generate=True,
              compute_budget=0.7, pad_token_id=0)
    dynamic = model.generate(ids, **kw)
    dynamic_report = model.last_compute_report
    static = model.generate(ids, cache_implementation="static", **kw)
    static_report = model.last_compute_report
    assert torch.equal(static.sequences, dynamic.sequences)
    for a, b in zip(static.scores, dynamic.scores):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(static_report.standalone_cost, dynamic_report.standalone_cost)
    assert float(static_report.standalone_cost.max()) < 0.75
    assert bool((static_report.cost >= dynamic_report.cost - 1e-6).all())


def test_a_static_caches_dense_attention_is_charged_its_whole_buffer():
    """Attention over a StaticCache of L slots reads all L (the empty ones masked): the report's
    cost exceeds the dynamic cache's by (L - n) K/V slots of every layer at each step of length n."""
    from transformers import StaticCache

    model = SolForCausalLM(tiny_model("llama", **WIDE), WIDE_CONFIG)  # CPU overhead default: attention runs dense
    cm = model.cost_model
    prompt, new, slots = 30, 8, 64
    ids = _ids(1, prompt)
    kw = dict(max_new_tokens=new, do_sample=False, compute_budget=0.7)
    dynamic = model.generate(ids, **kw)
    dynamic_cost = model.last_compute_report.cost.item()
    static = model.generate(ids, cache=StaticCache(config=model.config, max_cache_len=slots), **kw)
    report = model.last_compute_report
    assert torch.equal(static, dynamic)
    assert report.attention_read.item() > 1.0  # the buffer, not just the valid slots
    lengths = torch.arange(prompt + 1, prompt + new).double()  # the controlled steps' valid lengths
    extra = ((slots - lengths) * sum(cm.bytes.kv_per_token) / cm.dense_bytes(lengths.long()).double()).mean()
    assert report.cost.item() == pytest.approx(dynamic_cost + float(extra), rel=1e-4)
    assert report.standalone_cost.item() == pytest.approx(dynamic_cost, rel=1e-4)


def test_a_checkpoints_hybrid_cache_default_decodes_with_a_dynamic_cache():
    """Gemma checkpoints ship ``cache_implementation="hybrid"`` in their generation config;
    transformers decodes those with its default dynamic cache, and so does a controlled generate
    (the one that keeps Quest page bounds, so the same bytes are read)."""
    model = SolForCausalLM(tiny_model("gemma3_text", **WIDE), WIDE_CONFIG)
    model.attention_overhead_bytes["cpu"] = 0.0  # page-sparse attention runs, from cached page bounds
    ids = _ids(1, 30)
    expected = model.generate(ids, max_new_tokens=6, do_sample=False, compute_budget=0.7)
    expected_report = model.last_compute_report
    model.generation_config.cache_implementation = "hybrid"
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False, compute_budget=0.7), expected)
    torch.testing.assert_close(model.last_compute_report.cost, expected_report.cost)
    torch.testing.assert_close(model.last_compute_report.attention_read, expected_report.attention_read)


def test_a_quantized_cache_is_refused_clearly():
    """A quantized KV cache is read at another precision than the byte accounting counts; a
    chunked prefill would look like decode steps to the controlled step."""
    model = SolForCausalLM(tiny_model("llama"), SMALL)
    with pytest.raises(ValueError, match="quantized"):
        model.generate(_ids(1, 20), max_new_tokens=3, compute_budget=0.9, cache_implementation="quantized")
    with pytest.raises(ValueError, match="prefill_chunk_size"):
        model.generate(_ids(1, 20), max_new_tokens=3, compute_budget=0.9, prefill_chunk_size=8)
    with pytest.raises(ValueError, match="DynamicCache or a StaticCache"):
        model.generate(_ids(1, 20), max_new_tokens=3, compute_budget=0.9, past_key_values=object())


def test_pipeline_and_streamer_carry_the_budget(smollm2_path):
    """``transformers.pipeline("text-generation", model=sol_model)`` passes ``compute_budget`` (and
    the controller) through to generate, and a ``TextStreamer`` streams the controlled tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer, pipeline

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    model = SolForCausalLM(AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval(), SolConfig())
    prompt = "Python lists are"
    kw = dict(max_new_tokens=8, do_sample=False, compute_budget=0.6, controller="uniform")
    ids = tokenizer(prompt, return_tensors="pt")
    expected = tokenizer.decode(model.generate(**ids, **kw)[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    dense = tokenizer.decode(model.generate(**ids, max_new_tokens=8, do_sample=False)[0, ids["input_ids"].shape[1]:])
    assert expected != dense  # the budget changed the continuation, so the checks below can tell

    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    out = pipe(prompt, return_full_text=False, **kw)
    assert out[0]["generated_text"] == expected
    assert model.last_compute_report.cost.item() == pytest.approx(0.6, abs=0.03)

    class Collect(TextStreamer):
        def __init__(self, tok):
            super().__init__(tok, skip_prompt=True, skip_special_tokens=True)
            self.text = ""

        def on_finalized_text(self, text, stream_end=False):
            self.text += text

    streamer = Collect(tokenizer)
    model.generate(**ids, streamer=streamer, **kw)
    assert streamer.text.strip() == expected.strip()


def test_max_length_plans_the_controlled_steps_like_max_new_tokens(monkeypatch):
    """transformers' max_length counts the prompt: the policy's progress feature must plan
    max_length - prompt - 1 controlled steps, as for the equivalent max_new_tokens."""
    from sol_hf.runtime import step as step_module

    planned = []
    real = step_module.ControlledStep.__init__

    def spy(self, model, controller, targets, max_steps, *args, **kwargs):
        planned.append(max_steps)
        real(self, model, controller, targets, max_steps, *args, **kwargs)

    monkeypatch.setattr(step_module.ControlledStep, "__init__", spy)
    model = SolForCausalLM(tiny_model("llama"), SMALL)
    ids = _ids(1, 10)
    by_length = model.generate(ids, compute_budget=0.9, controller="uniform", max_length=17, do_sample=False)
    by_new = model.generate(ids, compute_budget=0.9, controller="uniform", max_new_tokens=7, do_sample=False)
    assert planned == [6, 6] and torch.equal(by_length, by_new)
    assert model.last_compute_report.controlled_steps == 6


def test_a_batch_whose_rows_together_read_every_weight_row_is_warned(recwarn):
    """On CPU, 4 rows at the lowest keep (0.3 of 64 and 768 channels) read 4 x 0.3 x 1.35 > 1 of
    every projection with the kept-row op, so every pruned projection runs dense: generate says so.
    Two rows still save (2 x 0.3 x 1.35 < 1): no warning."""
    model = SolForCausalLM(tiny_model("llama", **WIDE), WIDE_CONFIG)

    floor = model.budget_range(31)[0]

    def warned(batch):
        recwarn.clear()
        model.generate(_ids(batch, 30), max_new_tokens=3, do_sample=False, compute_budget=floor + 0.01)  # the lowest keeps
        return [w for w in recwarn if "saves no weight bytes" in str(w.message)]

    assert len(warned(4)) == 1
    assert model.last_compute_report.cost.min() > 0.99  # as warned: nothing saved
    assert not warned(2)
    assert model.last_compute_report.cost.max() < 0.9
    assert not warned(1)


def test_num_return_sequences_decodes_each_copy_under_its_prompts_budget():
    """``num_return_sequences=3`` under per-row budgets: the same sequences and report as
    generating the prompts repeated three times each (transformers expands the batch inside
    generate; the budgets and left padding follow its rows)."""
    model = SolForCausalLM(tiny_model("llama", **WIDE), WIDE_CONFIG)
    ids = _ids(2, 30)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    budgets = torch.tensor([0.7, 0.9])
    kw = dict(max_new_tokens=8, do_sample=True, temperature=1.5, pad_token_id=0)
    torch.manual_seed(3)
    expanded = model.generate(ids, attention_mask=mask, num_return_sequences=3, compute_budget=budgets, **kw)
    report = model.last_compute_report
    torch.manual_seed(3)
    repeated = model.generate(ids.repeat_interleave(3, 0), attention_mask=mask.repeat_interleave(3, 0),
                              compute_budget=budgets.repeat_interleave(3), **kw)
    assert torch.equal(expanded, repeated)
    for name in ("cost", "standalone_cost", "activation_keep", "target"):
        torch.testing.assert_close(getattr(report, name), getattr(model.last_compute_report, name))
    assert report.target.tolist() == pytest.approx([0.7] * 3 + [0.9] * 3)
    from transformers import GenerationConfig  # the same setting inside a GenerationConfig

    torch.manual_seed(3)
    config = GenerationConfig(num_return_sequences=3, max_new_tokens=8, do_sample=True, temperature=1.5, pad_token_id=0)
    assert torch.equal(model.generate(ids, attention_mask=mask, generation_config=config, compute_budget=budgets), expanded)


@pytest.mark.parametrize("rows", [1, 4, 40])
def test_pruned_input_keeps_each_rows_count_of_largest_channels_on_every_path(rows):
    """The masked-dense input: each row keeps exactly its count of largest-|x| channels, whether
    the counts are read on the host (one top-k per row, or per distinct count for many rows) or
    stay on the device (prefixes of one sorted top-k); with exact ties too (a row whose values
    repeat), and the same channels as the top-k a row decoded alone takes."""
    from sol_hf.runtime.projections import _pruned_input

    width = 48
    flat = torch.randn(rows, width, generator=torch.Generator().manual_seed(rows))
    flat[0, : width // 2] = flat[0, width // 2 :]  # every magnitude of row 0 appears twice
    levels = torch.tensor([5, 14, 24, 33, width])
    counts = levels[torch.arange(rows) % len(levels)]
    for host_sizes in (True, False):
        out = _pruned_input(flat, counts, int(counts.max()), host_sizes=host_sizes)
        assert torch.equal((out != 0).sum(-1), counts), host_sizes
        for r in range(rows):
            kept, dropped = flat[r].abs()[out[r] != 0], flat[r].abs()[out[r] == 0]
            assert dropped.numel() == 0 or kept.min() >= dropped.max()
            assert torch.equal(out[r][out[r] != 0], flat[r][out[r] != 0])
    host = _pruned_input(flat, counts, int(counts.max()), host_sizes=True)
    for r in range(rows):
        alone = torch.zeros(width, dtype=torch.bool)
        alone[torch.topk(flat[r : r + 1].abs(), int(counts[r]), dim=-1, sorted=False).indices[0]] = True
        assert torch.equal(host[r] != 0, alone), r
    uniform = _pruned_input(flat, None, 14, host_sizes=True)
    assert torch.equal(uniform, _pruned_input(flat, torch.full((rows,), 14), 14, host_sizes=True))


@pytest.mark.parametrize("rows", [2, 12])
@pytest.mark.parametrize("quantize", ["activations", "weights"])
def test_a_decode_batch_keeps_each_rows_own_channels_on_the_kept_row_path(quantize, rows):
    """Rows of a decode batch at different activation keeps, on the kept-row op (CPU, planned on
    the host), each get the output they get decoded alone, also where |x| has an exact tie at
    each row's boundary (its count-th and next largest magnitudes are equal): each row takes the
    top-k of its own count, the call it makes alone, not a prefix of the batch's widest sorted
    top-k, which can keep the other channel of the tied pair. 12 rows take the many-rows
    selection (one top-k per distinct count)."""
    from sol_hf.actions import kept_count
    from sol_hf.config import replace

    config = replace(WIDE_CONFIG, bits=(8, 16), quantize="weights") if quantize == "weights" else WIDE_CONFIG
    model = SolForCausalLM(tiny_model("llama", **WIDE), config)
    # low enough that the rows' kept channels together stay under the whole weight: the kept-row op runs
    model.cost_model.sparse_linear_read_factor["cpu"] = 1.0 if rows == 2 else 0.1
    space, bits = model.space, min(config.bits)
    keeps = [[k for k in space.activation_keep if k < 1.0][r % 2] for r in range(rows)]
    actions = torch.tensor([space.index_of(1.0, k, bits) for k in keeps])
    generator = torch.Generator().manual_seed(0)
    for group in model._layer_executors[0].groups:
        x = torch.randn(len(keeps), 1, group.width, generator=generator)
        for row, keep in enumerate(keeps):  # tie the row's boundary: its count-th largest |x| repeats, sign flipped
            order = x[row, 0].abs().argsort(descending=True)
            count = kept_count(keep, group.width)
            x[row, 0, order[count]] = -x[row, 0, order[count - 1]]
        step = model._step_state(actions, None, 0, None, True, True)
        batch = group.outputs(x, step)
        if quantize == "activations":  # the int8 copies always run their kept-row op on CPU
            assert group._plan(step, len(keeps), x.device)[1], "the batch ran the masked dense path"
        for row in range(len(keeps)):
            alone = group.outputs(x[row : row + 1].clone(), model._step_state(actions[row : row + 1], None, 0, None, True, True))
            for together, by_itself in zip(batch, alone):
                torch.testing.assert_close(together[row : row + 1], by_itself, rtol=1e-5, atol=1e-5)
