"""Where the activation actions execute: input-channel pruning that reads only the kept weight rows.

At wrap time every decoder layer gets a :class:`LayerExecutor`. For each site of
``SolConfig.sparse_inputs`` (the attention's q/k/v projections, its output projection, the
MLP's gate/up projections, its down projection) it prepares the transposed weight layout the
sparse ops read, ``(Din, Dout)`` row-major so one input channel's weights are one contiguous row
(projections that share their input are fused: q/k/v into one ``(Din, Dq + Dk + Dv)`` matrix,
gate/up likewise), and replaces the ``forward`` of those projections by an instance attribute.
Outside a controlled step the original ``forward`` runs, and so it does in a step whose rows
all keep every channel at full precision where the host knows it (``StepState.projections_dense``:
the step was charged the sites' full bytes when it was made, so a dense step pays no per-call
Python: 1.047 against 1.102 of the base step on SmolLM2, CPU, ``benchmarks/dense_step_overhead.py``);
:meth:`LayerExecutor.remove` deletes the attributes and frees the prepared copies.

During a controlled decode step each row keeps its top-``ceil(keep * Din)`` channels by
``|x|`` (``torch.topk``, no full sort on CPU), and the projections run one of two paths, chosen
by the bytes they read:

* **sparse**: ``ops.sparse_linear`` reads, for each row, only the weight rows of its kept
  channels (``embedding_bag`` on CPU, the Triton kernel on CUDA). Rows do not share reads, so
  a batch reads ``sum_r count_r`` rows.
* **masked dense**: where that is slower than reading the whole weight once (the rows' kept
  channels add up to about ``Din`` or more, given the sparse op's time per byte on this backend,
  ``SPARSE_LINEAR_READ_FACTOR``), the dropped channels are zeroed and the dense projection runs.

Either way the result is the same function of the input (up to float summation order).
Teacher-forced calls (several positions per row, ``StepState.decode`` false) always take the
masked dense path, the reference.
Bytes are attributed to rows as they are read: a sparse row is charged its own rows, and a row
of a dense call is charged the whole projection, as a row decoded alone would be.

The MLP output's activation fake-quantization (the paper's bits axis, hooked only where
``SolConfig.bits`` has levels below 16) reads no fewer bytes on any backend; it is credited nothing.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .. import ops
from ..actions import kept_count, read_factor, sparse_linear_pays
from .lora import LoraBranch, active_branches, base_layer
from .state import Runtime, StepState

__all__ = ["LayerExecutor", "quantize_output_hook", "projection_widths", "projection_bytes", "int8_row_bytes", "SPARSE_LINEAR_READ_FACTOR"]

# The sparse projection op's time per byte over the dense projection's where the two take equally
# long (the path-choice threshold, see sol_hf.runtime.calibrate), per device type, optionally per
# weight dtype ("cpu:bfloat16"). One machine's figures; model.calibrate_sparse_read_factor()
# measures the running one. CPU fp32: on this project's 2-core machine SmolLM2 measured 1.0-1.1
# with OMP_WAIT_POLICY=PASSIVE and 1.6 with spinning threads timing the op alone (its narrow rows
# read at 1.5-1.9 of the dense time per byte), and 1.9-2.2 timing decode steps with a 10 % margin
# (the calibration since 2026-12-02, session 9): above 1.35, under which uncalibrated budgets
# 0.8-0.7 decoded 14-20 % more slowly than base there. Not raised yet: tests and documented
# quality tables reason with 1.35. CPU bf16: the Llama-3.2-1B shape measured 1.0 under both policies
# (2026-12-02, after the op split rows into runs); 1.25 keeps a margin (was 1.75 for the earlier
# op). fp16 is not measured again. CUDA: the Triton kernel is built to read at the dense GEMV's
# bandwidth (not measured yet; a Triton step picks its path without host reads and uses 1.0).
SPARSE_LINEAR_READ_FACTOR = {"cpu": 1.35, "cpu:bfloat16": 1.25, "cpu:float16": 1.75, "cuda": 1.0}



def _transposed_weight(module: nn.Module) -> torch.Tensor:
    """(Din, Dout) view of a projection's weight: ``nn.Linear`` stores (Dout, Din); transformers'
    ``Conv1D`` (GPT-2) already stores (Din, Dout). A PEFT layer is read through its base layer."""
    module = base_layer(module)
    if type(module).__name__ == "Conv1D":
        return module.weight
    if isinstance(module, nn.Linear):
        return module.weight.t()
    raise TypeError(f"projection {type(module).__name__} is neither nn.Linear nor Conv1D; sol_hf cannot prune its input")


def projection_widths(projections: list[nn.Module]) -> tuple[int, float]:
    """(input channels, bytes of one input channel's weights over all ``projections``): a row of
    each base weight and of each active LoRA adapter's ``lora_A``."""
    weights = [_transposed_weight(p) for p in projections]
    widths = {w.shape[0] for w in weights}
    if len(widths) != 1:
        raise ValueError(f"projections that share an input read different widths {sorted(widths)}; sol_hf cannot prune their shared input")
    row = sum(w.shape[1] * w.element_size() for w in weights)
    row += sum(b.lora_A.shape[0] * b.lora_A.element_size() for p in projections for b in active_branches(p))
    return widths.pop(), float(row)


def projection_bytes(projections: list[nn.Module]) -> float:
    """Bytes a dense forward of ``projections`` reads: base weights and biases, plus the active
    LoRA adapters' weights (inactive, disabled or merged adapters are not read)."""
    total = 0
    for p in projections:
        tensors = list(base_layer(p).parameters())
        for branch in active_branches(p):
            tensors += [branch.lora_A, *branch.lora_B.parameters()]
        total += sum(t.numel() * t.element_size() for t in tensors)
    return float(total)


def int8_row_bytes(projections: list[nn.Module]) -> float:
    """Bytes of one input channel's row of the int8 copy of ``projections`` (fused): the codes of
    every output column plus a float32 scale and offset per group (see ``sol_hf.ops.int8_linear``)."""
    return float(ops.int8_row_bytes(sum(_transposed_weight(p).shape[1] for p in projections)))


def _prepare(projections: list[nn.Module]) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, ...]]:
    """Fused (Din, sum Dout) row-major weight, fused bias or None, and each projection's Dout."""
    weights = [_transposed_weight(p).detach() for p in projections]
    widths = tuple(w.shape[1] for w in weights)
    fused = weights[0].contiguous() if len(weights) == 1 else torch.cat(weights, dim=1).contiguous()
    biases = [base_layer(p).bias for p in projections]
    if all(b is None for b in biases):
        bias = None
    else:
        bias = torch.cat([b.detach() if b is not None else fused.new_zeros(w) for b, w in zip(biases, widths)])
    return fused, bias, widths


