"""tools/second_look.py: lesion shape features, the zoom crop and the logistic stacker."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from tests.conftest import load_tool


@pytest.fixture(scope="module")
def second_look():
    return load_tool("second_look")


def _disc(size: int = 160, centre=(80, 80), radius: int = 20) -> np.ndarray:
    rows, cols = np.mgrid[:size, :size]
    return ((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2).astype(float)


def _star(size: int = 160, arms: int = 7) -> np.ndarray:
    angles = np.linspace(0, 2 * np.pi, 2 * arms, endpoint=False)
    radii = np.where(np.arange(2 * arms) % 2 == 0, 40, 12)
    points = np.stack([80 + radii * np.cos(angles), 80 + radii * np.sin(angles)], axis=1).astype(np.int32)
    star = np.zeros((size, size), np.uint8)
    cv2.fillPoly(star, [points], 1)
    return star.astype(float)


def test_a_disc_is_round_solid_and_crisp(second_look):
    circularity, solidity, orientation, fuzziness = second_look.shape_features(_disc(), (400, 400))
    assert circularity > 0.85 and solidity > 0.95
    assert abs(orientation) < 0.05 and fuzziness == 0.0


def test_a_spiculated_lesion_is_neither_round_nor_solid(second_look):
    circularity, solidity, _, _ = second_look.shape_features(_star(), (400, 400))
    assert circularity < 0.5 and solidity < 0.75


def test_orientation_is_measured_in_the_images_aspect(second_look):
    # a disc in the square network input is twice as tall as wide in a 400 x 200 image
    assert second_look.shape_features(_disc(), (400, 200))[2] == pytest.approx(np.log(2), abs=0.1)
    assert second_look.shape_features(_disc(), (200, 400))[2] == pytest.approx(-np.log(2), abs=0.1)


def test_uncertain_margins_are_fuzzy(second_look):
    blurred = cv2.GaussianBlur(_disc(), (0, 0), 6)
    assert second_look.shape_features(blurred, (400, 400))[3] > 0.3


def test_the_largest_component_is_measured_and_empty_maps_are_neutral(second_look):
    with_speck = _disc() + _disc(centre=(20, 20), radius=3)
    np.testing.assert_allclose(
        second_look.shape_features(with_speck, (400, 400)), second_look.shape_features(_disc(), (400, 400))
    )
    np.testing.assert_allclose(second_look.shape_features(np.zeros((160, 160)), (400, 400)), [1, 1, 0, 0])


def test_zoom_box_frames_the_lesion_in_the_images_aspect(second_look):
    lesion = _disc(centre=(40, 120), radius=8) > 0  # a 17-pixel box of 160 in a 480 x 640 image
    top, left, height, width = second_look.zoom_box(lesion, (480, 640), factor=4.0)
    assert height / width == pytest.approx(480 / 640, abs=0.01)
    assert height == pytest.approx(4 * 17 * 3, abs=4)  # 4 times the box's 51 original rows
    assert top <= 32 * 3 and top + height >= 49 * 3 and left <= 112 * 4 and left + width >= 129 * 4


def test_zoom_box_stays_inside_the_image_and_has_a_minimum(second_look):
    corner = np.zeros((160, 160), bool)
    corner[:3, :3] = True
    top, left, height, width = second_look.zoom_box(corner, (300, 500), factor=4.0, min_fraction=0.25)
    assert (top, left) == (0, 0) and (height, width) == (75, 125)
    huge = np.ones((160, 160), bool)
    assert second_look.zoom_box(huge, (300, 500)) == (0, 0, 300, 500)
    assert second_look.zoom_box(np.zeros((160, 160), bool), (300, 500)) is None


def test_stacker_learns_the_informative_feature(second_look):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(400, 3))
    target = (features[:, 1] + 0.3 * rng.normal(size=400) > 0).astype(float)
    stacker = second_look.LogisticStacker(l2=1.0).fit(features, target)
    assert abs(stacker.coef[2]) > 3 * max(abs(stacker.coef[1]), abs(stacker.coef[3]))
    assert ((stacker.predict_proba(features) > 0.5) == target).mean() > 0.85


def test_restack_keeps_p_normal_and_sums_to_one(second_look):
    probs = np.array([[0.2, 0.5, 0.3], [0.9, 0.05, 0.05]])
    restacked = second_look.restack(probs, np.array([0.75, 0.5]))
    np.testing.assert_allclose(restacked, [[0.2, 0.2, 0.6], [0.9, 0.05, 0.05]])


def test_misses_counts_by_size_at_the_validation_threshold(second_look, tmp_path):
    def labels(areas: list[float], classes: list[int]) -> np.ndarray:
        maps = np.zeros((len(areas), 20, 20), np.uint8)
        for index, (area, cls) in enumerate(zip(areas, classes)):
            maps[index].flat[: int(area * 400)] = cls
        return maps

    # validation: cancers at 0.9, 0.8, ..., 0.0; benign at 0.05; 0.90 recall puts the threshold at the 9th, 0.1
    val_p = np.r_[np.linspace(0.9, 0.0, 10), np.full(5, 0.05)]
    val_cls = np.stack([np.zeros(15), 1 - val_p, val_p], axis=1)[None]
    np.savez(tmp_path / "validation_fold0.npz", cls=val_cls, label=labels([0.2] * 15, [2] * 10 + [1] * 5),
             augmented_cls=val_cls, augmented_label=np.r_[np.full(10, 2), np.ones(5)])  # fmt: skip
    # held out: a small cancer missed, a large one found, a large one missed whose lesion is not segmented, a benign
    held_p = np.array([0.05, 0.5, 0.02, 0.01])
    held_label = labels([0.02, 0.3, 0.3, 0.3], [2, 2, 2, 1])
    seg = (held_label > 0).astype(np.uint8) * 255
    seg[2] = 0
    np.savez(tmp_path / "predictions_fold0.npz", cls=np.stack([1 - held_p, np.zeros(4), held_p], 1)[None],
             label=held_label, seg=seg[None])  # fmt: skip
    row = second_look.misses(str(tmp_path))["fold0"]
    assert row["threshold"] == pytest.approx(0.1)
    assert (row["small_cancers"], row["small_missed"], row["large_cancers"], row["large_missed"]) == (1, 1, 2, 1)
    assert row["missed_not_segmented"] == 1


def test_closer_view_recovers_the_crops_call_from_the_mean(second_look, tmp_path):
    normal, benign = [0.8, 0.15, 0.05], [0.1, 0.8, 0.1]
    whole = np.array([benign, benign, benign, normal])
    # the first lesion is called normal only when seen closer, the second stays benign
    crop = np.array([normal, [0.05, 0.85, 0.1], benign, normal])
    zoomed = (whole + crop) / 2
    zoomed[2] = whole[2]  # no predicted lesion: not cropped
    np.savez(tmp_path / "zoom_test_fold0.npz", whole=whole, zoomed=zoomed, labels=np.array([1, 2, 1, 0]))
    result = second_look.closer_view(str(tmp_path))[str(tmp_path)]
    assert result["lesion_images"] == 3 and result["cropped"] == 2
    assert result["called_normal_whole"] == 0.0
    assert result["called_normal_closer"] == pytest.approx(1 / 3)
    with pytest.raises(FileNotFoundError, match="run 'zoom' first"):
        second_look.closer_view(str(tmp_path), split="validation")
