"""What MONAI Label needs from the bundle (``monailabel/compat.py``), checked without a server in the core environment.

``tests/test_monailabel.py`` runs the bundle end to end in MONAI Label; these tests are fast and run even where the
MONAI Label environment cannot be made: the repository's bundle has everything, a bundle that lacks something is
refused with each missing piece named and is never changed, and the output transform gives MONAI Label the shapes,
dtype, file extension and JSON (segment colours included) it needs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor

from scripts.common import LESION_COLOURS
from scripts.transforms import MonaiLabelOutputd

from .conftest import BUNDLE_ROOT, REPO_ROOT


def load_compat():
    spec = importlib.util.spec_from_file_location("monailabel_compat", REPO_ROOT / "monailabel" / "compat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


compat = load_compat()


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()


def load_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def output_entry(inference: dict) -> dict:
    """The ``MonaiLabelOutputd`` entry of ``inference.json``'s postprocessing."""
    entries = [t for t in inference["postprocessing"]["transforms"] if t["_target_"].endswith(compat.TRANSFORM_NAME)]
    assert len(entries) == 1, entries
    return entries[0]


@pytest.fixture
def bundle_copy(tmp_path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(BUNDLE_ROOT, copy, ignore=shutil.ignore_patterns("eval", "models", "__pycache__"))
    return copy


def test_the_repository_bundle_has_everything_monailabel_needs():
    assert compat.missing(BUNDLE_ROOT) == []
    compat.check(BUNDLE_ROOT)


def test_a_bundle_that_lacks_something_is_refused_and_left_alone(bundle_copy):
    transforms = bundle_copy / "scripts" / "transforms.py"
    code = transforms.read_text()
    transforms.write_text(re.sub(rf"^class {compat.TRANSFORM_NAME}\b", "class OldOutputd", code, flags=re.MULTILINE))
    inference_path = bundle_copy / "configs" / "inference.json"
    inference = load_json(inference_path)
    inference["postprocessing"]["transforms"].remove(output_entry(inference))
    inference_path.write_text(json.dumps(inference, indent=4))
    train_path = bundle_copy / "configs" / "train.json"
    train = load_json(train_path)
    train["train"]["dataloader"]["batch_size"] = "@batch_size"
    train["resize_transforms"] = [step for step in train["resize_transforms"] if step["_target_"] != "Lambdad"]
    train_path.write_text(json.dumps(train, indent=4))
    before = tree_digest(bundle_copy)
    needed = compat.missing(bundle_copy)
    assert needed == [
        f"scripts/transforms.py: class {compat.TRANSFORM_NAME}",
        f"configs/inference.json: postprocessing ends with {compat.TRANSFORM_NAME}",
        f'configs/train.json: train#dataloader#batch_size = "{compat.TRAIN_BATCH_SIZE}"',
        "configs/train.json: deterministic_transforms ends with a Lambdad keeping only filename_or_obj",
    ]
    with pytest.raises(compat.BundleNotReadyError) as error:
        compat.check(bundle_copy)
    for line in needed:
        assert line in str(error.value)
    assert tree_digest(bundle_copy) == before, "the check must never patch the bundle"
    assert not hasattr(compat, "apply"), "compat.py checks only; nothing may be patched into a served bundle"


def test_a_missing_config_file_is_named(bundle_copy):
    (bundle_copy / "configs" / "train.json").unlink()
    assert compat.missing(bundle_copy) == ["configs/train.json: file not found"]


def test_datalists_are_not_read_unless_a_dataset_uses_them(tmp_path):
    """Slicer's Train button sends run_id "": MONAI builds every config item, the BUSI datalists included."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "train.json"))
    parser.update({"bundle_root": str(BUNDLE_ROOT), "dataset_dir": str(tmp_path / "no such folder")})
    for section in ("train", "validate"):
        datalist = parser.get_parsed_content(f"{section}#datalist")
        assert callable(datalist)  # nothing was read: the missing folder would have raised
    train = load_json(BUNDLE_ROOT / "configs" / "train.json")
    assert train["training"] == "@run", "`training` must refer to `run`, not copy it (it would train twice)"


@pytest.mark.parametrize(
    "filename, spatial_shape, expected_shape, extension",
    [
        ("scan.png", (40, 30), (40, 30), None),
        ("scan.jpg", (40, 30), (40, 30), ".png"),
        ("scan.nrrd", (40, 30, 1), (40, 30, 1), None),
        ("scan.nii.gz", (40, 30, 1), (40, 30, 1), None),
    ],
)
def test_output_has_the_file_shape_uint8_and_the_class_json(filename, spatial_shape, expected_shape, extension):
    transform = MonaiLabelOutputd(class_names=["normal", "benign", "malignant"])
    meta = {"spatial_shape": np.array(spatial_shape), "filename_or_obj": filename}
    image = MetaTensor(torch.zeros(1, 16, 16), meta=meta)
    label_map = torch.zeros(1, 40, 30, dtype=torch.uint8)
    label_map[0, 5:10, 5:9] = 2
    data = {"image": image, "seg_pred": label_map, "cls": torch.tensor([0.1, 0.2, 0.7]), "cls_pred": torch.tensor(2)}
    out = transform(data)
    assert isinstance(out["pred"], np.ndarray) and out["pred"].dtype == np.uint8
    assert out["pred"].shape == expected_shape
    assert int(out["pred"].sum()) == 2 * 20
    assert out.get("result_extension") == extension
    result = out["result"]
    assert result["class"] == "malignant" and result["class_index"] == 2 and result["lesion_pixels"] == 20
    assert list(result["probabilities"]) == ["normal", "benign", "malignant"]
    assert result["probabilities"]["malignant"] == pytest.approx(0.7)
    json.dumps(result)  # plain JSON values only


def test_output_keeps_an_extension_the_request_asked_for():
    transform = MonaiLabelOutputd()
    image = MetaTensor(torch.zeros(1, 4, 4), meta={"spatial_shape": np.array((4, 4)), "filename_or_obj": "a.jpeg"})
    data = {"image": image, "seg_pred": torch.zeros(1, 4, 4), "cls": torch.tensor([0.8, 0.1, 0.1])}
    out = transform({**data, "result_extension": ".nii.gz"})
    assert out["result_extension"] == ".nii.gz"
    assert out["result"]["class"] == "normal" and out["pred"].shape == (4, 4)


def test_output_json_carries_the_overlay_colour_of_every_segment():
    """The JSON sends, in RGB, the colours ``scripts.io`` draws overlays with (``LESION_COLOURS``), for each segment
    ``metadata.json`` names."""
    segments = load_json(BUNDLE_ROOT / "configs" / "metadata.json")["network_data_format"]["outputs"]["pred"]
    names = {int(value): name for value, name in segments["channel_def"].items() if int(value) > 0}
    transform = MonaiLabelOutputd()
    image = MetaTensor(torch.zeros(1, 4, 4), meta={"spatial_shape": np.array((4, 4)), "filename_or_obj": "a.png"})
    data = {"image": image, "seg_pred": torch.zeros(1, 4, 4), "cls": torch.tensor([0.1, 0.8, 0.1])}
    result = transform(data)["result"]
    assert result["label_colors"] == {"benign": [0, 200, 0], "malignant": [230, 0, 0]}
    assert result["label_colors"] == {name: list(LESION_COLOURS[value]) for value, name in names.items()}
    assert json.loads(json.dumps(result)) == result  # plain JSON values only
    result["label_colors"]["benign"][0] = 255  # a caller changing one result leaves the next one alone
    assert transform(data)["result"]["label_colors"]["benign"] == [0, 200, 0]


def test_monailabel_gets_the_first_member_of_an_ensemble(tmp_path, monkeypatch):
    """MONAI Label fine-tunes one network (train.json), so the app's copy of an ensemble's weights is its first
    member; one network's weights stay as they are."""
    from scripts.net import MultiTaskResUNet

    monkeypatch.syspath_prepend(str(REPO_ROOT / "monailabel"))  # prepare_app imports compat from its folder
    spec = importlib.util.spec_from_file_location("monailabel_prepare_app", REPO_ROOT / "monailabel" / "prepare_app.py")
    prepare_app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare_app)
    tiny = {"channels": (8, 16, 32), "strides": (2, 2, 2), "decoder_channels": (16, 8, 8)}
    members = [MultiTaskResUNet(**tiny).state_dict() for _ in range(2)]
    ensemble = {f"members.{i}.{k}": v for i, state in enumerate(members) for k, v in state.items()}
    model = tmp_path / "model.pt"
    torch.save({"model": ensemble}, model)
    assert prepare_app.keep_first_member(model) == 2
    kept = torch.load(model, weights_only=True)["model"]
    assert kept.keys() == members[0].keys() and all(torch.equal(kept[k], v) for k, v in members[0].items())
    assert sorted(tmp_path.iterdir()) == [model]  # no temporary left beside it
    before = model.read_bytes()
    assert prepare_app.keep_first_member(model) == 1 and model.read_bytes() == before
