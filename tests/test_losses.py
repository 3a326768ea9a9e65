"""Joint loss: values computed by hand, weighting and the class read from the label map."""

from __future__ import annotations

import math

import pytest
import torch

from scripts.losses import MultiTaskLoss
from scripts.transforms import class_from_label_map


def _label_maps():
    label = torch.zeros(3, 1, 8, 8)
    label[1, 0, 2:5, 2:5] = 1  # benign
    label[2, 0, 3:6, 3:7] = 2  # malignant; image 0 is normal
    return label


def test_class_from_label_map():
    assert class_from_label_map(_label_maps()).tolist() == [0, 1, 2]
    assert int(class_from_label_map(_label_maps()[2])) == 2


def test_value_computed_by_hand():
    """Uniform logits on one 2x2 map [[0, 1], [0, 2]] (class 2): every probability is 1/3."""
    outputs = {"pred": torch.zeros(1, 3, 2, 2), "cls": torch.zeros(1, 3)}
    label = torch.tensor([[[[0, 1], [0, 2]]]])
    # Dice of background (2 pixels), benign and malignant (1 pixel each): 2 * intersection / (sum p + sum y)
    dice = [2 * (2 / 3) / (4 / 3 + 2), 2 * (1 / 3) / (4 / 3 + 1), 2 * (1 / 3) / (4 / 3 + 1)]
    dice_ce = (1 - sum(dice) / 3) + math.log(3)  # Dice loss + pixel cross-entropy
    assert float(MultiTaskLoss(alpha=1.0, beta=0.0)(outputs, label)) == pytest.approx(dice_ce, abs=1e-4)
    assert float(MultiTaskLoss(alpha=0.0, beta=1.0)(outputs, label)) == pytest.approx(math.log(3), abs=1e-6)
    both = MultiTaskLoss(alpha=1.0, beta=0.5)(outputs, label)
    assert float(both) == pytest.approx(dice_ce + 0.5 * math.log(3), abs=1e-4)


def test_alpha_beta_weight_the_two_terms():
    torch.manual_seed(0)
    outputs = {"pred": torch.randn(3, 3, 8, 8), "cls": torch.randn(3, 3)}
    label = _label_maps()
    seg_only = MultiTaskLoss(alpha=1.0, beta=0.0)(outputs, label)
    cls_only = MultiTaskLoss(alpha=0.0, beta=1.0)(outputs, label)
    expected_cls = torch.nn.functional.cross_entropy(outputs["cls"], torch.tensor([0, 1, 2]))
    torch.testing.assert_close(cls_only, expected_cls)
    torch.testing.assert_close(MultiTaskLoss(alpha=2.0, beta=0.5)(outputs, label), 2 * seg_only + 0.5 * cls_only)


def test_perfect_prediction_has_lower_loss():
    label = _label_maps()
    onehot = torch.nn.functional.one_hot(label[:, 0].long(), 3).permute(0, 3, 1, 2).float()
    perfect = {"pred": onehot * 20 - 10, "cls": torch.eye(3) * 20 - 10}
    wrong = {"pred": -perfect["pred"], "cls": -perfect["cls"]}
    loss = MultiTaskLoss()
    assert loss(perfect, label) < 0.1 < loss(wrong, label)


def test_class_weights():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, -1.0]])  # classes 0, 1, 2 of _label_maps
    outputs = {"pred": torch.zeros(3, 3, 8, 8), "cls": logits}
    per_image = [-math.log(math.exp(row[c]) / sum(math.exp(v) for v in row)) for c, row in enumerate(logits.tolist())]
    weights = [1.0, 1.0, 5.0]
    expected = sum(w * loss for w, loss in zip(weights, per_image)) / sum(weights)  # weighted mean over the batch
    weighted = MultiTaskLoss(alpha=0.0, beta=1.0, class_weights=weights)(outputs, _label_maps())
    assert float(weighted) == pytest.approx(expected, abs=1e-6)
    assert float(MultiTaskLoss(alpha=0.0, beta=1.0)(outputs, _label_maps())) == pytest.approx(sum(per_image) / 3)


def test_label_dtype_does_not_change_the_loss():
    torch.manual_seed(0)
    outputs = {"pred": torch.randn(3, 3, 8, 8), "cls": torch.randn(3, 3)}
    as_float = MultiTaskLoss()(outputs, _label_maps())
    torch.testing.assert_close(MultiTaskLoss()(outputs, _label_maps().to(torch.uint8)), as_float)
    assert torch.isfinite(as_float)
