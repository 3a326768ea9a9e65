#!/usr/bin/env bash
# Set-up, then the whole product on generated data: synthetic BUSI-layout images -> short training ->
# evaluation on the test split -> prediction with label maps, overlays and class probabilities.
# Everything is written under runs/demo (the shipped bundle/models is not touched).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source tools/env.sh
set -euo pipefail
OUT="${DEMO_DIR:-runs/demo}"
EPOCHS="${DEMO_EPOCHS:-30}"
# 128x128 keeps the demo to a few minutes on a laptop CPU; the bundle's default is 256x256
SIZE=(--image_size "[128, 128]")
COMMON=(--dataset_dir "$OUT/data" --datalist "$OUT/datalist.json" --ckpt_dir "$OUT/models" --output_dir "$OUT/eval" "${SIZE[@]}")
python bundle/scripts/synthetic.py --output_dir "$OUT/data" --num_per_class "${DEMO_IMAGES_PER_CLASS:-40}" --seed 0
python -m monai.bundle run training --config_file bundle/configs/train.json "${COMMON[@]}" --max_epochs "$EPOCHS"
python -m monai.bundle run evaluating --config_file "['bundle/configs/train.json','bundle/configs/evaluate.json']" "${COMMON[@]}"
python -m monai.bundle run --config_file bundle/configs/inference.json --dataset_dir "$OUT/data/malignant" \
    --output_dir "$OUT/predictions" --ckpt_path "$OUT/models/model.pt" "${SIZE[@]}"
echo "demo done: metrics in $OUT/eval/metrics.json, predictions in $OUT/predictions"
