"""tools/shift_test.py: the fixed scanner-like changes keep image and mask together and change what they claim to."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import load_tool


@pytest.fixture(scope="module")
def shift_test():
    return load_tool("shift_test")


def _image_and_label() -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.linspace(10.0, 200.0, 60 * 40).reshape(1, 60, 40)
    label = torch.zeros(1, 60, 40, dtype=torch.uint8)
    label[:, 25:35, 15:25] = 2
    return image, label


def test_intensity_changes_keep_the_mask_and_change_the_pixels(shift_test):
    image, label = _image_and_label()
    changes = shift_test.changes()
    for name in ("gamma_0.6", "gamma_1.6", "saturation", "blur", "low_resolution", "speckle", "depth_attenuation"):
        changed, same_label = changes[name](image, label)
        assert changed.shape == image.shape and torch.equal(same_label, label), name
        assert not torch.allclose(changed, image), f"{name} left the image as it was"
    brighter, _ = changes["gamma_0.6"](image, label)
    assert (brighter[0, 30, 20] > image[0, 30, 20]) and brighter.max() == pytest.approx(float(image.max()))
    saturated, _ = changes["saturation"](image, label)
    assert saturated.max() == pytest.approx(float(image.max())) and (saturated == image.max()).sum() > 1
    deep, _ = changes["depth_attenuation"](image, label)
    assert deep[0, 0, -1] / image[0, 0, -1] < deep[0, 0, 0] / image[0, 0, 0]  # the last axis is depth
    speckle_a, _ = changes["speckle"](image, label)
    speckle_b, _ = shift_test.changes()["speckle"](image, label)
    assert torch.equal(speckle_a, speckle_b)  # fixed, not drawn
    assert torch.equal(changes["none"](image, label)[0], image)


def test_field_of_view_changes_move_the_mask_with_the_image(shift_test):
    image, label = _image_and_label()
    changes = shift_test.changes()
    closer_image, closer_label = changes["closer"](image, label)
    assert closer_image.shape == closer_label.shape == (1, 42, 28)
    assert torch.equal(closer_image, image[:, 9:51, 6:34]) and torch.equal(closer_label, label[:, 9:51, 6:34])
    wider_image, wider_label = changes["wider"](image, label)
    assert wider_image.shape == wider_label.shape == (1, 78, 52)
    assert torch.equal(wider_label[:, 9:69, 6:46], label) and wider_label.sum() == label.sum()
    assert wider_image[:, :9].abs().sum() == 0 and torch.equal(wider_image[:, 9:69, 6:46], image)


def test_every_change_is_compared_with_the_unchanged_images(shift_test):
    with pytest.raises(ValueError, match="only must include 'none'"):
        shift_test.run(".", only="wider")


def _result(path, **changes: float) -> str:
    scores = {name: {key: value for key in ("dice", "normal_fp", "lesion_called_normal", "malignant_recall",
                                            "benign_malignant_auc", "accuracy")} for name, value in changes.items()}
    path.write_text(json.dumps({"scores": scores}))
    return str(path)


def test_compare_leaves_the_focus_change_out_of_the_mean_over_the_others(shift_test, tmp_path):
    candidate = _result(tmp_path / "candidate.json", none=0.5, speckle=0.9, blur=0.4, wider=0.6, closer=0.0)
    reference = _result(tmp_path / "reference.json", none=0.6, speckle=0.5, blur=0.5, wider=0.3)
    compared = shift_test.compare(candidate, reference, focus="speckle")
    assert compared["other_changes"] == ["blur", "wider"]  # "closer" is only in the candidate's result
    assert compared["D"]["speckle"]["malignant_recall"] == pytest.approx(0.4)
    assert compared["D"]["none"]["dice"] == pytest.approx(-0.1)
    assert compared["others"]["lesion_called_normal"] == pytest.approx(0.1)  # mean of -0.1 and +0.3
    with pytest.raises(ValueError, match="'gamma_0.6'"):
        shift_test.compare(candidate, reference, focus="gamma_0.6")
