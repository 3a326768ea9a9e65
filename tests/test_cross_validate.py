"""tools/cross_validate.py: folds that keep duplicate groups whole, the ensemble-against-selected report, the
downscaled copy, the training scheduler's deadline."""

from __future__ import annotations

import functools
import json
import sys
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


def _fake_training(dataset_dir, run_dir, overrides, seed) -> list[str]:
    """A stand-in for ``monai.bundle run training``: 10 logged epochs of 0.3 s."""
    script = (
        "import time\n"
        "for epoch in range(1, 11):\n"
        "    time.sleep(0.3)\n"
        "    print(f'SupervisedTrainer - INFO - Epoch[{epoch}] Complete. Time taken: 0.3', flush=True)\n"
    )
    return [sys.executable, "-c", script]


def test_train_deadline_stops_the_highest_seed_and_marks_finished_runs(cross_validate, monkeypatch, tmp_path):
    monkeypatch.setattr(sys.modules["ablate"], "_train_command", _fake_training)
    monkeypatch.setattr(cross_validate, "TrainingPool", functools.partial(cross_validate.TrainingPool, poll_s=0.2))
    for fold in (0, 1):
        (tmp_path / f"fold{fold}.json").write_text("{}")
    # 3 s of training cannot meet a 0.5 s deadline: seed 3 of both folds goes, the 3 seeds and 2 folds kept stay
    cross_validate.train("unused", out=str(tmp_path), seeds=4, parallel=8, deadline_s=0.5, extra={"max_epochs": 10})
    finished = sorted(p.parent.name for p in tmp_path.glob("fold*_seed*/finished"))
    assert finished == [f"fold{f}_seed{s}" for f in (0, 1) for s in (0, 1, 2)]
    assert cross_validate._epochs_done(tmp_path / "fold0_seed3" / "train.log") < 10
    # a second call trains only what is not finished: the two stopped runs
    cross_validate.train("unused", out=str(tmp_path), seeds=4, parallel=8, extra={"max_epochs": 10})
    assert len(list(tmp_path.glob("fold*_seed*/finished"))) == 8
    # fresh seeds for a replication: seeds 5 and 6 of fold 1 only
    cross_validate.train("unused", out=str(tmp_path), seeds=2, first_seed=5, fold=1, extra={"max_epochs": 10})
    assert sorted(p.parent.name for p in tmp_path.glob("fold*_seed[56]/finished")) == ["fold1_seed5", "fold1_seed6"]


def test_epochs_done_counts_an_epoch_repeated_after_a_resume_once(cross_validate, tmp_path):
    log = tmp_path / "train.log"
    line = "SupervisedTrainer - INFO - Epoch[{}] Complete. Time taken: 1\n"
    log.write_text("".join(line.format(e) for e in (1, 2, 3, 2, 3, 4)))
    assert cross_validate._epochs_done(log) == 4


def _malignancy_file(path, p_malignant: list[float], classes: list[int], augmented_shift: float = 0.0) -> None:
    """One seed's probabilities with the given ``p(malignant)`` (the rest split over normal and benign); the
    augmented draws are the same images with ``p(malignant)`` lowered by ``augmented_shift``."""

    def probs(p):
        p = np.asarray(p, dtype=np.float64)
        return np.stack([(1 - p) / 2, (1 - p) / 2, p], axis=1)[None]

    label = np.zeros((len(classes), 2, 2), dtype=np.uint8)
    label[:, 0, 0] = classes
    shifted = np.asarray(p_malignant) - augmented_shift
    np.savez(path, cls=probs(p_malignant), seg=np.zeros((1, *label.shape), np.uint8), label=label,
             augmented_cls=probs(shifted), augmented_label=np.array(classes), val_score=np.array([0.7]),
             seeds=np.array([0]), epochs=np.array([80]))  # fmt: skip


