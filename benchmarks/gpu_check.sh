#!/usr/bin/env bash
# Every GPU check and benchmark of the project in one run, for a lent GPU machine (H200/H100):
# the kernel tests on CUDA, the capture tests (no host sync, CUDA-graph replay, torch.compile of the
# controlled step: tests/test_capture.py), benchmarks/ops.py, and benchmarks/decode_speed.py on Llama-3.2-1B
# and Llama-3.1-8B shapes (random bf16 weights) at 1k / 8k / 32k context (8B at 1k also with int8 weight copies) against transformers'
# dynamic-cache and static-cache + torch.compile decode. Writes everything under $OUT (default
# ./gpu_results): one file per check. Each step has its own time limit; the whole run stays
# under 8 minutes. Needs torch with CUDA, transformers, triton and pytest (no installs, no network).
#
#     OUT=gpu_results bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)"; } > "$OUT/machine.txt" 2>&1
timeout 95 python3 -m pytest -q -p no:cacheprovider tests/test_ops_page_attention.py tests/test_ops_sparse_linear.py tests/test_ops_act_quant.py tests/test_int8_weights.py::test_triton_kernel_reads_int8_rows_where_flagged > "$OUT/kernel_tests.txt" 2>&1
echo "kernel tests: exit $?" >> "$OUT/machine.txt"
timeout 45 python3 -m pytest -q -p no:cacheprovider -rs tests/test_capture.py > "$OUT/capture_tests.txt" 2>&1
echo "capture tests: exit $?" >> "$OUT/machine.txt"
timeout 45 python3 benchmarks/ops.py > "$OUT/ops.json" 2> "$OUT/ops.err"
echo "ops.py: exit $?" >> "$OUT/machine.txt"
run() {  # seconds, name, then decode_speed arguments
  local limit=$1 name=$2; shift 2
  timeout "$limit" python3 benchmarks/decode_speed.py --device cuda --dtype bfloat16 --batch 1 --new-tokens 32 --repeats 3 \
    --output "$OUT/$name.json" "$@" > /dev/null 2> "$OUT/$name.err"
  echo "$name: exit $?" >> "$OUT/machine.txt"
}
run 60 decode_1b_ctx1k --model llama-1b-shape --context 1024 --static-baseline
run 45 decode_1b_ctx8k --model llama-1b-shape --context 8192
run 60 decode_8b_ctx1k --model llama-8b-shape --context 1024 --static-baseline
run 45 decode_8b_ctx8k --model llama-8b-shape --context 8192
run 40 decode_8b_ctx1k_int8 --model llama-8b-shape --context 1024 --preset int8-weights
run 45 decode_8b_ctx32k --model llama-8b-shape --context 32768
cat "$OUT/machine.txt"
