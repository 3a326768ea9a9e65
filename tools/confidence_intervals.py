"""How precisely does one evaluation measure the model? Bootstrap confidence intervals of its headline numbers.

    python tools/confidence_intervals.py --eval_dir eval_busi [--resamples 2000] [--seed 0] [--level 0.95] \
        [--datalist bundle/configs/datalist_Dataset_BUSI_with_GT.json]

reads what the bundle's evaluation wrote (``per_image.csv`` and ``per_image_maps.npz``,
``scripts.metrics.EvaluationReport``; run the evaluation with ``--malignant_threshold <t>`` for the operating
point) and resamples its images with replacement, within each true class so that every resample keeps the split's
class counts (a stratified percentile bootstrap). With ``--datalist`` (a datalist whose entries carry the ``group`` of
``tools/prepare_datalist.py``), whole duplicate groups are resampled instead of images, within the class that most of a
group's images have: near-duplicate frames of one scene share their errors, so counting them as independent images
makes the interval too narrow (a cluster bootstrap). Writes ``confidence_intervals.json`` next to them: per metric
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
        ``has_map`` (the predicted label map is not empty), ``filenames`` and ``class_names``.

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
        "filenames": np.array([row["filename"] for row in rows]),
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


def grouped_resample(labels: np.ndarray, groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices of one bootstrap resample that draws whole groups (all images of a drawn group, as often as it is
    drawn), each group's from the groups of its class: the class most of its images have (the lowest on a tie).
    With one image per group, in image order, it draws what :func:`stratified_resample` draws."""
    members = {group: np.flatnonzero(groups == group) for group in dict.fromkeys(groups.tolist())}
    stratum = {group: int(np.bincount(labels[index]).argmax()) for group, index in members.items()}
    drawn = []
    for c in sorted(set(stratum.values())):
        in_class = [group for group in members if stratum[group] == c]
        drawn += [members[in_class[i]] for i in rng.choice(len(in_class), size=len(in_class))]
    return np.concatenate(drawn)


def image_groups(filenames: np.ndarray, datalist: str | Path) -> np.ndarray:
    """The duplicate group of each image, matched by file name (without folders) to the entries of ``datalist``.

    Raises:
        ValueError: naming the first image that the datalist does not hold, or holds twice under one name.
    """
    data = json.loads(Path(datalist).read_text())
    group_of: dict[str, list] = {}
    for entries in data.values():
        if isinstance(entries, list):
            for entry in entries:
                if isinstance(entry, dict) and "image" in entry and "group" in entry:
                    group_of.setdefault(Path(entry["image"]).name, []).append(entry["group"])
    for name in filenames:
        if len(group_of.get(str(name), [])) != 1:
            problem = "does not hold" if str(name) not in group_of else "holds more than one image named"
            raise ValueError(f"{datalist} {problem} {str(name)!r}: it cannot say that image's duplicate group")
    return np.array([group_of[str(name)][0] for name in filenames])


def bootstrap(
    results: dict[str, np.ndarray], resamples: int = 2000, seed: int = 0, level: float = 0.95,
    groups: np.ndarray | None = None,
) -> dict:  # fmt: skip
    """Stratified percentile bootstrap intervals of :func:`headline`.

    Args:
        results: from :func:`load_evaluation`.
        resamples: the number of bootstrap resamples.
        seed: the resampling's random seed.
        level: the interval's coverage.
        groups: a duplicate-group id for each image, to resample whole groups (:func:`grouped_resample`);
            ``None``: images.

    Returns:
        per metric ``{"value", "low", "high"}``, plus ``num_images``, ``num_groups`` (``None`` without
        ``groups``), ``resamples`` and ``level``.
    """
    if resamples < 1 or not 0.0 < level < 1.0:
        raise ValueError(f"need resamples >= 1 and 0 < level < 1, got {resamples} and {level}")
    rng = np.random.default_rng(seed)
    labels = results["labels"]
    draws = [headline(results, stratified_resample(labels, rng) if groups is None
                      else grouped_resample(labels, groups, rng)) for _ in range(resamples)]  # fmt: skip
    tail = 100.0 * (1.0 - level) / 2.0
    measured = headline(results)
    num_groups = None if groups is None else len(set(groups.tolist()))
    summary: dict = {"num_images": int(len(labels)), "num_groups": num_groups, "resamples": resamples, "level": level}
    for key in METRICS:
        values = np.array([draw[key] for draw in draws])
        low, high = np.nanpercentile(values, [tail, 100.0 - tail])
        summary[key] = {"value": measured[key], "low": float(low), "high": float(high)}
    return summary


def main(
    eval_dir: str, resamples: int = 2000, seed: int = 0, level: float = 0.95, datalist: str | None = None
) -> str:
    """Write ``confidence_intervals.json`` into ``eval_dir`` and return a markdown table of it (``datalist``:
    resample the duplicate groups it records instead of images, see the module docstring)."""
    results = load_evaluation(eval_dir)
    groups = None if datalist is None else image_groups(results["filenames"], datalist)
    summary = bootstrap(results, resamples, seed, level, groups)
    (Path(eval_dir) / "confidence_intervals.json").write_text(json.dumps(summary, indent=1))
    counted = f"{summary['num_images']} images" + ("" if groups is None else f" in {summary['num_groups']} groups")
    lines = [f"| metric ({counted}) | value | {level:.0%} interval |", "| --- | ---: | --- |"]
    lines += [f"| {key} | {summary[key]['value']:.3f} | {summary[key]['low']:.3f}-{summary[key]['high']:.3f} |"
              for key in METRICS]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    fire.Fire(main)
