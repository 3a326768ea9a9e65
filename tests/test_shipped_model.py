"""The shipped weights reproduce the test-split numbers of the model card and metadata.json.

Runs only where the BUSI data sits at ``../shared/data/Dataset_BUSI_with_GT`` (CI has it; users may not).
"""

from __future__ import annotations

import json

import pytest
import torch

from .conftest import BUNDLE_ROOT, EVALUATE_CONFIGS, SHARED_DIR, run_bundle

BUSI = SHARED_DIR / "data" / "Dataset_BUSI_with_GT"
WEIGHTS = BUNDLE_ROOT / "models" / "model.pt"


@pytest.mark.skipif(not (BUSI.is_dir() and WEIGHTS.is_file()), reason="needs the BUSI data and shipped weights")
def test_evaluation_reproduces_the_published_numbers(tmp_path):
    assert set(torch.load(WEIGHTS, weights_only=True)) == {"model"}
    run_bundle("evaluating", "--config_file", EVALUATE_CONFIGS, "--dataset_dir", str(BUSI),
               "--ckpt_dir", str(WEIGHTS.parent), "--output_dir", str(tmp_path))  # fmt: skip
    measured = json.loads((tmp_path / "metrics.json").read_text())
    published = json.loads((BUNDLE_ROOT / "configs" / "metadata.json").read_text())["eval_metrics"]
    assert measured["num_images"] == 116
    for key, value in published.items():
        name = key.removeprefix("test_")
        section = "segmentation" if name in measured["segmentation"] else "classification"
        # evaluate.json runs in float32 on every machine; other thread counts may still round a few pixels apart
        assert measured[section][name] == pytest.approx(value, abs=0.005), key
