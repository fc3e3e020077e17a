"""lm-evaluation-harness model ``sol``: any lm-eval task at a compute budget.

    sol-hf lm-eval --model sol --model_args pretrained=BASE,policy=POLICY,compute_budget=0.6 --tasks hellaswag

(``sol-hf lm-eval`` takes lm-eval's own arguments; it registers this model and runs lm-eval's CLI.
A plain ``lm_eval --model sol`` cannot find it: lm-eval 0.4 reads no plugin entry points, its model
list is fixed in ``lm_eval.models.MODEL_MAPPING`` and ``--include_path`` adds tasks only. From
Python, ``import sol_hf.evaluation.lm_eval`` registers it before ``lm_eval.simple_evaluate(model="sol")``.)

:class:`SolLM` is lm-eval's ``hf`` model (:class:`lm_eval.models.huggingface.HFLM`: same loading,
tokenization, truncation, batching of generations and chat templates) with the base model wrapped
in a :class:`~sol_hf.SolForCausalLM`, and with the requests run under the budget:

* ``loglikelihood`` (and every window of ``loglikelihood_rolling``, which HFLM cuts into windows of
  ``max_length`` tokens and sends here): the protocol of ``sol_hf.evaluation``,
  :func:`sol_hf.episodes.run_episodes`. The context is prefilled densely except its last token,
  then one controlled teacher-forced step per continuation token (the first processes the last
  context token): every continuation token is scored by a controlled step. A context of one token
  (lm-eval's prefix token before an empty context, the first rolling window) leaves nothing to
  prefill before a controlled step: the first continuation token is then scored by the dense
  forward of that token (as ``generate``'s first token comes from its dense prefill) and counted
  as ``dense_scored_tokens`` in the report, not as a controlled step.
* ``generate_until``: :meth:`SolForCausalLM.generate` with ``compute_budget`` and the controller.

At ``compute_budget=1.0`` the controlled steps run the dense action whatever the controller (as
``generate`` does): the base model's log-likelihoods. After the run, ``get_model_info`` adds
``sol_compute`` (the achieved executed cost and per-axis means over the controlled steps, per
request type, against the target) to lm-eval's ``results["config"]``, which its JSON output
(``--output_path``) holds, and logs one line per request type.
"""

from __future__ import annotations

import logging
import sys
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils_hf import stop_sequences_criteria
from tqdm import tqdm

from ..budget import parse_compute_budget
from ..config import SolConfig
from ..episodes import run_episodes
from ..modeling import SolForCausalLM
from ..policy import Controller, UniformController
from .perplexity import BUDGET_TOLERANCE, _target_report

__all__ = ["SolLM", "SolModelArgsError", "cli_main"]

logger = logging.getLogger("lm_eval.models.sol")  # under lm-eval's logger: its handler prints it

CONTROLLERS = ("policy", "uniform", "random")


class SolModelArgsError(ValueError):
    """``--model_args`` that ``--model sol`` cannot run with (``sol-hf lm-eval`` prints it as one line)."""

# HFLM options that cannot work with a wrapped model, and why.
_REFUSED = {
    "parallelize": "a model split over devices with device_map is not supported by SolForCausalLM",
    "tp_plan": "tensor parallelism is not supported by SolForCausalLM",
    "peft": "a PEFT adapter wraps the base model's layers; merge it into the base checkpoint first",
    "delta": "merge the delta weights into the base checkpoint first",
    "autogptq": "GPTQ-quantized layers are not supported by SolForCausalLM",
    "gptqmodel": "GPTQ-quantized layers are not supported by SolForCausalLM",
    "mixed_precision_dtype": "the controlled steps run in the model's dtype; load it in the dtype wanted (dtype=...)",
    "backend": "SolForCausalLM wraps causal LMs only",
    "softmax_dtype": "the controlled steps compute log-probabilities in float32",
}
# HFLM options accepted as they are (its named parameters, less the refused ones), plus the one
# from_pretrained option SolForCausalLM handles (it wraps whatever attention the base runs).
_HFLM_OPTIONS = (
    "pretrained", "revision", "subfolder", "tokenizer", "truncation", "max_length", "device", "dtype",
    "batch_size", "max_batch_size", "trust_remote_code", "use_fast_tokenizer", "add_bos_token", "prefix_token_id",
    "max_memory_per_gpu", "max_cpu_memory", "offload_folder", "gguf_file", "think_end_token", "enable_thinking",
    "chat_template_args", "logits_cache", "attn_implementation",
)
_SOL_OPTIONS = ("policy", "policy_revision", "compute_budget", "controller", "controller_seed")


