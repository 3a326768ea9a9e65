"""Per-image reliability: the input check, the uncertainty score, the embedding distance and the status."""

from __future__ import annotations

import ast
import copy
import hashlib
import logging
import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from scripts.reliability import (
    NOT_ASSESSABLE,
    STATUS_KEY,
    STATUS_OK,
    UNCERTAINTY_KEY,
    InputCheckd,
    PredictionReliabilityd,
    image_problem,
    mahalanobis_distance,
    mask_disagreement,
    normalized_entropy,
)
from scripts.transforms import LesionLabelMapd, MonaiLabelOutputd

from .conftest import REPO_ROOT


def ultrasound_like(shape=(120, 160), scale=255.0, offset=0.0) -> torch.Tensor:
    rng = np.random.default_rng(0)
    speckle = rng.rayleigh(0.25, shape) * np.linspace(1.0, 0.3, shape[0])[:, None]
    return torch.as_tensor(offset + scale * np.clip(speckle, 0, 1), dtype=torch.float32)[None]


@pytest.mark.parametrize(
    "image, reason",
    [
        (torch.zeros(1, 400, 500), "near-uniform"),
        (torch.full((1, 300, 300), 128.0), "near-uniform"),
        (torch.full((1, 3, 3), 128.0), "smaller than 32"),
        (128.0 + torch.randn(1, 200, 200, generator=torch.Generator().manual_seed(0)), "near-uniform"),
    ],
)
def test_blank_and_tiny_images_are_not_assessable(image, reason):
    assert reason in image_problem(image)


@pytest.mark.parametrize("scale, offset", [(255.0, 0.0), (65535.0, 0.0), (1.0, 0.0), (2000.0, -1000.0)])
def test_images_with_content_pass_whatever_their_intensity_range(scale, offset):
    assert image_problem(ultrasound_like(scale=scale, offset=offset)) == ""


def test_input_check_transform_records_the_reason_and_keeps_the_image():
    image = torch.zeros(1, 64, 64)
    out = InputCheckd(keys="image")({"image": image})
    assert out["image"] is image and "near-uniform" in out["input_problem"]
    assert InputCheckd(keys="image")({"image": ultrasound_like()})["input_problem"] == ""


def test_normalized_entropy_is_zero_when_certain_and_one_when_uniform():
    probs = torch.tensor([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0.0]])
    np.testing.assert_allclose(normalized_entropy(probs), [0.0, 1.0, math.log(2) / math.log(3)], atol=1e-6)


def test_mahalanobis_distance_with_a_diagonal_precision():
    mean, precision = torch.tensor([1.0, -1.0]), torch.diag(torch.tensor([4.0, 1.0]))
    embeddings = torch.tensor([[1.0, -1.0], [2.0, -1.0], [1.0, 2.0]])
    np.testing.assert_allclose(mahalanobis_distance(embeddings, mean, precision), [0.0, 2.0, 3.0], atol=1e-6)


@pytest.fixture
def stats_file(tmp_path):
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"weights")
    path = tmp_path / "embedding_stats.pt"
    torch.save({"mean": torch.zeros(4), "precision": torch.eye(4),
                "ckpt_sha256": hashlib.sha256(b"weights").hexdigest()}, path)  # fmt: skip
    return path, checkpoint


def item(embedding, problem="") -> dict:
    return {"cls": torch.tensor([0.1, 0.3, 0.6]), "embedding": torch.as_tensor(embedding), "input_problem": problem}


def test_status_follows_the_input_check_and_the_embedding_distance(stats_file):
    path, checkpoint = stats_file
    reliability = PredictionReliabilityd(embedding_stats=str(path), max_distance=1.0, checkpoint=str(checkpoint))
    near = reliability(item([0.5, 0.0, 0.0, 0.0]))
    far = reliability(item([2.0, 0.0, 0.0, 0.0]))
    blank = reliability(item([0.0, 0.0, 0.0, 0.0], problem="near-uniform image"))
    assert (near["status"], near["status_reason"]) == (STATUS_OK, "")
    assert near["embedding_distance"] == pytest.approx(0.5)
    assert far["status"] == NOT_ASSESSABLE and "unlike the training images" in far["status_reason"]
    assert blank["status"] == NOT_ASSESSABLE and blank["status_reason"] == "near-uniform image"
    expected = float(normalized_entropy(torch.tensor([0.1, 0.3, 0.6])))
    assert near["uncertainty"] == pytest.approx(expected) and 0.0 < expected < 1.0


