"""How precisely does one evaluation measure the model? Bootstrap confidence intervals of its headline numbers.

    python tools/confidence_intervals.py --eval_dir eval_busi [--resamples 2000] [--seed 0] [--level 0.95]

reads what the bundle's evaluation wrote (``per_image.csv`` and ``per_image_maps.npz``,
``scripts.metrics.EvaluationReport``; run the evaluation with ``--malignant_threshold <t>`` for the operating
point) and resamples its images with replacement, within each true class so that every resample keeps the split's
class counts (a stratified percentile bootstrap). Writes ``confidence_intervals.json`` next to them: per metric
the evaluation's value and the ``level`` percentile interval over the resamples.

Metrics: lesion Dice and IoU of the shipped label map (mean over lesion images), the share of normal images with a
non-empty map (``normal_fp``), accuracy, macro F1, macro AUC (one-vs-rest), malignant recall and the share of
lesion images classified normal. The interval says how far the same model's number could move on another draw of a
split this size from the same hospital; it says nothing about other hospitals. A share that is 0 or 1 in the
evaluation stays so in every resample: read it with an exact binomial interval instead (0 of 97 lesion images: at
most 3.7 % at 95 %, Clopper-Pearson).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import fire
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bundle"))
from scripts.metrics import classification_metrics  # noqa: E402

METRICS = ("dice", "iou", "normal_fp", "accuracy", "macro_f1", "macro_auc", "malignant_recall",
           "lesion_called_normal")  # fmt: skip


def load_evaluation(eval_dir: str | Path) -> dict[str, np.ndarray]:
    """Per-image results of one evaluation folder.

    Returns:
        ``probs`` ``(N, C)``, ``labels`` and ``preds`` (class indices), ``dice`` and ``iou`` (per image),
        ``has_map`` (the predicted label map is not empty) and ``class_names``.

    Raises:
        FileNotFoundError: naming the missing file.
        ValueError: naming the file whose rows do not fit the maps or the class names.
    """
    folder = Path(eval_dir)
    table, maps_path = folder / "per_image.csv", folder / "per_image_maps.npz"
    for path in (table, maps_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run the bundle's 'evaluating' with --output_dir {folder}")
    with open(table, newline="", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    if not rows:
        raise ValueError(f"{table} has no images")
    class_names = [key.removeprefix("prob_") for key in rows[0] if key.startswith("prob_")]
    try:
        labels = np.array([class_names.index(row["true_class"]) for row in rows])
        preds = np.array([class_names.index(row["pred_class"]) for row in rows])
    except ValueError as error:
        raise ValueError(f"{table}: a class is not one of {class_names}") from error
    with np.load(maps_path) as stored:
        if f"seg_pred_{len(rows) - 1}" not in stored or f"seg_pred_{len(rows)}" in stored:
            raise ValueError(f"{maps_path} does not hold one predicted map for each of the {len(rows)} rows of {table}")
        has_map = np.array([bool(stored[f"seg_pred_{i}"].any()) for i in range(len(rows))])
    return {
        "probs": np.array([[float(row[f"prob_{name}"]) for name in class_names] for row in rows]),
        "labels": labels,
        "preds": preds,
        "dice": np.array([float(row["lesion_dice"]) for row in rows]),
        "iou": np.array([float(row["lesion_iou"]) for row in rows]),
        "has_map": has_map,
        "class_names": np.array(class_names),
    }


def headline(results: dict[str, np.ndarray], indices: np.ndarray | None = None) -> dict[str, float]:
    """The headline numbers (``METRICS``) of the images at ``indices`` (``None``: all, in order).

    Class 0 is normal and the last class malignant, as in ``scripts.common.CLASS_NAMES``.
    """
    chosen = np.arange(len(results["labels"])) if indices is None else indices
    labels, preds = results["labels"][chosen], results["preds"][chosen]
    lesion, normal = labels > 0, labels == 0
    class_names = list(results["class_names"])
    metrics = classification_metrics(results["probs"][chosen], preds, labels, class_names)
    return {
        "dice": float(results["dice"][chosen][lesion].mean()),
        "iou": float(results["iou"][chosen][lesion].mean()),
        "normal_fp": float(results["has_map"][chosen][normal].mean()),
        "accuracy": metrics["accuracy"],
        "macro_f1": metrics["macro_f1"],
        "macro_auc": metrics["macro_auc"],
        "malignant_recall": metrics["per_class"][class_names[-1]]["recall"],
        "lesion_called_normal": float((preds[lesion] == 0).mean()),
    }


def stratified_resample(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices of one bootstrap resample that draws each class's images from that class only."""
    return np.concatenate([rng.choice(members, size=len(members)) for members in
                           (np.flatnonzero(labels == c) for c in np.unique(labels))])  # fmt: skip


def bootstrap(results: dict[str, np.ndarray], resamples: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Stratified percentile bootstrap intervals of :func:`headline`.

    Returns:
        per metric ``{"value", "low", "high"}``, plus ``num_images`` and ``resamples``.
    """
    if resamples < 1 or not 0.0 < level < 1.0:
        raise ValueError(f"need resamples >= 1 and 0 < level < 1, got {resamples} and {level}")
    rng = np.random.default_rng(seed)
    draws = [headline(results, stratified_resample(results["labels"], rng)) for _ in range(resamples)]
    tail = 100.0 * (1.0 - level) / 2.0
    measured = headline(results)
    summary: dict = {"num_images": int(len(results["labels"])), "resamples": resamples, "level": level}
    for key in METRICS:
        values = np.array([draw[key] for draw in draws])
        low, high = np.nanpercentile(values, [tail, 100.0 - tail])
        summary[key] = {"value": measured[key], "low": float(low), "high": float(high)}
    return summary


def main(eval_dir: str, resamples: int = 2000, seed: int = 0, level: float = 0.95) -> str:
    """Write ``confidence_intervals.json`` into ``eval_dir`` and return a markdown table of it."""
    summary = bootstrap(load_evaluation(eval_dir), resamples, seed, level)
    (Path(eval_dir) / "confidence_intervals.json").write_text(json.dumps(summary, indent=1))
    lines = [f"| metric ({summary['num_images']} images) | value | {level:.0%} interval |", "| --- | ---: | --- |"]
    lines += [f"| {key} | {summary[key]['value']:.3f} | {summary[key]['low']:.3f}-{summary[key]['high']:.3f} |"
              for key in METRICS]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    fire.Fire(main)
