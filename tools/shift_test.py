"""Which scanner-like changes break the model? Fold models on their held-out images, each image changed one way at a
time, against the unchanged images.

Other hospitals' scanners differ from BUSI's in gain curve, resolution, speckle, depth compensation and field of
view. Each change here is fixed (not drawn), made on the image as loaded (the original pixels, before the network's
resize), and geometric ones move the lesion mask with the image:

- ``gamma_0.6`` / ``gamma_1.6``: a brighter / darker mid-grey curve (``AdjustContrast``);
- ``saturation``: 1.6 times the gain, clipped at the image's old maximum (over-exposed bright tissue);
- ``blur``: a Gaussian of sigma 2 pixels (a lower-frequency probe);
- ``low_resolution``: down to a third of the side and back (nearest, then bilinear);
- ``speckle``: multiplicative noise of standard deviation 0.3 and grain 1.5 pixels (``RandSpeckleNoised``);
- ``depth_attenuation``: the gain falls with depth to ``exp(-1)`` at the bottom (``RandDepthAttenuationd``);
- ``closer``: the central 70 % of each side (a smaller field of view; a lesion may be cut);
- ``wider``: 15 % black margins on every side (a larger display around the same image).

Affine intensity changes are left out: the preprocessing's percentile scaling and z-score remove them. The changed
image then goes through the pipeline from its crop to the scan on (``train.json``'s ``scan_threshold``; pass
``--extra "{'scan_threshold': 0.0}"`` to score without it).

``run`` scores each change with ``ablate.score`` (arg-max decisions, the two-seed ensemble of each fold, pooled over
the folds) and reports it minus the unchanged images. Usage::

    python tools/shift_test.py run --dataset_dir .busi/Dataset_BUSI_with_GT --cv runs/cv_lite2
    python tools/shift_test.py run --dataset_dir .busi/Dataset_BUSI_with_GT --cv runs/cv_lite2 \
        --extra "{'scan_threshold': 0.0}" --only none,wider,closer   # without the crop to the scan

``compare`` sets two such results against each other, a candidate recipe's and the reference's: per change, the
candidate minus the reference, and the mean of that over the changes other than ``none`` and the one the candidate
was made for (``--focus``)::

    python tools/shift_test.py compare --candidate runs/cv_speckle/shift_test.json \
        --reference runs/cv_lite2/shift_test.json --focus speckle
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

import fire
import numpy as np
import torch
from ablate import BUNDLE, _parser, load_network, score

Change = Callable[[torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]
SCORES = ("dice", "normal_fp", "lesion_called_normal", "malignant_recall", "benign_malignant_auc", "accuracy")


def _resample(image: torch.Tensor, factor: float) -> torch.Tensor:
    size = image.shape[-2:]
    small = torch.nn.functional.interpolate(image[None].float(), scale_factor=factor, mode="nearest")
    return torch.nn.functional.interpolate(small, size=size, mode="bilinear", align_corners=False)[0]


def changes(seed: int = 0) -> dict[str, Change]:
    """The fixed changes by name (see the module docstring); each takes and returns ``(image, label)``, ``(1, H, W)``
    each, the image in its loaded intensities."""
    from monai.transforms import AdjustContrast, BorderPad, CenterScaleCrop, GaussianSmooth

    from scripts.transforms import RandDepthAttenuationd, RandSpeckleNoised

    speckle = RandSpeckleNoised("image", prob=1.0, std=(0.3, 0.3), grain=(1.5, 1.5))
    attenuation = RandDepthAttenuationd("image", prob=1.0, attenuation=(1.0, 1.0))

    def both(transform, image, label):
        return transform(image), transform(label)

    def seeded(transform):
        def apply(image, label):
            transform.set_random_state(seed)
            return transform({"image": image.float()})["image"], label

        return apply

    return {
        "none": lambda image, label: (image, label),
        "gamma_0.6": lambda image, label: (AdjustContrast(0.6)(image.float()), label),
        "gamma_1.6": lambda image, label: (AdjustContrast(1.6)(image.float()), label),
        "saturation": lambda image, label: (torch.clamp(image.float() * 1.6, max=float(image.max())), label),
        "blur": lambda image, label: (GaussianSmooth(2.0)(image.float()), label),
        "low_resolution": lambda image, label: (_resample(image, 1 / 3), label),
        "speckle": seeded(speckle),
        "depth_attenuation": seeded(attenuation),
        "closer": lambda image, label: both(CenterScaleCrop(0.7), image, label),
        "wider": lambda image, label: both(BorderPad([round(side * 0.15) for side in image.shape[1:]]), image, label),
    }


@torch.no_grad()
def _predict_fold(
    dataset_dir: str, cv: str, fold: int, seeds: list[int], split: str, only: list[str] | None = None,
    extra: dict | None = None,
) -> dict[str, dict]:  # fmt: skip
    """Ensemble outputs of one fold's models under every change (or those in ``only``):
    ``{change: {"cls", "seg", "label"}}``."""
    from monai.data import MetaTensor
    from monai.transforms import Compose

    datalist = str((Path(cv) / f"fold{fold}.json").resolve())
    parser = _parser(dataset_dir, {**(extra or {}), "datalist": datalist, "validate#split": split, "amp": False})
    load = Compose(parser.get_parsed_content("load_transforms"))
    # a change is made to the loaded pixels, so that the pipeline's own crop to the scan (scan_threshold) sees it
    to_network = Compose(
        parser.get_parsed_content("crop_to_scan_transforms") + parser.get_parsed_content("resize_transforms")
        + parser.get_parsed_content("normalize_transforms")
    )  # fmt: skip
    networks = [
        load_network(parser, str(Path(cv) / f"fold{fold}_seed{seed}" / "models" / "model.pt")).eval() for seed in seeds
    ]
    selected = {name: change for name, change in changes().items() if only is None or name in only}
    outputs: dict[str, dict] = {}
    for item in parser.get_parsed_content("validate#datalist")():
        sample = load(item)
        for name, change in selected.items():
            image, label = change(sample["image"].as_tensor(), sample["label"].as_tensor())
            meta = sample["image"].meta
            ready = to_network({"image": MetaTensor(image, meta=meta), "label": MetaTensor(label, meta=meta)})
            results = [network(ready["image"].as_tensor()[None].float()) for network in networks]
            seg = np.mean([1 - torch.softmax(r["pred"], 1)[0, 0].numpy() for r in results], axis=0)
            cls = np.mean([torch.softmax(r["cls"], 1)[0].numpy() for r in results], axis=0)
            row = outputs.setdefault(name, {"cls": [], "seg": [], "label": []})
            row["cls"].append(cls), row["seg"].append(seg), row["label"].append(ready["label"].as_tensor()[0].numpy())
    return {name: {key: np.stack(values) for key, values in row.items()} for name, row in outputs.items()}


def run(
    dataset_dir: str, cv: str = "runs/cv_lite2", seeds: int = 2, first_seed: int = 0, split: str = "test",
    folds: int = 3, only: str | list[str] | None = None, extra: dict | None = None, out: str | None = None,
) -> dict:  # fmt: skip
    """Every change (or those in ``only``, which must hold ``none``) on the held-out (``test``) or ``validation``
    images of folds ``0 .. folds - 1``, scored pooled over the folds, and minus the unchanged images (``extra``:
    ``train.json`` overrides, e.g. ``{"scan_threshold": 0.0}`` to score without the pipeline's own crop to the scan).
    Saved as ``out``, or else as ``shift_{split}.json`` in ``cv``.

    Returns:
        ``{"scores": {change: {score: value}}, "D": {change: {score: value - unchanged}}}``.
    """
    if isinstance(only, str):
        only = only.split(",")
    if only is not None and "none" not in only:
        raise ValueError("only must include 'none', the unchanged images every change is compared with.")
    members = list(range(first_seed, first_seed + seeds))
    per_fold = [_predict_fold(dataset_dir, cv, fold, members, split, only, extra) for fold in range(folds)]
    scores = {}
    for name in per_fold[0]:
        pooled = {key: np.concatenate([fold[name][key] for fold in per_fold]) for key in ("cls", "seg", "label")}
        scored = score(pooled)
        scores[name] = {key: scored[key] for key in SCORES}
    result = {
        "scores": scores,
        "D": {name: {key: values[key] - scores["none"][key] for key in SCORES} for name, values in scores.items()},
        "seeds": members,
    }
    Path(out or Path(cv) / f"shift_{split}.json").write_text(json.dumps(result, indent=1))
    return result


def compare(candidate: str, reference: str, focus: str = "speckle") -> dict:
    """Candidate minus reference, change by change, for two :func:`run` results scored on the same images.

    Args:
        candidate: the candidate recipe's result (a JSON file written by ``run``).
        reference: the reference recipe's result.
        focus: the change the candidate was made to withstand; left out of the mean over the other changes.

    Returns:
        ``{"D": {change: {score: candidate - reference}}, "others": {score: mean over the other changes},
        "other_changes": [their names]}``, over the changes both results hold.
    """
    scores = [json.loads(Path(path).read_text())["scores"] for path in (candidate, reference)]
    shared = [name for name in scores[0] if name in scores[1]]
    if "none" not in shared or focus not in shared:
        raise ValueError(f"both results must hold 'none' and {focus!r}; they share {shared}.")
    diff = {name: {key: scores[0][name][key] - scores[1][name][key] for key in SCORES} for name in shared}
    others = [name for name in shared if name not in ("none", focus)]
    mean = {key: float(np.mean([diff[name][key] for name in others])) if others else float("nan") for key in SCORES}
    return {"D": diff, "others": mean, "other_changes": others}


if __name__ == "__main__":
    sys.path.insert(0, str(BUNDLE))
    fire.Fire({"run": run, "compare": compare})
