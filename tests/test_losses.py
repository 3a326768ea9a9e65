"""Joint loss: weighting and the class read from the label map."""

from __future__ import annotations

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
    outputs = {"pred": torch.zeros(3, 3, 8, 8), "cls": torch.randn(3, 3)}
    plain = MultiTaskLoss(alpha=0.0, beta=1.0)(outputs, _label_maps())
    weighted = MultiTaskLoss(alpha=0.0, beta=1.0, class_weights=[1.0, 1.0, 5.0])(outputs, _label_maps())
    assert not torch.isclose(plain, weighted)


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_accepts_label_dtypes(dtype):
    outputs = {"pred": torch.randn(3, 3, 8, 8), "cls": torch.randn(3, 3)}
    assert torch.isfinite(MultiTaskLoss()(outputs, _label_maps().to(dtype)))
