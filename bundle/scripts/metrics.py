"""
Evaluation metrics, ignite metrics and a report handler for breast ultrasound lesion segmentation
and normal / benign / malignant classification.

Conventions:
    - class indices: 0 normal, 1 benign, 2 malignant;
    - segmentation maps use the same values: 0 background, 1 benign lesion, 2 malignant lesion
      (a normal image has an all-zero map); the *lesion* mask of a map is ``map > 0``.

Lesion Dice / IoU convention:
    the per-image lesion Dice (IoU) compares the lesion masks of the prediction and the ground truth.
    When both masks are empty (a normal image correctly predicted lesion-free) the score is defined as 1,
    when only one of them is empty it is 0. The headline ``lesion_dice`` / ``lesion_iou`` is the mean of the
    per-image scores over the images whose ground truth HAS a lesion (benign or malignant) only, so that normal
    images neither inflate nor deflate it; false positives on normal images are reported separately as
    ``normal_false_positive_rate``.

This module is imported as ``scripts.metrics`` from the bundle root and must not import other project files.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from ignite.exceptions import NotComputableError
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce
from monai.data import decollate_batch
from monai.handlers.utils import from_engine
from monai.metrics import compute_confusion_matrix_metric, compute_dice, compute_iou, compute_roc_auc
from monai.visualize import blend_images

from .common import CLASS_NAMES, LESION_COLOURS, atomic_write

__all__ = [
    "CLASS_NAMES",
    "SEG_CLASS_NAMES",
    "ClassificationF1",
    "EvaluationReport",
    "LesionDice",
    "classification_metrics",
    "confusion_matrix",
    "lesion_dice_iou",
    "per_image_lesion_scores",
    "pixel_confusion_matrix",
    "precision_recall_f1",
    "roc_curve",
    "segmentation_metrics",
]

SEG_CLASS_NAMES: tuple[str, ...] = ("background", "benign", "malignant")

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------
# input helpers
# --------------------------------------------------------------------------------------------------------------


def _as_tensor(x: Any) -> torch.Tensor:
    """Convert a tensor / MetaTensor / array / number into a plain ``torch.Tensor`` (device kept)."""
    if isinstance(x, torch.Tensor):
        return x.as_tensor() if hasattr(x, "as_tensor") else x
    return torch.as_tensor(np.asarray(x))


def _iter_maps(maps: Any) -> list[torch.Tensor]:
    """Split a collection of label maps into a list of per-image maps.

    Args:
        maps: a sequence of per-image maps (each ``(1, H, W)`` or ``(H, W)``), or one tensor/array
            ``(N, 1, H, W)`` / ``(N, H, W)`` (a batch) or ``(H, W)`` (a single image).

    """
    if isinstance(maps, (list, tuple)):
        return [_as_tensor(m) for m in maps]
    t = _as_tensor(maps)
    if t.ndim == 2:
        return [t]
    if t.ndim in (3, 4):
        return list(t)
    raise ValueError(f"expected label maps shaped (N, 1, H, W), (N, H, W) or (H, W), got {tuple(t.shape)}.")


def _as_index_vector(x: Any) -> torch.Tensor:
    """Convert class predictions or labels into a 1-D ``int64`` CPU tensor of class indices.

    Args:
        x: a sequence with one entry per sample (a number, a 0-d or ``(1,)`` tensor holding the index, or a
            ``(C,)`` vector of scores / one-hot values that is arg-maxed), or one tensor/array: 0-d (one sample),
            ``(N,)`` or ``(N, 1)`` (indices) or ``(N, C)`` with ``C > 1`` (scores / one-hot, arg-maxed).

    """
    if isinstance(x, (list, tuple)):
        out = []
        for item in x:
            t = _as_tensor(item).detach().flatten()
            out.append(t.argmax() if t.numel() > 1 else t[0])
        if not out:
            return torch.zeros(0, dtype=torch.int64)
        return torch.stack([torch.round(o.float()).long().cpu() for o in out])
    t = _as_tensor(x).detach().cpu()
    if t.ndim == 0:
        t = t.reshape(1)
    elif t.ndim == 2:
        t = t.argmax(dim=1) if t.shape[1] > 1 else t[:, 0]
    elif t.ndim != 1:
        raise ValueError(f"expected class indices shaped (N,), (N, 1) or scores (N, C), got {tuple(t.shape)}.")
    return torch.round(t.float()).long()


def _as_prob_matrix(x: Any) -> torch.Tensor:
    """Stack per-sample ``(C,)`` probability vectors (or take an ``(N, C)`` array) into a float64 ``(N, C)`` tensor."""
    if isinstance(x, (list, tuple)):
        t = torch.stack([_as_tensor(p).detach().cpu().double().flatten() for p in x])
    else:
        t = _as_tensor(x).detach().cpu().double()
    if t.ndim != 2:
        raise ValueError(f"expected probabilities shaped (N, C), got {tuple(t.shape)}.")
    return t


def _nanmean(values: Sequence[float] | np.ndarray) -> float:
    """Mean of the non-NaN values; NaN (without a warning) when there are none."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else float("nan")


