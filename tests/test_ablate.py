"""tools/ablate.py: the validation scores of the ablation table and the overrides of its variants."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from tests.conftest import REPO_ROOT, TINY_NETWORK, tiny_model_file


@pytest.fixture(scope="module")
def ablate():
    spec = importlib.util.spec_from_file_location("ablate", REPO_ROOT / "tools" / "ablate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _outputs() -> dict[str, np.ndarray]:
    """Three images: a normal one (empty map), a benign lesion half found, a malignant lesion fully found."""
    label = np.zeros((3, 8, 8), dtype=np.uint8)
    label[1, :4, :4] = 1
    label[2, 4:, 4:] = 2
    seg = np.zeros((3, 8, 8), dtype=np.float32)
    seg[0, 0, 0] = 0.9  # a one-pixel false positive on the normal image
    seg[1, :2, :4] = 0.8
    seg[2, 4:, 4:] = 0.7
    cls = np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.5, 0.1, 0.4]], dtype=np.float32)
    return {"seg": seg, "cls": cls, "label": label}


def test_scores(ablate):
    scores = ablate.score(_outputs())
    # benign: 8 of 16 pixels found, no extra -> Dice 2*8/(8+16); malignant: perfect
    assert scores["dice_seg"] == pytest.approx((16 / 24 + 1.0) / 2)
    # the malignant image is classified normal, so its shipped map is emptied
    assert scores["dice"] == pytest.approx((16 / 24 + 0.0) / 2)
    # the normal image is classified normal, so its false-positive pixel is removed
    assert scores["normal_fp"] == 0.0
    assert scores["accuracy"] == pytest.approx(2 / 3)


def test_normal_threshold_keeps_confident_lesion_maps(ablate):
    scores = ablate.score(_outputs(), normal_threshold=0.55)
    # p(normal) 0.5 of the malignant image is below the threshold: its map is kept
    assert scores["dice"] == pytest.approx(scores["dice_seg"])
    # p(normal) 0.6 of the normal image is above it: still emptied
    assert scores["normal_fp"] == 0.0
    # ... and the malignant image is now called malignant (the likelier of benign and malignant)
    assert scores["accuracy"] == 1.0
    assert ablate.score(_outputs(), normal_threshold=0.95)["normal_fp"] == 1.0


def test_variants_override_existing_config_entries(ablate):
    config = json.loads((REPO_ROOT / "bundle" / "configs" / "train.json").read_text())
    for name, overrides in ablate.VARIANTS.items():
        for key in ablate._resolve(overrides):
            node = config
            for part in key.split("#")[:-1]:
                node = node[part]
            # the residual encoder's widths are not in train.json, whose default encoder is EfficientNet-Lite0
            known = key.split("#")[-1] in node or key == "loss#class_weights" or key in ablate.SCRATCH_ENCODER
            assert known or key == "ema_handler", f"{name}: {key} not in train.json"
    geometric = ablate._resolve(ablate.VARIANTS["geometric_augmentation_only"])["train#random_transforms"]
    assert [t["_target_"] for t in geometric] == ["RandAffined", "RandFlipd"]
    ema = ablate.VARIANTS["ema"]
    assert ema["train#handlers"][:-1] != config["train"]["handlers"] and ema["train#handlers"][-1] == "@ema_handler"
    saver = [h for h in ema["train#handlers"][:-1] if h["_target_"].endswith("TrainingCheckpoint")][0]
    assert saver["save_dict"]["ema_model"] == "$@ema_handler.ema_model"
    assert 0.005 < ema["ema_handler"]["momentum"] < 0.02  # a half-life of two epochs of 34 steps


def _calibrate_module():
    spec = importlib.util.spec_from_file_location("calibrate", REPO_ROOT / "tools" / "calibrate.py")
    calibrate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(calibrate)
    return calibrate


def test_ece_of_a_perfectly_calibrated_sample():
    calibrate = _calibrate_module()
    certain = np.eye(3)[[0, 1, 2, 1] * 10]
    assert calibrate.ece_sampling_floor(certain, draws=20)["mean"] == 0.0
    unsure = np.tile([[0.2, 0.5, 0.3]], (116, 1))
    floor = calibrate.ece_sampling_floor(unsure, draws=200)
    assert 0.02 < floor["mean"] < 0.08 and floor["p95"] > floor["mean"]  # about sqrt(0.25 / 116) = 0.046
    labels = np.full(116, 1)
    assert abs(calibrate.expected_calibration_error(unsure, labels)[0] - 0.5) < 1e-9  # confidence 0.5, accuracy 1


def test_sensitivity_alternatives_are_chosen_on_validation_and_scored_elsewhere():
    calibrate = _calibrate_module()

    def probs(malignant_p: list[float]) -> np.ndarray:
        return np.array([[0.0, 1.0 - p, p] for p in malignant_p])

    # validation: cancers at 0.9, 0.8, 0.2, 0.1 and benign lesions at 0.05, 0.3, 0.5
    validation, validation_labels = probs([0.9, 0.8, 0.2, 0.1, 0.05, 0.3, 0.5]), np.array([2, 2, 2, 2, 1, 1, 1])
    other, other_labels = probs([0.15, 0.7, 0.01, 0.85]), np.array([2, 2, 1, 1])
    rows = calibrate.sensitivity_alternatives(
        {"validation": validation, "test": other}, {"validation": validation_labels, "test": other_labels}, (0.5, 1.0)
    )
    assert [row["threshold"] for row in rows] == [0.8, 0.1]  # the 2nd and 4th highest validation cancer
    assert rows[0]["validation"] == {"sensitivity": 0.5, "specificity": 1.0}
    assert rows[1]["validation"] == {"sensitivity": 1.0, "specificity": pytest.approx(1 / 3)}
    # the other split is only scored at the validation thresholds
    assert rows[0]["test"] == {"sensitivity": 0.0, "specificity": 0.5}
    assert rows[1]["test"] == {"sensitivity": 1.0, "specificity": 0.5}


def test_malignant_operating_point(ablate):
    # p(malignant) of 5 malignant and 4 benign images (and one normal image, which does not count)
    probs = np.array([[0.1, 0.1, p] for p in (0.9, 0.8, 0.5, 0.3, 0.1, 0.6, 0.4, 0.2, 0.05, 0.7)])
    labels = np.array([2, 2, 2, 2, 2, 1, 1, 1, 1, 0])
    point = ablate.malignant_operating_point(probs, labels, sensitivity=0.8)
    assert point["threshold"] == pytest.approx(0.3)  # 4 of 5 malignant reach 0.3; 0.5 would catch only 3
    assert point["sensitivity"] == pytest.approx(0.8)
    assert point["specificity"] == pytest.approx(0.5)  # benign 0.2 and 0.05 stay below; 0.6 and 0.4 do not
    assert point["benign_malignant_auc"] == pytest.approx(14 / 20)
    assert ablate.malignant_operating_point(probs, labels, sensitivity=1.0)["threshold"] == pytest.approx(0.1)
    scores = ablate.score({"seg": np.zeros((10, 2, 2)), "cls": probs,
                           "label": np.repeat(labels, 4).reshape(10, 2, 2).astype(np.uint8)},
                          malignant_threshold=0.3)  # fmt: skip
    assert scores["malignant_recall"] == pytest.approx(0.8)
    # the threshold-free scores do not depend on the threshold: all 5 cancers need 0.1, below which 1 benign stays
    assert scores["benign_malignant_auc"] == pytest.approx(14 / 20)
    assert scores["specificity_at_0.9_recall"] == pytest.approx(0.25)


def test_threshold_rules_choose_their_images(ablate):
    probs, labels = np.full((2, 3), 0.3), np.array([1, 2])
    augmented_probs, augmented_labels = np.full((4, 3), 0.6), np.array([1, 2, 1, 2])
    args = (probs, labels, augmented_probs, augmented_labels)
    assert ablate.threshold_images("validation", *args)[0] is probs
    chosen, classes = ablate.threshold_images("augmented_validation", *args)
    assert chosen is augmented_probs and classes is augmented_labels
    both, both_classes = ablate.threshold_images("validation_and_augmented", *args)
    assert both.shape == (6, 3) and both_classes.tolist() == [1, 2, 1, 2, 1, 2]
    with pytest.raises(ValueError, match="'test'"):
        ablate.threshold_images("test", *args)


def test_checkpoints_predicted_together_match_each_predicted_alone(
    ablate, synthetic_dataset, synthetic_datalist, tmp_path
):
    ckpts = [str(tiny_model_file(tmp_path / f"seed{seed}" / "model.pt", seed)) for seed in (0, 1)]
    overrides = {**TINY_NETWORK, "amp": False, "datalist": str(synthetic_datalist)}
    together = ablate.predict_split_checkpoints(str(synthetic_dataset), ckpts, overrides, "validation", tta=True)
    for ckpt, shared in zip(ckpts, together):
        alone = ablate.predict_split(str(synthetic_dataset), ckpt, overrides, "validation", tta=True)
        for key in ("seg", "cls", "label", "views_seg", "views_logits", "embedding"):
            np.testing.assert_array_equal(shared[key], alone[key], err_msg=key)
    assert not np.array_equal(together[0]["cls"], together[1]["cls"]), "each checkpoint keeps its own outputs"


def test_operating_point_scores_a_threshold_of_tempered_probabilities(
    ablate, synthetic_dataset, synthetic_datalist, tmp_path
):
    ckpt = str(tiny_model_file(tmp_path / "model.pt", 0))
    overrides = {**TINY_NETWORK, "amp": False, "datalist": str(synthetic_datalist)}
    common = dict(dataset_dir=str(synthetic_dataset), ckpt=ckpt, image_size=64, threshold=0.334, overrides=overrides)
    plain = ablate.operating_point(**common)
    assert plain["sensitivity"] > 0, "some malignant image reaches the threshold untempered"
    # a huge temperature flattens every image to p = 1/3, just below the threshold
    flat = ablate.operating_point(**common, temperature=1e6)
    assert (flat["sensitivity"], flat["specificity"]) == (0.0, 1.0)