def test_thresholds_chosen_on_validation_are_scored_on_the_held_out_fold(cross_validate, tmp_path):
    cancers = [k / 20 for k in range(11, 21)]  # validation p(malignant) 0.55 ... 1.0: the 0.9-recall point is 0.6
    _malignancy_file(tmp_path / "validation_fold0.npz", cancers + [0.1] * 10, [2] * 10 + [1] * 10, augmented_shift=0.3)
    held_out = [k / 20 for k in range(4, 14)]  # held-out cancers score lower: 0.2 ... 0.65
    _malignancy_file(tmp_path / "predictions_fold0.npz", held_out + [0.1, 0.4], [2] * 10 + [1, 1])
    result = cross_validate.thresholds(out=str(tmp_path))
    on_validation = result["validation"]["fold0"]
    assert on_validation["threshold"] == pytest.approx(0.6) and on_validation["chosen_on_recall"] == 0.9
    assert on_validation["held_out_recall"] == pytest.approx(0.2) and on_validation["held_out_specificity"] == 1.0
    on_augmented = result["augmented_validation"]["fold0"]  # validation cancers lowered by 0.3: threshold 0.3
    assert on_augmented["threshold"] == pytest.approx(0.3)
    assert on_augmented["held_out_recall"] == pytest.approx(0.8) and on_augmented["held_out_specificity"] == 0.5
    assert result["validation_and_augmented"]["fold0"]["threshold"] == pytest.approx(0.35)
    assert result["validation"]["mean"]["held_out_recall"] == pytest.approx(0.2)
    (tmp_path / "validation_fold0.npz").unlink()
    with pytest.raises(FileNotFoundError, match="--split validation"):
        cross_validate.thresholds(out=str(tmp_path))


def test_compare_scores_the_candidate_ensemble_against_the_reference_on_shared_folds(cross_validate, tmp_path):
    right = np.eye(3)[[0, 0, 1, 1, 2, 2]] * 0.9 + 0.1 / 3
    wrong = np.eye(3)[[1, 2, 2, 0, 0, 1]] * 0.9 + 0.1 / 3
    candidate, reference = tmp_path / "candidate", tmp_path / "reference"
    candidate.mkdir(), reference.mkdir()
    _predictions(candidate / "predictions_fold0.npz", np.stack([wrong, right, right]), [0.7, 0.7, 0.7])
    _predictions(reference / "predictions_fold0.npz", np.stack([wrong, wrong, right]), [0.7, 0.7, 0.7])
    _predictions(candidate / "predictions_fold1.npz", np.stack([right, right]), [0.7, 0.7])
    _predictions(reference / "predictions_fold1.npz", np.stack([right, right]), [0.7, 0.7])
    _predictions(candidate / "predictions_fold2.npz", np.stack([right]), [0.7])  # the reference lacks fold 2
    result = cross_validate.compare(str(candidate), str(reference))
    assert result["folds"] == ["fold0", "fold1"]
    assert result["fold0"]["accuracy"] == pytest.approx(1.0)  # two right members against two wrong ones
    assert all(v == pytest.approx(0.0) for v in result["fold1"].values())
    assert result["mean"]["accuracy"] == pytest.approx(0.5)
    assert json.loads((candidate / "compare.json").read_text())["mean"]["accuracy"] == pytest.approx(0.5)
    # seed 0 alone: wrong in both folders
    assert cross_validate.compare(str(candidate), str(reference), seeds=1)["fold0"]["accuracy"] == pytest.approx(0.0)
    other_images = dict(np.load(reference / "predictions_fold1.npz"))
    np.savez(reference / "predictions_fold1.npz", **{**other_images, "label": np.zeros((6, 4, 4), np.uint8)})
    with pytest.raises(ValueError, match="predictions_fold1.npz: the two folders did not predict the same"):
        cross_validate.compare(str(candidate), str(reference))
    with pytest.raises(FileNotFoundError, match="run 'predict' first"):
        cross_validate.compare(str(candidate), str(tmp_path))
    # the validation images that chose the checkpoints, kept apart from the held-out ones
    _predictions(candidate / "validation_fold1.npz", np.stack([right, right]), [0.7, 0.7])
    _predictions(reference / "validation_fold1.npz", np.stack([wrong, wrong]), [0.7, 0.7])
    validation = cross_validate.compare(str(candidate), str(reference), split="validation")
    assert validation["folds"] == ["fold1"] and validation["mean"]["accuracy"] == pytest.approx(1.0)
    assert json.loads((candidate / "compare_validation.json").read_text())["folds"] == ["fold1"]
    assert json.loads((candidate / "compare.json").read_text())["folds"] == ["fold0", "fold1"]


