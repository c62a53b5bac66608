#!/usr/bin/env bash
# The prepared GPU-machine cost benchmark (the device tool runs it in the repository root):
#   bash study/benchmarks/gpu_cost.sh           -> $OUT/gpu_cost.json, gpu_cost.md, gpu_cost.log (or ./gpu_cost_out/)
#   bash study/benchmarks/gpu_cost.sh compile   -> $OUT/gpu_cost_compile.{json,md,log}: every model's forward through
#                                                  torch.compile, as TrainingArguments(torch_compile=True)
# study/benchmarks/overhead.py on CUDA with bf16 weights: BERT-base (batch 32 x 128 and 128 x 256, full fine-tuning) and
# Gemma-2-2B's shape (26 x 2304, GeGLU MLP 9216, vocabulary 256k; random init, nothing downloaded) with
# LoRA r = 8 on q/v/gate/up/down at 1 x 2048 tokens: plain, none (noise floor) and DREG under every kernel family
# (the compile pass: DREG at auto, whose sites are traced into the model's graph), interleaved,
# time and peak memory (torch.cuda.max_memory_allocated) of forward + backward + AdamW.
# The two passes are two calls (each within the device tool's 10 minutes). Extra arguments go to overhead.py
# (e.g. --steps 40). The DREG_COST_* variables exist for the CPU test of this script
# (tests/study/test_benchmark_overhead.py); leave them unset on the GPU machine.
set -uo pipefail
cd "$(dirname "$0")/../.."
PASS=eager
if [ "${1:-}" = "compile" ]; then PASS=compile; shift; fi
OUT="${OUT:-$PWD/gpu_cost_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
DEVICE="${DREG_COST_DEVICE:-cuda}"
SHAPES="${DREG_COST_SHAPES:-base:32x128,base:128x256,gemma2-2b-lora:1x2048}"
STEPS="${DREG_COST_STEPS:-20}"
WARMUP="${DREG_COST_WARMUP:-3}"
if [ "$PASS" = compile ]; then
    NAME=gpu_cost_compile
    REGULARIZERS="${DREG_COST_REGULARIZERS:-none,dreg}"
    EXTRA=(--torch_compile "${DREG_COST_COMPILE_BACKEND:-inductor}")
else
    NAME=gpu_cost
    # every DREG kernel family beside the plain step (dreg = auto: triton on CUDA)
    REGULARIZERS="${DREG_COST_REGULARIZERS:-none,dreg@triton,dreg@compiled,dreg@eager}"
    EXTRA=()
fi
python3 - <<'PY' || { echo "gpu_cost: a package is missing on this machine (carry its wheel, see the device README)"; exit 1; }
import importlib
for name in ("torch", "transformers", "peft", "triton"):
    print(name, importlib.import_module(name).__version__)
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
python3 study/benchmarks/overhead.py --device "$DEVICE" --dtype bfloat16 --shapes "$SHAPES" --regularizers "$REGULARIZERS" \
    --steps "$STEPS" --warmup "$WARMUP" --output "$OUT/$NAME.json" "${EXTRA[@]}" "$@" 2>&1 | tee "$OUT/$NAME.log"
status=${PIPESTATUS[0]}
[ "$status" -eq 0 ] && python3 study/benchmarks/cost_table.py "$OUT/$NAME.json" > "$OUT/$NAME.md"
exit "$status"
