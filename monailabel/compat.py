"""Check that a bundle has what it needs to run unchanged in MONAI Label 0.8.5's stock ``monaibundle`` app.

MONAI Label's bundle tasks read the bundle's own configs and override a few keys; the bundle itself
(``bundle/scripts/transforms.py``, ``bundle/configs/inference.json``, ``bundle/configs/train.json``) carries what
makes its behaviour right there, listed below. ``prepare_app.py`` calls :py:func:`check` before it places a bundle
in the app: a bundle that lacks any of it (an older copy, another bundle folder) is not served, and the error
names each missing piece. Nothing is patched in: the bundle is served exactly as it is.

1. Inference result (``inference.json`` postprocessing, transform ``MonaiLabelOutputd``): MONAI Label writes
   the ``pred`` key as the label file and returns the ``result`` key as the JSON of the response. Without the
   transform ``pred`` holds the 3-channel probabilities and the JSON is empty.
2. Small label sets (``train.json`` ``train#dataloader#batch_size``): MONAI Label trains on the few images
   labelled so far; with ``batch_size`` 16 and ``drop_last`` an epoch of fewer than 16 training images has no
   iteration and ignite stops with "Input data has zero size".
3. Short fine-tuning (``train.json`` ``lr_scheduler``): MONAI Label sets only ``train#trainer#max_epochs``; the
   schedule's 3 warm-up epochs start at learning rate 0, so a 1-epoch fine-tune changed no weight, and its cosine
   ran over the top-level ``max_epochs`` (100) instead of the epochs actually run.
4. Slicer's *Train* button (``train.json`` ``train#datalist``, ``validate#datalist``, ``training``): it sends the
   trainer option ``run_id`` as shown, an empty string, and MONAI 1.6.1's ``monai.bundle.run(run_id="")`` then
   resolves the *whole* config. Every item gets built: the BUSI datalists (``scripts.data.load_datalist`` on the
   default ``dataset_dir``, which stops the run with "file(s) missing" where that folder is absent, although MONAI Label
   replaced ``train#dataset#data``), and both ``run`` and its copy ``training`` (``%run``), which trained twice.
   The datalists become callables (``_mode_: callable``) that the datasets call, so nothing reads the dataset
   folder unless a dataset uses them, and ``training`` refers to ``run`` (``@run``) instead of copying it.
5. Mixed formats in one batch (``train.json`` ``deterministic_transforms``, or the lists its expression joins):
   images and labels saved through MONAI Label come as PNG/JPG and as single-slice NIfTI/NRRD (what Slicer uploads
   and saves); their readers leave different metadata on the MetaTensors (2 or 3 spatial dimensions, NIfTI header
   fields), and batching them fails with "stack expects each tensor to be equal size ... Collate error on the key
   'image'". A last deterministic transform keeps only the file name in the metadata (all that training and
   evaluation read).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

REQUIRED_FILES = ("scripts/transforms.py", "configs/inference.json", "configs/train.json")
TRANSFORM_NAME = "MonaiLabelOutputd"

TRAIN_BATCH_SIZE = "$min(@batch_size, len(@train#dataset))"
WARMUP_STEPS = "$min(3, @train#trainer#max_epochs // 4)"
T_TOTAL = "@train#trainer#max_epochs"
LAZY_DATALISTS = {"train": "$@train#datalist()", "validate": "$@validate#datalist()"}
TRAINING_ALIAS = "@run"
COMMON_META_ENTRY = {
    "_target_": "Lambdad",
    "keys": ["image", "label"],
    "func": "$lambda x: monai.data.MetaTensor("
    "x.as_tensor(), meta={'filename_or_obj': x.meta.get('filename_or_obj', '')})",
}


class BundleNotReadyError(RuntimeError):
    """The bundle lacks something MONAI Label needs (see the module docstring)."""


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _has_transform_class(transforms: Path) -> bool:
    code = transforms.read_text(encoding="utf-8")
    return re.search(rf"^class {TRANSFORM_NAME}\b", code, re.MULTILINE) is not None


def _has_output_entry(inference: dict) -> bool:
    post = inference.get("postprocessing", {}).get("transforms", [])
    return any(isinstance(t, dict) and str(t.get("_target_", "")).endswith(TRANSFORM_NAME) for t in post)


def _lazy_datalists(train: dict) -> bool:
    return all(
        train.get(section, {}).get("datalist", {}).get("_mode_") == "callable"
        and train.get(section, {}).get("dataset", {}).get("data") == data
        for section, data in LAZY_DATALISTS.items()
    )


def missing(bundle: str | Path) -> list[str]:
    """What of this module's list the bundle at ``bundle`` lacks.

    Args:
        bundle: the bundle folder (with ``configs/`` and ``scripts/``).

    Returns:
        One line per missing piece, ``"<file>: <what>"``; empty when the bundle is ready for MONAI Label.
    """
    bundle = Path(bundle)
    absent = [name for name in REQUIRED_FILES if not (bundle / name).is_file()]
    needed = [f"{name}: file not found" for name in absent]
    transforms, inference, train = REQUIRED_FILES
    if transforms not in absent and not _has_transform_class(bundle / transforms):
        needed.append(f"{transforms}: class {TRANSFORM_NAME}")
    if inference not in absent and not _has_output_entry(_load(bundle / inference)):
        needed.append(f"{inference}: postprocessing ends with {TRANSFORM_NAME}")
    if train not in absent:
        needed += _missing_in_train(_load(bundle / train))
    return needed


def _missing_in_train(train: dict) -> list[str]:
    needed = []
    if train.get("train", {}).get("dataloader", {}).get("batch_size") != TRAIN_BATCH_SIZE:
        needed.append(f'configs/train.json: train#dataloader#batch_size = "{TRAIN_BATCH_SIZE}"')
    scheduler = train.get("lr_scheduler", {})
    if scheduler.get("warmup_steps") != WARMUP_STEPS or scheduler.get("t_total") != T_TOTAL:
        needed.append(f'configs/train.json: lr_scheduler warmup_steps = "{WARMUP_STEPS}", t_total = "{T_TOTAL}"')
    if not _lazy_datalists(train):
        needed.append(
            'configs/train.json: train#datalist and validate#datalist "_mode_": "callable", '
            'train#dataset#data = "$@train#datalist()", validate#dataset#data = "$@validate#datalist()"'
        )
    if "training" in train and train["training"] != TRAINING_ALIAS:
        needed.append(f'configs/train.json: training = "{TRAINING_ALIAS}"')
    steps = [{k: v for k, v in step.items() if k != "_desc_"} if isinstance(step, dict) else step
             for step in _deterministic_steps(train)]  # fmt: skip
    if COMMON_META_ENTRY not in steps:
        needed.append("configs/train.json: deterministic_transforms ends with a Lambdad keeping only filename_or_obj")
    return needed


def _deterministic_steps(train: dict) -> list:
    """``deterministic_transforms`` of ``train.json``: a list, or an expression joining the lists it names
    (``"$@load_transforms + @resize_transforms"``)."""
    steps = train.get("deterministic_transforms", [])
    if isinstance(steps, str):
        return [step for name in re.findall(r"@([\w#]+)", steps) for step in train.get(name, [])]
    return steps


def check(bundle: str | Path) -> None:
    """Fail unless the bundle at ``bundle`` has everything MONAI Label needs; never changes the bundle.

    Args:
        bundle: the bundle folder to be served.

    Raises:
        BundleNotReadyError: naming each missing piece (see :py:func:`missing`).
    """
    needed = missing(bundle)
    if needed:
        raise BundleNotReadyError(
            f"the bundle at {bundle} lacks what MONAI Label 0.8.5's monaibundle app needs "
            "(see monailabel/compat.py; update it from this repository's bundle/):\n  - " + "\n  - ".join(needed)
        )
