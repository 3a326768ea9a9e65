"""tools/fold_targets.py: #11's targets on held-out folds and where their lesion Dice is lost."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import load_tool

CLASSES = np.array([0, 0, 1, 1, 1, 2, 2, 2])  # 2 normal, 3 benign, 3 malignant images per fold


@pytest.fixture(scope="module")
def fold_targets():
    return load_tool("fold_targets")


def _labels() -> np.ndarray:
    """Label maps ``(8, 8, 8)``: a 4 x 4 lesion of the image's class in the top-left corner of each lesion image."""
    label = np.zeros((len(CLASSES), 8, 8), dtype=np.uint8)
    for i, c in enumerate(CLASSES):
        label[i, :4, :4] = c
    return label


def _save_fold(folder, fold: int, cls: np.ndarray, seg: np.ndarray, split: str = "predictions") -> None:
    """One fold's stored predictions: ``cls`` ``(seeds, 8, 3)``, ``seg`` ``(seeds, 8, 8, 8)`` lesion probabilities."""
    seeds = len(cls)
    np.savez(folder / f"{split}_fold{fold}.npz", cls=cls, seg=(seg * 255).round().astype(np.uint8), label=_labels(),
             seeds=np.arange(seeds))  # fmt: skip


def _perfect(seeds: int) -> tuple[np.ndarray, np.ndarray]:
    cls = np.stack([np.eye(3)[CLASSES] * 0.9 + 0.1 / 3] * seeds)
    seg = np.stack([(_labels() > 0).astype(np.float32)] * seeds)
    return cls, seg


def test_a_perfect_model_meets_every_target_with_no_spread(fold_targets, tmp_path):
    for fold in range(3):
        for split in ("predictions", "validation"):
            _save_fold(tmp_path, fold, *_perfect(seeds=3), split=split)
    result = fold_targets.targets(cv=str(tmp_path), members=2)
    assert result["subsets"] == 3 and result["images"] == {"normal": 6, "benign": 9, "malignant": 9}
    for decision in fold_targets.DECISIONS:
        assert all(result[decision][key]["met"] for key in fold_targets.TARGETS), result[decision]
        assert result[decision]["score"]["met"] is None and result[decision]["score"]["mean"] == pytest.approx(1.0)
        assert result[decision]["dice"]["mean"] == pytest.approx(1.0)
        assert all(entry["sd"] == pytest.approx(0.0) for entry in result[decision].values())
    assert json.loads((tmp_path / "targets_members2.json").read_text())["members"] == 2


def test_the_operating_point_is_chosen_on_validation_and_finds_cancers_the_arg_max_misses(fold_targets, tmp_path):
    cls, seg = _perfect(seeds=2)
    # every malignant image looks benign (p(malignant) 0.4 < p(benign) 0.5), on validation and held out alike
    cls[:, CLASSES == 2] = [0.1, 0.5, 0.4]
    for fold in range(2):
        _save_fold(tmp_path, fold, cls, seg)
        _save_fold(tmp_path, fold, cls, seg, split="validation")
    result = fold_targets.targets(cv=str(tmp_path), members=1)
    assert result["argmax"]["malignant_recall"]["mean"] == pytest.approx(0.0)
    assert not result["argmax"]["malignant_recall"]["met"]
    assert result["thresholds"] == pytest.approx([0.4, 0.4])
    assert result["operating_point"]["malignant_recall"]["mean"] == pytest.approx(1.0)
    assert result["operating_point"]["malignant_recall"]["met"]


def test_the_ensemble_averages_the_chosen_seeds(fold_targets, tmp_path):
    cls, seg = _perfect(seeds=2)
    seg[1] = 0.0  # the second seed draws no lesion: alone it has Dice 0, with the first the mean is 0.5 (not > 0.5)
    _save_fold(tmp_path, 0, cls, seg)
    _save_fold(tmp_path, 0, cls, seg, split="validation")
    one = fold_targets.targets(cv=str(tmp_path), members=1)
    assert one["argmax"]["dice"]["mean"] == pytest.approx(0.5)
    assert one["argmax"]["dice"]["sd"] == pytest.approx(0.5)
    assert fold_targets.targets(cv=str(tmp_path), members=2)["argmax"]["dice"]["mean"] == pytest.approx(0.0)


def test_dice_losses_sorts_every_lesion_image_into_one_cause(fold_targets, tmp_path):
    cls, seg = _perfect(seeds=1)
    lesion = np.flatnonzero(CLASSES > 0)
    cls[0, lesion[0]] = [0.8, 0.1, 0.1]  # called normal
    seg[0, lesion[1]] = 0.0  # a lesion call with an empty map
    seg[0, lesion[2]] = np.roll(seg[0, lesion[2]], 4, axis=1)  # beside the lesion
    seg[0, lesion[3], :4, :4], seg[0, lesion[3], :1, :1] = 0.0, 1.0  # one pixel of 16: Dice 2/17
    seg[0, lesion[4], 4:, 4:] = 1.0  # 16 extra pixels: Dice 2/3
    _save_fold(tmp_path, 0, cls, seg)
    result = fold_targets.dice_losses(cv=str(tmp_path))
    causes = result["causes"]
    assert result["lesion_images"] == 6
    assert [causes[name]["images"] for name in causes] == [1, 1, 1, 1, 1, 1]
    assert causes["overlap_below_0.5"]["mean_dice"] == pytest.approx(2 / 17)
    assert causes["dice_0.5_to_0.8"]["mean_dice"] == pytest.approx(2 / 3)
    assert sum(c["dice_lost"] for c in causes.values()) == pytest.approx(1 - result["mean_dice"])


def test_missing_files_and_impossible_ensembles_are_named(fold_targets, tmp_path):
    with pytest.raises(FileNotFoundError, match="predictions_fold"):
        fold_targets.targets(cv=str(tmp_path))
    _save_fold(tmp_path, 0, *_perfect(seeds=2))
    with pytest.raises(FileNotFoundError, match="validation_fold0.npz"):
        fold_targets.targets(cv=str(tmp_path))
    _save_fold(tmp_path, 0, *_perfect(seeds=2), split="validation")
    with pytest.raises(ValueError, match="members must be 1-2"):
        fold_targets.targets(cv=str(tmp_path), members=3)
