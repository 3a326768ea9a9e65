"""tools/cross_validate.py: folds that keep duplicate groups whole, the ensemble-against-selected report, the
downscaled copy."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from tests.conftest import load_tool


@pytest.fixture(scope="module")
def cross_validate():
    return load_tool("cross_validate")


def _datalist(path) -> dict:
    """60 training images in 40 duplicate groups (some of 2 or 3 images), 3 classes; 5 validation, 5 test."""
    rng = np.random.default_rng(0)
    training, group = [], 0
    while len(training) < 60:
        size = int(rng.choice([1, 1, 2, 3]))
        label = int(rng.integers(0, 3))
        for _ in range(min(size, 60 - len(training))):
            training.append({"image": f"img{len(training)}.png", "masks": [], "class": label, "group": group})
        group += 1
    other = [{"image": f"other{i}.png", "masks": [], "class": i % 3, "group": 1000 + i} for i in range(10)]
    datalist = {"training": training, "validation": other[:5], "test": other[5:]}
    path.write_text(json.dumps(datalist))
    return datalist


def test_folds_hold_out_whole_groups_and_never_the_test_split(cross_validate, tmp_path):
    source = _datalist(tmp_path / "datalist.json")
    paths = cross_validate.folds(out=str(tmp_path / "cv"), folds=3, datalist=str(tmp_path / "datalist.json"))
    fold_lists = [json.loads(open(p).read()) for p in paths]
    held_out = Counter(e["image"] for f in fold_lists for e in f["test"])
    assert held_out == Counter(e["image"] for e in source["training"])  # every training image held out exactly once
    group_folds = {}
    for index, fold_list in enumerate(fold_lists):
        assert {e["image"] for e in fold_list["training"]}.isdisjoint(e["image"] for e in fold_list["test"])
        assert len(fold_list["training"]) + len(fold_list["test"]) == len(source["training"])
        assert fold_list["validation"] == source["validation"]
        for entry in fold_list["test"]:
            assert group_folds.setdefault(entry["group"], index) == index, "a duplicate group straddles two folds"
        assert {e["class"] for e in fold_list["test"]} == {0, 1, 2}
    listed = {e["image"] for f in fold_lists for key in ("training", "validation", "test") for e in f[key]}
    assert listed.isdisjoint(e["image"] for e in source["test"])


def _predictions(path, cls: np.ndarray, val_score: list[float]) -> None:
    """A fold's predictions: 6 images (2 per class), the lesion map of each seed equal to the ground truth."""
    classes = np.array([0, 0, 1, 1, 2, 2])
    label = np.zeros((6, 4, 4), dtype=np.uint8)
    for i, c in enumerate(classes):
        label[i, :2, :2] = c
    seeds = len(val_score)
    seg = np.stack([(label > 0).astype(np.uint8) * 255] * seeds)
    np.savez(path, cls=cls, seg=seg, label=label, augmented_cls=cls, augmented_label=classes,
             val_score=np.array(val_score), seeds=np.arange(seeds), epochs=np.full(seeds, 80))  # fmt: skip


def test_report_compares_the_ensemble_with_the_seed_validation_would_ship(cross_validate, tmp_path):
    right = np.eye(3)[[0, 0, 1, 1, 2, 2]] * 0.9 + 0.1 / 3
    wrong = np.eye(3)[[1, 2, 2, 0, 0, 1]] * 0.9 + 0.1 / 3
    # seed 1 is right and has the best validation score; seeds 0 and 2 are confidently wrong
    _predictions(tmp_path / "predictions_fold0.npz", np.stack([wrong, right, wrong]), [0.70, 0.75, 0.72])
    # three identical seeds: the ensemble is any one of them
    _predictions(tmp_path / "predictions_fold1.npz", np.stack([right, right, right]), [0.70, 0.71, 0.72])
    cross_validate.report(out=str(tmp_path))
    result = json.loads((tmp_path / "report.json").read_text())
    fold0 = result["fold0"]
    assert fold0["selected_seed"] == 1 and fold0["selected"] == fold0["seed1"]
    assert fold0["seed1"]["accuracy"] == 1.0 and fold0["seed0"]["accuracy"] == 0.0
    assert fold0["ensemble"]["accuracy"] == 0.0  # two wrong members outvote the right one
    differences = result["ensemble_minus_selected"]
    assert differences["fold0"]["accuracy"] == pytest.approx(-1.0)
    assert all(v == pytest.approx(0.0) for v in differences["fold1"].values())
    assert differences["mean"]["accuracy"] == pytest.approx(-0.5)
    assert result["pooled"]["selected"]["accuracy"] == 1.0 and result["pooled"]["ensemble"]["accuracy"] == 0.5


def test_downscale_shrinks_images_and_keeps_mask_values(cross_validate, tmp_path):
    source = tmp_path / "Dataset_BUSI_with_GT" / "benign"
    source.mkdir(parents=True)
    image = np.random.default_rng(0).integers(0, 256, (300, 400), dtype=np.uint8)
    mask = np.zeros((300, 400), dtype=np.uint8)
    mask[100:200, 100:250] = 255
    Image.fromarray(image).save(source / "benign (1).png")
    Image.fromarray(mask).save(source / "benign (1)_mask.png")
    Image.fromarray(image[:50, :80]).save(source / "benign (2).png")
    out = tmp_path / "small" / "Dataset_BUSI_with_GT"
    cross_validate.downscale(str(source.parent), str(out), max_side=100)
    small = np.array(Image.open(out / "benign" / "benign (1).png"))
    small_mask = np.array(Image.open(out / "benign" / "benign (1)_mask.png"))
    assert small.shape == small_mask.shape == (75, 100)
    assert set(np.unique(small_mask)) == {0, 255}
    assert abs(float(small.mean()) - float(image.mean())) < 2.0  # a box filter keeps the mean grey level
    np.testing.assert_array_equal(np.array(Image.open(out / "benign" / "benign (2).png")), image[:50, :80])