def _check_budget(value: Any) -> float:
    """A unified budget in (0, 1], with the library's messages for anything else."""
    if value is None or value == "":
        raise SolModelArgsError(
            "model_args needs compute_budget: the target mean executed cost of the controlled steps, a float in "
            "(0, 1] (1.0 = the base model), e.g. compute_budget=0.6"
        )
    try:
        parse_compute_budget(value, 1)
    except (TypeError, ValueError) as err:
        raise SolModelArgsError(f"model_args compute_budget={value!r}: {err}") from None
    return float(value)


class _Tally:
    """Sums of the per-step values of one request type's controlled steps."""

    def __init__(self):
        self.requests = 0
        self.dense_scored_tokens = 0
        self.steps = 0
        self.sums: dict[str, float] = defaultdict(float)

    def add(self, steps: int, sums: dict[str, float]) -> None:
        """``steps`` more controlled steps whose values sum to ``sums`` (name -> total)."""
        self.steps += steps
        for name, total in sums.items():
            self.sums[name] += total

    def summary(self, budget: float) -> dict[str, Any]:
        out: dict[str, Any] = {"requests": self.requests, "controlled_steps": self.steps}
        if self.dense_scored_tokens:
            out["dense_scored_tokens"] = self.dense_scored_tokens
        if not self.steps:
            return out
        out.update({name: total / self.steps for name, total in self.sums.items()})
        out.update(_target_report(budget, out))
        return out