def test_statistics_of_other_weights_are_not_used(stats_file, tmp_path, caplog):
    path, _ = stats_file
    retrained = tmp_path / "retrained.pt"
    retrained.write_bytes(b"other weights")
    with caplog.at_level(logging.WARNING):
        reliability = PredictionReliabilityd(embedding_stats=str(path), max_distance=1.0, checkpoint=str(retrained))
    out = reliability(item([5.0, 0.0, 0.0, 0.0]))
    assert out["status"] == STATUS_OK and math.isnan(out["embedding_distance"])
    assert "fitted for other weights" in caplog.text


def test_an_image_that_is_not_assessable_gets_no_lesion_and_no_class():
    seg = torch.zeros(3, 8, 8)
    seg[0], seg[2] = 0.1, 0.9  # every pixel is lesion
    data = {"pred": seg, "cls": torch.tensor([0.1, 0.2, 0.7]), "status": NOT_ASSESSABLE,
            "status_reason": "near-uniform image", "uncertainty": 0.8,
            "image": MetaTensor(torch.zeros(1, 8, 8), meta={"spatial_shape": [8, 8], "filename_or_obj": "a.png"})}
    out = LesionLabelMapd(status_key="status")(data)
    assert not out["seg_pred"].any() and int(out["cls_pred"]) == -1
    result = MonaiLabelOutputd()(out)["result"]
    assert (result["class"], result["class_index"], result["probabilities"]) == (None, -1, {})
    assert (result["status"], result["uncertainty"]) == (NOT_ASSESSABLE, 0.8)
    assessed = LesionLabelMapd(status_key="status")({**data, "status": STATUS_OK})
    assert int(assessed["cls_pred"]) == 2 and set(assessed["seg_pred"].unique().tolist()) == {2}


def test_mask_disagreement_is_one_minus_the_dice_of_the_two_views_masks():
    left, right, empty = torch.zeros(8, 8), torch.zeros(8, 8), torch.zeros(8, 8)
    left[:, :4], right[:, 2:6] = 0.9, 0.9  # 32 pixels each, 16 shared
    assert mask_disagreement(left, left) == pytest.approx(0.0)
    assert mask_disagreement(left, right) == pytest.approx(0.5)
    assert mask_disagreement(left, empty) == pytest.approx(1.0)
    assert mask_disagreement(empty, empty) == pytest.approx(0.0)


def test_uncertainty_with_two_views_adds_their_mask_disagreement():
    seg, seg_flipped = torch.zeros(3, 8, 8), torch.zeros(3, 8, 8)
    seg[0], seg_flipped[0] = 1.0, 1.0
    seg[0, :, :4], seg_flipped[0, :, 2:6] = 0.1, 0.1  # lesion masks half overlapping: disagreement 0.5
    probs = torch.tensor([0.1, 0.3, 0.6])
    item = {"cls": probs, "cls_flipped": probs, "pred": seg, "pred_flipped": seg_flipped}
    out = PredictionReliabilityd()(item)
    assert out["uncertainty"] == pytest.approx((float(normalized_entropy(probs)) + 0.5) / 2)


@pytest.fixture(scope="module")
def tiny_network() -> torch.nn.Module:
    from scripts.net import MultiTaskResUNet

    torch.manual_seed(0)
    return MultiTaskResUNet(channels=(8, 16, 32, 64), strides=(2, 2, 2, 2), decoder_channels=(32, 16, 8, 8)).eval()


