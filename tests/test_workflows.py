"""End to end: the three user commands (train, evaluate, infer) on generated data with a tiny network."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from .conftest import EVALUATE_CONFIGS, REPO_ROOT, TINY_NETWORK_ARGS, TRAIN_CONFIG, load_tool, run_bundle


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_dataset, synthetic_datalist):
    work = tmp_path_factory.mktemp("workflow")
    shutil.copy(synthetic_datalist, work / "datalist.json")
    common = [
        "--dataset_dir", str(synthetic_dataset), "--datalist", str(work / "datalist.json"),
        "--ckpt_dir", str(work / "models"), "--output_dir", str(work / "eval"), *TINY_NETWORK_ARGS,
    ]  # fmt: skip
    run_bundle("training", "--config_file", TRAIN_CONFIG, *common, "--max_epochs", "2", "--batch_size", "4")
    return work, common


def test_training_writes_a_plain_state_dict(trained):
    work, _ = trained
    checkpoint = torch.load(work / "models" / "model.pt", weights_only=True)
    assert set(checkpoint) == {"model"} and "classification_head.layers.3.weight" in checkpoint["model"]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(work / "eval"))


def test_training_leaves_the_saved_split_alone(trained):
    work, common = trained
    before = (work / "datalist.json").read_bytes()
    run_bundle("--config_file", TRAIN_CONFIG, *common, "--max_epochs", "1", "--batch_size", "4")  # `run` id
    assert (work / "datalist.json").read_bytes() == before


def test_evaluation_writes_metrics_and_plots(trained):
    work, common = trained
    weights = (work / "models" / "model.pt").read_bytes()
    result = run_bundle("--config_file", EVALUATE_CONFIGS, *common, "--batch_size", "4")  # the default id, `run`
    assert "SupervisedTrainer" not in result.stdout + result.stderr, "evaluate.json overrides `run`: no training"
    assert (work / "models" / "model.pt").read_bytes() == weights
    metrics = json.loads((work / "eval" / "metrics.json").read_text())
    datalist = json.loads((work / "datalist.json").read_text())
    assert metrics["num_images"] == len(datalist["test"])
    for key in ("lesion_dice", "lesion_iou", "pixel_accuracy", "mean_iou", "normal_false_positive_rate"):
        assert 0.0 <= metrics["segmentation"][key] <= 1.0, key
    for key in ("accuracy", "macro_f1"):
        assert 0.0 <= metrics["classification"][key] <= 1.0, key
    load_tool("evaluation_figures").draw(str(work / "eval"))
    for plot in ("confusion_matrix.png", "roc_curves.png", "overlays.png"):
        assert Image.open(work / "eval" / plot).size[0] > 100


def test_evaluation_of_an_ensemble_of_trained_networks(trained, tmp_path):
    """evaluate.json builds as many members as model.pt holds: two copies of the trained network score as it does."""
    work, common = trained
    members = tmp_path / "models"
    load_tool("make_ensemble").main([str(work / "models" / "model.pt")] * 2, str(members / "model.pt"))
    ensemble_common = [arg if arg != str(work / "models") else str(members) for arg in common]
    ensemble_common[ensemble_common.index(str(work / "eval"))] = str(tmp_path / "eval")
    run_bundle("--config_file", EVALUATE_CONFIGS, *common, "--batch_size", "4")
    run_bundle("--config_file", EVALUATE_CONFIGS, *ensemble_common, "--batch_size", "4")
    single = json.loads((work / "eval" / "metrics.json").read_text())
    ensemble = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for group, key in [("segmentation", "lesion_dice"), ("segmentation", "pixel_accuracy"),
                       ("classification", "accuracy"), ("classification", "macro_f1")]:  # fmt: skip
        assert ensemble[group][key] == pytest.approx(single[group][key], abs=1e-6), key


def test_inference_on_mixed_folder(trained, synthetic_dataset, tmp_path):
    import itk
    import nibabel as nib

    work, _ = trained
    source = sorted((synthetic_dataset / "malignant").glob("* (1).png"))
    inputs = tmp_path / "in put"
    inputs.mkdir()
    image = np.array(Image.open(source[0]).convert("L"))
    Image.fromarray(image).save(inputs / "scan (1).png")
    nib.save(nib.Nifti1Image(image.T[:, :, None].astype(np.int16), np.diag([0.1, 0.1, 1, 1])), inputs / "scan.nii.gz")
    itk.imwrite(itk.image_from_array(image[None].astype(np.int16)), str(inputs / "scan.nrrd"))
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    Image.fromarray(np.zeros((40, 50), np.uint8)).save(inputs / "blank.png")
    out = tmp_path / "out"
    run_bundle(
        "--config_file", "bundle/configs/inference.json", "--dataset_dir", str(inputs), "--output_dir", str(out),
        "--ckpt_path", str(work / "models" / "model.pt"), "--explanation_maps", "true", *TINY_NETWORK_ARGS,
    )  # fmt: skip
    with open(out / "predictions.csv", newline="") as stream:
        rows = {Path(row["image"]).name: row for row in csv.DictReader(stream)}
    assert set(rows) == {"scan (1).png", "scan.nii.gz", "scan.nrrd", "blank.png"}
    assert rows["blank.png"]["explanation_map"] == "" and not (out / "blank_cam.png").exists()
    for name in ("scan (1).png", "scan.nii.gz", "scan.nrrd"):
        heat_map = Image.open(rows[name]["explanation_map"])
        assert heat_map.size == image.shape[::-1] and heat_map.mode == "RGB", name
    assert "broken.png" in (out / "skipped.csv").read_text()
    blank = rows.pop("blank.png")
    assert (blank["status"], blank["predicted_class"], blank["p_malignant"]) == ("not assessable", "", "")
    assert "near-uniform" in blank["status_reason"]
    assert not np.array(Image.open(out / "blank_seg.png")).any()
    maps = {
        "scan (1).png": np.array(Image.open(out / "scan (1)_seg.png")),
        "scan.nii.gz": np.asarray(nib.load(out / "scan_seg.nii.gz").dataobj)[:, :, 0].T,
        "scan.nrrd": itk.array_from_image(itk.imread(str(out / "scan_seg.nrrd")))[0],
    }
    for name, label_map in maps.items():
        row = rows[name]
        assert label_map.shape == image.shape, name
        probabilities = [float(row[f"p_{c}"]) for c in ("normal", "benign", "malignant")]
        assert abs(sum(probabilities) - 1) < 1e-4
        assert row["status"] == "ok" and 0.0 <= float(row["uncertainty"]) <= 1.0, name
        predicted = ["normal", "benign", "malignant"].index(row["predicted_class"])
        assert set(np.unique(label_map)) <= {0, predicted}, name  # the map agrees with the class
        assert Image.open(out / f"{Path(name).name.split('.')[0]}_overlay.png").size == image.shape[::-1]
    np.testing.assert_array_equal(maps["scan.nii.gz"], maps["scan (1).png"])
    np.testing.assert_array_equal(maps["scan.nrrd"], maps["scan (1).png"])


def test_inference_onnxruntime_backend_writes_the_same_predictions(trained, synthetic_dataset, tmp_path):
    pytest.importorskip("onnxruntime")
    work, _ = trained
    inputs = tmp_path / "images"
    inputs.mkdir()
    for path in sorted(synthetic_dataset.glob("*/* (1).png")):
        (inputs / f"{path.parent.name}.png").write_bytes(path.read_bytes())
    tables = {}
    for backend in ("torch", "onnxruntime"):
        out = tmp_path / backend
        run_bundle(
            "--config_file", "bundle/configs/inference.json", "--dataset_dir", str(inputs), "--output_dir", str(out),
            "--ckpt_path", str(work / "models" / "model.pt"), "--backend", backend, *TINY_NETWORK_ARGS,
        )  # fmt: skip
        with open(out / "predictions.csv", newline="") as stream:
            tables[backend] = {Path(row["image"]).name: row for row in csv.DictReader(stream)}
    assert set(tables["torch"]) == set(tables["onnxruntime"]) == {"normal.png", "benign.png", "malignant.png"}
    assert "explanation_map" not in tables["torch"]["normal.png"] and not list(tmp_path.glob("*/*_cam.png"))  # off
    for name, expected in tables["torch"].items():
        found = tables["onnxruntime"][name]
        assert (found["predicted_class"], found["status"]) == (expected["predicted_class"], expected["status"]), name
        for column in ("p_normal", "p_benign", "p_malignant", "uncertainty"):
            assert abs(float(found[column]) - float(expected[column])) < 1e-4, (name, column)
        assert abs(int(found["lesion_pixels"]) - int(expected["lesion_pixels"])) <= 2, name


@pytest.mark.parametrize("balance", [0.0, 0.5, 1.0])
def test_training_sampler_balances_classes(balance):
    """Each training image is drawn with weight (images of its class) ** -class_balance; without classes in the
    datalist (MONAI Label's image/label lists) every image weighs the same."""
    from monai.bundle import ConfigParser

    counts = {0: 2, 1: 6, 2: 3}
    items = [{"image": f"{c}_{i}.png", "class": c} for c, n in counts.items() for i in range(n)]
    parser = ConfigParser()
    parser.read_config(str(REPO_ROOT / TRAIN_CONFIG))
    parser["class_balance"] = balance
    parser["train#dataset"] = {"_target_": "monai.data.Dataset", "data": items}
    sampler = parser.get_parsed_content("train#sampler")
    expected = torch.tensor([counts[item["class"]] ** -balance for item in items], dtype=torch.double)
    torch.testing.assert_close(sampler.weights, expected)
    assert sampler.num_samples == len(items) and sampler.replacement
    parser["train#dataset"] = {"_target_": "monai.data.Dataset", "data": [{"image": "a"}, {"image": "b"}]}
    unlabelled = parser.get_parsed_content("train#sampler", lazy=False).weights
    assert unlabelled[0] == unlabelled[1] > 0
    class_share = {c: float(expected[[i["class"] == c for i in items]].sum() / expected.sum()) for c in counts}
    if balance == 1.0:
        assert all(share == pytest.approx(1 / 3) for share in class_share.values())


def test_inference_on_an_ensemble_averages_its_members(tmp_path):
    """inference.json builds as many members as the checkpoint holds (tools/make_ensemble.py); the ensemble's
    probabilities lie between its members' and its Grad-CAM map is written."""
    from .conftest import predict, tiny_model_file

    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (70, 90), dtype=np.uint8)).save(inputs / "scan one.png")
    members = [tiny_model_file(tmp_path / f"seed{seed}.pt", seed=seed) for seed in (0, 1)]
    ensemble = tmp_path / "ensemble.pt"
    load_tool("make_ensemble").main([str(m) for m in members], str(ensemble))
    probs = {}
    for name, model in (("seed0", members[0]), ("seed1", members[1]), ("ensemble", ensemble)):
        extra = ("--explanation_maps", "true") if name == "ensemble" else ()
        predict(inputs, tmp_path / name, model, "--amp", "False", "--cls_temperature", "1.0", *extra)
        with open(tmp_path / name / "predictions.csv", newline="") as stream:
            row = next(csv.DictReader(stream))
        probs[name] = np.array([float(row[f"p_{c}"]) for c in ("normal", "benign", "malignant")])
    np.testing.assert_allclose(probs["ensemble"], (probs["seed0"] + probs["seed1"]) / 2, atol=2e-3)
    assert not np.allclose(probs["seed0"], probs["seed1"], atol=1e-2)  # the members differ
    assert (tmp_path / "ensemble" / "scan one_cam.png").is_file()