def _prepare_lora(projections: list[nn.Module]) -> tuple[torch.Tensor | None, list[tuple[int, LoraBranch]]]:
    """Fused (Din, sum r) row-major ``lora_A`` of every active adapter of ``projections`` (None
    without any), and (projection position, branch) per adapter in its column order."""
    parts = [(i, b) for i, p in enumerate(projections) for b in active_branches(p)]
    if not parts:
        return None, []
    dtypes = {b.lora_A.dtype for _, b in parts}
    if len(dtypes) != 1:
        raise TypeError(f"the LoRA adapters of projections that share an input have different dtypes {sorted(map(str, dtypes))}")
    fused = torch.cat([b.lora_A.detach().t() for _, b in parts], dim=1).contiguous()
    return fused, parts


def _own_top_k(magnitude: torch.Tensor, counts: torch.Tensor, host_counts: list[int]) -> list[tuple]:
    """Each row's channels: an unsorted ``topk`` of its own count over its ``magnitude`` row
    (R, Din), the call a row decoded alone makes, so exact ties at a row's boundary break the same
    way alone and in a batch, on the kept-row path and the masked one. ``counts`` (R,) holds
    ``host_counts`` on the device. Returns ``(rows, indices)`` pairs: ``rows`` an int and
    ``indices`` (count,) in a small batch (one top-k per row costs least), or ``rows`` an (n,)
    int64 tensor of the rows sharing a count and ``indices`` (n, count) for many rows
    (teacher-forced episodes score thousands of rows at a few levels: one top-k per distinct
    count; the device path's sorted top-k of the widest count, shared by all rows, took 3.1-3.2x as
    long for 2048 rows and 1.5-2.2x for 4, ``benchmarks/pruned_input_cpu.py``,
    ``docs/results/pruned_input_cpu_active.json``)."""
    if magnitude.shape[0] <= 8:
        return [(row, torch.topk(magnitude[row], count, sorted=False).indices) for row, count in enumerate(host_counts)]
    picks = []
    for count in sorted(set(host_counts)):
        rows = (counts == count).nonzero().squeeze(-1)
        picks.append((rows, torch.topk(magnitude.index_select(0, rows), count, dim=-1, sorted=False).indices))
    return picks


