"""Segmentation and classification metrics, the macro-F1 ignite metric of training and the evaluation report.

Label maps hold 0 background, 1 benign, 2 malignant lesion; the *lesion* mask of a map is ``map > 0``. The
per-image lesion Dice (IoU) is 1 when both masks are empty and 0 when only one is; the headline ``lesion_dice`` /
``lesion_iou`` is the mean over the images whose ground truth HAS a lesion, so normal images neither inflate nor
deflate it (their false positives are ``normal_false_positive_rate``).
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from ignite.metrics import ConfusionMatrix
from monai.data import decollate_batch
from monai.handlers.utils import from_engine
from monai.metrics import compute_confusion_matrix_metric, compute_dice, compute_iou, compute_roc_auc

from .common import CLASS_NAMES, atomic_write, display_image, write_table

__all__ = ["ClassificationF1", "EvaluationReport", "classification_metrics", "segmentation_metrics"]

logger = logging.getLogger(__name__)


def _maps(maps: Any) -> list[torch.Tensor]:
    """Per-image label maps from a sequence of ``(1, H, W)``/``(H, W)`` maps or an ``(N, [1,] H, W)`` batch."""
    maps = [torch.as_tensor(m) for m in maps] if isinstance(maps, (list, tuple)) else torch.as_tensor(maps)
    return [maps] if isinstance(maps, torch.Tensor) and maps.ndim == 2 else list(maps)


def _class_indices(values: Any) -> torch.Tensor:
    """One class index per sample from numbers, 0-d/``(1,)`` tensors or ``(C,)`` scores (arg-maxed)."""
    if torch.is_tensor(values):  # a batch: (N,), (N, 1) or (N, C); 0-d: one sample
        values = values.reshape(len(values) if values.ndim else 1, -1)
    rows = [torch.as_tensor(v).detach().cpu().flatten() for v in values]
    return torch.tensor([int(r.argmax()) if r.numel() > 1 else round(float(r[0])) for r in rows], dtype=torch.long)


def _nanmean(values: Any) -> float:
    """Mean of the non-NaN values; NaN (without a warning) when there are none."""
    values = np.asarray(values, dtype=np.float64)
    return float(values[~np.isnan(values)].mean()) if (~np.isnan(values)).any() else float("nan")


def lesion_dice_iou(seg_pred: Any, label: Any) -> tuple[float, float]:
    """Dice and IoU of the lesion masks of one predicted and one ground-truth map (module convention)."""
    pred, label = torch.as_tensor(seg_pred), torch.as_tensor(label)
    if pred.shape != label.shape:
        raise ValueError(f"seg_pred and label shapes differ: {tuple(pred.shape)} vs {tuple(label.shape)}.")
    pred = (pred > 0).reshape(1, 1, -1).double()
    label = (label > 0).reshape(1, 1, -1).double().to(pred.device)
    dice = compute_dice(pred, label, include_background=True, ignore_empty=False)
    return float(dice.item()), float(compute_iou(pred, label, include_background=True, ignore_empty=False).item())


def segmentation_metrics(seg_preds: Any, labels: Any) -> dict[str, Any]:
    """Segmentation metrics of images that may differ in size.

    Args:
        seg_preds: predicted maps, a sequence of ``(1, H, W)``/``(H, W)`` maps or an ``(N, [1,] H, W)`` array.
        labels: ground-truth maps in the same layout.

    Returns:
        ``lesion_dice``/``lesion_iou`` (NaN without lesion images) and their ``_std``, ``lesion_dice_all_images``;
        over all pixels ``pixel_accuracy``, ``background_iou``, ``lesion_pixel_iou``, their ``mean_iou`` and
        ``dice_<value name>``; ``normal_false_positive_rate``; image counts; ``per_image`` lesion Dice and IoU.
    """
    preds, gts = _maps(seg_preds), _maps(labels)
    if len(preds) != len(gts):
        raise ValueError(f"got {len(preds)} predictions but {len(gts)} labels.")
    scores = np.array([lesion_dice_iou(p, y) for p, y in zip(preds, gts)], dtype=np.float64).reshape(-1, 2)
    has_lesion = np.array([bool((y > 0).any()) for y in gts], dtype=bool)
    cm = sum(  # pixel confusion of the 3-valued maps, rows = ground truth
        torch.bincount(y.round().long().cpu().ravel() * 3 + p.round().long().cpu().ravel(), minlength=9).numpy()
        for p, y in zip(preds, gts)
    ).reshape(3, 3)
    tn, fp, fn, tp = cm[0, 0], cm[0, 1:].sum(), cm[1:, 0].sum(), cm[1:, 1:].sum()
    background_iou = tn / (tn + fp + fn) if tn + fp + fn else float("nan")
    lesion_pixel_iou = tp / (tp + fp + fn) if tp + fp + fn else float("nan")
    lesion = scores[has_lesion]
    false_positive = np.array([bool((p > 0).any()) for p in preds])[~has_lesion]
    out = {
        "lesion_dice": _nanmean(lesion[:, 0]),
        "lesion_dice_std": float(lesion[:, 0].std()) if len(lesion) else float("nan"),
        "lesion_iou": _nanmean(lesion[:, 1]),
        "lesion_iou_std": float(lesion[:, 1].std()) if len(lesion) else float("nan"),
        "lesion_dice_all_images": _nanmean(scores[:, 0]),
        "pixel_accuracy": float((tn + tp) / cm.sum()) if cm.sum() else float("nan"),
        "mean_iou": _nanmean([background_iou, lesion_pixel_iou]),
        "background_iou": float(background_iou),
        "lesion_pixel_iou": float(lesion_pixel_iou),
        "normal_false_positive_rate": float(false_positive.mean()) if false_positive.size else float("nan"),
        "num_images": len(gts),
        "num_lesion_images": int(has_lesion.sum()),
        "num_normal_images": int((~has_lesion).sum()),
    }
    for value, name in enumerate(("background", *CLASS_NAMES[1:])):  # label value v > 0 is class v's lesion
        total = cm[value, :].sum() + cm[:, value].sum()
        out[f"dice_{name}"] = float(2 * cm[value, value] / total) if total else float("nan")
    return {**out, "per_image": {"lesion_dice": scores[:, 0].tolist(), "lesion_iou": scores[:, 1].tolist()}}


def precision_recall_f1(cm: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall and F1 of a confusion matrix (rows true, columns predicted) by MONAI.

    As scikit-learn's ``zero_division=0``: an undefined value is 0 for a class seen in labels or predictions; a
    class seen in neither gets NaN for all three, which leaves it out of NaN-ignoring macro averages.
    """
    cm = torch.as_tensor(np.asarray(cm), dtype=torch.float64)
    tp = cm.diag()
    fp, fn = cm.sum(dim=0) - tp, cm.sum(dim=1) - tp
    counts = torch.stack([tp, fp, cm.sum() - tp - fp - fn, fn], dim=-1)  # MONAI's (tp, fp, tn, fn) per class
    present = ((tp + fp + fn) > 0).numpy()
    results = [compute_confusion_matrix_metric(name, counts).numpy() for name in ("precision", "recall", "f1 score")]
    precision, recall, f1 = (np.where(present, np.nan_to_num(v.astype(np.float64)), np.nan) for v in results)
    return precision, recall, f1


