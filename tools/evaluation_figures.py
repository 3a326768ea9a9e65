"""Draw the figures of an evaluation from what the bundle's evaluation wrote into its output folder.

    python tools/evaluation_figures.py --eval_dir bundle/eval

reads ``metrics.json``, ``per_image.csv`` and ``per_image_maps.npz`` (``scripts.metrics.EvaluationReport``) and
writes next to them ``confusion_matrix.png`` (counts and row-normalised), ``roc_curves.png`` (one-vs-rest, AUC in
the legend) and ``overlays.png`` (image / ground truth / prediction of the best and worst lesion-Dice images and
of the normal images with the largest predicted lesion area; benign green, malignant red).
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import fire
import matplotlib
import numpy as np

matplotlib.use("Agg")
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from monai.visualize import blend_images  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bundle"))
from scripts.common import LESION_COLOURS  # noqa: E402

# map values 0 (transparent), 1 benign, 2 malignant
OVERLAY_COLOURS = ListedColormap([(0.0, 0.0, 0.0)] + [tuple(c / 255 for c in LESION_COLOURS[v]) for v in (1, 2)])
ROC_COLOURS = ("tab:blue", "tab:green", "tab:red")  # normal, benign, malignant (benign green, malignant red)


def roc_curve(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Binary ROC curve points (MONAI computes the AUC only, not the curve).

    Returns:
        ``(fpr, tpr)`` from ``(0, 0)`` to ``(1, 1)``, one point per distinct score; empty when the targets are all
        positive or all negative.
    """
    scores, targets = np.asarray(scores, np.float64).ravel(), np.asarray(targets).ravel() > 0
    positives, negatives = int(targets.sum()), int((~targets).sum())
    if not positives or not negatives:
        return np.zeros(0), np.zeros(0)
    order = np.argsort(-scores, kind="mergesort")
    scores, targets = scores[order], targets[order]
    last_of_threshold = np.r_[np.nonzero(np.diff(scores))[0], scores.size - 1]
    true_positives = np.cumsum(targets)[last_of_threshold]
    false_positives = last_of_threshold + 1 - true_positives
    return np.r_[0.0, false_positives / negatives], np.r_[0.0, true_positives / positives]


