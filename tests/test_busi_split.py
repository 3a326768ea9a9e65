"""The committed BUSI split is what the code makes, and no duplicate group or similar pair straddles two subsets.

Runs only where the BUSI data sits at ``../shared/data/Dataset_BUSI_with_GT`` (CI has it; users may not).
"""

from __future__ import annotations

import json
import re

import numpy as np
import prepare_datalist as data  # tools/, on sys.path (conftest.py)
import pytest

from .conftest import BUNDLE_ROOT, REPO_ROOT, SHARED_DIR

BUSI = SHARED_DIR / "data" / "Dataset_BUSI_with_GT"
COMMITTED = BUNDLE_ROOT / "configs" / "datalist_Dataset_BUSI_with_GT.json"
SAMPLES_README = REPO_ROOT / "samples" / "README.md"
SPLITS = ("training", "validation", "test")
pytestmark = pytest.mark.skipif(not BUSI.is_dir(), reason=f"BUSI data not found at {BUSI}")


@pytest.fixture(scope="module")
def remade(tmp_path_factory) -> tuple[dict, dict[str, np.ndarray], bytes]:
    """The split made anew from BUSI, the thumbnail descriptors of every image (from the same single scan) and the
    file written."""
    scan, thumbnails = data.scan_dataset, {}

    def scan_and_keep(*args, **kwargs):
        cases, skipped = scan(*args, **kwargs)
        thumbnails.update((case["image"], case["thumbnails"]) for case in cases)
        return cases, skipped

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data, "scan_dataset", scan_and_keep)
        path = tmp_path_factory.mktemp("split") / "datalist.json"
        datalist = data.create_datalist(str(BUSI), str(path))
    return datalist, thumbnails, path.read_bytes()


@pytest.fixture(scope="module")
def committed() -> dict:
    return json.loads(COMMITTED.read_text())


def _subset_of(datalist: dict) -> dict[str, str]:
    return {entry["image"]: split for split in SPLITS for entry in datalist[split]}


def test_committed_split_is_reproduced(remade, committed):
    datalist, _, written = remade
    for key in ("duplicate_hash", "duplicate_similarity", *SPLITS, "counts", "duplicate_groups"):
        assert datalist[key] == committed[key], key
    assert written == COMMITTED.read_bytes()
    assert len(_subset_of(committed)) == 780


def test_duplicate_groups_stay_in_one_subset(committed):
    subset_of = _subset_of(committed)
    for group in committed["duplicate_groups"]:
        assert len({subset_of[member] for member in group["members"]}) == 1, group
    assert max(len(group["members"]) for group in committed["duplicate_groups"]) <= 10  # no chain of look-alikes
    together = [
        ("benign (433)", "malignant (145)"),  # identical, filed under two classes
        ("benign (154)", "benign (21)"),  # near-duplicates the 63-bit hash missed
        ("benign (141)", "benign (64)"),
        ("benign (140)", "benign (62)"),  # one frame, one copy with a black corner
        ("malignant (39)", "malignant (40)"),  # frames of one lesion
        ("malignant (42)", "malignant (40)"),
        *[("malignant (3)", f"malignant ({n})") for n in range(4, 10)],
        ("malignant (65)", "malignant (66)"),  # a sector image and its central crop
    ]
    group_of = {m: g["group"] for g in committed["duplicate_groups"] for m in g["members"]}
    for first, second in together:
        first, second = (f"{name.split()[0]}/{name}.png" for name in (first, second))
        assert first in group_of and group_of.get(first) == group_of.get(second), (first, second)


def test_no_similar_pair_straddles_subsets(remade, committed):
    _, thumbnails, _ = remade
    subset_of = _subset_of(committed)
    images = sorted(thumbnails)
    scores = data.thumbnail_similarity(*[np.stack([thumbnails[image] for image in images])] * 2)
    np.testing.assert_allclose(scores, scores.T, atol=1e-9)
    similar = np.argwhere(np.triu(scores >= data.DEFAULT_SIMILARITY_THRESHOLD, 1))
    assert 150 < len(similar) < 1000, len(similar)  # the measure finds the copies and does not flood
    straddling = [(images[i], images[j]) for i, j in similar if subset_of[images[i]] != subset_of[images[j]]]
    assert not straddling


def test_demo_samples_are_unchanged_test_split_images():
    """samples/ (the README's demo) holds at most 6 BUSI images, each byte-identical to a test-split image."""
    listed = re.findall(r"^\| `(busi_[^`]+\.png)` \| `([^`]+)` \| (\w+) \|$", SAMPLES_README.read_text(), re.MULTILINE)
    files = sorted(p.name for p in SAMPLES_README.parent.glob("*.png"))
    assert sorted(name for name, _, _ in listed) == files and 0 < len(files) <= 6
    test_split = {entry["image"]: entry["class_name"] for entry in json.loads(COMMITTED.read_text())["test"]}
    for name, source, class_name in listed:
        assert test_split.get(source) == class_name, f"{source} is not a {class_name} test-split image"
        if BUSI.is_dir():
            assert (SAMPLES_README.parent / name).read_bytes() == (BUSI / source).read_bytes(), name
