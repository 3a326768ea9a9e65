"""The model card, the licence and the data licence that the Model Zoo asks for."""

from __future__ import annotations

import hashlib
import importlib.metadata
import re

import pytest

from .conftest import BUNDLE_ROOT, SHARED_DIR

DOCS = BUNDLE_ROOT / "docs"
# the headings of the Model Zoo's README template, in order
HEADINGS = [
    "Model Overview",
    "Data",
    "Preprocessing",
    "Training configuration",
    "Input",
    "Output",
    "Performance",
    "MONAI Bundle Commands",
    "References",
    "License",
]
COMMANDS = ["run training", "run evaluating", "run --config_file configs/inference.json", "ckpt_export", "onnx_export"]


def test_model_card_follows_the_zoo_template():
    text = (DOCS / "README.md").read_text()
    headings = [re.sub(r"^#+\s*", "", line).strip() for line in text.splitlines() if line.startswith("#")]
    positions = [headings.index(h) for h in HEADINGS]
    assert positions == sorted(positions), "headings out of the template's order"
    for command in COMMANDS:
        assert f"python -m monai.bundle {command}" in text, command


def test_license_is_apache_2():
    text = (BUNDLE_ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    try:
        files = importlib.metadata.distribution("monai").files or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    monai_license = [f for f in files if f.name == "LICENSE"]
    if not monai_license:
        pytest.skip("MONAI's LICENSE file is not installed")
    assert text.strip() == monai_license[0].read_text().strip(), "the full Apache-2.0 text, as in the Model Zoo"


def test_data_license_names_busi_and_ships_no_images():
    text = (DOCS / "data_license.txt").read_text()
    for needle in ("BUSI", "CC0 1.0", "Al-Dhabyani", "Data in Brief 28 (2020) 104863"):
        assert needle in text, needle
    suffixes = (".png", ".jpg", ".jpeg", ".bmp", ".dcm", ".nii", ".gz", ".nrrd")
    shipped = [p for p in BUNDLE_ROOT.rglob("*") if p.is_file() and p.suffix.lower() in suffixes]
    assert all(p.parent == DOCS for p in shipped), "images only as figures in docs/"
    busi = SHARED_DIR / "data" / "Dataset_BUSI_with_GT"
    if busi.is_dir():  # figures are fine; copies of the data are not
        digest = lambda path: hashlib.sha1(path.read_bytes()).hexdigest()  # noqa: E731
        data = {digest(p) for p in busi.rglob("*.png")}
        assert not [p for p in shipped if digest(p) in data]
