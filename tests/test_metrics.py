"""Tests of bundle/scripts/metrics.py (hand-computed metric values, ignite metrics, the report handler) and of
tools/evaluation_figures.py."""

from __future__ import annotations

import csv
import functools
import json
import math
import os

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from ignite.exceptions import NotComputableError
from ignite.metrics import MetricsLambda
from monai.data import MetaTensor
from monai.handlers import from_engine
from PIL import Image

from scripts import metrics as M  # the bundle folder is on sys.path (conftest.py)
from scripts.common import CLASS_NAMES

from .conftest import REPO_ROOT, TRAIN_CONFIG, load_tool


def train_config():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO_ROOT / TRAIN_CONFIG))
    return parser


def configured_lesion_dice():
    """train.json's lesion Dice metric (MONAI's ``MeanDice``), a new instance per call."""
    return train_config().get_parsed_content("train#key_metric#train_lesion_dice", lazy=False)


@functools.lru_cache(maxsize=1)
def lesion_mask_transform():
    """The step of train.json's post-processing that adds the lesion masks the lesion Dice compares."""
    parser = train_config()
    steps = parser["train"]["postprocessing"]["transforms"]
    index = next(i for i, step in enumerate(steps) if "seg_pred_lesion" in str(step.get("overwrite")))
    return parser.get_parsed_content(f"train#postprocessing#transforms#{index}")


def with_lesion_masks(sample: dict) -> dict:
    """``sample`` with the lesion masks that train.json's post-processing adds for the lesion Dice."""
    return lesion_mask_transform()(sample)


def square(size: int, top: int, left: int, side: int, value: int = 1, shape: tuple = ()) -> np.ndarray:
    """A ``size x size`` map with a ``side x side`` square of ``value`` at ``(top, left)``."""
    m = np.zeros((size, size), dtype=np.uint8)
    m[top : top + side, left : left + side] = value
    return m.reshape(shape or m.shape)


# ----------------------------------------------------------------------------------------------- segmentation


def test_lesion_dice_iou_known_overlap():
    gt = square(8, 0, 0, 4)  # 16 pixels
    # shifted by 2 columns: 8 pixels overlap -> Dice 16/32, IoU 8/24
    assert M.lesion_dice_iou(square(8, 0, 2, 4), gt) == pytest.approx((1 / 2, 1 / 3), abs=1e-12)
    # shifted by (2, 2): 4 pixels overlap -> Dice 8/32, IoU 4/28
    assert M.lesion_dice_iou(square(8, 2, 2, 4), gt) == pytest.approx((1 / 4, 1 / 7), abs=1e-12)
    # lesion = map > 0: a malignant prediction of a benign lesion still overlaps; (1, H, W) tensors work
    pred = torch.as_tensor(square(8, 0, 0, 4, value=2, shape=(1, 8, 8)))
    assert M.lesion_dice_iou(pred, torch.as_tensor(gt[None])) == (1.0, 1.0)
    # disjoint
    assert M.lesion_dice_iou(square(8, 4, 4, 4), gt) == (0.0, 0.0)


def test_lesion_dice_iou_empty_cases():
    empty = np.zeros((4, 4))
    assert M.lesion_dice_iou(empty, empty) == (1.0, 1.0)
    assert M.lesion_dice_iou(square(4, 0, 0, 1), empty) == (0.0, 0.0)  # false positive on a normal image
    assert M.lesion_dice_iou(empty, square(4, 0, 0, 1)) == (0.0, 0.0)  # missed lesion
    with pytest.raises(ValueError):
        M.lesion_dice_iou(np.zeros((4, 4)), np.zeros((4, 5)))


