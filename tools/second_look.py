"""Small cancers without retraining: a zoomed second look and lesion-shape stacking, judged on held-out folds.

Most cancers the shipped model misses are small (1-6 % of the image): at 160 px such a lesion covers less than one
of the 25 bottleneck cells that the class head averages. Two candidates act after the network, so a fold's
existing models (``tools/cross_validate.py``) can judge them on images no selection has seen:

- ``zoom``: crop the image around the largest predicted lesion component (:func:`zoom_box`), run the same networks
  on the crop, and average its class probabilities with the whole image's.
- ``stack``: a logistic regression (:class:`LogisticStacker`) re-splits ``p(benign) + p(malignant)`` from the
  network's ``log(p_malignant / p_benign)`` and the shape of the predicted lesion (:func:`shape_features`); it is
  fitted on the other folds' held-out predictions (cross-fitting), so no fold scores a model fitted on itself.

Both report, per fold and averaged, the candidate minus the plain fold ensemble: benign/malignant AUC (of
``p(malignant)``), macro AUC, and the benign specificity at 0.90 malignant recall (``tools/ablate.py``'s scores).

Usage::

    python tools/second_look.py zoom --dataset_dir .busi/Dataset_BUSI_with_GT --cv runs/cv_lite2 --fold 0
    python tools/second_look.py zoom_report --cv runs/cv_lite2
    python tools/second_look.py stack --dataset_dir .busi/Dataset_BUSI_with_GT --cv runs/cv_lite2
    python tools/second_look.py misses --cv runs/cv_lite2   # are the held-out misses small, or not segmented?
    python tools/second_look.py closer_view --folders runs/cv_lite2_zoom2,runs/cv_freecrop_zoom2
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import fire
import numpy as np
import torch
from ablate import _parser, image_classes, load_network, malignant_operating_point, threshold_images
from cross_validate import prediction_path
from monai.transforms.utils import get_largest_connected_component_mask

SHAPE_FEATURES = ("circularity", "solidity", "orientation", "margin_fuzziness")
SHAPE_SIDE = 256  # the longer side at which shapes are measured, in the image's own aspect


def largest_component(lesion: np.ndarray) -> np.ndarray | None:
    """The largest 4-connected component of a boolean map, or ``None`` where the map is empty."""
    return get_largest_connected_component_mask(lesion, connectivity=1) if lesion.any() else None


def shape_features(lesion_prob: np.ndarray, image_hw: tuple[int, int], threshold: float = 0.5) -> np.ndarray:
    """Shape of the largest predicted lesion component, measured in the image's own aspect (the network sees a
    square resize): ``circularity`` 4 pi area / perimeter^2 (of a polygon within 2 pixels of the outline),
    ``solidity`` area / convex hull area, ``orientation`` log of the vertical over the horizontal spread (> 0: taller
    than wide), ``margin_fuzziness`` the pixels whose lesion probability lies between 0.2 and 0.8 over that band plus
    the lesion.

    Args:
        lesion_prob: lesion probability ``(h, w)`` in [0, 1] at the network's resolution.
        image_hw: the original image's ``(height, width)``.
        threshold: lesion where the probability exceeds this.

    Returns:
        the four features in :data:`SHAPE_FEATURES` order; an empty map gives a round, crisp, flat shape
        ``(1, 1, 0, 0)``.
    """
    component = largest_component(lesion_prob > threshold)
    if component is None:
        return np.array([1.0, 1.0, 0.0, 0.0])
    height, width = image_hw
    scale = max(height, width) / SHAPE_SIDE
    size = (max(8, round(width / scale)), max(8, round(height / scale)))
    square = cv2.resize(component.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(square, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:  # the component vanished in the resize
        return np.array([1.0, 1.0, 0.0, 0.0])
    contour = max(contours, key=cv2.contourArea)
    area = max(cv2.contourArea(contour), 1.0)
    # the pixel staircase makes a digital disc's perimeter about 15 % too long: measure a 2-pixel polygon fit
    perimeter = max(cv2.arcLength(cv2.approxPolyDP(contour, 2.0, True), True), 1.0)
    hull = max(cv2.contourArea(cv2.convexHull(contour)), 1.0)
    rows, cols = np.nonzero(square)
    orientation = np.log((rows.std() + 1e-3) / (cols.std() + 1e-3))
    band = float(((lesion_prob > 0.2) & (lesion_prob < 0.8)).sum())
    fuzziness = band / max(band + float((lesion_prob > threshold).sum()), 1.0)
    return np.array([min(4 * np.pi * area / perimeter**2, 1.0), min(area / hull, 1.0), orientation, fuzziness])


def malignant_log_odds(probs: np.ndarray) -> np.ndarray:
    """``log(p_malignant / p_benign)`` of class probabilities ``(N, 3)``."""
    return np.log(probs[:, 2] + 1e-6) - np.log(probs[:, 1] + 1e-6)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow for large |x|, and no scipy (not a declared requirement)


class LogisticStacker:
    """L2-penalised logistic regression on standardised inputs, fitted by Newton's method (no scikit-learn)."""

    def __init__(self, l2: float = 1.0) -> None:
        self.l2 = l2
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None
        self.coef: np.ndarray | None = None  # intercept first

    def _design(self, features: np.ndarray) -> np.ndarray:
        return np.c_[np.ones(len(features)), (features - self.mean) / self.std]

    def fit(self, features: np.ndarray, target: np.ndarray, max_iter: int = 100) -> LogisticStacker:
        """Fit to ``features`` ``(N, F)`` and binary ``target`` ``(N,)``; returns itself."""
        self.mean, self.std = features.mean(0), features.std(0) + 1e-6
        design = self._design(features)
        penalty = self.l2 * np.diag(np.r_[0.0, np.ones(features.shape[1])])  # the intercept is not penalised
        coef = np.zeros(design.shape[1])
        for _ in range(max_iter):
            prob = _sigmoid(design @ coef)
            gradient = design.T @ (prob - target) + penalty @ coef
            hessian = (design * (prob * (1 - prob))[:, None]).T @ design + penalty
            step = np.linalg.solve(hessian, gradient)
            coef -= step
            if np.abs(step).max() < 1e-9:
                break
        self.coef = coef
        return self

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """Probability of the positive class for ``features`` ``(N, F)``."""
        return _sigmoid(self._design(features) @ self.coef)