def select_overlays(dice: np.ndarray, has_lesion: np.ndarray, lesion_area: np.ndarray, count: int) -> list[int]:
    """Rows of the overlays figure: best and worst lesion-Dice images, then normals (largest predicted area first)."""
    count = min(count, len(dice))
    lesion = [int(i) for i in np.argsort(-dice, kind="stable") if has_lesion[i]]
    normal = sorted(np.flatnonzero(~has_lesion).tolist(), key=lambda i: (-lesion_area[i], i))
    num_normal = min(len(normal), max(1, count // 4))
    num_lesion = min(len(lesion), count - num_normal)
    num_normal = min(len(normal), count - num_lesion)  # more normals when there are few lesion images
    num_best = (num_lesion + 1) // 2
    return lesion[:num_best] + lesion[len(lesion) - (num_lesion - num_best) :] + normal[:num_normal]


def overlay(image: np.ndarray, label_map: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """RGB ``(H, W, 3)`` blend of a uint8 image and a 0/1/2 map by MONAI's ``blend_images``."""
    blended = blend_images(
        image=image[None].astype(np.float32) / 255.0,
        label=label_map[None].astype(np.float32) / 2.0,  # 0/1/2 -> colours 0/1/2 of the 3-entry colour map
        alpha=alpha,
        cmap=OVERLAY_COLOURS,  # type: ignore[arg-type]
        rescale_arrays=False,
        transparent_background=True,
    )
    return np.clip(np.moveaxis(np.asarray(blended), 0, -1), 0.0, 1.0)


def plot_confusion(cm: np.ndarray, class_names: list[str], path: Path) -> None:
    """Confusion matrix as counts and row-normalised (recall)."""
    figure = Figure(figsize=(10, 4.2))
    with np.errstate(invalid="ignore", divide="ignore"):
        normalised = cm / cm.sum(axis=1, keepdims=True)
    for k, (data, title) in enumerate(((cm / max(cm.max(), 1), "counts"), (normalised, "row-normalised (recall)"))):
        axes = figure.add_subplot(1, 2, k + 1)
        axes.imshow(np.nan_to_num(data), cmap="Blues", vmin=0, vmax=1)
        for (i, j), shade in np.ndenumerate(data):
            text = str(cm[i, j]) if k == 0 else ("-" if np.isnan(shade) else f"{shade:.2f}")
            axes.text(j, i, text, ha="center", va="center", color="white" if shade > 0.5 else "black")
        axes.set_xticks(range(len(class_names)), class_names)
        axes.set_yticks(range(len(class_names)), class_names)
        axes.set(xlabel="predicted", ylabel="true", title=f"Confusion matrix, {title}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def plot_roc(probs: np.ndarray, labels: np.ndarray, classification: dict, class_names: list[str], path: Path) -> None:
    """One-vs-rest ROC curves with the AUCs that the evaluation computed."""
    figure = Figure(figsize=(5.5, 5))
    axes = figure.add_subplot(1, 1, 1)
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    for c, name in enumerate(class_names):
        auc = classification["per_class"][name]["auc"]
        fpr, tpr = roc_curve(probs[:, c], labels == c)
        colour = ROC_COLOURS[c] if c < len(ROC_COLOURS) else f"C{c}"
        if fpr.size and auc is not None:
            axes.plot(fpr, tpr, color=colour, linewidth=1.8, label=f"{name} (AUC = {auc:.3f})")
        else:
            axes.plot([], [], color=colour, label=f"{name} (AUC n/a)")
    macro = classification["macro_auc"]
    axes.set_title(f"One-vs-rest ROC (macro AUC = {'n/a' if macro is None or math.isnan(macro) else f'{macro:.3f}'})")
    axes.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
    axes.set_aspect("equal")
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def plot_overlays(rows: list[dict], maps: dict, chosen: list[int], path: Path) -> None:
    """Image, ground truth and prediction of the chosen rows of the per-image table."""
    figure = Figure(figsize=(9, 3.1 * len(chosen)))
    for row, i in enumerate(chosen):
        image = maps[f"image_{i}"]
        predicted = f"pred: {rows[i]['pred_class']}, Dice {float(rows[i]['lesion_dice']):.3f}"
        panels = (
            (np.repeat(image[..., None] / 255.0, 3, axis=-1), rows[i]["filename"]),
            (overlay(image, maps[f"label_{i}"]), f"ground truth: {rows[i]['true_class']}"),
            (overlay(image, maps[f"seg_pred_{i}"]), predicted),
        )
        for column, (picture, title) in enumerate(panels):
            axes = figure.add_subplot(len(chosen), 3, row * 3 + column + 1)
            axes.imshow(picture, interpolation="nearest")
            axes.set_title(title, fontsize=9)
            axes.axis("off")
    figure.suptitle("Overlays (benign = green, malignant = red)", fontsize=11)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (3.1 * len(chosen))))
    figure.savefig(path, dpi=100)


def draw(eval_dir: str = "bundle/eval", num_overlays: int = 8) -> list[str]:
    """Write the three figures of the evaluation in ``eval_dir`` next to its report; returns their paths.

    Args:
        eval_dir: output folder of the evaluation.
        num_overlays: rows of ``overlays.png`` (0: no overlays).
    """
    folder = Path(eval_dir)
    classification = json.loads((folder / "metrics.json").read_text())["classification"]
    class_names = classification["class_names"]
    with open(folder / "per_image.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    probs = np.array([[float(row[f"prob_{name}"]) for name in class_names] for row in rows])
    labels = np.array([class_names.index(row["true_class"]) for row in rows])
    plot_confusion(np.array(classification["confusion_matrix"]), class_names, folder / "confusion_matrix.png")
    plot_roc(probs, labels, classification, class_names, folder / "roc_curves.png")
    written = [str(folder / "confusion_matrix.png"), str(folder / "roc_curves.png")]
    if num_overlays > 0:
        with np.load(folder / "per_image_maps.npz") as stored:
            maps = dict(stored)
        has_lesion = np.array([maps[f"label_{i}"].any() for i in range(len(rows))])
        lesion_area = np.array([(maps[f"seg_pred_{i}"] > 0).sum() for i in range(len(rows))])
        dice = np.array([float(row["lesion_dice"]) for row in rows])
        chosen = select_overlays(dice, has_lesion, lesion_area, num_overlays)
        if chosen:
            plot_overlays(rows, maps, chosen, folder / "overlays.png")
            written.append(str(folder / "overlays.png"))
    return written


if __name__ == "__main__":
    fire.Fire(draw)
