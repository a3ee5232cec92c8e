#!/usr/bin/env bash
# Every GPU figure of docs/performance.md in one command, logs kept in one folder.
#
#   benchmarks/gpu_suite.sh [LOG_DIR] [REPEATS]
#
# 1. device_parity.py: bf16 capture / steering / cached-generation parity against plain HF
#    on the tiny random Llama and Qwen2, the persona organism (and SmolLM2 where installed);
# 2. bench_probe.py --random-qwen7b: fast path vs bridge vs plain HF generate / forward on a
#    random-weight Qwen2.5-7B shape in bf16, batch 32 and 128 on the same loaded weights,
#    64-token prompts, 128 new tokens, interleaved repeats;
# 3. bench_vllm.py on the same random Qwen2.5-7B shape, when vLLM imports on the machine (a
#    CUDA build of vllm 0.32.x matching its torch; it is not on the GPU machine and too large to
#    carry there, so this step says it was skipped).
#
# Budget: about 6-8 minutes on one H100 (the 7B model is built once, about 31 GB for the
# plain copy and the bridge's copy). Pass REPEATS=2 to shorten it; BENCH_MODEL=--random-qwen-tiny
# runs the same steps on a toy model (a smoke test that needs no GPU).
set -uo pipefail
cd "$(dirname "$0")/.."
log=${1:-gpu-logs}
repeats=${2:-3}
mkdir -p "$log"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
status=0
# Scripts run as modules (-m) from the repository root: this checkout's persona_lens is the one
# imported, whether or not a package is installed (a fresh GPU machine has none).
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true; } | tee "$log/gpu.txt"
start=$(date +%s)
"$py" -m benchmarks.device_parity 2>&1 | grep -v -e "Loading weights" -e "Writing model" | tee "$log/parity.txt" || status=1
echo "parity: $(( $(date +%s) - start )) s" | tee -a "$log/parity.txt"
start=$(date +%s)
"$py" -m benchmarks.bench_probe ${BENCH_MODEL:---random-qwen7b} --batch 32,128 --repeats "$repeats" 2>&1 | tee "$log/bench_qwen7b.txt" || status=1
echo "benchmark: $(( $(date +%s) - start )) s" | tee -a "$log/bench_qwen7b.txt"
start=$(date +%s)
if "$py" -c "import vllm" 2>/dev/null; then
  "$py" -m benchmarks.bench_vllm --random-qwen7b --prompts 64 --new-tokens 128 --repeats "$repeats" 2>&1 \
      | grep -v -e " INFO " -e "it/s]" | tee "$log/bench_vllm.txt" || status=1
else
  echo "vLLM: skipped (vllm does not import here; see docs/scale.md)" | tee "$log/bench_vllm.txt"
fi
echo "vllm benchmark: $(( $(date +%s) - start )) s" | tee -a "$log/bench_vllm.txt"
exit $status
