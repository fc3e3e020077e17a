"""Policy artifacts: ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` for SolForCausalLM.

A policy artifact is a folder (or a Hub model repo) holding exactly three files:

* ``sol_config.json``: the full :class:`SolConfig`, the base model's id and pinned revision, a
  fingerprint of the base model's architecture, and the sol_hf version that wrote it;
* ``policy.safetensors``: the policy's weights, never the base model's;
* ``README.md``: a model card (``library_name: sol_hf``, ``base_model:adapter:<base>``).

Only safetensors is ever read (no pickle), nothing runs remote code, and every check (config,
tensors, base fingerprint, tensor names and shapes) passes before the base model is wrapped, so
a failed load leaves a given base model untouched. See ``docs/artifact-format.md``.

This module does not import ``sol_hf.modeling`` (data flows modeling -> hub): the mixin builds
models with ``cls(...)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .config import CONFIG_NAME, FORMAT_VERSION, SolConfig
from .policy import SolPolicy
from .runtime.lora import applied_adapter_tensors, is_peft_model, peft_inner_model

__all__ = [
    "SolHubMixin",
    "SolArtifactError",
    "CONFIG_NAME",
    "POLICY_WEIGHTS_NAME",
    "MODEL_CARD_NAME",
    "ARTIFACT_FILES",
    "base_fingerprint",
    "adapter_fingerprint",
    "read_artifact_config",
    "read_policy_tensors",
    "resolve_policy_folder",
    "model_card",
]

POLICY_WEIGHTS_NAME = "policy.safetensors"
MODEL_CARD_NAME = "README.md"
ARTIFACT_FILES = (CONFIG_NAME, POLICY_WEIGHTS_NAME, MODEL_CARD_NAME)
# Suffixes of pickle-based checkpoints: never read, named in the refusal message.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
FINGERPRINT_FIELDS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
)
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


class SolArtifactError(ValueError):
    """A policy artifact is missing, unsafe, malformed or meant for another base model."""


# ---------------------------------------------------------------------------------------------
# Base fingerprint
# ---------------------------------------------------------------------------------------------


def _fingerprint_hash(fields: Mapping[str, Any]) -> str:
    canonical = json.dumps({k: fields.get(k) for k in FINGERPRINT_FIELDS}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def base_fingerprint(model_or_config: Any) -> dict[str, Any]:
    """The architecture fingerprint of a base model (or its ``PretrainedConfig``).

    Returns ``{model_type, hidden_size, num_hidden_layers, num_attention_heads,
    num_key_value_heads, intermediate_size, vocab_size, sha256}``; ``sha256`` hashes the other
    fields (canonical JSON), so a policy can be checked against a base before its weights load.
    """
    config = getattr(model_or_config, "config", model_or_config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = int(text.num_attention_heads)
    hidden = int(text.hidden_size)
    intermediate = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None)
    if intermediate is None and text.model_type == "gpt2":  # GPT-2: n_inner=None means 4 * n_embd
        intermediate = 4 * hidden
    fields: dict[str, Any] = {
        "model_type": str(text.model_type),
        "hidden_size": hidden,
        "num_hidden_layers": int(text.num_hidden_layers),
        "num_attention_heads": heads,
        "num_key_value_heads": int(getattr(text, "num_key_value_heads", None) or heads),
        "intermediate_size": None if intermediate is None else int(intermediate),
        "vocab_size": int(text.vocab_size),
    }
    fields["sha256"] = _fingerprint_hash(fields)
    return fields


def _check_fingerprint(
    stored: dict[str, Any] | None, actual: dict[str, Any], where: str, base_name: str, allow_mismatch: bool
) -> None:
    if stored is None:
        message = (
            f"{where} has no base_fingerprint, so sol_hf cannot check that the policy belongs to base model "
            f"{base_name!r} (fingerprint {actual}). Re-save the policy with sol_hf, or pass "
            f"allow_fingerprint_mismatch=True to load it unchecked."
        )
    else:
        if stored == actual:
            return
        differing = [
            f"{k}: policy {stored.get(k)!r} vs base {actual.get(k)!r}" for k in FINGERPRINT_FIELDS if stored.get(k) != actual.get(k)
        ]
        message = (
            f"the policy in {where} was trained for a different base model than {base_name!r}.\n"
            f"  policy's base fingerprint: {stored}\n"
            f"  loaded base's fingerprint: {actual}\n"
            f"  differing: {'; '.join(differing)}\n"
            f"Load it with the base model named in its sol_config.json, or pass allow_fingerprint_mismatch=True "
            f"to load it anyway (its actions were learned on another model)."
        )
    _refuse_or_warn(message, allow_mismatch)


def _refuse_or_warn(message: str, allow_mismatch: bool) -> None:
    """A mismatch between a policy and the model it is loaded on: an error, or with the caller's
    ``allow_fingerprint_mismatch`` a warning pointing at the caller of ``from_pretrained``."""
    if not allow_mismatch:
        raise SolArtifactError(message)
    warnings.warn(message, stacklevel=4)


ADAPTER_FINGERPRINT_FIELDS = ("adapters", "tensors", "parameters", "sha256")


def adapter_fingerprint(model: Any) -> dict[str, Any] | None:
    """The identity of the PEFT adapters applied to ``model`` (a ``PeftModel``, or a transformers
    model with PEFT layers), or ``None`` for a bare model.

    Returns ``{adapters, tensors, parameters, sha256}``: the applied adapters' names, how many
    tensors and parameters they hold, and a SHA-256 over every applied adapter weight (module path,
    position, dtype, shape and bytes) and scaling. Adapter names do not enter the hash: the same
    weights loaded under another name are the same adapter.
    """
    inner = peft_inner_model(model) if is_peft_model(model) else model
    entries = applied_adapter_tensors(inner)
    if not entries:
        return None
    digest = hashlib.sha256()
    parameters = 0
    for path, _name, position, key, tensor in entries:
        tensor = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{path}/{position}/{key}|{tensor.dtype}|{tensor.numel()}\n".encode("utf-8"))
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
        parameters += tensor.numel() if key != "scaling" else 0
    names = sorted({name for _, name, _, _, _ in entries})
    return {"adapters": names, "tensors": sum(key != "scaling" for *_, key, _ in entries), "parameters": parameters,
            "sha256": digest.hexdigest()}


def _describe_adapter(fingerprint: Mapping[str, Any] | None, name_or_path: str | None = None) -> str:
    if fingerprint is None:
        return "the bare base model (no PEFT adapter)"
    where = f" from {name_or_path!r}" if name_or_path else ""
    return (f"PEFT adapter(s) {fingerprint['adapters']}{where} ({fingerprint['parameters']:,} parameters, "
            f"sha256 {fingerprint['sha256']})")


def _check_adapter(stored: dict[str, Any] | None, actual: dict[str, Any] | None, where: str,
                   stored_name: str | None, allow_mismatch: bool) -> None:
    """Refuse (or warn, with ``allow_mismatch``) when the model's adapters are not the policy's."""
    if (stored and stored["sha256"]) == (actual and actual["sha256"]):
        return
    message = (
        f"the policy in {where} was trained on {_describe_adapter(stored, stored_name)}, but the given model has "
        f"{_describe_adapter(actual)}.\n"
        f"  policy's adapter fingerprint: {stored}\n"
        f"  model's adapter fingerprint:  {actual}\n"
        f"Load the policy on the model (and adapter) it was trained with, or pass allow_fingerprint_mismatch=True "
        f"to load it anyway (its actions were learned on another model)."
    )
    _refuse_or_warn(message, allow_mismatch)


# ---------------------------------------------------------------------------------------------
# Reading an artifact
# ---------------------------------------------------------------------------------------------


def _is_pickle_name(name: str) -> bool:
    return name.lower().endswith(PICKLE_SUFFIXES)


def _pickle_refusal(path: str) -> SolArtifactError:
    return SolArtifactError(
        f"refusing to read {path}: it is a pickle-based checkpoint (.bin/.pt/.pth/.pkl/.ckpt), and unpickling can "
        f"run arbitrary code. sol_hf reads policies only from {POLICY_WEIGHTS_NAME} (safetensors). Convert it where "
        f"you trust it: torch.load it there, then SolForCausalLM(base, config, policy).save_pretrained(dir)."
    )


def _looks_local(ref: str) -> bool:
    return os.path.isabs(ref) or ref.startswith((".", "~")) or ref.count("/") > 1 or os.sep != "/" and os.sep in ref


def resolve_policy_folder(
    policy: str | os.PathLike, revision: str | None = None, cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
) -> str:
    """A local folder holding the artifact ``policy`` names (a folder, a file in it, or a Hub repo id).

    Hub repos are fetched with ``huggingface_hub.snapshot_download`` (only ``sol_config.json`` and
    ``policy.safetensors``), which honours ``HF_HUB_OFFLINE``, ``revision``, ``cache_dir`` and ``token``.
    """
    ref = os.fspath(policy)
    if not isinstance(ref, str):
        raise TypeError(f"policy must be a Hub repo id or a local path, got {type(policy).__name__}")
    expanded = os.path.expanduser(ref)
    if os.path.isfile(expanded):
        if _is_pickle_name(expanded):
            raise _pickle_refusal(expanded)
        if os.path.basename(expanded) in (CONFIG_NAME, POLICY_WEIGHTS_NAME):
            return os.path.dirname(os.path.abspath(expanded))
        raise SolArtifactError(
            f"{expanded} is a file; pass the folder (or Hub repo) holding {CONFIG_NAME} and {POLICY_WEIGHTS_NAME}"
        )
    if os.path.isdir(expanded):
        return expanded
    if _looks_local(ref):
        raise SolArtifactError(f"policy folder {ref!r} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            ref, revision=revision, cache_dir=cache_dir, token=token,
            allow_patterns=[CONFIG_NAME, POLICY_WEIGHTS_NAME], library_name="sol_hf",
        )
    except Exception as err:  # noqa: BLE001 - re-raised with what was tried
        raise SolArtifactError(
            f"could not find policy {ref!r}: it is not a local folder, and fetching it from the Hub "
            f"(revision={revision!r}, cache_dir={cache_dir!r}) failed: {type(err).__name__}: {err}. "
            f"With HF_HUB_OFFLINE=1 only repos already in the cache can be loaded."
        ) from err


def _artifact_paths(folder: str) -> tuple[str, str]:
    """(config path, weights path) of an artifact folder; refuses pickles and missing files."""
    names = sorted(os.listdir(folder))
    config_path = os.path.join(folder, CONFIG_NAME)
    weights_path = os.path.join(folder, POLICY_WEIGHTS_NAME)
    if not os.path.isfile(weights_path):
        pickles = [n for n in names if _is_pickle_name(n)]
        if pickles:
            raise _pickle_refusal(os.path.join(folder, pickles[0]))
    if not os.path.isfile(config_path):
        raise SolArtifactError(
            f"{folder} has no {CONFIG_NAME}, so it is not a SOL policy artifact (files found: {names}). A policy "
            f"artifact holds {', '.join(ARTIFACT_FILES)}. To wrap a plain base model with an untrained policy, use "
            f"SolForCausalLM(AutoModelForCausalLM.from_pretrained(...), SolConfig(...))."
        )
    if not os.path.isfile(weights_path):
        raise SolArtifactError(f"{folder} has {CONFIG_NAME} but no {POLICY_WEIGHTS_NAME} (files found: {names})")
    return config_path, weights_path


def read_artifact_config(path: str | os.PathLike) -> tuple[SolConfig, dict[str, Any] | None, dict[str, Any] | None]:
    """Parse and validate ``sol_config.json`` -> (SolConfig, stored base fingerprint or None,
    stored adapter fingerprint or None: a policy for a bare base, as every format-2 artifact)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise SolArtifactError(f"{path} is not valid JSON ({err}); the artifact is corrupt: re-download or re-save it") from None
    except UnicodeDecodeError as err:
        raise SolArtifactError(f"{path} is not UTF-8 text ({err}); the artifact is corrupt") from None
    if not isinstance(data, dict):
        raise SolArtifactError(f"{path} must hold a JSON object, got {type(data).__name__}")
    version = data.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise SolArtifactError(f"{path}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise SolArtifactError(
            f"{path} was written by a newer sol_hf (format_version={version}, sol_hf "
            f"{data.get('sol_hf_version', 'unknown')}); this sol_hf reads format_version <= {FORMAT_VERSION}. "
            f"Upgrade sol_hf: pip install -U sol-hf"
        )
    try:
        config = SolConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise SolArtifactError(f"{path} does not hold a valid SolConfig: {err}") from None
    if config.policy_hidden_size is None:
        raise SolArtifactError(f"{path}: policy_hidden_size is null; a saved policy always records its width")
    fingerprint = data.get("base_fingerprint")
    if fingerprint is not None:
        if not isinstance(fingerprint, dict) or set(fingerprint) != {*FINGERPRINT_FIELDS, "sha256"}:
            raise SolArtifactError(
                f"{path}: base_fingerprint must be an object with fields {[*FINGERPRINT_FIELDS, 'sha256']}, got {fingerprint!r}"
            )
        if fingerprint["sha256"] != _fingerprint_hash(fingerprint):
            raise SolArtifactError(
                f"{path}: base_fingerprint sha256 {fingerprint['sha256']} does not match its fields {fingerprint}; "
                f"the file was edited or corrupted"
            )
    adapter = data.get("adapter_fingerprint")
    if adapter is not None and (
        not isinstance(adapter, dict) or set(adapter) != set(ADAPTER_FINGERPRINT_FIELDS)
        or not isinstance(adapter["sha256"], str) or not re.fullmatch(r"[0-9a-f]{64}", adapter["sha256"])
    ):
        raise SolArtifactError(
            f"{path}: adapter_fingerprint must be null or an object with fields {list(ADAPTER_FINGERPRINT_FIELDS)} "
            f"and a 64-hex sha256, got {adapter!r}"
        )
    return config, fingerprint, adapter