@register_model("sol")
class SolLM(HFLM):
    """lm-eval's ``hf`` model with its decode steps run by SOL under ``compute_budget``.

    Args (lm-eval ``--model_args``, besides HFLM's ``pretrained``, ``device``, ``dtype``,
    ``batch_size``, ``max_length``, ``revision``, ...):
        policy: a policy artifact (folder or Hub id) for ``pretrained``; empty or omitted: none
            (an untrained policy of ``SolConfig()``'s grid; use the uniform or random controller).
        policy_revision: the policy repo's revision.
        compute_budget: target mean executed cost fraction of the controlled steps, in (0, 1].
        controller: ``policy`` (default with a policy), ``uniform`` (default without) or ``random``.
        controller_seed: seed of the random controller (default 0).
    """

    def __init__(self, pretrained: str, compute_budget: float | None = None, policy: str | None = None,
                 policy_revision: str | None = None, controller: str | None = None, controller_seed: int | None = None,
                 **kwargs):
        refused = sorted(k for k in kwargs if k in _REFUSED and kwargs[k] not in (None, False, "", "default", "causal"))
        if refused:
            raise SolModelArgsError("; ".join(f"model_args {k}: {_REFUSED[k]}" for k in refused))
        unknown = sorted(set(kwargs) - set(_HFLM_OPTIONS) - set(_REFUSED))
        if unknown:
            raise SolModelArgsError(
                f"unknown model_args {unknown} for --model sol; it takes {list(_SOL_OPTIONS)} and lm-eval's hf options "
                f"{sorted(set(_HFLM_OPTIONS) - {'pretrained'})}"
            )
        if kwargs.get("trust_remote_code"):
            raise SolModelArgsError("sol_hf never runs remote code: model_args trust_remote_code=True is refused")
        if str(kwargs.get("batch_size", 1)).startswith("auto"):
            raise SolModelArgsError("--model sol needs a fixed batch size (e.g. --batch_size 8); 'auto' is not supported")
        self.compute_budget = _check_budget(compute_budget)
        policy = policy or None  # policy= (empty) means none
        if controller is None:
            controller = "policy" if policy else "uniform"
        if controller not in CONTROLLERS:
            raise SolModelArgsError(f"model_args controller must be one of {list(CONTROLLERS)}, got {controller!r}")
        if controller == "policy" and policy is None:
            raise SolModelArgsError(
                "model_args controller=policy needs a trained policy: pass policy=<artifact folder or Hub id>, or use "
                "controller=uniform or controller=random"
            )
        if controller_seed is not None and controller != "random":
            raise SolModelArgsError(f"model_args controller_seed is for controller=random, not {controller}")
        for name in _REFUSED:
            kwargs.pop(name, None)
        if kwargs.get("device") is None:  # HFLM's default "cuda" would be taken literally on a CPU machine
            kwargs["device"] = "cuda" if torch.cuda.is_available() else "cpu"
        super().__init__(pretrained=pretrained, **kwargs)
        if policy is None:
            self.sol_model = SolForCausalLM(self._model, SolConfig())
        else:
            self.sol_model = SolForCausalLM.from_pretrained(self._model, policy, revision=policy_revision)
        self.sol_model.eval()
        self.policy_name = policy
        options = {"seed": controller_seed or 0} if controller == "random" else {}
        self.controller: Controller = self.sol_model.make_controller(controller, **options)
        # At budget 1.0 every controlled step runs the dense action (the uniform controller's pick at
        # 1.0), whatever the controller, as generate runs the base model.
        self._episode_controller = self.controller if self.compute_budget < 1.0 else UniformController(self.sol_model.space)
        self._tallies = {"loglikelihood": _Tally(), "generate_until": _Tally()}

    # -- loglikelihood (and the windows of loglikelihood_rolling) ----------------------------------
    def _loglikelihood_tokens(self, requests: Sequence[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether every continuation token is the argmax) per
        request, in order.

        Requests with the same prefill run together, ``batch_size`` at a time; under the uniform
        and random controllers a shorter continuation rides along a longer one (its decisions
        depend only on its own steps so far, and the steps past its end are dropped), the
        policy's need the same number of steps (the policy reads its progress through them)."""
        same_length = self._episode_controller.uses_policy
        groups: dict[tuple[int, bool, int], list[int]] = defaultdict(list)
        windows, steps = [], []
        for i, (_, context, continuation) in enumerate(requests):
            if not context or not continuation or len(continuation) > self.max_length:
                raise ValueError(
                    f"request {i}: needs a context and a continuation of at most max_length={self.max_length} tokens, got "
                    f"{len(context)} and {len(continuation)}"
                )
            window = (context + continuation)[-(self.max_length + 1):]  # left-truncated as HFLM does
            prefix = len(window) - len(continuation) - 1  # the densely prefilled tokens
            dense_first = prefix == 0  # a one-token context: its forward scores the first token
            context_length = max(prefix, 1)
            windows.append(window)
            steps.append(len(window) - context_length - 1)
            groups[(context_length, dense_first, steps[-1] if same_length else 0)].append(i)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        tally = self._tallies["loglikelihood"]
        batch_size = override_bs or self.batch_size
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                   desc=f"sol loglikelihood (budget {self.compute_budget:g}, {self.controller.name})")
        for (context_length, dense_first, _), members in sorted(groups.items()):
            members.sort(key=lambda i: -steps[i])
            if steps[members[0]]:
                self._check_reachable(context_length + 1)
            for start in range(0, len(members), batch_size):
                rows = members[start:start + batch_size]
                scored = self._score([windows[i] for i in rows], context_length, dense_first, [steps[i] for i in rows])
                for i, answer in zip(rows, scored):
                    results[i] = answer
                    if requests[i][0] is not None:  # rolling windows have no cache key
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                tally.requests += len(rows)
                tally.dense_scored_tokens += len(rows) * dense_first
                bar.update(len(rows))
        bar.close()
        return results

    @torch.no_grad()
    def _score(self, windows: list[list[int]], context_length: int, dense_first: bool,
               steps: list[int]) -> list[tuple[float, bool]]:
        """(sum of the scored tokens' log-probabilities, all of them argmax) per window: the
        ``steps[r]`` tokens after ``context_length + 1`` by controlled steps, and with
        ``dense_first`` the token after the first by the dense forward of the first."""
        rows, longest = len(windows), max(steps)
        log_probs = torch.zeros(rows, 1 + longest, dtype=torch.float64)
        greedy = torch.ones(rows, 1 + longest, dtype=torch.bool)
        scored = torch.arange(1 + longest) <= torch.tensor(steps).unsqueeze(1)  # (B, 1 + T): the rows' own tokens
        scored[:, 0] = dense_first
        if dense_first:  # the base model's forward of the one context token scores the next token
            first = torch.tensor([w[:2] for w in windows])
            logits = self.sol_model(input_ids=first[:, :1].to(self.device)).logits[:, -1].float()
            dense = torch.log_softmax(logits, -1).cpu()
            log_probs[:, 0] = dense.gather(-1, first[:, 1:]).squeeze(-1).double()
            greedy[:, 0] = dense.argmax(-1) == first[:, 1]
        if longest:
            length = context_length + longest + 1
            # a shorter window is padded with its last token; the steps past its end are not scored
            batch = torch.tensor([w + w[-1:] * (length - len(w)) for w in windows], dtype=torch.long)
            targets = parse_compute_budget(self.compute_budget, rows)
            run = run_episodes(self.sol_model, batch, context_length, self._episode_controller, targets)
            log_probs[:, 1:] = run.token_log_probs.double().cpu()
            greedy[:, 1:] = run.token_is_greedy.cpu()
            own = scored[:, 1:].to(run.step_cost.device)
            per_step = {"cost": run.step_cost, "attention_keep": run.attention_keep, "activation_keep": run.activation_keep,
                        "bits": run.bits}
            self._tallies["loglikelihood"].add(
                int(own.sum()), {name: float((value.double() * own).sum()) for name, value in per_step.items()}
            )
        total = torch.where(scored, log_probs, 0.0).sum(1)
        return [(float(total[r]), bool(greedy[r][scored[r]].all())) for r in range(rows)]

    def _check_reachable(self, length: int) -> None:
        """Refuse a budget the action grid cannot meet at ``length`` tokens (the first controlled
        step's), as ``generate`` does, before any request of that length runs."""
        reason = self.sol_model.unreachable_budget_message(
            self.compute_budget, length, "policy" if self._episode_controller.uses_policy else "uniform"
        )
        if reason is not None:
            raise SolModelArgsError(f"model_args compute_budget: {reason}")

    # -- generate_until ----------------------------------------------------------------------------
    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs) -> torch.Tensor:
        """HFLM's generation call, through :meth:`SolForCausalLM.generate` at the budget. The length
        is passed as ``max_new_tokens``: generate plans its controlled steps from it."""
        # As HFLM: temperature 0 (the default) means greedy decoding.
        temperature = generation_kwargs.pop("temperature", 0.0)
        if generation_kwargs.get("do_sample") is None and temperature == 0.0:
            generation_kwargs["do_sample"] = False
        if not (generation_kwargs.get("do_sample") is False and temperature == 0.0):
            generation_kwargs["temperature"] = temperature
        criteria = stop_sequences_criteria(self.tokenizer, stop, context.shape[1], context.shape[0])
        output = self.sol_model.generate(
            context, compute_budget=self.compute_budget, controller=self.controller,
            max_new_tokens=max_length - context.shape[1], stopping_criteria=criteria,
            pad_token_id=self.tokenizer.pad_token_id, use_cache=True, **generation_kwargs,
        )
        report = self.sol_model.last_compute_report
        tally = self._tallies["generate_until"]
        tally.requests += context.shape[0]
        if report is None:  # budget 1.0: the base model's generate, every step dense
            return output
        per_row = {"cost": report.cost, "standalone_cost": report.standalone_cost, "nominal_cost": report.nominal_cost,
                   "attention_keep": report.attention_keep, "activation_keep": report.activation_keep, "bits": report.bits}
        steps = report.controlled_steps  # every row of the batch ran them (each row's values are its means)
        tally.add(steps * context.shape[0], {name: float(value.double().sum()) * steps for name, value in per_row.items()})
        return output

    # -- report ------------------------------------------------------------------------------------
    def compute_report(self) -> dict[str, Any]:
        """What the controlled steps of the requests so far achieved, per request type.

        ``cost`` is the executed cost fraction (bytes the executing ops read / dense bytes, the
        policy's weights included when it decides), the mean over all controlled steps of that
        type; for log-likelihoods each request as if decoded alone (as ``sol_hf.evaluation``),
        for generations in its batch, beside ``standalone_cost``. ``relative_error`` and
        ``within_tolerance`` compare it to ``compute_budget``."""
        report: dict[str, Any] = {
            "compute_budget": self.compute_budget,
            "controller": self.controller.name if self.compute_budget < 1.0 else "dense (budget 1.0)",
            "policy": self.policy_name,
            "tolerance": BUDGET_TOLERANCE,
        }
        for kind, tally in self._tallies.items():
            if tally.requests:
                report[kind] = tally.summary(self.compute_budget)
        return report

    def get_model_info(self) -> dict:
        """HFLM's model info plus ``sol_compute`` (:meth:`compute_report`); lm-eval calls it once,
        after the evaluation, and stores it in ``results["config"]``. Logs the achieved cost."""
        info = super().get_model_info()
        report = self.compute_report()
        for kind in self._tallies:
            entry = report.get(kind)
            if entry and "cost" in entry:
                logger.info(
                    "sol: %s achieved executed cost %.4f over %d controlled steps (target %g, relative error %+.2f%%)",
                    kind, entry["cost"], entry["controlled_steps"], self.compute_budget, 100 * entry["relative_error"]["cost"],
                )
        info["sol_compute"] = report
        return info


def cli_main(argv: Sequence[str]) -> int:
    """``sol-hf lm-eval ARGS``: lm-eval's command line with ``--model sol`` registered."""
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0