def restack(probs: np.ndarray, malignant_share: np.ndarray) -> np.ndarray:
    """Class probabilities with ``p(normal)`` kept and ``p(benign) + p(malignant)`` split by ``malignant_share``."""
    lesion = probs[:, 1] + probs[:, 2]
    return np.stack([probs[:, 0], lesion * (1 - malignant_share), lesion * malignant_share], axis=1)


def zoom_box(
    lesion: np.ndarray, image_hw: tuple[int, int], factor: float = 4.0, min_fraction: float = 0.25
) -> tuple[int, int, int, int] | None:
    """The crop around the largest lesion component of ``lesion`` (a boolean map at any resolution), in the
    original image's pixels: ``factor`` times the component's box a side, at least ``min_fraction`` of the image, in
    the image's aspect (so that the square resize distorts it as it does the whole image), shifted inside the image.

    Returns:
        ``(top, left, height, width)``, or ``None`` where there is no lesion.
    """
    component = largest_component(lesion)
    if component is None:
        return None
    height, width = image_hw
    rows, cols = np.nonzero(component)
    scale_y, scale_x = height / lesion.shape[0], width / lesion.shape[1]
    box_h, box_w = (rows.max() + 1 - rows.min()) * scale_y, (cols.max() + 1 - cols.min()) * scale_x
    centre_y, centre_x = (rows.min() + rows.max() + 1) / 2 * scale_y, (cols.min() + cols.max() + 1) / 2 * scale_x
    side = min(1.0, max(factor * box_h / height, factor * box_w / width, min_fraction))
    crop_h, crop_w = max(1, round(side * height)), max(1, round(side * width))
    top = int(np.clip(round(centre_y - crop_h / 2), 0, height - crop_h))
    left = int(np.clip(round(centre_x - crop_w / 2), 0, width - crop_w))
    return top, left, crop_h, crop_w


