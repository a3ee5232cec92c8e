#!/usr/bin/env bash
# Every GPU figure of the docs in one command, logs kept in one folder.
#
#   benchmarks/gpu_suite.sh [LOG_DIR] [REPEATS]
#
# Steps, most wanted first, each under its own time limit (seconds, overridable: T_FINETUNE,
# T_SCREEN, T_PROBE, T_PARITY) so that a slow step cannot eat the next one's time:
# 1. bench_finetune.py --random-qwen7b: a LoRA step (the release's adapter) plain, with
#    preventative steering and with CAFT, on Qwen2.5-7B's shape with random bf16 weights
#    (docs/finetuning.md);
# 2. bench_screen.py --random-qwen7b: the screening projection pass against a plain HF forward of
#    the same token ids, and base-response generation against probe.generate (docs/screening.md);
# 3. bench_probe.py --random-qwen7b: fast path vs bridge vs plain HF generate / forward, batch 32
#    (docs/performance.md);
# 4. device_parity.py: bf16 capture / steering / cached-generation parity against plain HF on the
#    tiny random Llama and Qwen2 and the persona organism;
# 5. bench_vllm.py on the same shape, when vLLM imports on the machine (a CUDA build of vllm
#    0.32.x matching its torch); otherwise it says it was skipped.
#
# Budget: about 9 minutes on one H100 or H200 (each step builds the 7B weights once: about 15 GB, 30 GB
# where a plain HF copy is compared). BENCH_MODEL=--random-qwen-tiny runs the same steps on a
# toy model without a GPU (a smoke test of the script).
set -uo pipefail
cd "$(dirname "$0")/.."
log=${1:-gpu-logs}
repeats=${2:-3}
model=${BENCH_MODEL:---random-qwen7b}
mkdir -p "$log"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
status=0
quiet() { grep --line-buffered -v -e "Loading weights" -e "Writing model" -e " INFO " -e "it/s]" -e "FutureWarning" -e "warnings.warn"; }
step() {  # step NAME LIMIT_S COMMAND...: run it under its limit, log to $log/NAME.txt
  local name=$1 limit=$2; shift 2
  local start=$(date +%s)
  timeout "$limit" "$@" 2>&1 | quiet | tee "$log/$name.txt"
  local rc=${PIPESTATUS[0]}
  echo "$name: rc $rc, $(( $(date +%s) - start )) s (limit $limit s)" | tee -a "$log/$name.txt"
  [ "$rc" = 0 ] || status=1
}
# Scripts run as modules (-m) from the repository root: this checkout's persona_lens is the one
# imported, whether or not a package is installed (a fresh GPU machine has none).
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$py" - <<'EOF'
import importlib
for name in ("torch", "transformers", "peft", "pyarrow", "datasets", "transformer_lens", "plotly", "vllm"):
    try:
        m = importlib.import_module(name)
        print(f"{name} {getattr(m, '__version__', '?')}")
    except Exception as e:  # report, do not stop: each step says what it needs
        print(f"{name}: not importable ({type(e).__name__}: {str(e)[:120]})")
EOF
} 2>&1 | tee "$log/gpu.txt"
step finetune "${T_FINETUNE:-150}" "$py" -m benchmarks.bench_finetune $model --batch 8 --repeats 7
step screen "${T_SCREEN:-170}" "$py" -m benchmarks.bench_screen $model --samples 64 --batch 32 --new-tokens 64 \
  --repeats 5 --skip memory --json "$log/screen.json"
step probe "${T_PROBE:-240}" "$py" -m benchmarks.bench_probe $model --batch 32 --repeats "$repeats"
step parity "${T_PARITY:-60}" "$py" -m benchmarks.device_parity
if "$py" -c "import vllm" 2>/dev/null; then
  step vllm "${T_VLLM:-150}" "$py" -m benchmarks.bench_vllm ${model/--random-qwen-tiny/--model persona-organism} \
    --prompts 64 --new-tokens 128 --repeats "$repeats"
else
  echo "vLLM: skipped (vllm does not import here; see docs/scale.md)" | tee "$log/vllm.txt"
fi
exit $status
