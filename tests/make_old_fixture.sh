#!/usr/bin/env bash
# How tests/fixtures/old_run/ was made (kept for the record; the tests never run this).
#
# The fixture is the output of qvlm at commit 7e5207b, the last version before the CPU speed
# options were removed. Its config.yaml files therefore still hold the removed keys
# (model.qformer.image_pos_embed, data.pad_to_multiple_of, train.itc_one_pass,
# train.itm_reuse_image_kv, train.fused_qkv, train.share_prompt_prefix), and its safetensors are
# what that code wrote. tests/test_old_runs.py loads it with today's code.
#
# Size: configs/tiny.yaml's Q-Former is a random BERT with BERT's 30522-token vocabulary at width
# 32, so every Q-Former file would hold a 3.9 MB word-embedding table (three copies: two model
# folders and a checkpoint). The fixture's runs narrow the Q-Former to width 8 and a 9600-token
# vocabulary (the synthetic captions' largest token id under the packaged MiniLM tokenizer is
# 9546), which keeps the whole fixture near 1 MB. Everything else is configs/tiny.yaml.
#
# Run from the repository root, offline:  bash tests/make_old_fixture.sh
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$REPO/.venv/bin/python}
OLD=/tmp/old            # a worktree of the old code
WORK=/tmp/oldfix        # the old runs (absolute paths end up in their config.yaml: train.init_from)
DEST=$REPO/tests/fixtures/old_run

if [ ! -d "$OLD" ]; then
    git -C "$REPO" worktree add "$OLD" 7e5207b
    trap 'git -C "$REPO" worktree remove --force "$OLD"' EXIT
fi
export HF_HUB_OFFLINE=1 PYTHONPATH=$OLD/src
"$PY" -c "import qvlm, qvlm.allocator; assert qvlm.__file__.startswith('$OLD/'), qvlm.__file__"

QFORMER='model.qformer.source=random:bert?hidden_size=8&num_hidden_layers=2&num_attention_heads=2&intermediate_size=16&max_position_embeddings=64&vocab_size=9600'
rm -rf "$WORK"

# Stage 1, two steps, a checkpoint each step.
"$PY" -m qvlm.cli train "$OLD/configs/tiny.yaml" "$QFORMER" train.stage=1 train.max_steps=2 \
    train.save_every=1 --out "$WORK/stage1" --no-progress

# Stage 2 from it, run to the end: its model/ folder is the old model folder the tests load.
"$PY" -m qvlm.cli train "$OLD/configs/tiny.yaml" "$QFORMER" train.stage=2 train.max_steps=2 \
    train.save_every=1 "train.init_from=$WORK/stage1/model" --out "$WORK/stage2" --no-progress

# The same stage-2 run interrupted after step 1 (the old train()'s stop_at_step): what --resume continues.
"$PY" - "$OLD/configs/tiny.yaml" "$QFORMER" "$WORK" <<'EOF'
import sys
from qvlm.config import load_config
from qvlm.train.loop import train
config, qformer, work = sys.argv[1:]
cfg = load_config(config, [qformer, "train.stage=2", "train.max_steps=2", "train.save_every=1",
                           f"train.init_from={work}/stage1/model"])
print(train(cfg, f"{work}/stage2_interrupted", progress=False, stop_at_step=1))
EOF

grep -n "fused_qkv\|share_prompt_prefix" "$WORK/stage2/model/config.yaml"

rm -rf "$DEST"
mkdir -p "$DEST/stage1" "$DEST/stage2" "$DEST/stage2_interrupted/checkpoints"
cp -r "$WORK/stage1/model" "$DEST/stage1/model"
cp -r "$WORK/stage2/model" "$DEST/stage2/model"
cp "$WORK/stage2_interrupted/config.yaml" "$WORK/stage2_interrupted/metrics.jsonl" "$DEST/stage2_interrupted/"
cp -r "$WORK/stage2_interrupted/checkpoints/step-1" "$WORK/stage2_interrupted/checkpoints/latest" \
    "$DEST/stage2_interrupted/checkpoints/"
du -sh "$DEST"
