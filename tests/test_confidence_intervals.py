"""tools/confidence_intervals.py: bootstrap intervals of the headline numbers of a bundle evaluation folder."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from ignite.engine import Engine

from scripts import metrics as M

from .conftest import load_tool
from .test_metrics import report_batches


@pytest.fixture(scope="module")
def ci():
    return load_tool("confidence_intervals")


@pytest.fixture
def eval_dir(tmp_path):
    """What the bundle's evaluation writes for nine images (4 benign, 3 malignant, 2 normal)."""
    M.EvaluationReport(output_dir=str(tmp_path)).attach(engine := Engine(lambda e, batch: batch))
    engine.run(report_batches(), max_epochs=1)
    return tmp_path


def test_headline_matches_the_evaluation_report(ci, eval_dir):
    results = ci.load_evaluation(eval_dir)
    summary = json.loads((eval_dir / "metrics.json").read_text())
    seg, cls = summary["segmentation"], summary["classification"]
    numbers = ci.headline(results)
    assert numbers["dice"] == pytest.approx(seg["lesion_dice"], abs=1e-6)
    assert numbers["iou"] == pytest.approx(seg["lesion_iou"], abs=1e-6)
    assert numbers["normal_fp"] == pytest.approx(seg["normal_false_positive_rate"]) == 0.5
    for key in ("accuracy", "macro_f1", "macro_auc"):
        assert numbers[key] == pytest.approx(cls[key], abs=1e-6), key
    assert numbers["malignant_recall"] == pytest.approx(cls["per_class"]["malignant"]["recall"]) == pytest.approx(2 / 3)
    assert numbers["lesion_called_normal"] == pytest.approx(1 / 7)


def test_resamples_keep_the_class_counts(ci):
    labels = np.array([0, 0, 1, 1, 1, 2, 2, 1, 0, 2, 2])
    rng = np.random.default_rng(3)
    for _ in range(20):
        drawn = ci.stratified_resample(labels, rng)
        np.testing.assert_array_equal(np.bincount(labels[drawn]), np.bincount(labels))
    assert len({tuple(ci.stratified_resample(labels, rng)) for _ in range(20)}) > 1


def test_intervals_narrow_with_more_images_and_repeat_with_the_seed(ci, eval_dir):
    results = ci.load_evaluation(eval_dir)
    small = ci.bootstrap(results, resamples=100, seed=1)
    assert small == ci.bootstrap(results, resamples=100, seed=1)
    large = ci.bootstrap({key: value if key == "class_names" else np.tile(value, (20,) + (1,) * (value.ndim - 1))
                          for key, value in results.items()}, resamples=100, seed=1)  # fmt: skip
    assert large["num_images"] == 20 * small["num_images"] == 180
    for key in ("dice", "accuracy", "macro_f1", "malignant_recall"):
        assert small[key]["low"] <= small[key]["value"] <= small[key]["high"], key
        assert large[key]["value"] == pytest.approx(small[key]["value"]), key
        assert large[key]["high"] - large[key]["low"] < (small[key]["high"] - small[key]["low"]) / 2, key


def test_a_perfect_model_has_no_spread(ci):
    labels = np.array([0, 1, 1, 2, 2, 2])
    results = {"probs": np.eye(3)[labels], "labels": labels, "preds": labels, "dice": np.ones(6), "iou": np.ones(6),
               "has_map": labels > 0, "class_names": np.array(["normal", "benign", "malignant"])}  # fmt: skip
    summary = ci.bootstrap(results, resamples=50)
    for key in ci.METRICS:
        expected = 0.0 if key in ("normal_fp", "lesion_called_normal") else 1.0
        assert summary[key] == {"value": expected, "low": expected, "high": expected}, key


def test_main_writes_the_intervals_and_names_missing_files(ci, eval_dir):
    table = ci.main(str(eval_dir), resamples=100)
    written = json.loads((eval_dir / "confidence_intervals.json").read_text())
    assert written["num_images"] == 9 and written["resamples"] == 100
    assert "| dice |" in table and "95% interval" in table
    (eval_dir / "per_image_maps.npz").unlink()
    with pytest.raises(FileNotFoundError, match="per_image_maps.npz"):
        ci.load_evaluation(eval_dir)
    with pytest.raises(ValueError, match="resamples"):
        ci.bootstrap({"labels": np.zeros(1)}, resamples=0)


def test_maps_that_do_not_fit_the_table_are_named(ci, eval_dir):
    with np.load(eval_dir / "per_image_maps.npz") as stored:
        maps = {key: value for key, value in stored.items() if not key.endswith("_8")}
    np.savez_compressed(eval_dir / "per_image_maps.npz", **maps)
    with pytest.raises(ValueError, match="per_image_maps.npz .* 9 rows of .*per_image.csv"):
        ci.load_evaluation(eval_dir)


def test_grouped_resamples_draw_whole_groups_and_match_the_image_bootstrap_for_singletons(ci):
    labels = np.array([0, 0, 1, 1, 1, 2, 2, 1, 0, 2, 2])
    groups = np.array([5, 5, 7, 7, 8, 9, 9, 8, 6, 3, 4])
    rng = np.random.default_rng(3)
    for _ in range(20):
        drawn = ci.grouped_resample(labels, groups, rng)
        for group in np.unique(groups):
            # a drawn group brings all its images, as often as it was drawn
            assert np.count_nonzero(groups[drawn] == group) % np.count_nonzero(groups == group) == 0, group
    singletons = np.arange(len(labels))
    first, second = np.random.default_rng(4), np.random.default_rng(4)
    for _ in range(5):
        np.testing.assert_array_equal(ci.grouped_resample(labels, singletons, first),
                                      ci.stratified_resample(labels, second))  # fmt: skip


def test_duplicate_groups_widen_the_interval_that_counted_them_as_images(ci, eval_dir):
    results = ci.load_evaluation(eval_dir)
    copies = 4  # every image four times, as near-duplicate frames of one scene
    tiled = {key: value if key == "class_names" else np.repeat(value, copies, axis=0) for key, value in results.items()}
    groups = np.repeat(np.arange(len(results["labels"])), copies)
    as_images = ci.bootstrap(tiled, resamples=200, seed=2)
    as_groups = ci.bootstrap(tiled, resamples=200, seed=2, groups=groups)
    assert as_groups["num_groups"] == 9 and as_images["num_groups"] is None
    for key in ("dice", "accuracy", "macro_f1"):
        assert as_groups[key]["value"] == as_images[key]["value"], key
        assert as_groups[key]["high"] - as_groups[key]["low"] > 1.5 * (as_images[key]["high"] - as_images[key]["low"])


def test_main_groups_by_the_datalist_and_names_an_image_it_lacks(ci, eval_dir):
    names = ci.load_evaluation(eval_dir)["filenames"]
    datalist = eval_dir / "datalist.json"
    entries = [{"image": f"class/{name}", "group": i // 2} for i, name in enumerate(names)]
    datalist.write_text(json.dumps({"training": [], "test": entries, "description": "generated"}))
    table = ci.main(str(eval_dir), resamples=50, datalist=str(datalist))
    assert f"{len(names)} images in {(len(names) + 1) // 2} groups" in table
    assert json.loads((eval_dir / "confidence_intervals.json").read_text())["num_groups"] == (len(names) + 1) // 2
    datalist.write_text(json.dumps({"test": entries[1:]}))
    with pytest.raises(ValueError, match=re.escape(f"does not hold '{names[0]}'")):
        ci.main(str(eval_dir), resamples=50, datalist=str(datalist))