# --------------------------------------------------------------------------------------------------------------
# segmentation
# --------------------------------------------------------------------------------------------------------------


def lesion_dice_iou(seg_pred: Any, label: Any) -> tuple[float, float]:
    """Dice and IoU between the lesion masks (``map > 0``) of one predicted and one ground-truth map.

    Both are computed with MONAI's ``compute_dice`` / ``compute_iou`` (``ignore_empty=False``), so an image whose
    ground truth and prediction are both empty scores 1 and an image where only one of them is empty scores 0.

    Args:
        seg_pred: predicted map of one image, ``(1, H, W)`` or ``(H, W)``, values 0/1/2 (or a binary mask).
        label: ground-truth map of the same shape.

    Returns:
        ``(dice, iou)`` as python floats.

    """
    p, y = _as_tensor(seg_pred), _as_tensor(label)
    if p.shape != y.shape:
        raise ValueError(f"seg_pred and label shapes differ: {tuple(p.shape)} vs {tuple(y.shape)}.")
    p = (p > 0).reshape(1, 1, -1).double()
    y = (y > 0).reshape(1, 1, -1).double().to(p.device)
    dice = compute_dice(p, y, include_background=True, ignore_empty=False)
    iou = compute_iou(p, y, include_background=True, ignore_empty=False)
    return float(dice.item()), float(iou.item())


