"""What the bundle needs to run unchanged in MONAI Label 0.8.5's stock ``monaibundle`` app.

MONAI Label's bundle tasks read the bundle's own configs and override a few keys; the three changes below make
the bundle's behaviour right there. They belong in the bundle itself (``bundle/scripts/transforms.py``,
``bundle/configs/inference.json``, ``bundle/configs/train.json``). Until the bundle has them,
``prepare_app.py`` applies them to the *copy* it places in the app, says so loudly, and leaves ``bundle/``
untouched; once the bundle has them, :py:func:`apply` changes nothing.

1. Inference result (``inference.json`` postprocessing, new transform ``MonaiLabelOutputd``): MONAI Label writes
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
   resolves the *whole* config. Every item gets built: the BUSI datalists (``scripts.data.load_or_create_datalist``
   on the default ``dataset_dir``, which stops the run with "dataset folder not found" although MONAI Label
   replaced ``train#dataset#data``), and both ``run`` and its copy ``training`` (``%run``), which trained twice.
   The datalists become callables (``_mode_: callable``) that the datasets call, so nothing reads the dataset
   folder unless a dataset uses them, and ``training`` refers to ``run`` (``@run``) instead of copying it.
5. Mixed formats in one batch (``train.json`` ``deterministic_transforms``): images and labels saved through
   MONAI Label come as PNG/JPG and as single-slice NIfTI/NRRD (what Slicer uploads and saves); their readers
   leave different metadata on the MetaTensors (2 or 3 spatial dimensions, NIfTI header fields), and batching
   them fails with "stack expects each tensor to be equal size ... Collate error on the key 'image'". A last
   deterministic transform keeps only the file name in the metadata (all that training and evaluation read).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

TRANSFORM_NAME = "MonaiLabelOutputd"

TRANSFORM_CODE = '''

class MonaiLabelOutputd(MapTransform):
    """Shape an inference result the way MONAI Label (and the viewers it serves, such as 3D Slicer) expects it.

    MONAI Label's bundle inference saves ``output_key`` as the label file, in the input's format and, when the array
    has more than two axes, with the input's geometry; it returns ``result_key`` as the JSON of the response. This
    writes the ``(1, X, Y)`` label map as a uint8 array of the input file's own spatial shape (``(X, Y)`` for
    PNG/JPG, ``(X, Y, 1)`` for a single-slice NIfTI/NRRD as 3D Slicer saves them) and the class with its
    probabilities as plain JSON values. For a JPEG input it asks for a PNG label file (``result_extension``):
    MONAI Label would otherwise save the label map in the input's lossy format. The bundle's own inference
    workflow reads none of these keys.

    Args:
        label_map_key: key of the ``(1, X, Y)`` label map at the input's size.
        cls_key: key of the class probabilities ``(num_classes,)``.
        cls_pred_key: key of the predicted class index (the arg-max of the probabilities if missing).
        image_key: key of the input image, a MetaTensor whose ``spatial_shape`` is the file's shape.
        output_key: key to write the label map to (MONAI Label's ``pred``).
        result_key: key to write the JSON result to (MONAI Label's ``result``).
        class_names: class names in index order.
        extension_key: key of MONAI Label's label file extension, set for JPEG inputs unless already given.
    """

    lossy_suffixes = (".jpg", ".jpeg")

    def __init__(
        self,
        label_map_key: str = "seg_pred",
        cls_key: str = "cls",
        cls_pred_key: str = "cls_pred",
        image_key: str = "image",
        output_key: str = "pred",
        result_key: str = "result",
        class_names: tuple[str, ...] | list[str] = CLASS_NAMES,
        extension_key: str = "result_extension",
    ) -> None:
        super().__init__(keys=[label_map_key, cls_key])
        self.label_map_key = label_map_key
        self.cls_key = cls_key
        self.cls_pred_key = cls_pred_key
        self.image_key = image_key
        self.output_key = output_key
        self.result_key = result_key
        self.class_names = list(class_names)
        self.extension_key = extension_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        label_map = torch.as_tensor(d[self.label_map_key]).detach().cpu()[0].to(torch.uint8).numpy()
        image = d.get(self.image_key)
        shape = image.meta.get("spatial_shape") if isinstance(image, MetaTensor) else None
        shape = [int(s) for s in np.asarray(shape).reshape(-1)] if shape is not None else []
        if len(shape) > 2 and tuple(shape[:2]) == label_map.shape:
            label_map = label_map.reshape(label_map.shape + (1,) * (len(shape) - 2))
        probabilities = torch.as_tensor(d[self.cls_key]).detach().float().cpu().reshape(-1).tolist()
        predicted = int(d[self.cls_pred_key]) if self.cls_pred_key in d else int(np.argmax(probabilities))
        source = str(image.meta.get("filename_or_obj", "")) if isinstance(image, MetaTensor) else ""
        if source.lower().endswith(self.lossy_suffixes) and not d.get(self.extension_key):
            d[self.extension_key] = ".png"
        d[self.output_key] = np.ascontiguousarray(label_map)
        d[self.result_key] = {
            "class": self.class_names[predicted],
            "class_index": predicted,
            "probabilities": {name: round(float(p), 6) for name, p in zip(self.class_names, probabilities)},
            "lesion_pixels": int((label_map > 0).sum()),
        }
        return d
'''

POSTPROCESSING_ENTRY = {
    "_target_": f"scripts.transforms.{TRANSFORM_NAME}",
    "label_map_key": "seg_pred",
    "cls_key": "cls",
    "cls_pred_key": "cls_pred",
    "image_key": "image",
    "output_key": "pred",
    "result_key": "result",
    "class_names": "@class_names",
}

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


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _dump(path: Path, config: dict) -> None:
    path.write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")


def _has_transform_class(bundle: Path) -> bool:
    transforms = (bundle / "scripts" / "transforms.py").read_text(encoding="utf-8")
    return re.search(rf"^class {TRANSFORM_NAME}\b", transforms, re.MULTILINE) is not None


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
    """The changes of this module that the bundle at ``bundle`` lacks (empty: ready for MONAI Label)."""
    bundle = Path(bundle)
    needed = []
    if not _has_transform_class(bundle):
        needed.append(f"scripts/transforms.py: class {TRANSFORM_NAME}")
    if not _has_output_entry(_load(bundle / "configs" / "inference.json")):
        needed.append(f"configs/inference.json: postprocessing ends with {TRANSFORM_NAME}")
    train = _load(bundle / "configs" / "train.json")
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
    if COMMON_META_ENTRY not in train.get("deterministic_transforms", []):
        needed.append("configs/train.json: deterministic_transforms ends with a Lambdad keeping only filename_or_obj")
    return needed


def apply(bundle: str | Path) -> list[str]:
    """Apply the missing changes to the bundle copy at ``bundle`` (never to the repository's ``bundle/``).

    Returns:
        The changes applied (empty when the bundle already had them all).
    """
    bundle = Path(bundle)
    needed = missing(bundle)
    if not needed:
        return []
    if not _has_transform_class(bundle):
        path = bundle / "scripts" / "transforms.py"
        path.write_text(path.read_text(encoding="utf-8").rstrip("\n") + "\n" + TRANSFORM_CODE, encoding="utf-8")
    inference_path = bundle / "configs" / "inference.json"
    inference = _load(inference_path)
    if not _has_output_entry(inference):
        inference["postprocessing"]["transforms"].append(dict(POSTPROCESSING_ENTRY))
        _dump(inference_path, inference)
    train_path = bundle / "configs" / "train.json"
    train = _load(train_path)
    train["train"]["dataloader"]["batch_size"] = TRAIN_BATCH_SIZE
    train["lr_scheduler"]["warmup_steps"] = WARMUP_STEPS
    train["lr_scheduler"]["t_total"] = T_TOTAL
    for section, data in LAZY_DATALISTS.items():
        train[section]["datalist"]["_mode_"] = "callable"
        train[section]["dataset"]["data"] = data
    if "training" in train:
        train["training"] = TRAINING_ALIAS
    if COMMON_META_ENTRY not in train["deterministic_transforms"]:
        train["deterministic_transforms"].append(dict(COMMON_META_ENTRY))
    _dump(train_path, train)
    return needed
