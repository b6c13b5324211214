#!/usr/bin/env bash
# The GPU check, for a lent device machine (see README "Development"): CUDA tests, then the real-size
# random-weight engine benchmark (Qwen2.5-VL-7B + Qwen2.5-0.5B; Gemma-3-12B + Gemma-3-1B) in bfloat16.
# Writes its logs and JSON under ${OUT:-eval/results/device}. Nothing in the project depends on it.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-eval/results/device}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_engine_contract.py 2>&1 | tail -n 30 | tee "$out/cuda_tests.log"
for pair in real-qwen real-gemma; do
  timeout 240 python3 eval/bench_engine.py --models "$pair" --device cuda --dtype bfloat16 --num-prompts 3 \
    --max-new-tokens 64 --num-draft-tokens 5 --cost-repeats 20 --repeats 2 --out "$out/bench_${pair}.json" \
    2>&1 | tail -n 25 | tee "$out/bench_${pair}.log"
done