def _own_channels(magnitude: torch.Tensor, counts: torch.Tensor | None, host_counts: list[int]) -> torch.Tensor:
    """(R, widest) int64 for the kept-row ops: row ``r``'s first ``host_counts[r]`` entries are its
    :func:`_own_top_k` channels (the prefix the op reads); past them, unused repeats of its first."""
    widest = max(host_counts)
    if min(host_counts) == widest:
        return torch.topk(magnitude, widest, dim=-1, sorted=False).indices
    channels = torch.empty(magnitude.shape[0], widest, dtype=torch.long, device=magnitude.device)
    for rows, own in _own_top_k(magnitude, counts, host_counts):
        channels[rows, : own.shape[-1]] = own
        channels[rows, own.shape[-1] :] = own[..., :1]
    return channels


def _pruned_input(flat: torch.Tensor, counts: torch.Tensor | None, widest: int, host_sizes: bool = False) -> torch.Tensor:
    """(R, Din) ``flat`` with all but each row's ``counts`` largest-|x| channels zeroed: exactly
    ``count`` channels per row, the ones the sparse ops read (a threshold on |x| would keep every
    tied channel; exact ties are common: with grouped-query attention the heads that share a KV
    head output the same values at a row's first token). ``widest``: the largest count;
    ``counts=None``: every row keeps ``widest``. ``host_sizes``: the step plans on the host
    (``StepState.host``), so ``counts`` may be read there: each row's channels are then
    :func:`_own_top_k`, the ones the kept-row op reads for it in a batch and alone. Elsewhere
    (no host read: CUDA steps must not sync, and a step compiles into one graph) each row keeps
    the prefix of one sorted top-k of ``widest``."""
    magnitude = flat.abs()
    pruned = torch.zeros_like(flat)  # kept values are scattered in: cheaper than a bool mask and a where
    host_counts = counts.tolist() if host_sizes and counts is not None else None
    if counts is None or (host_counts is not None and min(host_counts) == max(host_counts)):
        count = widest if counts is None else host_counts[0]
        if count >= flat.shape[-1]:
            return flat
        kept = torch.topk(magnitude, count, dim=-1, sorted=False).indices
        return pruned.scatter_(-1, kept, flat.gather(-1, kept))
    if host_counts is not None:  # the channels :func:`_own_channels` gives the kept-row op
        for rows, own in _own_top_k(magnitude, counts, host_counts):
            if isinstance(rows, int):
                pruned[rows].scatter_(-1, own, flat[rows].gather(-1, own))
            else:
                picked = flat.index_select(0, rows)
                pruned.index_copy_(0, rows, torch.zeros_like(picked).scatter_(-1, own, picked.gather(-1, own)))
        return pruned
    channels = torch.topk(magnitude, widest, dim=-1, sorted=True).indices  # (R, widest), largest first
    used = torch.arange(widest, device=flat.device) < counts.unsqueeze(-1)
    return pruned.scatter_(-1, channels, torch.where(used, flat.gather(-1, channels), 0.0))


