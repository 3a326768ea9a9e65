"""The committed BUSI split is what the code makes, and no duplicate group straddles two subsets.

Runs only where the BUSI data sits at ``../shared/data/Dataset_BUSI_with_GT`` (CI has it; users may not).
"""

from __future__ import annotations

import json

import pytest

from scripts.data import create_datalist

from .conftest import BUNDLE_ROOT, SHARED_DIR

BUSI = SHARED_DIR / "data" / "Dataset_BUSI_with_GT"
COMMITTED = BUNDLE_ROOT / "configs" / "datalist_Dataset_BUSI_with_GT.json"
SPLITS = ("training", "validation", "test")


@pytest.mark.skipif(not BUSI.is_dir(), reason=f"BUSI data not found at {BUSI}")
def test_committed_split_is_reproduced_and_grouped(tmp_path):
    remade = create_datalist(str(BUSI), str(tmp_path / "datalist.json"))
    committed = json.loads(COMMITTED.read_text())
    for split in SPLITS:
        assert remade[split] == committed[split], split
    subset_of = {entry["image"]: split for split in SPLITS for entry in committed[split]}
    assert len(subset_of) == 780
    for group in committed["duplicate_groups"]:
        assert len({subset_of[member] for member in group["members"]}) == 1, group
    together = [
        ("benign/benign (433).png", "malignant/malignant (145).png"),  # identical, filed under two classes
        ("benign/benign (154).png", "benign/benign (21).png"),  # near-duplicates the 63-bit hash missed
        ("benign/benign (141).png", "benign/benign (64).png"),
    ]
    for first, second in together:
        assert subset_of[first] == subset_of[second]