def tiny_segmentation_set() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Four 4x4 images: two lesion images, a normal with one false-positive pixel, a clean normal."""
    gt0 = square(4, 0, 0, 2, 1)  # benign, 4 px
    pred0 = np.zeros((4, 4), np.uint8)
    pred0[0:2, 0:3] = 1  # 6 px, 4 overlap: Dice 8/10, IoU 4/6
    gt1 = square(4, 0, 0, 2, 2)  # malignant, 4 px
    pred1 = np.zeros((4, 4), np.uint8)
    pred1[0, 0:2] = 2
    pred1[1, 0] = 1  # 3 px inside the lesion: Dice 6/7, IoU 3/4
    gt2 = np.zeros((4, 4), np.uint8)
    pred2 = square(4, 3, 3, 1, 1)  # one false-positive pixel
    gt3, pred3 = np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8)
    return [pred0, pred1, pred2, pred3], [gt0, gt1, gt2, gt3]


def test_segmentation_metrics_tiny_set():
    preds, gts = tiny_segmentation_set()
    out = M.segmentation_metrics(preds, gts)
    per_image = out.pop("per_image")
    assert per_image["lesion_dice"] == pytest.approx([0.8, 6 / 7, 0, 1])
    assert per_image["lesion_iou"] == pytest.approx([2 / 3, 3 / 4, 0, 1])
    assert out["lesion_dice"] == pytest.approx((0.8 + 6 / 7) / 2)
    assert out["lesion_dice_std"] == pytest.approx(abs(0.8 - 6 / 7) / 2)
    assert out["lesion_iou"] == pytest.approx((2 / 3 + 3 / 4) / 2)
    assert out["lesion_dice_all_images"] == pytest.approx((0.8 + 6 / 7 + 0 + 1) / 4)
    # binary problem over 64 pixels: tp 7, fp 3, fn 1, tn 53
    assert out["pixel_accuracy"] == pytest.approx(60 / 64)
    assert out["background_iou"] == pytest.approx(53 / 57)
    assert out["lesion_pixel_iou"] == pytest.approx(7 / 11)
    assert out["mean_iou"] == pytest.approx((53 / 57 + 7 / 11) / 2)
    # 3-valued maps: background 2*53/(56+54), benign 2*4/(4+8), malignant 2*2/(4+2)
    assert out["dice_background"] == pytest.approx(106 / 110)
    assert out["dice_benign"] == pytest.approx(2 / 3)
    assert out["dice_malignant"] == pytest.approx(2 / 3)
    assert out["normal_false_positive_rate"] == pytest.approx(0.5)
    assert (out["num_images"], out["num_lesion_images"], out["num_normal_images"]) == (4, 2, 2)
    # layouts: a stacked (N, 1, H, W) tensor gives the same numbers
    stacked = M.segmentation_metrics(torch.as_tensor(np.stack(preds))[:, None], torch.as_tensor(np.stack(gts))[:, None])
    assert stacked.pop("per_image") == per_image
    assert stacked == pytest.approx(out)


def test_segmentation_metrics_no_lesion_or_no_normal():
    empty = np.zeros((4, 4), np.uint8)
    out = M.segmentation_metrics([empty, square(4, 0, 0, 1)], [empty, empty])
    assert math.isnan(out["lesion_dice"]) and math.isnan(out["lesion_iou"])
    assert out["normal_false_positive_rate"] == 0.5
    assert math.isnan(out["dice_malignant"])  # absent from prediction and ground truth
    out = M.segmentation_metrics([square(4, 0, 0, 2)], [square(4, 0, 0, 2)])
    assert out["lesion_dice"] == 1.0 and math.isnan(out["normal_false_positive_rate"])


# --------------------------------------------------------------------------------------------- classification


def test_classification_metrics_six_samples():
    labels = [0, 0, 1, 1, 2, 2]
    preds = [0, 1, 1, 1, 2, 0]
    probs = np.eye(3)[preds] * 0.7 + 0.1
    out = M.classification_metrics(probs, [torch.tensor(p) for p in preds], torch.tensor(labels), CLASS_NAMES)
    assert out["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert out["accuracy"] == pytest.approx(4 / 6)
    pc = out["per_class"]
    assert [pc[n]["precision"] for n in CLASS_NAMES] == pytest.approx([1 / 2, 2 / 3, 1.0])
    assert [pc[n]["recall"] for n in CLASS_NAMES] == pytest.approx([1 / 2, 1.0, 1 / 2])
    assert [pc[n]["f1"] for n in CLASS_NAMES] == pytest.approx([1 / 2, 4 / 5, 2 / 3])
    assert [pc[n]["support"] for n in CLASS_NAMES] == [2, 2, 2]
    assert out["macro_precision"] == pytest.approx(13 / 18)
    assert out["macro_recall"] == pytest.approx(2 / 3)
    assert out["macro_f1"] == pytest.approx(59 / 90)
    # preds=None -> argmax of the probabilities (same here)
    assert M.classification_metrics(probs, None, labels)["confusion_matrix"] == out["confusion_matrix"]


def test_auc_separable_is_one():
    labels = [0, 0, 1, 1, 2, 2]
    probs = np.eye(3)[labels] * 0.8 + 0.1
    out = M.classification_metrics(probs, None, labels)
    assert out["macro_auc"] == pytest.approx(1.0)
    assert all(out["per_class"][n]["auc"] == pytest.approx(1.0) for n in CLASS_NAMES)


def test_auc_known_example_with_absent_class():
    probs = [[0.6, 0.3, 0.1], [0.3, 0.4, 0.3], [0.5, 0.4, 0.1], [0.2, 0.7, 0.1]]
    labels = [0, 0, 1, 1]  # malignant absent
    out = M.classification_metrics([torch.tensor(p) for p in probs], None, labels)
    pc = out["per_class"]
    assert pc["normal"]["auc"] == pytest.approx(0.75)  # 3 of 4 positive/negative pairs ordered
    assert pc["benign"]["auc"] == pytest.approx(0.875)  # 3 pairs + one tie
    assert math.isnan(pc["malignant"]["auc"])
    assert out["macro_auc"] == pytest.approx((0.75 + 0.875) / 2)
    # malignant neither true nor predicted: NaN, left out of the macro averages
    assert math.isnan(pc["malignant"]["f1"]) and pc["malignant"]["support"] == 0
    assert out["macro_f1"] == pytest.approx(0.5)
    # the ROC curve points integrate to the same AUC
    fpr, tpr = load_tool("evaluation_figures").roc_curve(np.array(probs)[:, 0], np.array(labels) == 0)
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    assert np.trapezoid(tpr, fpr) == pytest.approx(0.75)


def test_precision_recall_f1_zero_division():
    # class 2 predicted but never true: precision 0, recall 0 (not NaN); class 1 never predicted: precision 0
    cm = np.array([[2, 0, 1], [1, 0, 0], [0, 0, 0]])
    p, r, f = M.precision_recall_f1(cm)
    np.testing.assert_allclose(p, [2 / 3, 0, 0])
    np.testing.assert_allclose(r, [2 / 3, 0, 0])
    np.testing.assert_allclose(f, [2 / 3, 0, 0])


# ------------------------------------------------------------------------------------------------ ignite metrics


def make_sample(gt: np.ndarray, pred: np.ndarray, cls_label: int, cls_pred: int, name: str = "x.png") -> dict:
    size = gt.shape[-1]
    image = MetaTensor(torch.rand(1, size, size), meta={"filename_or_obj": f"/data/{name}"})
    prob = torch.full((3,), 0.15)
    prob[cls_pred] = 0.7
    return with_lesion_masks({
        "image": image,
        "label": torch.as_tensor(gt, dtype=torch.float32).reshape(1, size, size),
        "seg_pred": torch.as_tensor(pred, dtype=torch.float32).reshape(1, size, size),
        "cls": prob,
        "cls_pred": torch.tensor(cls_pred),
        "cls_label": torch.tensor([cls_label]),
    })


def epoch_batches(epoch: int) -> list[list[dict]]:
    """Epoch 1: perfect predictions. Epoch 2: lesion Dice 0.5 and 2 of 4 wrong classes."""
    g = square(8, 0, 0, 4)
    if epoch == 1:
        return [[make_sample(g, g, 1, 1), make_sample(2 * g, 2 * g, 2, 2)], [make_sample(0 * g, 0 * g, 0, 0)]]
    return [
        [make_sample(g, square(8, 0, 2, 4), 1, 2), make_sample(2 * g, 2 * g, 2, 2)],
        [make_sample(2 * g, 0 * g, 2, 0), make_sample(0 * g, g, 0, 0)],
    ]


@pytest.mark.parametrize("skip_unrolling", [True, False])
def test_ignite_metrics_reset_between_epochs(skip_unrolling):
    engine = Engine(lambda e, batch_index: epoch_batches(e.state.epoch)[batch_index])
    dice = configured_lesion_dice()
    f1 = M.ClassificationF1(
        output_transform=from_engine(["cls_pred", "cls_label"]), num_classes=3, skip_unrolling=skip_unrolling
    )
    dice.attach(engine, "lesion_dice")
    f1.attach(engine, "macro_f1")
    MetricsLambda(lambda d, f: (d + f) / 2, dice, f1).attach(engine, "combined")
    # a MetricsLambda over metrics that are not attached on their own
    MetricsLambda(lambda d, f: d * f, configured_lesion_dice(), M.ClassificationF1()).attach(engine, "product")
    history = []
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: history.append(dict(e.state.metrics)))
    engine.run([0, 1], max_epochs=2)

    assert history[0]["lesion_dice"] == pytest.approx(1.0)
    assert history[0]["macro_f1"] == pytest.approx(1.0)
    assert history[0]["combined"] == pytest.approx(1.0)
    # epoch 2 alone: lesion Dice (0.5 + 1 + 0) / 3; confusion [[1,0,0],[0,0,1],[1,0,1]] -> F1 (2/3, 0, 1/2)
    assert history[1]["lesion_dice"] == pytest.approx(0.5)
    assert history[1]["macro_f1"] == pytest.approx(7 / 18)
    assert history[1]["combined"] == pytest.approx((0.5 + 7 / 18) / 2)
    assert history[1]["product"] == pytest.approx(0.5 * 7 / 18)


def test_ignite_metrics_direct_update_and_edge_cases():
    dice = configured_lesion_dice()
    normal = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    dice.update((normal, normal))
    assert dice.compute() == 0.0  # no lesion image seen
    g = torch.as_tensor(square(8, 0, 0, 4) > 0)
    dice.update((torch.stack([g, 0 * g])[:, None], torch.stack([g, 0 * g])[:, None]))
    assert dice.compute() == 1.0  # the normal images are skipped
    dice.update((torch.stack([0 * g])[:, None], torch.stack([g])[:, None]))
    assert dice.compute() == 0.5  # a missed lesion scores 0
    dice.reset()
    dice.update((normal, normal))
    assert dice.compute() == 0.0

    f1 = M.ClassificationF1(num_classes=3)
    with pytest.raises(NotComputableError):
        f1.compute()
    f1.update((torch.tensor([[0.1, 0.8, 0.1], [0.9, 0.05, 0.05]]), torch.tensor([1, 0])))  # scores are arg-maxed
    assert f1.compute() == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------- report handler


def report_batches(size: int = 64) -> list[list[dict]]:
    """Three iterations, nine samples: 4 benign, 3 malignant, 2 normal, with varied quality."""
    specs = [  # (true class, pred class, gt square, pred square)
        (1, 1, (10, 10, 20), (12, 12, 20)),
        (1, 1, (30, 30, 16), (30, 30, 16)),
        (1, 2, (5, 40, 12), (20, 40, 12)),
        (2, 2, (20, 20, 24), (22, 18, 24)),
        (2, 1, (8, 8, 10), None),
        (2, 2, (40, 10, 15), (38, 12, 15)),
        (0, 0, None, None),
        (0, 1, None, (5, 5, 6)),
        (1, 0, (25, 25, 8), None),
    ]
    samples = []
    for k, (cl, cp, gs, ps) in enumerate(specs):
        gt = square(size, *gs, value=cl) if gs else np.zeros((size, size), np.uint8)
        pred = square(size, *ps, value=cp if cp else 1) if ps else np.zeros((size, size), np.uint8)
        name = f"{CLASS_NAMES[cl]} ({k}).png"
        s = make_sample(gt, pred, cl, cp, name)
        s["image"] = MetaTensor(torch.randn(1, size, size) + torch.as_tensor(gt > 0) * 2, meta=s["image"].meta)
        samples.append(s)
    return [samples[0:3], samples[3:6], samples[6:9]]


def test_evaluation_report_end_to_end(tmp_path):
    batches = report_batches()
    flat = [s for b in batches for s in b]
    out_dir = tmp_path / "eval" / "nested"
    report = M.EvaluationReport(output_dir=str(out_dir), prefix="val_")
    engine = Engine(lambda e, batch: batch)
    report.attach(engine)
    report.attach(engine)  # attaching twice registers the handlers once
    state = engine.run(batches, max_epochs=2)  # the second epoch must not accumulate the first one's samples

    assert sorted(os.listdir(out_dir)) == ["metrics.json", "per_image.csv", "per_image_maps.npz"]

    summary = json.loads((out_dir / "metrics.json").read_text())
    assert summary["num_images"] == 9 and summary["num_lesion_images"] == 7
    seg = M.segmentation_metrics([s["seg_pred"] for s in flat], [s["label"] for s in flat])
    cls = M.classification_metrics(
        [s["cls"] for s in flat], [s["cls_pred"] for s in flat], [s["cls_label"] for s in flat]
    )
    per_image = seg.pop("per_image")
    for k, v in seg.items():
        assert summary["segmentation"][k] == pytest.approx(v), k
    assert summary["classification"]["confusion_matrix"] == cls["confusion_matrix"]
    for k in ("accuracy", "macro_precision", "macro_recall", "macro_f1", "macro_auc"):
        assert summary["classification"][k] == pytest.approx(cls[k]), k
    assert summary["classification"]["per_class"]["malignant"]["f1"] == pytest.approx(
        cls["per_class"]["malignant"]["f1"]
    )

    assert state.metrics["val_lesion_dice"] == pytest.approx(seg["lesion_dice"])
    assert state.metrics["val_macro_f1"] == pytest.approx(cls["macro_f1"])
    assert state.metrics["val_normal_fp_rate"] == pytest.approx(0.5)

    with open(out_dir / "per_image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9
    assert rows[0]["filename"] == "benign (0).png" and rows[2]["pred_class"] == "malignant"
    np.testing.assert_allclose([float(r["lesion_dice"]) for r in rows], per_image["lesion_dice"], atol=1e-6)
    np.testing.assert_allclose([float(r["lesion_iou"]) for r in rows], per_image["lesion_iou"], atol=1e-6)
    np.testing.assert_allclose(
        [float(r["prob_normal"]) for r in rows], [float(s["cls"][0]) for s in flat], atol=1e-6
    )

    with np.load(out_dir / "per_image_maps.npz") as maps:  # rows first, as displayed
        np.testing.assert_array_equal(maps["label_0"], flat[0]["label"][0].numpy().T)
        assert maps["image_8"].dtype == np.uint8 and maps["image_8"].shape == (64, 64)

    written = load_tool("evaluation_figures").draw(str(out_dir), num_overlays=6)
    expected = ["confusion_matrix.png", "overlays.png", "roc_curves.png"]
    assert sorted(os.path.basename(path) for path in written) == expected
    for name in ("confusion_matrix.png", "roc_curves.png", "overlays.png"):
        with Image.open(out_dir / name) as im:
            im.verify()
        with Image.open(out_dir / name) as im:
            assert im.format == "PNG" and min(im.size) > 200
    with Image.open(out_dir / "overlays.png") as im:
        assert im.size[1] > im.size[0]  # 6 rows x 3 columns


def test_evaluation_report_nan_written_as_null(tmp_path):
    g = square(16, 2, 2, 6)
    batches = [[make_sample(g, g, 1, 1), make_sample(g, g, 1, 1), make_sample(0 * g, 0 * g, 0, 0)]]
    engine = Engine(lambda e, batch: batch)
    M.EvaluationReport(output_dir=str(tmp_path)).attach(engine)
    engine.run(batches)
    text = (tmp_path / "metrics.json").read_text()
    assert "NaN" not in text
    summary = json.loads(text)
    assert summary["classification"]["per_class"]["malignant"]["auc"] is None
    assert summary["segmentation"]["dice_malignant"] is None
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_report_from_bundle_config(tmp_path):
    from monai.bundle import ConfigParser

    parser = ConfigParser(
        {
            "output_dir": str(tmp_path / "eval"),
            "handler": {"_target_": "scripts.metrics.EvaluationReport", "output_dir": "@output_dir"},
        }
    )
    handler = parser.get_parsed_content("handler")
    assert isinstance(handler, M.EvaluationReport) and handler.output_dir == str(tmp_path / "eval")