class _PrunedProjections:
    """One group of projections that read the same input: the prepared weight and the last result."""

    def __init__(self, projections: list[nn.Module], levels: tuple[float, ...], quantize_weights: bool = False):
        self.projections = projections
        self.originals = [p.forward for p in projections]
        self.levels = levels
        self.quantize_weights = quantize_weights
        self.int8: ops.Int8Weight | None = None
        self._counts: dict[torch.device, torch.Tensor] = {}
        self._every: dict[tuple[int, torch.device], torch.Tensor] = {}
        self._last_input: torch.Tensor | None = None
        self._last_step: StepState | None = None
        self._last_outputs: tuple[torch.Tensor, ...] = ()
        self._merged: tuple[bool, ...] | None = None
        self.refresh()

    def refresh(self) -> None:
        """(Re)read the projections: the prepared layouts and their byte figures. Called at wrap
        time and whenever the PEFT adapters change (switched, disabled, merged): a merge changes
        the base weight, so its layout is prepared again; the adapters' layout always is."""
        merged = tuple(bool(getattr(p, "merged", False)) for p in self.projections)
        if merged != self._merged:
            self.weight_t, self.bias, self.widths = _prepare(self.projections)
            self.int8 = ops.quantize_int8(self.weight_t) if self.quantize_weights else None
            self._merged = merged
        self.lora_t, self.lora_parts = _prepare_lora(self.projections)
        if self.int8 is not None and self.lora_parts:
            raise TypeError(
                "SolConfig(quantize='weights') reads int8 copies of the base weights, which do not hold the unmerged "
                "LoRA adapters of a PeftModel; merge them first (peft_model.merge_and_unload()) or use quantize='activations'"
            )
        self.width, self.row_bytes = projection_widths(self.projections)
        self.full_bytes = projection_bytes(self.projections)
        self.bias_bytes = self.full_bytes - self.width * self.row_bytes  # biases and lora_B: read whatever is kept
        self.counts_host = tuple(kept_count(k, self.width) for k in self.levels)
        self._last_input, self._last_step, self._last_outputs = None, None, ()
        # Copies made for the layouts (a Conv1D weight is used as it is, no copy).
        base = base_layer(self.projections[0])
        shares = len(self.projections) == 1 and self.weight_t.data_ptr() == base.weight.data_ptr()
        lora = 0 if self.lora_t is None else self.lora_t.numel() * self.lora_t.element_size()
        int8 = 0 if self.int8 is None else self.int8.nbytes
        self.prepared_bytes = (0 if shares else self.weight_t.numel() * self.weight_t.element_size()) + lora + int8

    def counts(self, device: torch.device) -> torch.Tensor:
        """(levels,) int64 kept channels per activation keep level, on ``device`` (built once)."""
        if device not in self._counts:
            self._counts[device] = torch.tensor(self.counts_host, dtype=torch.long, device=device)
        return self._counts[device]

    def _host_counts(self, step: StepState) -> list[int]:
        """Each row's kept channels at this site, from the step's host plan."""
        return [self.counts_host[i] for i in step.host.activation_index]

    def outputs(self, x: torch.Tensor, step: StepState) -> tuple[torch.Tensor, ...]:
        """Every projection's output for input ``x`` (..., Din) under the step's actions; computed
        once per input (the fused projections share it)."""
        if x is self._last_input and step is self._last_step:
            return self._last_outputs
        flat = x.reshape(-1, self.width)
        if self.int8 is not None and (step.host is None or step.host.any_quant):
            results = self._int8_outputs(x, flat, step)
            self._last_input, self._last_step, self._last_outputs = x, step, results
            return results
        rows = flat.shape[0]
        all_kept, sparse, widest, uniform, row_bytes_read = self._plan(step, rows, x.device)
        lead = x.shape[:-1]
        counts = None if uniform else self.counts(x.device)[step.activation_index]  # (R,)
        if all_kept:
            results = tuple(f(x) for f in self.originals)
            step.projection_bytes.add(self.full_bytes)
        elif sparse:
            # (R, widest): each row reads its count's prefix. Planned on the host: every row's own
            # top-k (the channels it keeps decoded alone); on the device: one sorted top-k.
            if step.host is not None:
                host_counts = [widest] if uniform else self._host_counts(step)
                channels = _own_channels(flat.abs(), counts, host_counts)
            else:
                channels = torch.topk(flat.abs(), widest, dim=-1, sorted=not uniform).indices
            results = self._kept_row_outputs(flat, channels, counts, lead)
            if row_bytes_read is not None:
                step.projection_bytes.add(row_bytes_read)
            else:
                step.projection_bytes.add(counts * self.row_bytes + self.bias_bytes)
        else:
            # counts None: every row keeps ``widest``
            pruned = _pruned_input(flat, counts, widest, host_sizes=step.host is not None)
            results = tuple(f(pruned.view_as(x)) for f in self.originals)
            step.projection_bytes.add(self.full_bytes)
        self._last_input, self._last_step, self._last_outputs = x, step, results
        return results

    def _kept_row_outputs(self, flat: torch.Tensor, channels: torch.Tensor, counts: torch.Tensor | None,
                          lead: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
        """Every projection's (*lead, Dout) output from the kept-row op: ``flat`` (R, Din) reading
        the first ``counts[r]`` of ``channels`` (R, K) per row (``None``: all K), the adapters'
        kept rows too."""
        fused = ops.sparse_linear(flat, self.weight_t, channels, counts, self.bias)
        if self.lora_t is not None:
            flat_results = [fused] if len(self.widths) == 1 else list(fused.split(self.widths, dim=-1))
            self._add_adapters(flat_results, flat, channels, counts)
            return tuple(y.view(*lead, y.shape[-1]) for y in flat_results)
        # (..., sum Dout) -> each projection's (..., Dout) view
        return torch.split_with_sizes(fused.view(*lead, fused.shape[-1]), self.widths, dim=-1)

    def _int8_outputs(self, x: torch.Tensor, flat: torch.Tensor, step: StepState) -> tuple[torch.Tensor, ...]:
        """:meth:`outputs` where rows may read the int8 copy (``bits`` below 16 with
        ``quantize='weights'``): flagged rows compute with the int8 weights of their kept channels.

        * decode on CPU (sizes on the host): the int8 rows run the int8 kept-row op, each charged
          its kept rows of the copy; in a batch that mixes precisions, the full-precision rows run
          the masked dense projection (charged in full);
        * decode on Triton: one kernel for all rows, each reading its own copy (no host sync);
        * teacher-forced calls: the reference, masked input times the dequantized copy.
        """
        rows, device = flat.shape[0], flat.device
        counts = self.counts(device)[step.activation_index]  # (R,)
        flags = step.bits < 16  # (R,)
        int8_bytes = self.int8.row_bytes
        if not step.decode:
            pruned = _pruned_input(flat, counts, self.width, host_sizes=step.host is not None)
            quantized = pruned.float() @ ops.dequantize_int8(self.int8)
            if self.bias is not None:
                quantized = quantized + self.bias.float()
            full = torch.cat([f(pruned).reshape(rows, -1) for f in self.originals], dim=-1)
            fused = torch.where(flags.unsqueeze(-1), quantized.to(full.dtype), full)
            step.projection_bytes.add(torch.where(flags, self.width * int8_bytes + self.bias_bytes, self.full_bytes))
        elif step.host is None:
            channels = torch.topk(flat.abs(), self.width, dim=-1).indices
            fused = ops.sparse_linear(flat, self.weight_t, channels, counts, self.bias, int8=self.int8, use_int8=flags)
            step.projection_bytes.add(torch.where(flags, counts * int8_bytes, counts * self.row_bytes) + self.bias_bytes)
        else:
            host_counts = self._host_counts(step)
            quantized_rows = [r for r, bits in enumerate(step.host.bits) if bits < 16]
            if len(quantized_rows) == rows:
                fused = self._int8_rows(flat, counts, host_counts)
            else:
                picked = torch.tensor(quantized_rows, dtype=torch.long, device=device)
                pruned = _pruned_input(flat, counts, self.width, host_sizes=True)
                fused = torch.cat([f(pruned).reshape(rows, -1) for f in self.originals], dim=-1)
                fused[picked] = self._int8_rows(flat[picked], counts[picked], [host_counts[r] for r in quantized_rows])
            step.projection_bytes.add([
                c * int8_bytes + self.bias_bytes if bits < 16 else self.full_bytes
                for c, bits in zip(host_counts, step.host.bits)
            ])
        parts = [fused] if len(self.widths) == 1 else list(fused.split(self.widths, dim=-1))
        return tuple(y.view(*x.shape[:-1], y.shape[-1]) for y in parts)

    def _int8_rows(self, flat: torch.Tensor, counts: torch.Tensor, host_counts: list[int]) -> torch.Tensor:
        """(R, sum Dout): every row of ``flat`` through the int8 kept-row op, ``host_counts`` kept
        channels each."""
        widest = max(host_counts)
        uniform = min(host_counts) == widest
        if uniform and widest >= self.width:  # every channel: no selection
            channels = self._every_channel(flat.shape[0], flat.device)
        else:
            channels = _own_channels(flat.abs(), counts, host_counts)
        return ops.sparse_linear_int8(flat, self.int8, channels, None if uniform else counts, self.bias)

    def _every_channel(self, rows: int, device: torch.device) -> torch.Tensor:
        """(rows, Din) int64 ``0..Din-1`` per row, made once per (rows, device)."""
        key = (rows, device)
        if key not in self._every:
            self._every[key] = torch.arange(self.width, device=device).expand(rows, -1).contiguous()
        return self._every[key]

    def _add_adapters(self, results: list[torch.Tensor], flat: torch.Tensor, channels: torch.Tensor,
                      counts: torch.Tensor | None) -> None:
        """Add each active LoRA adapter's ``lora_B(lora_A x) * scaling`` to its projection's (R, Dout)
        result, reading only the kept rows of the fused ``lora_A`` layout (as PEFT does, the adapter
        computes in its own dtype and the sum is cast back to the projection's)."""
        low = ops.sparse_linear(flat.to(self.lora_t.dtype), self.lora_t, channels, counts, None)  # (R, sum r)
        ranks = [branch.lora_A.shape[0] for _, branch in self.lora_parts]
        for (position, branch), part in zip(self.lora_parts, low.split(ranks, dim=-1)):
            base = results[position]
            results[position] = (base + branch.lora_B(part) * branch.scaling).to(base.dtype)

    def _plan(self, step: StepState, rows: int, device: torch.device):
        """(all kept, sparse, widest count, every row keeps the same count, bytes read per row
        or None) for this step: decided once per step for every group of the same width, levels
        and dtype (each layer's q/k/v, say), from the host copies of the actions where there are."""
        key = ("projection", self.width, self.counts_host, self.weight_t.dtype, self.row_bytes, self.bias_bytes, rows)
        plan = step.layouts.get(key)
        if plan is None:
            if step.host is not None:  # sizes known on the host: pick the faster path
                host_counts = self._host_counts(step)
                widest = max(host_counts)
                all_kept = min(host_counts) >= self.width
                factor = read_factor(self.runtime.cost_model.sparse_linear_read_factor, device.type, self.weight_t.dtype)
                sparse = step.decode and sparse_linear_pays(sum(host_counts), self.width, factor)
                uniform = min(host_counts) == widest
                rest = self.bias_bytes
                read = widest * self.row_bytes + rest if uniform else [c * self.row_bytes + rest for c in host_counts]
            else:  # Triton reads the counts on the device: one row at a time pays, no host sync
                widest, all_kept, sparse, uniform, read = self.width, False, step.decode and rows == 1, False, None
            plan = step.layouts[key] = (all_kept, sparse, widest, uniform, read)
        return plan

    def install(self, runtime: Runtime) -> None:
        self.runtime = runtime
        for position, (module, original) in enumerate(zip(self.projections, self.originals)):
            def forward(x, *args, _position=position, _original=original, **kwargs):
                step = runtime.step
                if step is None or step.projections_dense:
                    return _original(x, *args, **kwargs)
                return self.outputs(x, step)[_position]

            object.__setattr__(module, "forward", forward)

    def remove(self) -> None:
        for module in self.projections:
            module.__dict__.pop("forward", None)
        self._last_input, self._last_step, self._last_outputs = None, None, ()
        self.weight_t = self.bias = self.lora_t = self.int8 = None
        self.lora_parts = []
        self._counts.clear()
        self._every.clear()


class LayerExecutor:
    """The executed activation actions of one decoder layer (see the module docstring): one
    :class:`_PrunedProjections` per site of ``config.sparse_inputs``, and the paper's MLP-output
    fake quantization when the grid has bits below 16.

    Args:
        layer: the decoder layer.
        adapter: where the layer keeps its attention and MLP projections.
        config: the model's :class:`~sol_hf.config.SolConfig`.
        runtime: the wrapped model's runtime.
    """

    def __init__(self, layer: nn.Module, adapter, config, runtime: Runtime):
        quantize_weights = config.quantize == "weights" and min(config.bits) < 16
        self.groups = [
            _PrunedProjections(adapter.site_projections(layer, site), config.activation_keep, quantize_weights)
            for site in config.sparse_inputs
        ]
        for group in self.groups:
            group.install(runtime)
        mlp_output = adapter.mlp_output_module(layer)
        quantize_activations = config.quantize == "activations" and min(config.bits) < 16
        self.quant_handle = mlp_output.register_forward_hook(quantize_output_hook(runtime)) if quantize_activations else None

    @property
    def prepared_bytes(self) -> int:
        """Memory held by the prepared (transposed) weight copies."""
        return sum(group.prepared_bytes for group in self.groups)

    def refresh(self) -> None:
        """Follow a change of the layer's PEFT adapters (see :meth:`_PrunedProjections.refresh`)."""
        for group in self.groups:
            group.refresh()

    def remove(self) -> None:
        if self.quant_handle is not None:
            self.quant_handle.remove()
        for group in self.groups:
            group.remove()


def quantize_output_hook(runtime: Runtime):
    """Forward hook on an MLP: per-token fake-quantization of its output to the step's bits (a
    reference-only action: it reads no fewer bytes, and is skipped when every row keeps 16 bits
    and the host knows it)."""

    def hook(module, args, output):
        step = runtime.step
        if step is None or (step.host is not None and not step.host.any_quant):
            return None
        tensor = output[0] if isinstance(output, tuple) else output
        flat = tensor.reshape(-1, tensor.shape[-1])
        quantized = ops.fake_quantize(flat, step.bits).view_as(tensor)
        return (quantized, *output[1:]) if isinstance(output, tuple) else quantized

    return hook