def class_scores(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Benign/malignant AUC of ``p(malignant)``, macro AUC and benign specificity at 0.90 malignant recall."""
    from scripts.metrics import classification_metrics

    point = malignant_operating_point(probs, labels, sensitivity=0.9)
    return {
        "benign_malignant_auc": point["benign_malignant_auc"],
        "macro_auc": classification_metrics(probs, None, labels)["macro_auc"],
        "specificity_at_0.9_recall": point["specificity"],
    }


def _difference(candidate: dict, reference: dict) -> dict:
    return {key: candidate[key] - reference[key] for key in reference}


def _mean(rows: list[dict]) -> dict:
    return {key: float(np.mean([row[key] for row in rows])) for key in rows[0]} if rows else {}


@torch.no_grad()
def zoom(
    dataset_dir: str, cv: str = "runs/cv_lite2", fold: int = 0, split: str = "test", factor: float = 4.0,
    seeds: int = 2, extra: dict | None = None, first_seed: int = 0,
) -> str:  # fmt: skip
    """Class probabilities of fold ``fold``'s models (seeds ``first_seed`` .. ``first_seed + seeds`` - 1, mean) on
    its held-out (``test``) or ``validation`` images, whole and zoomed on the predicted lesion (float32, image by
    image).

    Returns:
        the path of ``zoom_{split}_fold{k}.npz`` in ``cv``: ``whole`` and ``zoomed`` ``(N, 3)``, ``labels`` ``(N,)``.
    """
    from monai.transforms import Compose

    datalist = str((Path(cv) / f"fold{fold}.json").resolve())
    parser = _parser(dataset_dir, {**(extra or {}), "datalist": datalist, "validate#split": split, "amp": False})
    # up to the resize: the scan's own pixels
    load = Compose(parser.get_parsed_content("load_transforms") + parser.get_parsed_content("crop_to_scan_transforms"))
    to_network = Compose(
        parser.get_parsed_content("resize_transforms") + parser.get_parsed_content("normalize_transforms")
    )
    networks = [
        load_network(parser, str(Path(cv) / f"fold{fold}_seed{seed}" / "models" / "model.pt")).eval()
        for seed in range(first_seed, first_seed + seeds)
    ]

    def predict(image, label) -> tuple[np.ndarray, np.ndarray]:
        tensor = to_network({"image": image, "label": label})["image"].as_tensor()[None]
        outputs = [network(tensor) for network in networks]
        lesion = np.mean([1 - torch.softmax(o["pred"].float(), 1)[0, 0].numpy() for o in outputs], axis=0)
        return lesion, np.mean([torch.softmax(o["cls"].float(), 1)[0].numpy() for o in outputs], axis=0)

    whole, zoomed, labels = [], [], []
    for item in parser.get_parsed_content("validate#datalist")():
        sample = load(item)
        image, label = sample["image"], sample["label"]
        lesion, probs = predict(image, label)
        box = zoom_box(lesion > 0.5, tuple(image.shape[-2:]), factor)
        if box is None:
            crop_probs = probs
        else:
            top, left, height, width = box
            crop = (..., slice(top, top + height), slice(left, left + width))
            _, crop_probs = predict(image[crop], label[crop])
        whole.append(probs)
        zoomed.append((probs + crop_probs) / 2)
        labels.append(int(label.max()))
    path = Path(cv) / f"zoom_{split}_fold{fold}.npz"
    np.savez(path, whole=np.array(whole), zoomed=np.array(zoomed), labels=np.array(labels))
    return str(path)


def zoom_report(cv: str = "runs/cv_lite2") -> dict:
    """Zoomed minus whole-image scores per fold (held-out and validation images) and averaged over the folds."""
    report = {}
    for split in ("test", "validation"):
        rows = {}
        for path in sorted(Path(cv).glob(f"zoom_{split}_fold*.npz")):
            data = np.load(path)
            whole = class_scores(data["whole"], data["labels"])
            rows[path.stem] = {"whole": whole, "D": _difference(class_scores(data["zoomed"], data["labels"]), whole)}
        report[split] = {"folds": rows, "mean_D": _mean([row["D"] for row in rows.values()])}
    (Path(cv) / "zoom_report.json").write_text(json.dumps(report, indent=1))
    return report


def closer_view(folders: str | list[str] = "runs/cv_lite2_zoom2", split: str = "test") -> dict:
    """Lesion images seen closer: the share of them called normal (arg-max), on the whole image and on the
    :func:`zoom` crop alone (``2 zoomed - whole``, as ``zoomed`` is their mean), pooled over each folder's folds.
    A crop is as close as ``zoom``'s ``factor`` made it; an image without a predicted lesion is not cropped and
    counts with its whole-image call.

    Args:
        folders: one or several folders holding ``zoom_{split}_fold*.npz`` (a list or a comma-separated string).
        split: ``test`` (held-out) or ``validation``.

    Returns:
        ``{folder: {"lesion_images", "cropped", "called_normal_whole", "called_normal_closer"}}``.
    """
    result = {}
    for folder in folders.split(",") if isinstance(folders, str) else folders:
        paths = sorted(Path(folder).glob(f"zoom_{split}_fold*.npz"))
        if not paths:
            raise FileNotFoundError(f"no zoom_{split}_fold*.npz in {folder}: run 'zoom' first")
        whole, zoomed, labels = (np.concatenate([np.load(path)[key] for path in paths])
                                 for key in ("whole", "zoomed", "labels"))  # fmt: skip
        lesion, closer = labels > 0, 2 * zoomed - whole
        result[folder] = {
            "lesion_images": int(lesion.sum()),
            "cropped": int((lesion & (np.abs(zoomed - whole).sum(1) > 1e-6)).sum()),
            "called_normal_whole": float((whole[lesion].argmax(1) == 0).mean()),
            "called_normal_closer": float((closer[lesion].argmax(1) == 0).mean()),
        }
    return result


def _fold_features(dataset_dir: str, cv: str, fold: int, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stacker inputs, fold-ensemble class probabilities and true classes of one fold's prediction file."""
    data = np.load(prediction_path(cv, fold, split))
    items = json.loads((Path(cv) / f"fold{fold}.json").read_text())[split]
    lesion, probs = data["seg"].mean(0) / 255.0, data["cls"].mean(0)
    sizes = [cv2.imread(str(Path(dataset_dir) / item["image"]), cv2.IMREAD_GRAYSCALE).shape for item in items]
    shapes = np.stack([shape_features(p, hw) for p, hw in zip(lesion, sizes)])
    return np.c_[malignant_log_odds(probs), shapes], probs, image_classes(data["label"])


def _fit(features: np.ndarray, labels: np.ndarray, l2: float) -> LogisticStacker:
    lesion = labels > 0
    return LogisticStacker(l2).fit(features[lesion], (labels[lesion] == 2).astype(float))


def stack(dataset_dir: str, cv: str = "runs/cv_lite2", l2: float = 1.0) -> dict:
    """Cross-fitted shape stacking on every fold with held-out predictions: fold ``k`` is scored by a stacker fitted
    on the other folds' held-out benign and malignant images; the fold models' validation images by one fitted on
    all held-out folds.

    Returns:
        (also saved as ``stack_report.json`` in ``cv``) per fold the plain ensemble's scores, the stacker's minus
        them (``D``), its coefficients; ``mean_D``; and ``validation_D`` per fold.
    """
    folds = sorted(int(p.stem.removeprefix("predictions_fold")) for p in Path(cv).glob("predictions_fold*.npz"))
    data = {fold: _fold_features(dataset_dir, cv, fold, "test") for fold in folds}
    names = ["malignant_log_odds", *SHAPE_FEATURES]
    report: dict = {"folds": {}, "validation_D": {}}
    for fold, (features, probs, labels) in data.items():
        others = [data[other] for other in folds if other != fold]
        if not others:
            continue
        stacker = _fit(np.concatenate([o[0] for o in others]), np.concatenate([o[2] for o in others]), l2)
        plain = class_scores(probs, labels)
        stacked = class_scores(restack(probs, stacker.predict_proba(features)), labels)
        coef = dict(zip(["intercept", *names], np.round(stacker.coef, 3).tolist()))
        report["folds"][fold] = {"plain": plain, "D": _difference(stacked, plain), "coef": coef}
    report["mean_D"] = _mean([row["D"] for row in report["folds"].values()])
    if data:
        stacker = _fit(np.concatenate([d[0] for d in data.values()]), np.concatenate([d[2] for d in data.values()]), l2)
        for fold in folds:
            if prediction_path(cv, fold, "validation").is_file():
                features, probs, labels = _fold_features(dataset_dir, cv, fold, "validation")
                stacked = restack(probs, stacker.predict_proba(features))
                report["validation_D"][fold] = _difference(class_scores(stacked, labels), class_scores(probs, labels))
    (Path(cv) / "stack_report.json").write_text(json.dumps(report, indent=1))
    return report


def misses(cv: str = "runs/cv_lite2", small: float = 0.05, found: float = 0.1, sensitivity: float = 0.9) -> dict:
    """Which held-out cancers each fold ensemble misses at the shipped threshold rule (0.90 malignant recall on its
    validation images and their augmented draws, ``ablate.threshold_images``), by lesion size.

    Args:
        cv: the cross-validation folder, with ``predictions_fold{k}.npz`` and ``validation_fold{k}.npz``.
        small: a cancer is small where its true lesion covers less than this share of the image.
        found: a missed cancer's lesion counts as not segmented where the predicted lesion covers less than this share
            of its true mask.
        sensitivity: the validation recall the threshold reaches.

    Returns:
        (also saved as ``misses.json`` in ``cv``) per fold and pooled: cancers and misses, small and large, and the
        misses whose lesion was not segmented.
    """
    report: dict = {}
    for path in sorted(Path(cv).glob("predictions_fold*.npz")):
        fold = path.stem.removeprefix("predictions_")
        held_out, validation = np.load(path), np.load(Path(cv) / f"validation_{fold}.npz")
        rule_probs, rule_labels = threshold_images(
            "validation_and_augmented", validation["cls"].mean(0), image_classes(validation["label"]),
            validation["augmented_cls"].mean(0), validation["augmented_label"],
        )  # fmt: skip
        threshold = malignant_operating_point(rule_probs, rule_labels, sensitivity)["threshold"]
        label, lesion = held_out["label"], held_out["seg"].mean(0) / 255.0 > 0.5
        cancer = image_classes(label) == 2
        truth = label[cancer] > 0
        area = truth.reshape(len(truth), -1).mean(1)
        covered = (lesion[cancer] & truth).reshape(len(truth), -1).sum(1) / truth.reshape(len(truth), -1).sum(1)
        missed = held_out["cls"].mean(0)[cancer, 2] < threshold
        report[fold] = {
            "threshold": threshold,
            "small_cancers": int((area < small).sum()),
            "small_missed": int((missed & (area < small)).sum()),
            "large_cancers": int((area >= small).sum()),
            "large_missed": int((missed & (area >= small)).sum()),
            "missed_not_segmented": int((missed & (covered < found)).sum()),
        }
    if report:
        report["pooled"] = {key: sum(row[key] for row in report.values()) for key in next(iter(report.values()))}
        report["pooled"].pop("threshold")
    (Path(cv) / "misses.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    fire.Fire({"zoom": zoom, "zoom_report": zoom_report, "closer_view": closer_view, "stack": stack, "misses": misses})
