"""Joint segmentation + classification loss on one class-coded label map."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.losses import DiceCELoss
from torch import nn

from .transforms import class_from_label_map

__all__ = ["MultiTaskLoss"]


class MultiTaskLoss(nn.Module):
    """``alpha * DiceCE(segmentation) + beta * CE(classification)``; the image class is the label map's largest
    value (0 normal, 1 benign, 2 malignant), so image + label map is all training needs, as in MONAI Label.

    Args:
        alpha, beta: weights of the segmentation and the classification loss.
        class_weights: optional weights of the classification cross-entropy, one per class.
        seg_loss: segmentation loss of ``(logits, label_map)``; by default DiceCE with batch-wise Dice, which stays
            stable for images without a lesion.
    """

    def __init__(
        self, alpha: float = 1.0, beta: float = 0.5, class_weights: Sequence[float] | None = None,
        seg_loss: nn.Module | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.alpha, self.beta = alpha, beta
        self.seg_loss = seg_loss or DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
        weight = None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32)
        self.cls_loss = nn.CrossEntropyLoss(weight=weight)

    def forward(self, outputs: dict[str, torch.Tensor], label: torch.Tensor) -> torch.Tensor:
        """The loss of network outputs ``{"pred": (B, 3, X, Y), "cls": (B, 3)}`` for label maps ``(B, 1, X, Y)``."""
        label = torch.as_tensor(label)
        loss = outputs["pred"].new_zeros(())
        if self.alpha:
            loss = loss + self.alpha * self.seg_loss(outputs["pred"], label)
        if self.beta:
            loss = loss + self.beta * self.cls_loss(outputs["cls"], class_from_label_map(label))
        return loss