def read_policy_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of ``policy.safetensors`` on the CPU; a truncated or corrupt file raises."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.fspath(path)
    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise SolArtifactError(
            f"{path} is not a readable safetensors file (truncated or corrupt?): {err}. Re-download or re-save the policy."
        ) from None


def _check_tensors(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], path: str) -> None:
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    misshaped = [
        f"{name}: file {tuple(tensors[name].shape)} vs expected {tuple(expected[name].shape)}"
        for name in sorted(set(tensors) & set(expected))
        if tensors[name].shape != expected[name].shape
    ]
    wrong_kind = [
        f"{name}: {tensors[name].dtype} vs expected {expected[name].dtype}"
        for name in sorted(set(tensors) & set(expected))
        if tensors[name].dtype.is_floating_point != expected[name].dtype.is_floating_point
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected}")
    if misshaped:
        problems.append(f"mis-shaped tensors [{'; '.join(misshaped)}]")
    if wrong_kind:
        problems.append(f"tensors of the wrong dtype kind [{'; '.join(wrong_kind)}]")
    if problems:
        raise SolArtifactError(
            f"{path} does not match the policy its {CONFIG_NAME} describes: {', '.join(problems)}. "
            f"The two files come from different policies, or one was edited."
        )


# ---------------------------------------------------------------------------------------------
# Base model revision and version helpers
# ---------------------------------------------------------------------------------------------


