"""Tests of the synthetic BUSI-layout data generator (tools/synthetic.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))

from synthetic import (  # noqa: E402
    CLASSES,
    MARKER_FILE,
    case_rng,
    generate_case,
    generate_dataset,
    load_binary_mask,
    make_case,
)

NAME = re.compile(r"^(benign|malignant|normal) \((\d+)\)(_mask(_(\d+))?)?\.png$")


def _files(root: Path) -> dict[str, bytes]:
    """All files under ``root`` as relative path -> bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _union(folder: Path, stem: str) -> np.ndarray:
    """Union of all mask files of one case."""
    masks = [load_binary_mask(p) for p in sorted(folder.glob(f"{stem}_mask*.png"))]
    assert masks, f"no mask for {stem}"
    return np.logical_or.reduce(masks)


def _gray(path: Path) -> np.ndarray:
    """Image as a 2-D uint8 array (RGB images must have identical planes)."""
    data = np.asarray(Image.open(path))
    if data.ndim == 3:
        assert data.shape[-1] == 3 and np.array_equal(data[..., 0], data[..., 1])
        assert np.array_equal(data[..., 0], data[..., 2])
        data = data[..., 0]
    return data


def _ring(mask: np.ndarray, width: int = 7) -> np.ndarray:
    """Band of pixels just outside ``mask``."""
    grown = cv2.dilate(mask.astype(np.uint8), np.ones((2 * width + 1, 2 * width + 1), np.uint8)) > 0
    return grown & ~mask


def _solidity(mask: np.ndarray) -> float:
    """Area / convex hull area of the largest component."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    contour = max(contours, key=cv2.contourArea)
    return float(mask.sum()) / max(float(cv2.contourArea(cv2.convexHull(contour))), 1.0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A small data set with every variation present."""
    root = tmp_path_factory.mktemp("busi")
    counts = {"benign": 6, "malignant": 6, "normal": 3}
    assert generate_dataset(str(root), counts, seed=3, rgb_fraction=0.5, extra_mask_fraction=0.5) == counts
    return root


def test_layout_names_and_counts(dataset):
    assert sorted(p.name for p in dataset.iterdir()) == sorted([*CLASSES, MARKER_FILE])
    expected = {"benign": 6, "malignant": 6, "normal": 3}
    for label in CLASSES:
        names = [p.name for p in (dataset / label).iterdir()]
        parsed = [NAME.match(n) for n in names]
        assert all(parsed), names
        assert all(m.group(1) == label for m in parsed)
        images = sorted(int(m.group(2)) for m in parsed if m.group(3) is None)
        masks = sorted(int(m.group(2)) for m in parsed if m.group(3) == "_mask")
        extras = [m for m in parsed if m.group(5) is not None]
        assert images == masks == list(range(1, expected[label] + 1))
        assert all(m.group(5) == "1" for m in extras)
        # extra masks: exactly round(0.5 * count) lesion cases, never for normal
        assert len(extras) == (3 if label != "normal" else 0)


def test_masks_match_images(dataset):
    for label in CLASSES:
        for image_path in (dataset / label).glob(f"{label} (*).png"):
            if "_mask" in image_path.name:
                continue
            image = _gray(image_path)
            assert image.dtype == np.uint8 and 180 <= image.shape[0] <= 260 and 200 <= image.shape[1] <= 300
            mask_paths = sorted((dataset / label).glob(f"{image_path.stem}_mask*.png"))
            for mask_path in mask_paths:
                mask = load_binary_mask(mask_path)
                assert mask.shape == image.shape, mask_path.name
                if label == "normal":
                    assert not mask.any(), mask_path.name
                else:
                    assert mask.any(), mask_path.name
                    assert mask.sum() < 0.25 * mask.size


def test_union_of_mask_files_is_the_lesion(dataset):
    """Files on disk decode to the masks of ``generate_case``; the union covers all of the dark lesion."""
    for label in ("benign", "malignant"):
        for index in range(1, 7):
            stem = f"{label} ({index})"
            has_extra = (dataset / label / f"{stem}_mask_1.png").exists()
            image, masks = generate_case(3, label, index, extra_mask=has_extra)
            assert len(masks) == (2 if has_extra else 1)
            union = _union(dataset / label, stem)
            assert np.array_equal(union, np.logical_or.reduce(masks))
            assert np.array_equal(_gray(dataset / label / f"{stem}.png"), image)
            if has_extra:  # the extra file adds lesion pixels the first one lacks
                assert not np.array_equal(union, load_binary_mask(dataset / label / f"{stem}_mask.png"))
            # a mask missing part of the lesion would leave very dark pixels just outside it
            ring = _ring(union, 3)
            assert image[union].mean() < 0.6 * image[ring].mean()


def test_lesion_darker_than_surroundings():
    for label in ("benign", "malignant"):
        for index in range(1, 11):
            image, masks = make_case(case_rng(11, label, index), label, 200, 240, extra_mask=index % 3 == 0)
            union = np.logical_or.reduce(masks)
            touching = len(masks) > 1 and np.any(_ring(masks[0], 1) & masks[1])
            # pieces of one lesion border each other; separate lesions must each be dark
            for mask in [union] if touching else masks:
                assert image[mask].mean() < 0.75 * image[_ring(mask)].mean(), (label, index)