def test_mix_stacks_the_chosen_seeds_of_two_folders_in_order_and_links_their_runs(cross_validate, tmp_path):
    right = np.eye(3)[[0, 0, 1, 1, 2, 2]] * 0.9 + 0.1 / 3
    wrong = np.eye(3)[[1, 2, 2, 0, 0, 1]] * 0.9 + 0.1 / 3
    first, second = tmp_path / "first", tmp_path / "second"
    for folder in (first, second):
        folder.mkdir()
        (folder / "fold0.json").write_text('{"test": []}')
    (second / "fold0_seed2").mkdir()
    _predictions(first / "predictions_fold0.npz", np.stack([wrong, right]), [0.5, 0.6])  # seeds 0, 1
    _predictions(second / "predictions_fold0.npz", np.stack([wrong, wrong, right, wrong]), [0.1, 0.2, 0.3, 0.4])
    _predictions(first / "validation_fold0.npz", np.stack([wrong, right]), [0.5, 0.6])  # the second lacks it
    written = cross_validate.mix(f"{second}:2,{first}:1", str(tmp_path / "mix"))
    assert written == [str(tmp_path / "mix" / "predictions_fold0.npz")]
    mixed = np.load(tmp_path / "mix" / "predictions_fold0.npz")
    np.testing.assert_allclose(mixed["cls"], np.stack([right, right]))  # second's seed 2, then first's seed 1
    np.testing.assert_allclose(mixed["val_score"], [0.3, 0.6])
    assert mixed["seeds"].tolist() == [0, 1] and mixed["seg"].shape == (2, 6, 4, 4)
    assert (tmp_path / "mix" / "fold0_seed0").resolve() == (second / "fold0_seed2").resolve()  # for shift_test.py
    assert not (tmp_path / "mix" / "fold0_seed1").exists()  # the first folder kept no run of seed 1
    assert cross_validate.compare(str(tmp_path / "mix"), str(first))["mean"]["accuracy"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="holds seeds \\[0, 1\\], not 5"):
        cross_validate.mix(f"{first}:5,{second}:0", str(tmp_path / "bad"))
    (second / "fold0.json").write_text('{"test": [1]}')
    with pytest.raises(ValueError, match="the members' folds differ"):
        cross_validate.mix(f"{first}:0,{second}:0", str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="'folder:seed'"):
        cross_validate.mix("first", str(tmp_path / "bad"))


def test_cleanup_scores_the_largest_component_and_filled_holes_against_the_plain_maps(cross_validate, tmp_path):
    right = np.eye(3)[[0, 0, 1, 1, 2, 2]] * 0.9 + 0.1 / 3
    _predictions(tmp_path / "predictions_fold0.npz", np.stack([right]), [0.7])
    data = dict(np.load(tmp_path / "predictions_fold0.npz"))
    label = np.zeros((6, 8, 8), np.uint8)
    label[2:, 1:6, 1:6] = np.array([1, 1, 2, 2])[:, None, None]  # a 5 x 5 lesion on each lesion image
    seg = (label > 0).astype(np.uint8) * 255
    seg[2, 3, 3] = 0  # a hole in the lesion
    seg[3, 7, 7] = 255  # a speck apart from it
    seg[0, 7, 7] = 255  # a speck on a normal image, called normal, so its shipped map is empty anyway
    np.savez(tmp_path / "predictions_fold0.npz", **{**data, "label": label, "seg": seg[None]})
    result = cross_validate.cleanup(out=str(tmp_path))
    hole_dice, speck_dice = 2 * 24 / (24 + 25), 2 * 25 / (26 + 25)
    plain = (hole_dice + speck_dice + 2) / 4
    assert result["largest_component"]["fold0"]["dice"] == pytest.approx((hole_dice + 3) / 4 - plain)
    assert result["largest_component_filled"]["mean"]["dice"] == pytest.approx(1.0 - plain)
    assert json.loads((tmp_path / "cleanup.json").read_text())["largest_component"]["mean"]["iou"] > 0
    with pytest.raises(FileNotFoundError, match="run 'predict' first"):
        cross_validate.cleanup(out=str(tmp_path), split="validation")