def _sol_hf_version() -> str:
    from . import __version__  # the package is fully imported by the time anything is saved

    return __version__


def _is_hub_id(name: str | None) -> bool:
    """True for ``org/name``-style ids that are not existing local paths."""
    if not name or os.path.exists(os.path.expanduser(name)) or _looks_local(name):
        return False
    return re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", name) is not None


def _hub_commit_hash(repo_id: str | None, revision: str | None, cache_dir: str | os.PathLike | None) -> str | None:
    """The commit ``revision`` (default branch if None) of ``repo_id`` points to in the local HF cache."""
    if revision is not None and _COMMIT_RE.match(revision):
        return revision
    if not _is_hub_id(repo_id):
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir, revision=revision)
    except Exception:  # noqa: BLE001 - best effort
        return None
    if not isinstance(cached, str):
        return None
    match = re.search(r"snapshots[/\\]([0-9a-f]{40})[/\\]", cached)
    return match.group(1) if match else None


# ---------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------


def _format_cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _evaluation_table(rows: Sequence[Mapping[str, Any]]) -> str:
    columns: list[str] = []
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_format_cell(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def _usage_budget(config: SolConfig) -> float:
    low, high = config.budget_range
    return round((low + high) / 2, 2)


def model_card(
    config: SolConfig, fingerprint: Mapping[str, Any], policy_ref: str, num_policy_parameters: int,
    evaluation: Sequence[Mapping[str, Any]] | None = None, adapter: Mapping[str, Any] | None = None,
) -> str:
    """The README.md of a policy artifact: YAML metadata, action grid, budgets, evaluation, usage.

    Args:
        policy_ref: what the usage snippet loads (the Hub repo id, or the local folder).
        evaluation: rows of an evaluation table, e.g. ``[{"budget": 0.5, "perplexity": 12.3}]``.
        adapter: the PEFT adapter fingerprint of an adapted base (:func:`adapter_fingerprint`).
    """
    from huggingface_hub import ModelCardData

    base = config.base_model_name_or_path
    hub_base = base if _is_hub_id(base) else None
    tags = ["sol_hf", "sol", "adaptive-compute"]
    if hub_base:
        tags.append(f"base_model:adapter:{hub_base}")
    data = ModelCardData(library_name="sol_hf", base_model=hub_base, tags=tags, pipeline_tag="text-generation")
    low, high = config.budget_range
    budget = _usage_budget(config)
    rev = f" at revision `{config.base_revision}`" if config.base_revision else ""
    base_line = f"`{base}`{rev}" if base else "an unnamed base model (no `base_model_name_or_path` was recorded)"
    if adapter is not None:
        name = config.adapter_name_or_path
        adapter_rev = f" at revision `{config.adapter_revision}`" if config.adapter_revision else ""
        named = f"`{name}`{adapter_rev}" if name else "an unnamed adapter (no `adapter_name_or_path` was recorded)"
        base_line += (f" with the PEFT LoRA adapter {named} applied (unmerged; adapter weights sha256 "
                      f"`{adapter['sha256']}`); it refuses to load on another adapter")
    levels = lambda values: ", ".join(f"{v:g}" for v in values)  # noqa: E731
    bits_axis = ("weight bits (int8 copies of the same projections' weights)" if config.quantize == "weights"
                 else "activation bits (MLP output, fake-quantized; saves no bytes)")

    unnamed_adapter = adapter is not None and not config.adapter_name_or_path
    if base and not unnamed_adapter:
        revision_arg = f', revision="{config.base_revision}"' if config.base_revision else ""
        also = "the pinned base model" + (" and its adapter" if adapter is not None else "")
        usage = (
            "```python\n"
            "from transformers import AutoTokenizer\n"
            "from sol_hf import SolForCausalLM\n\n"
            f'model = SolForCausalLM.from_pretrained("{policy_ref}")  # also loads {also}\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{base}"{revision_arg})\n'
            'inputs = tokenizer("The capital of France is", return_tensors="pt")\n'
            f"output = model.generate(**inputs, compute_budget={budget}, max_new_tokens=20)\n"
            "print(tokenizer.decode(output[0], skip_special_tokens=True))\n"
            "print(model.last_compute_report)\n"
            "```"
        )
    else:
        base_arg = f'"{base}"' if base else '"<the base model this policy was trained on>"'
        with_adapter = (
            "from peft import PeftModel\n" if adapter is not None else "",
            'base = PeftModel.from_pretrained(base, "<the LoRA adapter this policy was trained with>")\n'
            if adapter is not None else "",
        )
        usage = (
            "```python\n"
            "from transformers import AutoModelForCausalLM\n"
            f"{with_adapter[0]}"
            "from sol_hf import SolForCausalLM\n\n"
            f"base = AutoModelForCausalLM.from_pretrained({base_arg})\n"
            f"{with_adapter[1]}"
            f'model = SolForCausalLM.from_pretrained(base, "{policy_ref}")\n'
            "```"
        )
    evaluation_text = (
        _evaluation_table(evaluation) if evaluation else "No evaluation was recorded with this artifact."
    )
    fp_rows = "\n".join(f"| {k} | {fingerprint.get(k)} |" for k in FINGERPRINT_FIELDS)
    adapter_section = "" if adapter is None else (
        "\n## PEFT adapter\n\n| field | value |\n|---|---|\n"
        f"| name_or_path | {config.adapter_name_or_path} |\n| revision | {config.adapter_revision} |\n"
        f"| adapters | {', '.join(adapter['adapters'])} |\n| parameters | {adapter['parameters']:,} |\n"
        f"| sha256 | `{adapter['sha256']}` |\n"
    )
    body = f"""
# SOL compute policy for {base or "a causal LM"}

A `sol_hf` policy: a small network ({num_policy_parameters:,} parameters) that, at every
decode step, reads the base model's hidden state and picks how much compute the step spends (KV pages read,
input channels kept, bit-width). The base model's weights are unchanged and are **not** in this
repository; the policy belongs to {base_line} and refuses to load on a model with another architecture
fingerprint.

## Action grid

{config.num_actions} actions, one per decode step and batch row, applied to every layer:

| axis | levels |
|---|---|
| attention keep (fraction of KV tokens read, selection `{config.selection}`, pages of {config.page_size} tokens) | {levels(config.attention_keep)} |
| activation keep (fraction of input channels, top-\\|x\\|, of: {", ".join(config.sparse_inputs)}) | {levels(config.activation_keep)} |
| {bits_axis} | {levels(config.bits)} |

The first {config.sink_tokens} and last {config.recent_tokens} tokens of each row are always read.

## Budgets

Trained for unified compute budgets from **{low:g} to {high:g}** (mean bytes read per decode step as a fraction
of the dense step's, the policy's own weights included). `compute_budget=1.0` or `None` runs the base model
exactly.

## Evaluation

{evaluation_text}

## Usage

{usage}

## Base model fingerprint

| field | value |
|---|---|
{fp_rows}
| sha256 | `{fingerprint.get("sha256")}` |
{adapter_section}
## Framework versions

- sol_hf {_sol_hf_version()} (artifact format {config.format_version})
"""
    return f"---\n{data.to_yaml()}\n---\n{body}"


def _load_adapter(base_model: Any, config: SolConfig, hub_kwargs: Mapping[str, Any]) -> Any:
    """``PeftModel.from_pretrained(base_model, config.adapter_name_or_path)`` at the recorded revision."""
    try:
        from peft import PeftModel
    except ImportError as err:
        raise SolArtifactError(
            f"this policy was trained on a PEFT adapter ({config.adapter_name_or_path!r}); loading it needs peft: "
            f"pip install 'sol-hf[training]' (or pip install peft)"
        ) from err
    try:
        return PeftModel.from_pretrained(base_model, config.adapter_name_or_path, revision=config.adapter_revision,
                                         **{k: v for k, v in hub_kwargs.items() if v is not None})
    except Exception as err:  # noqa: BLE001 - re-raised with the artifact's context
        raise SolArtifactError(
            f"could not load the PEFT adapter {config.adapter_name_or_path!r} (revision {config.adapter_revision!r}) "
            f"the policy was trained with: {type(err).__name__}: {err}. Load it yourself and pass the PeftModel as base."
        ) from err


# ---------------------------------------------------------------------------------------------
# The mixin
# ---------------------------------------------------------------------------------------------


def _write_atomic(path: str, payload: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(payload)
    os.replace(tmp, path)


class SolHubMixin:
    """Hub I/O methods mixed into SolForCausalLM (which provides ``sol_config``, ``policy``,
    ``base_model``). ``evaluation_results``: rows the model card's evaluation table shows when
    ``save_pretrained`` gets none (evaluation code may set it)."""

    evaluation_results: Sequence[Mapping[str, Any]] | None = None
    _base_commit_hash: str | None = None

    # -- saving ------------------------------------------------------------------------------------
    def _artifact_config(self) -> tuple[SolConfig, dict[str, Any], dict[str, Any] | None]:
        from .config import replace

        config = self.sol_config
        base = self.base_model
        if config.base_model_name_or_path is None and getattr(base, "name_or_path", ""):
            config = replace(config, base_model_name_or_path=base.name_or_path)
        if config.base_revision is None:
            revision = self._base_commit_hash or getattr(base.config, "_commit_hash", None)
            revision = revision or _hub_commit_hash(config.base_model_name_or_path, None, None)
            if revision:
                config = replace(config, base_revision=revision)
        return config, base_fingerprint(base), adapter_fingerprint(base)

    def save_pretrained(
        self, save_directory: str | os.PathLike, evaluation: Sequence[Mapping[str, Any]] | None = None,
        repo_id: str | None = None,
    ) -> list[str]:
        """Write the policy artifact (``sol_config.json``, ``policy.safetensors``, ``README.md``).

        Args:
            save_directory: the folder (created if needed). Nothing else in it is touched.
            evaluation: rows for the card's evaluation table (default: ``self.evaluation_results``).
            repo_id: the Hub repo the card's usage snippet loads from (default: ``save_directory``).

        Returns:
            The three paths written.
        """
        from safetensors.torch import save as save_safetensors

        directory = os.fspath(save_directory)
        if os.path.isfile(directory):
            raise ValueError(f"save_directory {directory} is a file; pass a folder")
        os.makedirs(directory, exist_ok=True)
        config, fingerprint, adapter = self._artifact_config()
        payload = {**config.to_dict(), "base_fingerprint": fingerprint, "adapter_fingerprint": adapter,
                   "sol_hf_version": _sol_hf_version()}
        config_bytes = (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode("utf-8")
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in self.policy.state_dict().items()}
        weights_bytes = save_safetensors(
            tensors, metadata={"format": "pt", "sol_format_version": str(config.format_version)}
        )
        rows = evaluation if evaluation is not None else self.evaluation_results
        n_params = sum(p.numel() for p in self.policy.parameters())
        card = model_card(config, fingerprint, repo_id or directory, n_params, rows, adapter=adapter)
        paths = [os.path.join(directory, name) for name in ARTIFACT_FILES]
        for path, data in zip(paths, (config_bytes, weights_bytes, card.encode("utf-8"))):
            _write_atomic(path, data)
        return paths

    def push_to_hub(
        self, repo_id: str, private: bool | None = None, token: str | bool | None = None, revision: str | None = None,
        commit_message: str | None = None, create_pr: bool = False,
        evaluation: Sequence[Mapping[str, Any]] | None = None,
    ):
        """Create ``repo_id`` (if needed) and commit the three artifact files to it; never base weights.

        Args:
            private: visibility of a newly created repo (``None``: the account default).
            token: Hub token (default: the logged-in one).
            revision: branch to commit to (created from the default branch if missing).
            commit_message: defaults to "Upload SOL policy".
            create_pr: open a pull request instead of committing directly.
            evaluation: rows for the card's evaluation table.

        Returns:
            huggingface_hub's ``CommitInfo``.
        """
        from huggingface_hub import CommitOperationAdd, HfApi

        api = HfApi(token=token, library_name="sol_hf", library_version=_sol_hf_version())
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model").repo_id
        if revision is not None and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, evaluation=evaluation, repo_id=repo_id)
            operations = [
                CommitOperationAdd(path_in_repo=name, path_or_fileobj=os.path.join(tmp, name)) for name in ARTIFACT_FILES
            ]
            return api.create_commit(
                repo_id, operations=operations, commit_message=commit_message or "Upload SOL policy",
                revision=revision, create_pr=create_pr, repo_type="model",
            )

    # -- loading -----------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, base: Any, policy: str | os.PathLike | None = None, revision: str | None = None,
        base_revision: str | None = None, cache_dir: str | os.PathLike | None = None, token: str | bool | None = None,
        allow_fingerprint_mismatch: bool = False, **base_kwargs,
    ):
        """Load a policy artifact next to its base model.

        ``SolForCausalLM.from_pretrained(base, policy)`` or ``SolForCausalLM.from_pretrained(policy)``.

        Args:
            base: a Hub id or local path of the base model, or an already loaded ``PreTrainedModel``
                or LoRA ``PeftModel`` (wrapped in place, as ``SolForCausalLM(base, ...)`` does).
                Alone, without ``policy``: the policy artifact, whose ``sol_config.json`` names the
                base model, loaded at its pinned ``base_revision`` (as ``AutoPeftModelForCausalLM``),
                with the PEFT adapter it names (``adapter_name_or_path``) where it was trained on one.
            policy: a Hub repo id or a local folder holding the artifact.
            revision: the **policy** repo's revision.
            base_revision: the base model's revision; defaults to the one pinned in
                ``sol_config.json`` when the base is the one it names.
            cache_dir, token: for both downloads (``HF_HUB_OFFLINE`` is honoured).
            allow_fingerprint_mismatch: load a policy whose base fingerprint (or PEFT adapter
                fingerprint) differs from the model's, with a warning instead of an error.
            **base_kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` for the base
                (``dtype``, ``device_map``, ``attn_implementation``, ...).

        Every check passes before the base model is loaded or wrapped: a failed load leaves a
        given base model as it was. The returned model is in eval mode and ``generate`` defaults
        to the policy controller.
        """
        from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

        if base_kwargs.get("trust_remote_code"):
            raise ValueError("sol_hf never runs remote code: trust_remote_code=True is refused for the base model")
        given_model = isinstance(base, PreTrainedModel) or is_peft_model(base)
        if isinstance(base, torch.nn.Module) and not given_model:
            raise TypeError(
                f"base must be a Hub id, a local path, a transformers PreTrainedModel or a peft PeftModel, got "
                f"{type(base).__name__} (for a SolForCausalLM, pass model.unwrap())"
            )
        if policy is None:
            if given_model or base is None:
                raise TypeError(
                    "SolForCausalLM.from_pretrained(model) needs a policy: from_pretrained(base_model, policy_id_or_path)"
                )
            policy, base = base, None
        folder = resolve_policy_folder(policy, revision=revision, cache_dir=cache_dir, token=token)
        config_path, weights_path = _artifact_paths(folder)
        config, stored_fingerprint, stored_adapter = read_artifact_config(config_path)
        tensors = read_policy_tensors(weights_path)

        # The base: given, or named (by the caller or by sol_config.json). Its config comes first,
        # so a mismatched policy is refused before any base weights load.
        base_model = base if given_model else None
        hub_kwargs = {"cache_dir": cache_dir, "token": token}
        if base_model is None:
            if base is None:
                base = config.base_model_name_or_path
                if base is None:
                    raise SolArtifactError(
                        f"{config_path} names no base model (base_model_name_or_path is null); pass it: "
                        f"SolForCausalLM.from_pretrained(base, {os.fspath(policy)!r})"
                    )
            base = os.fspath(base)
            if base_revision is None and base == config.base_model_name_or_path and _is_hub_id(base):
                base_revision = config.base_revision
            try:
                base_config = AutoConfig.from_pretrained(base, revision=base_revision, **hub_kwargs)
            except Exception as err:  # noqa: BLE001 - re-raised with the artifact's context
                raise SolArtifactError(
                    f"could not load the config of base model {base!r} (revision {base_revision!r}) for policy "
                    f"{os.fspath(policy)!r}: {type(err).__name__}: {err}. Pass the base explicitly: "
                    f"SolForCausalLM.from_pretrained(base_model_or_path, policy)."
                ) from err
            base_name = base
        else:
            inner = peft_inner_model(base_model) if is_peft_model(base_model) else base_model
            base_config = inner.config
            base_name = getattr(inner, "name_or_path", "") or type(inner).__name__
            if base_kwargs:
                raise TypeError(
                    f"{sorted(base_kwargs)} are for loading the base model; the base was given already loaded"
                )
            if getattr(base_model, "_sol_runtime", None) is not None:
                raise ValueError("this base model is already wrapped by a SolForCausalLM; call .unwrap() on that one first")
        _check_fingerprint(stored_fingerprint, base_fingerprint(base_config), config_path, base_name, allow_fingerprint_mismatch)
        if base_model is not None:
            _check_adapter(stored_adapter, adapter_fingerprint(base_model), config_path, config.adapter_name_or_path,
                           allow_fingerprint_mismatch)
        elif stored_adapter is not None and not config.adapter_name_or_path:
            raise SolArtifactError(
                f"the policy in {config_path} was trained on {base!r} with {_describe_adapter(stored_adapter)}, and names "
                f"no adapter to load (adapter_name_or_path is null). Load the base and its adapter yourself and pass "
                f"the PeftModel: SolForCausalLM.from_pretrained(PeftModel.from_pretrained(base, adapter), policy)"
            )

        lm_hidden = base_config.get_text_config().hidden_size
        try:
            new_policy = SolPolicy(config, lm_hidden)
        except ValueError as err:
            raise SolArtifactError(f"{config_path} describes a policy that cannot be built: {err}") from None
        _check_tensors(tensors, new_policy.state_dict(), weights_path)
        new_policy.load_state_dict(tensors, strict=True)

        commit = None
        if base_model is None:
            base_model = AutoModelForCausalLM.from_pretrained(base, revision=base_revision, **hub_kwargs, **base_kwargs)
            commit = _hub_commit_hash(base, base_revision, cache_dir)
            if stored_adapter is not None:
                base_model = _load_adapter(base_model, config, hub_kwargs)
                _check_adapter(stored_adapter, adapter_fingerprint(base_model), config_path, config.adapter_name_or_path,
                               allow_fingerprint_mismatch)
        elif config.base_revision:
            loaded = getattr(base_model.config, "_commit_hash", None)
            if loaded and loaded != config.base_revision:
                warnings.warn(
                    f"the policy was trained on {config.base_model_name_or_path}@{config.base_revision}, the given base "
                    f"model is at {loaded}; the architecture fingerprint matches, the weights may not",
                    stacklevel=2,
                )
        new_policy.to(device=next(base_model.parameters()).device)
        model = cls(base_model, config, new_policy)
        model._base_commit_hash = commit
        model._policy_trained = True
        model.eval()
        return model