def per_image_lesion_scores(seg_preds: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-image lesion Dice and IoU (see :func:`lesion_dice_iou`) and whether the ground truth has a lesion.

    Args:
        seg_preds: predicted maps, a sequence of ``(1, H, W)``/``(H, W)`` maps or an ``(N, [1,] H, W)`` array.
        labels: ground-truth maps in the same layout.

    Returns:
        ``(dice, iou, has_lesion)``: float64, float64 and bool arrays of length N.

    """
    preds, gts = _iter_maps(seg_preds), _iter_maps(labels)
    if len(preds) != len(gts):
        raise ValueError(f"got {len(preds)} predictions but {len(gts)} labels.")
    scores = [lesion_dice_iou(p, y) for p, y in zip(preds, gts)]
    dice = np.array([s[0] for s in scores], dtype=np.float64)
    iou = np.array([s[1] for s in scores], dtype=np.float64)
    has_lesion = np.array([bool((y > 0).any()) for y in gts], dtype=bool)
    return dice, iou, has_lesion


def pixel_confusion_matrix(seg_preds: Any, labels: Any, num_classes: int = 3) -> np.ndarray:
    """Pixel confusion matrix accumulated over all pixels of all images.

    Args:
        seg_preds: predicted maps (see :func:`per_image_lesion_scores`), integer values in ``[0, num_classes)``.
        labels: ground-truth maps in the same layout.
        num_classes: number of map values.

    Returns:
        ``(num_classes, num_classes)`` int64 array, rows = ground truth, columns = prediction.

    """
    preds, gts = _iter_maps(seg_preds), _iter_maps(labels)
    if len(preds) != len(gts):
        raise ValueError(f"got {len(preds)} predictions but {len(gts)} labels.")
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    for p, y in zip(preds, gts):
        if p.shape != y.shape:
            raise ValueError(f"seg_pred and label shapes differ: {tuple(p.shape)} vs {tuple(y.shape)}.")
        p_np = torch.round(p.detach().float()).long().cpu().numpy().ravel()
        y_np = torch.round(y.detach().float()).long().cpu().numpy().ravel()
        if p_np.size and (min(p_np.min(), y_np.min()) < 0 or max(p_np.max(), y_np.max()) >= num_classes):
            raise ValueError(f"map values must lie in [0, {num_classes}).")
        cm += np.bincount(y_np * num_classes + p_np, minlength=num_classes**2).reshape(num_classes, num_classes)
    return cm


def segmentation_metrics(seg_preds: Any, labels: Any) -> dict[str, float | int]:
    """Segmentation metrics of a set of images.

    Args:
        seg_preds: predicted maps (values 0 background, 1 benign, 2 malignant), a sequence of ``(1, H, W)`` or
            ``(H, W)`` maps, or an ``(N, [1,] H, W)`` array. Images may differ in size.
        labels: ground-truth maps in the same layout.

    Returns:
        a dict with

        - ``lesion_dice`` / ``lesion_iou``: mean per-image lesion Dice / IoU over the images whose ground truth
          has a lesion (NaN if there are none); ``lesion_dice_std`` / ``lesion_iou_std``: their population std;
        - ``lesion_dice_all_images``: mean per-image lesion Dice over all images (normal images count 1 when the
          prediction is empty, 0 otherwise);
        - ``pixel_accuracy`` and ``mean_iou``: the binary lesion-vs-background problem accumulated over all
          pixels of all images; ``mean_iou`` is the mean of the background IoU and the lesion IoU
          (``background_iou``, ``lesion_pixel_iou``), as quoted by the original BUSI notebooks;
        - ``dice_background``, ``dice_benign``, ``dice_malignant``: per-class Dice on the 3-valued maps accumulated
          over all pixels of all images (NaN for a class absent from both prediction and ground truth);
        - ``normal_false_positive_rate``: fraction of normal images (all-zero ground truth) whose prediction has
          any lesion pixel (NaN if there are no normal images);
        - ``num_images``, ``num_lesion_images``, ``num_normal_images``.

    """
    dice, iou, has_lesion = per_image_lesion_scores(seg_preds, labels)
    cm = pixel_confusion_matrix(seg_preds, labels, num_classes=3)

    # binary lesion-vs-background confusion: [[tn, fp], [fn, tp]]
    tn, fp = cm[0, 0], cm[0, 1:].sum()
    fn, tp = cm[1:, 0].sum(), cm[1:, 1:].sum()
    total = cm.sum()
    bg_iou = tn / (tn + fp + fn) if (tn + fp + fn) else float("nan")
    fg_iou = tp / (tp + fp + fn) if (tp + fp + fn) else float("nan")

    out: dict[str, float | int] = {
        "lesion_dice": _nanmean(dice[has_lesion]),
        "lesion_dice_std": float(dice[has_lesion].std()) if has_lesion.any() else float("nan"),
        "lesion_iou": _nanmean(iou[has_lesion]),
        "lesion_iou_std": float(iou[has_lesion].std()) if has_lesion.any() else float("nan"),
        "lesion_dice_all_images": _nanmean(dice),
        "pixel_accuracy": float((tn + tp) / total) if total else float("nan"),
        "mean_iou": _nanmean([bg_iou, fg_iou]),
        "background_iou": float(bg_iou),
        "lesion_pixel_iou": float(fg_iou),
    }
    for c, name in enumerate(SEG_CLASS_NAMES):
        denom = cm[c, :].sum() + cm[:, c].sum()
        out[f"dice_{name}"] = float(2 * cm[c, c] / denom) if denom else float("nan")

    normal = ~has_lesion
    pred_has_lesion = np.array([bool((p > 0).any()) for p in _iter_maps(seg_preds)], dtype=bool)
    out["normal_false_positive_rate"] = float(pred_has_lesion[normal].mean()) if normal.any() else float("nan")
    out["num_images"] = len(dice)
    out["num_lesion_images"] = int(has_lesion.sum())
    out["num_normal_images"] = int(normal.sum())
    return out


# --------------------------------------------------------------------------------------------------------------
# classification
# --------------------------------------------------------------------------------------------------------------


def confusion_matrix(preds: Any, labels: Any, num_classes: int = 3) -> np.ndarray:
    """Multi-class confusion matrix.

    Args:
        preds: predicted class indices (see :func:`classification_metrics` for accepted layouts).
        labels: true class indices.
        num_classes: number of classes.

    Returns:
        ``(num_classes, num_classes)`` int64 array, rows = true class, columns = predicted class.

    """
    p, y = _as_index_vector(preds), _as_index_vector(labels)
    if p.numel() != y.numel():
        raise ValueError(f"got {p.numel()} predictions but {y.numel()} labels.")
    if p.numel() and (min(p.min(), y.min()) < 0 or max(p.max(), y.max()) >= num_classes):
        raise ValueError(f"class indices must lie in [0, {num_classes}).")
    cm = torch.bincount(y * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)
    return cm.numpy().astype(np.int64)


def precision_recall_f1(cm: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall and F1 from a multi-class confusion matrix (rows true, columns predicted).

    The per-class one-vs-rest counts are passed to MONAI's ``compute_confusion_matrix_metric``. Zero-division
    convention (as scikit-learn's ``zero_division=0`` with ``labels=None``): a class that occurs in the labels or
    in the predictions gets 0 for an undefined precision or recall; a class that occurs in neither gets NaN for
    all three, and is therefore left out of NaN-ignoring macro averages.

    Returns:
        ``(precision, recall, f1)`` float64 arrays of length C.

    """
    cm_t = torch.as_tensor(np.asarray(cm), dtype=torch.float64)
    tp = cm_t.diag()
    fp = cm_t.sum(dim=0) - tp
    fn = cm_t.sum(dim=1) - tp
    tn = cm_t.sum() - tp - fp - fn
    counts = torch.stack([tp, fp, tn, fn], dim=-1)  # MONAI's (tp, fp, tn, fn) layout, shape (C, 4)
    present = ((tp + fp + fn) > 0).numpy()
    results = []
    for name in ("precision", "recall", "f1 score"):
        values = compute_confusion_matrix_metric(name, counts).numpy().astype(np.float64)
        values = np.where(present, np.nan_to_num(values, nan=0.0), np.nan)
        results.append(values)
    return results[0], results[1], results[2]


def roc_curve(scores: Any, targets: Any) -> tuple[np.ndarray, np.ndarray]:
    """Binary ROC curve points (MONAI computes the AUC only, not the curve).

    Args:
        scores: ``(N,)`` scores, higher = more positive.
        targets: ``(N,)`` binary targets.

    Returns:
        ``(fpr, tpr)`` arrays starting at ``(0, 0)`` and ending at ``(1, 1)``, one point per distinct threshold.
        Empty arrays when the targets are all positive or all negative.

    """
    s = np.asarray(_as_tensor(scores).detach().cpu().double()).ravel()
    t = np.asarray(_as_tensor(targets).detach().cpu()).ravel() > 0
    n_pos, n_neg = int(t.sum()), int((~t).sum())
    if n_pos == 0 or n_neg == 0:
        return np.zeros(0), np.zeros(0)
    order = np.argsort(-s, kind="mergesort")
    s, t = s[order], t[order]
    last_of_threshold = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
    tps = np.cumsum(t)[last_of_threshold]
    fps = (last_of_threshold + 1) - tps
    return np.r_[0.0, fps / n_neg], np.r_[0.0, tps / n_pos]


def classification_metrics(
    probs: Any, preds: Any, labels: Any, class_names: Sequence[str] = CLASS_NAMES
) -> dict[str, Any]:
    """Classification metrics of a set of samples.

    Args:
        probs: class probabilities, a sequence of ``(C,)`` vectors or an ``(N, C)`` array.
        preds: predicted class indices, a sequence of numbers / 0-d / ``(1,)`` tensors or an ``(N,)`` array;
            ``None`` uses ``argmax(probs)``.
        labels: true class indices in the same layouts as ``preds``.
        class_names: one name per class, ``C`` entries.

    Returns:
        a dict with ``accuracy``; ``macro_precision``, ``macro_recall``, ``macro_f1`` (NaN-ignoring means of the
        per-class values, see :func:`precision_recall_f1`); ``macro_auc``: mean of the one-vs-rest ROC AUCs of MONAI's
        ``compute_roc_auc`` over the classes where it is defined (a class absent from the labels, or the only class
        present, has NaN AUC); ``per_class``: ``{name: {"precision", "recall", "f1", "support", "auc"}}``;
        ``confusion_matrix``: nested list, rows = true class, columns = predicted class; ``class_names``;
        ``num_samples``.

    """
    num_classes = len(class_names)
    p_mat = _as_prob_matrix(probs)
    y = _as_index_vector(labels)
    pred = p_mat.argmax(dim=1) if preds is None else _as_index_vector(preds)
    if not (p_mat.shape[0] == y.numel() == pred.numel()):
        raise ValueError(f"got {p_mat.shape[0]} probabilities, {pred.numel()} predictions and {y.numel()} labels.")
    if p_mat.shape[1] != num_classes:
        raise ValueError(f"probabilities have {p_mat.shape[1]} columns but there are {num_classes} class names.")
    if y.numel() == 0:
        raise ValueError("no samples to evaluate.")

    cm = confusion_matrix(pred, y, num_classes)
    precision, recall, f1 = precision_recall_f1(cm)
    support = cm.sum(axis=1)

    onehot = F.one_hot(y, num_classes).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # compute_roc_auc warns and returns NaN for a class absent from the labels
        auc = np.asarray(compute_roc_auc(p_mat, onehot, average="none"), dtype=np.float64)

    return {
        "accuracy": float(np.trace(cm) / cm.sum()),
        "macro_precision": _nanmean(precision),
        "macro_recall": _nanmean(recall),
        "macro_f1": _nanmean(f1),
        "macro_auc": _nanmean(auc),
        "per_class": {
            name: {
                "precision": float(precision[c]),
                "recall": float(recall[c]),
                "f1": float(f1[c]),
                "support": int(support[c]),
                "auc": float(auc[c]),
            }
            for c, name in enumerate(class_names)
        },
        "confusion_matrix": cm.tolist(),
        "class_names": list(class_names),
        "num_samples": int(y.numel()),
    }


# --------------------------------------------------------------------------------------------------------------
# ignite metrics
# --------------------------------------------------------------------------------------------------------------


class LesionDice(Metric):
    """Mean per-image lesion Dice over the images whose ground truth has a lesion (0.0 if there are none).

    Lesion masks are ``map > 0``; see :func:`lesion_dice_iou`. Normal images (empty ground truth) are skipped.

    Args:
        output_transform: maps ``engine.state.output`` to ``(seg_preds, labels)``; defaults to
            ``monai.handlers.from_engine(["seg_pred", "label"])``, which suits a decollated evaluator output.
        device: device of the accumulators.
        skip_unrolling: passed to ``ignite.metrics.Metric``; ``True`` hands the whole per-iteration lists to
            :meth:`update` instead of one sample at a time (both work).

    Example::

        LesionDice(output_transform=from_engine(["seg_pred", "label"])).attach(evaluator, "lesion_dice")

    """

    def __init__(
        self,
        output_transform: Callable | None = None,
        device: str | torch.device = "cpu",
        skip_unrolling: bool = True,
    ) -> None:
        self._sum: torch.Tensor
        self._count: torch.Tensor
        if output_transform is None:
            output_transform = from_engine(["seg_pred", "label"])
        super().__init__(output_transform=output_transform, device=device, skip_unrolling=skip_unrolling)

    @reinit__is_reduced
    def reset(self) -> None:
        self._sum = torch.tensor(0.0, dtype=torch.float64, device=self._device)
        self._count = torch.tensor(0.0, dtype=torch.float64, device=self._device)

    @reinit__is_reduced
    def update(self, output: Sequence[Any]) -> None:
        seg_preds, labels = output[0], output[1]
        preds, gts = _iter_maps(seg_preds), _iter_maps(labels)
        if len(preds) != len(gts):
            raise ValueError(f"got {len(preds)} predictions but {len(gts)} labels.")
        for p, y in zip(preds, gts):
            if not bool((y > 0).any()):
                continue
            self._sum += lesion_dice_iou(p, y)[0]
            self._count += 1

    @sync_all_reduce("_sum", "_count")
    def compute(self) -> float:
        if self._count.item() == 0:
            return 0.0
        return float((self._sum / self._count).item())


class ClassificationF1(Metric):
    """Macro F1 score of a multi-class classifier, accumulated through a confusion matrix.

    Per-class F1 follows :func:`precision_recall_f1` (a class absent from both labels and predictions is left out
    of the macro average).

    Args:
        output_transform: maps ``engine.state.output`` to ``(preds, labels)``; defaults to
            ``monai.handlers.from_engine(["cls_pred", "cls_label"])``. Predictions and labels may be class
            indices (numbers, 0-d or ``(1,)`` tensors per sample, or ``(N,)`` / ``(N, 1)`` tensors); per-sample
            ``(C,)`` or batched ``(N, C)`` scores / one-hot vectors are arg-maxed.
        num_classes: number of classes.
        device: device of the accumulator.
        skip_unrolling: see :class:`LesionDice`.

    Raises:
        NotComputableError: from :meth:`compute` when no sample was seen.

    """

    def __init__(
        self,
        output_transform: Callable | None = None,
        num_classes: int = 3,
        device: str | torch.device = "cpu",
        skip_unrolling: bool = True,
    ) -> None:
        self.num_classes = num_classes
        self._cm: torch.Tensor
        if output_transform is None:
            output_transform = from_engine(["cls_pred", "cls_label"])
        super().__init__(output_transform=output_transform, device=device, skip_unrolling=skip_unrolling)

    @reinit__is_reduced
    def reset(self) -> None:
        self._cm = torch.zeros(self.num_classes, self.num_classes, dtype=torch.float64, device=self._device)

    @reinit__is_reduced
    def update(self, output: Sequence[Any]) -> None:
        cm = confusion_matrix(output[0], output[1], self.num_classes)
        self._cm += torch.as_tensor(cm, dtype=torch.float64, device=self._device)

    @sync_all_reduce("_cm")
    def compute(self) -> float:
        if self._cm.sum().item() == 0:
            raise NotComputableError("ClassificationF1 must have at least one example before it can be computed.")
        return _nanmean(precision_recall_f1(self._cm.cpu())[2])


# --------------------------------------------------------------------------------------------------------------
# report handler
# --------------------------------------------------------------------------------------------------------------

# overlay colours for map values 0 (transparent), 1 benign, 2 malignant; see ``_overlay``
_OVERLAY_COLORS = [(0.0, 0.0, 0.0)] + [tuple(c / 255 for c in LESION_COLOURS[v]) for v in (1, 2)]
# ROC curve colours of the classes normal, benign, malignant (benign green and malignant red as in the overlays)
_ROC_COLORS = ("tab:blue", "tab:green", "tab:red")


def _json_safe(obj: Any) -> Any:
    """Recursively convert numpy/torch scalars to python and NaN/inf to ``None``."""
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return _json_safe(np.asarray(obj.detach().cpu() if isinstance(obj, torch.Tensor) else obj).tolist())
    if isinstance(obj, (np.integer, bool, np.bool_)):
        return obj.item() if isinstance(obj, np.generic) else obj
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def _atomic_write(path: str, write: Callable[[Any], None], binary: bool = False) -> None:
    """Write a file atomically (:py:func:`scripts.io.atomic_write`) through ``write(open_file)``."""

    def write_file(temporary: str) -> None:
        with open(temporary, "wb") if binary else open(temporary, "w", newline="", encoding="utf-8") as stream:
            write(stream)

    atomic_write(path, write_file)


def _save_figure(fig: Any, path: str, dpi: int = 100) -> None:
    """Render a ``matplotlib.figure.Figure`` to PNG (Agg canvas) and write it atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    _atomic_write(path, lambda f: f.write(buf.getvalue()), binary=True)


def _display_image(image: Any, max_size: int) -> np.ndarray:
    """Percentile-rescale (1st-99th) an image to uint8 and area-downsample it to at most ``max_size`` pixels a side."""
    t = _as_tensor(image).detach().float().cpu()
    if t.ndim == 3:  # (C, H, W) -> mean over channels
        t = t.mean(dim=0)
    if t.ndim != 2:
        raise ValueError(f"expected an image shaped (C, H, W) or (H, W), got {tuple(t.shape)}.")
    h, w = t.shape
    scale = min(1.0, max_size / max(h, w))
    if scale < 1.0:
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        t = F.interpolate(t[None, None], size=size, mode="area")[0, 0]
    lo, hi = np.percentile(t.numpy(), (1, 99))
    t = ((t - lo) / (hi - lo)).clamp(0, 1) if hi > lo else torch.zeros_like(t)
    return (t * 255).round().to(torch.uint8).numpy()


def _map_uint8(x: Any) -> np.ndarray:
    """A label map as a 2-D uint8 array."""
    t = _as_tensor(x).detach()
    if t.ndim == 3:
        t = t[0]
    return torch.round(t.float()).to(torch.uint8).cpu().numpy()


def _overlay(display: np.ndarray, seg: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """RGB ``(h, w, 3)`` blend of a uint8 display image and a 0/1/2 map (resized nearest), by ``blend_images``."""
    from matplotlib.colors import ListedColormap

    h, w = display.shape
    seg_t = torch.as_tensor(seg, dtype=torch.float32)[None, None]
    if seg_t.shape[-2:] != (h, w):
        seg_t = F.interpolate(seg_t, size=(h, w), mode="nearest")
    # values 0/1/2 -> 0/0.5/1 -> colours 0/1/2 of a 3-entry colormap; rescale_arrays=False keeps the colours fixed
    blended = blend_images(
        image=display[None].astype(np.float32) / 255.0,
        label=seg_t[0].numpy() / 2.0,
        alpha=alpha,
        cmap=ListedColormap(_OVERLAY_COLORS),  # type: ignore[arg-type]  # matplotlib accepts a Colormap object
        rescale_arrays=False,
        transparent_background=True,
    )
    return np.clip(np.moveaxis(np.asarray(blended), 0, -1), 0.0, 1.0)


class EvaluationReport:
    """Ignite handler writing an evaluation report of a segmentation + classification evaluator.

    It expects ``engine.state.output`` to be a list of per-sample dicts (decollated evaluator output) with keys
    ``image``, ``label``, ``seg_pred``, ``cls`` (class probabilities), ``cls_pred``, ``cls_label`` (a dict of
    batched values is decollated first). Per iteration it keeps, per sample, the maps as uint8, a
    percentile-rescaled uint8 display image downsampled to ``display_size``, the probabilities, the classes and
    the file name. At EPOCH_COMPLETED it computes :func:`segmentation_metrics` and :func:`classification_metrics`
    over the epoch, writes into
    ``output_dir`` (each file atomically)

    - ``metrics.json``: ``{"segmentation": {...}, "classification": {...}, "num_images": n, "num_lesion_images": m}``
      (NaN written as ``null``);
    - ``per_image.csv``: file name, true/predicted class, class probabilities, lesion Dice and IoU;
    - ``confusion_matrix.png`` (counts and row-normalised), ``roc_curves.png`` (one-vs-rest, AUC in the legend),
      ``overlays.png`` (rows: image / ground truth / prediction for the best and worst lesion-Dice images and
      normal images, normals with the largest predicted lesion area first; benign green, malignant red);

    and puts the headline numbers into ``engine.state.metrics`` as ``f"{prefix}{name}"`` for ``name`` in
    ``lesion_dice``, ``lesion_iou``, ``pixel_accuracy``, ``mean_iou``, ``normal_fp_rate``, ``accuracy``,
    ``macro_precision``, ``macro_recall``, ``macro_f1``, ``macro_auc``.

    Usage in a bundle config (evaluator ``val_handlers``)::

        {"_target_": "scripts.metrics.EvaluationReport", "output_dir": "@output_dir"}

    Args:
        output_dir: folder for the report files, created if missing; the files are overwritten every epoch.
        class_names: one name per class.
        num_overlays: number of rows of ``overlays.png`` (0 disables the figure).
        prefix: prefix of the names put into ``engine.state.metrics`` (not of the file names).
        display_size: maximal side of the stored display images.
        output_transform: applied to ``engine.state.output`` before reading it.

    Note:
        In a distributed run the per-sample records are gathered from all ranks and only rank 0 writes files
        (samples padded by a distributed sampler are counted twice). This path is untested here.

    """

    def __init__(
        self,
        output_dir: str,
        class_names: Sequence[str] = CLASS_NAMES,
        num_overlays: int = 8,
        prefix: str = "",
        display_size: int = 128,
        output_transform: Callable = lambda x: x,
    ) -> None:
        self.output_dir = str(output_dir)
        self.class_names = tuple(class_names)
        self.num_overlays = int(num_overlays)
        self.prefix = prefix
        self.display_size = int(display_size)
        self.output_transform = output_transform
        self._records: list[dict[str, Any]] = []
        self.logger = logger

    def attach(self, engine: Engine) -> None:
        """Register the handler's event handlers on ``engine``."""
        if not engine.has_event_handler(self.epoch_started, Events.EPOCH_STARTED):
            engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        if not engine.has_event_handler(self.iteration_completed, Events.ITERATION_COMPLETED):
            engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        if not engine.has_event_handler(self.epoch_completed, Events.EPOCH_COMPLETED):
            engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def reset(self) -> None:
        """Drop the stored per-sample records."""
        self._records = []

    def epoch_started(self, engine: Engine) -> None:
        """Start a new epoch with no stored samples."""
        self.reset()

    def iteration_completed(self, engine: Engine) -> None:
        """Store what the report needs from each sample of ``engine.state.output``."""
        output = self.output_transform(engine.state.output)
        if isinstance(output, Mapping):
            output = decollate_batch(dict(output))
        for item in output:
            self._records.append(self._record(item, index=len(self._records)))

    def _record(self, item: Mapping[str, Any], index: int) -> dict[str, Any]:
        image = item["image"]
        meta = getattr(image, "meta", None) or item.get("image_meta_dict", {})
        name = meta.get("filename_or_obj", None) if isinstance(meta, Mapping) else None
        name = os.path.basename(str(name)) if name else f"sample_{index}"
        return {
            "name": name,
            "label": _map_uint8(item["label"]),
            "seg_pred": _map_uint8(item["seg_pred"]),
            "display": _display_image(image, self.display_size),
            "prob": _as_tensor(item["cls"]).detach().cpu().double().flatten().numpy(),
            "cls_pred": int(_as_index_vector([item["cls_pred"]])[0]),
            "cls_label": int(_as_index_vector([item["cls_label"]])[0]),
        }

    def epoch_completed(self, engine: Engine) -> None:
        """Compute the metrics of the epoch, write the report and update ``engine.state.metrics``."""
        records = self._records
        if idist.get_world_size() > 1:
            records = [r for rank_records in idist.all_gather(records) for r in rank_records]
        if not records:
            self.logger.warning("EvaluationReport: no samples were seen, nothing written.")
            return

        labels = [r["label"] for r in records]
        seg_preds = [r["seg_pred"] for r in records]
        seg = segmentation_metrics(seg_preds, labels)
        cls = classification_metrics(
            [r["prob"] for r in records],
            [r["cls_pred"] for r in records],
            [r["cls_label"] for r in records],
            self.class_names,
        )
        dice, iou, has_lesion = per_image_lesion_scores(seg_preds, labels)

        headline = {
            "lesion_dice": seg["lesion_dice"],
            "lesion_iou": seg["lesion_iou"],
            "pixel_accuracy": seg["pixel_accuracy"],
            "mean_iou": seg["mean_iou"],
            "normal_fp_rate": seg["normal_false_positive_rate"],
            "accuracy": cls["accuracy"],
            "macro_precision": cls["macro_precision"],
            "macro_recall": cls["macro_recall"],
            "macro_f1": cls["macro_f1"],
            "macro_auc": cls["macro_auc"],
        }
        for k, v in headline.items():
            engine.state.metrics[f"{self.prefix}{k}"] = v

        if idist.get_rank() != 0:
            return
        os.makedirs(self.output_dir, exist_ok=True)
        summary = {
            "segmentation": seg,
            "classification": cls,
            "num_images": len(records),
            "num_lesion_images": int(has_lesion.sum()),
        }
        _atomic_write(
            os.path.join(self.output_dir, "metrics.json"),
            lambda f: json.dump(_json_safe(summary), f, indent=2, allow_nan=False),
        )
        self._write_csv(records, dice, iou)
        self._plot_confusion(np.asarray(cls["confusion_matrix"]))
        self._plot_roc(records, cls)
        if self.num_overlays > 0:
            self._plot_overlays(records, dice, has_lesion)
        self.logger.info(
            "EvaluationReport (%d images) written to %s: %s",
            len(records),
            self.output_dir,
            ", ".join(f"{k}={v:.4f}" for k, v in headline.items()),
        )

    def _write_csv(self, records: list[dict[str, Any]], dice: np.ndarray, iou: np.ndarray) -> None:
        def write(f: Any) -> None:
            writer = csv.writer(f)
            writer.writerow(
                ["filename", "true_class", "pred_class"]
                + [f"prob_{n}" for n in self.class_names]
                + ["lesion_dice", "lesion_iou"]
            )
            for r, d, i in zip(records, dice, iou):
                writer.writerow(
                    [r["name"], self.class_names[r["cls_label"]], self.class_names[r["cls_pred"]]]
                    + [f"{p:.6f}" for p in r["prob"]]
                    + [f"{d:.6f}", f"{i:.6f}"]
                )

        _atomic_write(os.path.join(self.output_dir, "per_image.csv"), write)

    def _plot_confusion(self, cm: np.ndarray) -> None:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(10, 4.2))
        with np.errstate(invalid="ignore", divide="ignore"):
            norm = cm / cm.sum(axis=1, keepdims=True)
        n = len(self.class_names)
        for k, (data, title) in enumerate(((cm, "counts"), (norm, "row-normalised (recall)"))):
            ax = fig.add_subplot(1, 2, k + 1)
            ax.imshow(np.nan_to_num(data / max(cm.max(), 1) if k == 0 else data), cmap="Blues", vmin=0, vmax=1)
            for i in range(n):
                for j in range(n):
                    v = data[i, j]
                    text = f"{int(v)}" if k == 0 else ("-" if np.isnan(v) else f"{v:.2f}")
                    shade = 0.0 if np.isnan(v) else (v / max(cm.max(), 1) if k == 0 else v)
                    ax.text(j, i, text, ha="center", va="center", color="white" if shade > 0.5 else "black")
            ax.set_xticks(range(n), self.class_names)
            ax.set_yticks(range(n), self.class_names)
            ax.set_xlabel("predicted")
            ax.set_ylabel("true")
            ax.set_title(f"Confusion matrix, {title}")
        fig.tight_layout()
        _save_figure(fig, os.path.join(self.output_dir, "confusion_matrix.png"))

    def _plot_roc(self, records: list[dict[str, Any]], cls: dict[str, Any]) -> None:
        from matplotlib.figure import Figure

        probs = np.stack([r["prob"] for r in records])
        labels = np.array([r["cls_label"] for r in records])
        fig = Figure(figsize=(5.5, 5))
        ax = fig.add_subplot(1, 1, 1)
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
        for c, name in enumerate(self.class_names):
            auc = cls["per_class"][name]["auc"]
            fpr, tpr = roc_curve(probs[:, c], labels == c)
            color = _ROC_COLORS[c] if c < len(_ROC_COLORS) else f"C{c}"
            if fpr.size and not math.isnan(auc):
                ax.plot(fpr, tpr, color=color, linewidth=1.8, label=f"{name} (AUC = {auc:.3f})")
            else:
                ax.plot([], [], color=color, label=f"{name} (AUC n/a)")
        auc_text = "n/a" if math.isnan(cls["macro_auc"]) else f"{cls['macro_auc']:.3f}"
        ax.set_title(f"One-vs-rest ROC (macro AUC = {auc_text})")
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.set_aspect("equal")
        ax.legend(loc="lower right")
        fig.tight_layout()
        _save_figure(fig, os.path.join(self.output_dir, "roc_curves.png"))

    def _select_overlays(self, records: list[dict[str, Any]], dice: np.ndarray, has_lesion: np.ndarray) -> list[int]:
        """Best and worst lesion-Dice images plus normals (largest predicted lesion area first)."""
        n = min(self.num_overlays, len(records))
        lesion = [int(i) for i in np.argsort(-dice, kind="stable") if has_lesion[i]]
        area = [int((r["seg_pred"] > 0).sum()) for r in records]
        normal = sorted((i for i in range(len(records)) if not has_lesion[i]), key=lambda i: (-area[i], i))
        n_normal = min(len(normal), max(1, n // 4))
        n_lesion = min(len(lesion), n - n_normal)
        n_normal = min(len(normal), n - n_lesion)  # more normals when there are few lesion images
        n_best = (n_lesion + 1) // 2
        chosen = lesion[:n_best] + lesion[len(lesion) - (n_lesion - n_best) :]
        return chosen + normal[:n_normal]

    def _plot_overlays(self, records: list[dict[str, Any]], dice: np.ndarray, has_lesion: np.ndarray) -> None:
        from matplotlib.figure import Figure

        rows = self._select_overlays(records, dice, has_lesion)
        if not rows:
            return
        fig = Figure(figsize=(9, 3.1 * len(rows)))
        for row, i in enumerate(rows):
            r = records[i]
            true_name, pred_name = self.class_names[r["cls_label"]], self.class_names[r["cls_pred"]]
            panels = (
                # MONAI arrays put the image's x axis first: transpose to rows-first for display
                (np.repeat(r["display"].T[..., None] / 255.0, 3, axis=-1), f"{r['name']}"),
                (_overlay(r["display"].T, r["label"].T), f"ground truth: {true_name}"),
                (_overlay(r["display"].T, r["seg_pred"].T), f"pred: {pred_name}, Dice {dice[i]:.3f}"),
            )
            for col, (img, title) in enumerate(panels):
                ax = fig.add_subplot(len(rows), 3, row * 3 + col + 1)
                ax.imshow(img, interpolation="nearest")
                ax.set_title(title, fontsize=9)
                ax.axis("off")
        fig.suptitle("Overlays (benign = green, malignant = red)", fontsize=11)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (3.1 * len(rows))))
        _save_figure(fig, os.path.join(self.output_dir, "overlays.png"))
