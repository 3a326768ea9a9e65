"""The bundle changes MONAI Label needs (``monailabel/compat.py``), checked without a server in the core environment.

``tests/test_monailabel.py`` runs them end to end in MONAI Label; these tests are fast and run even where the MONAI
Label environment cannot be made: the copy is made ready and left alone the second time, ``bundle/`` itself is
never touched, and the output transform gives MONAI Label the shapes, dtype, file extension and JSON it needs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor

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


@pytest.fixture
def bundle_copy(tmp_path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(BUNDLE_ROOT, copy, ignore=shutil.ignore_patterns("eval", "models", "__pycache__"))
    return copy


def output_transform():
    """The bundle's ``MonaiLabelOutputd`` once it has it, else the code ``compat.py`` adds to the served copy."""
    import scripts.transforms as transforms

    if hasattr(transforms, compat.TRANSFORM_NAME):
        return getattr(transforms, compat.TRANSFORM_NAME)
    namespace = dict(vars(transforms))
    exec(compat.TRANSFORM_CODE, namespace)  # noqa: S102 - our own code, as it is appended to the copy
    return namespace[compat.TRANSFORM_NAME]


def test_apply_readies_the_copy_once_and_leaves_bundle_alone(bundle_copy):
    before = tree_digest(BUNDLE_ROOT / "configs") + tree_digest(BUNDLE_ROOT / "scripts")
    applied = compat.apply(bundle_copy)
    assert applied == compat.missing(BUNDLE_ROOT)
    assert compat.missing(bundle_copy) == []
    assert compat.apply(bundle_copy) == []  # a second start changes nothing
    assert tree_digest(BUNDLE_ROOT / "configs") + tree_digest(BUNDLE_ROOT / "scripts") == before
    for name in ("train.json", "inference.json"):
        json.loads((bundle_copy / "configs" / name).read_text())
    compile((bundle_copy / "scripts" / "transforms.py").read_text(), "transforms.py", "exec")


def test_datalists_are_not_read_unless_a_dataset_uses_them(bundle_copy, tmp_path):
    """Slicer's Train button sends run_id "": MONAI builds every config item, the BUSI datalists included."""
    compat.apply(bundle_copy)
    parser = ConfigParser()
    parser.read_config(str(bundle_copy / "configs" / "train.json"))
    parser.update({"bundle_root": str(bundle_copy), "dataset_dir": str(tmp_path / "no such folder")})
    for section in ("train", "validate"):
        datalist = parser.get_parsed_content(f"{section}#datalist")
        assert callable(datalist)  # nothing was read: the missing folder would have raised
    train = json.loads((bundle_copy / "configs" / "train.json").read_text())
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
    transform = output_transform()(class_names=["normal", "benign", "malignant"])
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
    transform = output_transform()()
    image = MetaTensor(torch.zeros(1, 4, 4), meta={"spatial_shape": np.array((4, 4)), "filename_or_obj": "a.jpeg"})
    data = {"image": image, "seg_pred": torch.zeros(1, 4, 4), "cls": torch.tensor([0.8, 0.1, 0.1])}
    out = transform({**data, "result_extension": ".nii.gz"})
    assert out["result_extension"] == ".nii.gz"
    assert out["result"]["class"] == "normal" and out["pred"].shape == (4, 4)