def test_malignant_less_convex_and_shadowed():
    solidity, posterior = {}, {}
    for label in ("benign", "malignant"):
        solidity[label], posterior[label] = [], []
        for index in range(1, 13):
            image, (mask,) = make_case(case_rng(5, label, index), label, 220, 260)
            solidity[label].append(_solidity(mask))
            ys, xs = np.nonzero(mask)
            x0, x1, y1 = xs.min(), xs.max() + 1, ys.max() + 1
            below = image[y1 + 2 : y1 + 30, x0:x1].astype(float)
            side = np.concatenate([image[y1 + 2 : y1 + 30, : max(x0 - 10, 1)], image[y1 + 2 : y1 + 30, x1 + 10 :]], 1)
            posterior[label].append(below.mean() / max(side.astype(float).mean(), 1.0))
    assert np.mean(solidity["malignant"]) < np.mean(solidity["benign"]) - 0.08
    assert min(solidity["benign"]) > 0.9
    # posterior acoustic enhancement (benign) vs shadowing (malignant)
    assert np.mean(posterior["benign"]) > 1.05 > np.mean(posterior["malignant"]) + 0.2


def test_make_case_shapes_and_label_check():
    for label in CLASSES:
        image, masks = make_case(np.random.default_rng(0), label, 181, 203)
        assert image.shape == (181, 203) and image.dtype == np.uint8
        assert all(m.shape == (181, 203) and m.dtype == bool for m in masks)
        assert 40 < image.mean() < 200 and image.std() > 15  # neither blank nor saturated
    with pytest.raises(ValueError, match="label"):
        make_case(np.random.default_rng(0), "cyst", 200, 200)


def test_deterministic(tmp_path):
    counts = {"benign": 2, "malignant": 2, "normal": 1}
    generate_dataset(str(tmp_path / "a"), counts, seed=7)
    generate_dataset(str(tmp_path / "b"), counts, seed=7)
    generate_dataset(str(tmp_path / "c"), counts, seed=8)
    first, second, other = (_files(tmp_path / n) for n in "abc")
    assert first == second
    pngs = [k for k in first if k.endswith(").png")]
    assert all(first[k] != other.get(k) for k in pngs)


def test_rgb_fraction_and_mask_encodings(tmp_path):
    generate_dataset(str(tmp_path / "rgb"), 4, seed=0, rgb_fraction=0.5, extra_mask_fraction=0.0)
    generate_dataset(str(tmp_path / "plain"), 4, seed=0, rgb_fraction=0.0, mask_encoding_variety=False)
    for label in CLASSES:
        modes = [Image.open(tmp_path / "rgb" / label / f"{label} ({i}).png").mode for i in range(1, 5)]
        assert sorted(modes) == ["L", "L", "RGB", "RGB"]
        assert not list((tmp_path / "rgb" / label).glob("*_mask_1.png"))
        for path in (tmp_path / "plain" / label).glob("*.png"):
            with Image.open(path) as image:
                assert image.mode == "L"
                values = set(np.unique(np.asarray(image)).tolist())
            if "_mask" in path.name:
                assert values <= {0, 255}
        # content does not depend on the storage options
        for i in range(1, 5):
            assert np.array_equal(
                _gray(tmp_path / "rgb" / label / f"{label} ({i}).png"),
                _gray(tmp_path / "plain" / label / f"{label} ({i}).png"),
            )
    generate_dataset(str(tmp_path / "varied"), 10, seed=0)
    kinds = set()
    for path in (tmp_path / "varied").rglob("*_mask*.png"):
        with Image.open(path) as image:
            kinds.add((image.mode, int(np.asarray(image).max())))
    assert ("L", 255) in kinds and ("RGBA", 255) in kinds and ("L", 1) in kinds


def test_output_folder_rules(tmp_path):
    foreign = tmp_path / "real"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match=re.escape(str(foreign))):
        generate_dataset(str(foreign), 1)
    root = tmp_path / "new" / "nested"
    generate_dataset(str(root), {"benign": 3, "malignant": 3}, seed=1, extra_mask_fraction=1.0)
    assert len(list((root / "benign").glob("*_mask_1.png"))) == 3
    # rewriting a synthetic folder removes stale files of the earlier run
    assert generate_dataset(str(root), 1, seed=1, extra_mask_fraction=0.0) == dict.fromkeys(CLASSES, 1)
    assert sorted(p.name for p in (root / "benign").iterdir()) == ["benign (1).png", "benign (1)_mask.png"]
    with pytest.raises(ValueError, match="unknown"):
        generate_dataset(str(tmp_path / "x"), {"cancer": 2})
    with pytest.raises(ValueError):
        generate_dataset(str(tmp_path / "x"), -1)
    with pytest.raises(ValueError):
        generate_dataset(str(tmp_path / "x"), 1, rgb_fraction=1.5)


def test_command_line(tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, str(TOOLS / "synthetic.py"), "--output_dir", str(out)]
    result = subprocess.run(cmd + ["--num_per_class", "2", "--seed", "4"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for label in CLASSES:
        assert (out / label / f"{label} (2).png").is_file() and (out / label / f"{label} (2)_mask.png").is_file()