@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.inference_mode])
def test_class_activation_map_is_monai_gradcam_of_the_predicted_class(tiny_network, grad_mode):
    from monai.visualize import GradCAM

    from scripts.reliability import ClassActivationMapd, _ClassLogits

    image = torch.randn(1, 64, 64, generator=torch.Generator().manual_seed(1))
    reference = torch.zeros(1, 96, 128)
    before = {k: v.clone() for k, v in tiny_network.state_dict().items()}
    explain = ClassActivationMapd(tiny_network, enabled="true")
    with grad_mode():  # as inside the engine
        maps = [explain({"image": image, "cls_pred": torch.tensor(c), "display_image": reference})["cam"]
                for c in (1, 2)]  # fmt: skip
    for c, heat in zip((1, 2), maps):
        assert heat.shape == (1, 96, 128) and 0.0 <= float(heat.min()) and float(heat.max()) <= 1.0
        gradcam = GradCAM(_ClassLogits(copy.deepcopy(tiny_network)), target_layers="network.encoder.stages.3")
        expected = gradcam(image[None], class_idx=c)
        expected = torch.nn.functional.interpolate(expected, size=(96, 128), mode="bilinear", align_corners=False)[0]
        torch.testing.assert_close(heat, expected.detach(), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(maps[0], maps[1])  # the map follows the class
    for key, value in tiny_network.state_dict().items():  # the network itself is left as it was
        assert torch.equal(value, before[key]), key
    assert not any(m._forward_hooks or m._backward_hooks for m in tiny_network.modules())


def test_class_activation_map_off_or_without_a_class(tiny_network):
    from scripts.reliability import ClassActivationMapd

    data = {"image": torch.randn(1, 64, 64), "cls_pred": torch.tensor(2), "display_image": torch.zeros(1, 64, 64)}
    assert "cam" not in ClassActivationMapd(tiny_network)(data)  # off by default
    assert "cam" not in ClassActivationMapd(tiny_network, enabled=True)({**data, "cls_pred": torch.tensor(-1)})
    named = ClassActivationMapd(tiny_network, enabled=True, layer="encoder.stages.2")(data)["cam"]
    default = ClassActivationMapd(tiny_network, enabled=True)(data)["cam"]
    assert named.shape == (1, 64, 64) and not torch.allclose(named, default)


def test_class_activation_map_of_an_ensemble_is_the_mean_over_its_members():
    import functools

    from monai.visualize import GradCAM

    from scripts.net import MultiTaskEnsemble, MultiTaskResUNet
    from scripts.reliability import ClassActivationMapd, _ClassLogits

    torch.manual_seed(0)
    member = functools.partial(MultiTaskResUNet, channels=(8, 16, 32, 64), strides=(2, 2, 2, 2),
                               decoder_channels=(32, 16, 8, 8))  # fmt: skip
    ensemble = MultiTaskEnsemble(member, num_members=2).eval()
    image = torch.randn(1, 64, 64, generator=torch.Generator().manual_seed(1))
    data = {"image": image, "cls_pred": torch.tensor(2), "display_image": torch.zeros(1, 64, 64)}
    with torch.no_grad():
        heat = ClassActivationMapd(ensemble, enabled=True)(data)["cam"]
    per_member = []
    for i in range(2):
        layer = f"network.members.{i}.encoder.stages.3"
        gradcam = GradCAM(_ClassLogits(copy.deepcopy(ensemble)), target_layers=layer)
        per_member.append(gradcam(image[None], class_idx=2)[0])
    torch.testing.assert_close(heat, torch.stack(per_member).mean(0).detach(), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(per_member[0], per_member[1])


def test_active_learning_reads_the_keys_and_status_values_written_here():
    """``monailabel/activelearning.py`` runs in MONAI Label's environment, without the bundle's scripts: its copies of
    the result keys and status values must be these."""
    tree = ast.parse((REPO_ROOT / "monailabel" / "activelearning.py").read_text())
    copies = {target.id: node.value.value for node in tree.body if isinstance(node, ast.Assign)
              and isinstance(node.value, ast.Constant) for target in node.targets}  # fmt: skip
    written = PredictionReliabilityd()({"cls": torch.tensor([0.2, 0.3, 0.5])})
    assert (copies["STATUS_OK"], copies["NOT_ASSESSABLE"]) == (STATUS_OK, NOT_ASSESSABLE)
    assert (copies["RESULT_STATUS"], copies["RESULT_UNCERTAINTY"]) == (STATUS_KEY, UNCERTAINTY_KEY)
    assert {STATUS_KEY, UNCERTAINTY_KEY} <= set(written)