def classification_metrics(probs: Any, preds: Any, labels: Any, class_names: Sequence[str] = CLASS_NAMES) -> dict:
    """Classification metrics of a set of samples.

    Args:
        probs: class probabilities, a sequence of ``(C,)`` vectors or an ``(N, C)`` array.
        preds: predicted class per sample (see :func:`_class_indices`); ``None``: ``argmax(probs)``.
        labels: true class per sample.
        class_names: one name per class.

    Returns:
        ``accuracy``; NaN-ignoring ``macro_`` precision, recall, f1 and auc (MONAI's one-vs-rest); ``per_class``
        ``{name: {precision, recall, f1, support, auc}}``; ``confusion_matrix`` (rows true); ``class_names``;
        ``num_samples``.
    """
    num_classes = len(class_names)
    probs = torch.stack([torch.as_tensor(p).detach().cpu().double().flatten() for p in probs])
    labels = _class_indices(labels)
    preds = probs.argmax(dim=1) if preds is None else _class_indices(preds)
    if not len(probs) == len(preds) == len(labels) or len(labels) == 0:
        raise ValueError(f"got {len(probs)} probabilities, {len(preds)} predictions and {len(labels)} labels.")
    indices = torch.cat([preds, labels])
    if probs.shape[1] != num_classes or indices.min() < 0 or indices.max() >= num_classes:
        raise ValueError(f"probabilities and class indices must fit the {num_classes} class names.")
    cm = torch.bincount(labels * num_classes + preds, minlength=num_classes**2).reshape(num_classes, -1).numpy()
    precision, recall, f1 = precision_recall_f1(cm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # compute_roc_auc warns and returns NaN for a class absent from the labels
        auc = np.asarray(compute_roc_auc(probs, F.one_hot(labels, num_classes).double(), average="none"), np.float64)
    values = {"precision": precision, "recall": recall, "f1": f1, "auc": auc}
    return {
        "accuracy": float(np.trace(cm) / cm.sum()),
        **{f"macro_{key}": _nanmean(values[key]) for key in ("precision", "recall", "f1", "auc")},
        "per_class": {
            name: {**{key: float(v[c]) for key, v in values.items()}, "support": int(cm[c].sum())}
            for c, name in enumerate(class_names)
        },
        "confusion_matrix": cm.tolist(),
        "class_names": list(class_names),
        "num_samples": len(labels),
    }


class ClassificationF1(ConfusionMatrix):
    """Macro F1 (:func:`precision_recall_f1`) of predicted classes, by ignite's confusion matrix.

    Args:
        output_transform: ``engine.state.output`` to ``(preds, labels)``; default ``from_engine(["cls_pred",
            "cls_label"])``.
        num_classes, device, skip_unrolling: as in ignite's ``ConfusionMatrix`` (``skip_unrolling``: ``True``
            hands :meth:`update` a whole iteration, ``False`` one sample at a time).
    """

    def __init__(
        self,
        output_transform: Callable | None = None,
        num_classes: int = len(CLASS_NAMES),
        device: str | torch.device = "cpu",
        skip_unrolling: bool = True,
    ) -> None:
        output_transform = output_transform or from_engine(["cls_pred", "cls_label"])
        super().__init__(num_classes, None, output_transform, device, skip_unrolling)

    def update(self, output: Sequence[Any]) -> None:
        preds, labels = _class_indices(output[0]), _class_indices(output[1])
        super().update((F.one_hot(preds, self.num_classes), labels))  # ignite arg-maxes (N, C) scores

    def compute(self) -> float:
        return _nanmean(precision_recall_f1(super().compute().cpu())[2])


class EvaluationReport:
    """Ignite handler writing the evaluation report of a segmentation + classification evaluator.

    It reads ``KEYS`` of each sample of ``engine.state.output``; every epoch it writes into ``output_dir``, each file
    atomically, ``metrics.json`` (:func:`segmentation_metrics` and :func:`classification_metrics`, NaN as
    ``null``), ``per_image.csv`` (file name, true and predicted class, probabilities, lesion Dice and IoU) and
    ``per_image_maps.npz`` (display image, ground truth and predicted map per row, for
    ``tools/evaluation_figures.py``), and puts ``HEADLINE`` into ``engine.state.metrics``. In a distributed run
    rank 0 writes the samples of all ranks.

    Args:
        output_dir: folder of the report, created if missing.
        class_names: one name per class.
        prefix: prefix of the names put into ``engine.state.metrics``.
    """

    KEYS = ("image", "label", "seg_pred", "cls", "cls_pred", "cls_label")
    HEADLINE = ("lesion_dice", "lesion_iou", "pixel_accuracy", "mean_iou", "normal_fp_rate", "accuracy")
    HEADLINE += ("macro_precision", "macro_recall", "macro_f1", "macro_auc")

    def __init__(self, output_dir: str, class_names: Sequence[str] = CLASS_NAMES, prefix: str = "") -> None:
        self.output_dir = str(output_dir)
        self.class_names = tuple(class_names)
        self.prefix = prefix
        self.records: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        """Register the handler on ``engine`` (once)."""
        if not engine.has_event_handler(self.epoch_completed, Events.EPOCH_COMPLETED):
            engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
            engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def epoch_started(self, engine: Engine) -> None:
        """Forget the samples of the previous epoch."""
        self.records = []

    def iteration_completed(self, engine: Engine) -> None:
        """Keep what the report needs of each sample."""
        output = engine.state.output
        for item in decollate_batch(dict(output)) if isinstance(output, dict) else output:
            name = getattr(item["image"], "meta", {}).get("filename_or_obj")
            item = {key: torch.as_tensor(item[key]).detach().cpu() for key in self.KEYS}
            self.records.append(
                {
                    "name": os.path.basename(str(name)) if name else f"sample_{len(self.records)}",
                    "image": display_image(item["image"].float().mean(0).numpy()),
                    **{key: item[key].round()[0].T.to(torch.uint8).numpy() for key in ("label", "seg_pred")},
                    "prob": item["cls"].double().flatten().numpy(),
                    "cls_pred": int(_class_indices([item["cls_pred"]])[0]),
                    "cls_label": int(_class_indices([item["cls_label"]])[0]),
                }
            )

    def epoch_completed(self, engine: Engine) -> None:
        """Compute the metrics of the epoch, write the report and update ``engine.state.metrics``."""
        records = self.records
        if idist.get_world_size() > 1:
            records = [record for rank_records in idist.all_gather(records) for record in rank_records]
        if not records:
            logger.warning("EvaluationReport: no samples were seen, nothing written.")
            return
        segmentation = segmentation_metrics([r["seg_pred"] for r in records], [r["label"] for r in records])
        per_image = segmentation.pop("per_image")
        classes = ([r[key] for r in records] for key in ("prob", "cls_pred", "cls_label"))
        classification = classification_metrics(*classes, self.class_names)
        values = {**segmentation, "normal_fp_rate": segmentation["normal_false_positive_rate"], **classification}
        headline = {name: values[name] for name in self.HEADLINE}
        engine.state.metrics.update({f"{self.prefix}{name}": value for name, value in headline.items()})
        if idist.get_rank() != 0:
            return
        summary = {"segmentation": segmentation, "classification": classification, "num_images": len(records),
                   "num_lesion_images": segmentation["num_lesion_images"]}  # fmt: skip
        text = json.dumps(json.loads(json.dumps(summary), parse_constant=lambda _: None), indent=2)
        atomic_write(os.path.join(self.output_dir, "metrics.json"), lambda path: Path(path).write_text(text))
        rows = [
            {"filename": r["name"], "true_class": self.class_names[r["cls_label"]],
             "pred_class": self.class_names[r["cls_pred"]],
             **{f"prob_{name}": f"{p:.6f}" for name, p in zip(self.class_names, r["prob"])},
             "lesion_dice": f"{dice:.6f}", "lesion_iou": f"{iou:.6f}"}
            for r, dice, iou in zip(records, per_image["lesion_dice"], per_image["lesion_iou"])
        ]  # fmt: skip
        write_table(os.path.join(self.output_dir, "per_image.csv"), rows)
        maps = {f"{key}_{i}": r[key] for i, r in enumerate(records) for key in ("image", "label", "seg_pred")}
        atomic_write(os.path.join(self.output_dir, "per_image_maps.npz"), lambda tmp: np.savez_compressed(tmp, **maps))
        logger.info("Evaluation of %d images written to %s: %s", len(records), self.output_dir, headline)
