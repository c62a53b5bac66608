#!/usr/bin/env bash
# The prepared GPU-machine check (the device tool runs it in the repository root):
#   bash study/benchmarks/gpu_check.sh            -> $OUT/gpu_check.json (or ./gpu_check_out/ outside the device tool)
# bf16, FSDP and DDP exactness of DREG on the Trainer's own collator; see study/benchmarks/gpu_check.py.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
python3 - <<'PY' || { echo "gpu_check: a package is missing on this machine (carry its wheel, see the device README)"; exit 1; }
import importlib
for name in ("torch", "transformers", "accelerate", "datasets", "tokenizers"):
    print(name, importlib.import_module(name).__version__)
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
python3 study/benchmarks/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
