#!/usr/bin/env bash
# Set-up, then the shipped model on real breast ultrasound: the BUSI test-split images in samples/ -> label maps,
# overlays and a class table in runs/demo/predictions (the bundle's inference.json, shipped bundle/models/model.pt).
#
#   bash tools/demo.sh              # a few minutes on a fresh 2-core machine, installation included
#   DEMO_TRAIN=1 bash tools/demo.sh # then also: generated BUSI-layout data -> short training -> evaluation ->
#                                   # prediction, all under runs/demo (the shipped bundle/models is not touched)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source tools/env.sh
set -euo pipefail
OUT="${DEMO_DIR:-runs/demo}"

python -m monai.bundle run --config_file bundle/configs/inference.json --dataset_dir samples \
    --output_dir "$OUT/predictions"
echo
echo "shipped model on samples/ (true classes in samples/README.md):"
python - "$OUT/predictions/predictions.csv" <<'PY'
import csv, os, sys
rows = list(csv.DictReader(open(sys.argv[1])))
print(f"{'image':<28}{'predicted':<11}{'p_normal':>9}{'p_benign':>9}{'p_malignant':>12}{'lesion px':>10}")
for r in rows:
    print(f"{os.path.basename(r['image']):<28}{r['predicted_class']:<11}{float(r['p_normal']):9.3f}"
          f"{float(r['p_benign']):9.3f}{float(r['p_malignant']):12.3f}{r['lesion_pixels']:>10}")
PY
echo "label maps and overlays: $OUT/predictions/*_seg.png, *_overlay.png"

if [ "${DEMO_TRAIN:-0}" = "1" ]; then
    EPOCHS="${DEMO_EPOCHS:-30}"
    # 128x128 keeps this part to a few minutes on a laptop CPU
    COMMON=(--dataset_dir "$OUT/data" --datalist "$OUT/datalist.json" --ckpt_dir "$OUT/models"
            --output_dir "$OUT/eval" --image_size "[128, 128]")
    python tools/synthetic.py --output_dir "$OUT/data" --num_per_class "${DEMO_IMAGES_PER_CLASS:-40}" --seed 0
    python tools/prepare_datalist.py --dataset_dir "$OUT/data" --datalist "$OUT/datalist.json"
    python -m monai.bundle run training --config_file bundle/configs/train.json "${COMMON[@]}" --max_epochs "$EPOCHS"
    python -m monai.bundle run evaluating --config_file "['bundle/configs/train.json','bundle/configs/evaluate.json']" \
        "${COMMON[@]}"
    python -m monai.bundle run --config_file bundle/configs/inference.json --dataset_dir "$OUT/data/malignant" \
        --output_dir "$OUT/synthetic_predictions" --ckpt_path "$OUT/models/model.pt" --image_size "[128, 128]"
    echo "trained on generated data: metrics in $OUT/eval/metrics.json, predictions in $OUT/synthetic_predictions"
fi
