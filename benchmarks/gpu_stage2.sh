#!/usr/bin/env bash
# The stage-2 MFU experiments on one GPU in one call: `bash benchmarks/gpu_stage2.sh` from the
# repository root (about 8 minutes; QVLM_GPU_BUDGET_S sets the seconds, default 480).
#
# 1. benchmarks/stage2_variants.py at batch 512: every variant in priority order (the padding mask,
#    the image and label positions found on the device vs the collator's, LoRA dropout, padding,
#    SDPA backends, the shared prefix, a bf16 residual stream) until its share of the time runs out;
# 2. the fastest settings measured so far at batch 1024, with the collator's positions and with
#    them found on the device;
# 3. a kernel profile of that batch-1024 step (benchmarks/profile_step.py);
# 4. ITM's gather of the shared image keys/values, advanced index vs index_select (seconds;
#    benchmarks/bench_row_gather.py at QVLM_GPU_GATHER_BATCHES, default 64,256);
# 5. a kernel profile of the stage-1 step (eager, batch 256) with its host-device syncs counted:
#    the step should make none now; the sixth session's profile (236.9 ms a step, 212.8 ms of
#    kernels) is the reference. The last QVLM_GPU_STAGE1_S seconds (default 120) are kept for 4 and 5.
# Reports go to ${OUT:-benchmarks}/gpu_stage2_*.{json,txt}. Needs a CUDA torch and qvlm's libraries
# (run benchmarks/gpu.sh first on a bare machine: it installs what is missing); the tokenizers come
# from .gpu/tok when it exists (python benchmarks/write_tokenizers.py .gpu/tok), else from the two
# offline packages. QVLM_GPU_SHAPES and QVLM_GPU_BATCH change the shapes and the first batch size
# (a CPU smoke run: QVLM_GPU_SHAPES=smoke QVLM_GPU_BATCH=4 QVLM_GPU_GATHER_BATCHES=2).
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [[ -d .gpu/tok/bert && -d .gpu/tok/smollm2 ]]; then
  export QVLM_BENCH_BERT_TOKENIZER=${QVLM_BENCH_BERT_TOKENIZER:-$PWD/.gpu/tok/bert}
  export QVLM_BENCH_LLM_TOKENIZER=${QVLM_BENCH_LLM_TOKENIZER:-$PWD/.gpu/tok/smollm2}
fi
OUT_DIR=${OUT:-benchmarks}
BUDGET=${QVLM_GPU_BUDGET_S:-480}
SHAPES=${QVLM_GPU_SHAPES:-real}
BATCH=${QVLM_GPU_BATCH:-512}
STAGE1_S=${QVLM_GPU_STAGE1_S:-120}
STAGE1_BATCH=${QVLM_GPU_STAGE1_BATCH:-256}
mkdir -p "$OUT_DIR"
start=$(date +%s)
left() { echo $(( BUDGET - STAGE1_S - ($(date +%s) - start) )); }
BEST="compiled, causal, LoRA dropout 0"
status=0

echo "gpu_stage2.sh: variants at batch $BATCH ($SHAPES shapes)"
timeout $(( (BUDGET - STAGE1_S) * 50 / 100 )) "$PY" benchmarks/stage2_variants.py --shapes "$SHAPES" --batch "$BATCH" \
  --budget-s $(( (BUDGET - STAGE1_S) * 40 / 100 )) --json-out "$OUT_DIR/gpu_stage2_variants_b$BATCH.json" || status=$?

echo "gpu_stage2.sh: the fastest settings at batch $(( 2 * BATCH )), $(left) s left"
timeout $(( $(left) * 50 / 100 )) "$PY" benchmarks/stage2_variants.py --shapes "$SHAPES" --batch $(( 2 * BATCH )) \
  --only "$BEST" "$BEST, positions found on the device" --json-out "$OUT_DIR/gpu_stage2_variants_b$(( 2 * BATCH )).json" \
  || status=$?

echo "gpu_stage2.sh: kernel profile at batch $(( 2 * BATCH )), $(left) s left"
timeout $(( $(left) > 30 ? $(left) : 30 )) "$PY" benchmarks/profile_step.py --shapes "$SHAPES" \
  --batch $(( 2 * BATCH )) --compile --set model.llm.lora.dropout=0 --rows 30 \
  > "$OUT_DIR/gpu_stage2_profile_b$(( 2 * BATCH )).txt" || status=$?
head -40 "$OUT_DIR/gpu_stage2_profile_b$(( 2 * BATCH )).txt" || true

echo "gpu_stage2.sh: ITM's row gather, advanced index vs index_select"
GATHER_DEVICE=$("$PY" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')
timeout 40 "$PY" benchmarks/bench_row_gather.py --device "$GATHER_DEVICE" --dtype bf16 \
  --batches "${QVLM_GPU_GATHER_BATCHES:-64,256}" > "$OUT_DIR/gpu_row_gather.txt" || status=$?
cat "$OUT_DIR/gpu_row_gather.txt" || true

echo "gpu_stage2.sh: stage-1 kernel profile and host syncs at batch $STAGE1_BATCH, $(( $(left) + STAGE1_S )) s left"
timeout $(( $(left) + STAGE1_S > 30 ? $(left) + STAGE1_S : 30 )) "$PY" benchmarks/profile_step.py --stage 1 \
  --shapes "$SHAPES" --batch "$STAGE1_BATCH" --rows 20 > "$OUT_DIR/gpu_stage1_profile_b$STAGE1_BATCH.txt" || status=$?
head -16 "$OUT_DIR/gpu_stage1_profile_b$STAGE1_BATCH.txt" || true
echo "gpu_stage2.sh: done in $(( $(date +%s) - start )) s (exit $status)"
exit $status
