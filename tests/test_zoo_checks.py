"""The MONAI Model Zoo's bundle checks, or tested equivalents where the stock check does not fit this bundle.

- required files (Zoo ``verify_bundle_directory`` and the bundle specification);
- ``ConfigWorkflow(...).check_properties()`` for the train and infer workflows (Zoo unit tests);
- network input / output against ``network_data_format``: the stock ``verify_net_in_out`` reads ``output.shape``
  of a single tensor, while this network returns ``{"pred": ..., "cls": ...}``, so the same check is done here
  for both outputs.

The TorchScript / ONNX export checks run on the packaged bundle, in ``test_package.py``.
"""

from __future__ import annotations

import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.utils import BundleProperty, BundlePropertyConfig, get_equivalent_dtype

from .conftest import BUNDLE_ROOT, TINY_NETWORK

CONFIGS = BUNDLE_ROOT / "configs"
META_FILE = str(CONFIGS / "metadata.json")
REQUIRED_FILES = (
    "LICENSE",
    "configs/metadata.json",
    "configs/inference.json",
    "configs/train.json",
    "configs/evaluate.json",
    "configs/logging.conf",
    "docs/README.md",
    "docs/data_license.txt",
    "scripts/__init__.py",
)


def test_evaluate_config_overrides_run():
    """As in the Zoo: train.json + evaluate.json merged evaluate with the default ``run`` (``evaluating`` too)."""
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")])
    assert parser["run"] == ["$@validate#evaluator.run()"] and parser["evaluating"] == parser["training"] == "@run"


def test_required_files():
    missing = [name for name in REQUIRED_FILES if not (BUNDLE_ROOT / name).is_file()]
    assert not missing


def missing_properties(workflow: ConfigWorkflow) -> list[str]:
    """``check_properties()``, except that a missing required ID is reported instead of raising ``KeyError``."""
    absent = [
        name
        for name, prop in workflow.properties.items()
        if prop.get(BundleProperty.REQUIRED) and prop[BundlePropertyConfig.ID] not in workflow.parser
    ]
    return absent or workflow.check_properties()


def train_workflow(synthetic_dataset, datalist, tmp_path) -> ConfigWorkflow:
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "train.json"),
        meta_file=META_FILE,
        logging_file=False,  # logging.conf would reconfigure the root logger of the test session
        workflow_type="train",
        bundle_root=str(BUNDLE_ROOT),
        dataset_dir=str(synthetic_dataset),
        datalist=str(datalist),
        ckpt_dir=str(tmp_path / "models"),
        output_dir=str(tmp_path / "eval"),
        num_workers=0,
        cache_rate=0.0,
        **TINY_NETWORK,
    )
    workflow.initialize()
    return workflow


def test_train_workflow_properties(synthetic_dataset, synthetic_datalist, tmp_path):
    assert missing_properties(train_workflow(synthetic_dataset, synthetic_datalist, tmp_path)) == []


def test_infer_workflow_properties(synthetic_dataset, tmp_path):
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "inference.json"),
        meta_file=META_FILE,
        logging_file=False,  # logging.conf would reconfigure the root logger of the test session
        workflow_type="infer",
        bundle_root=str(BUNDLE_ROOT),
        dataset_dir=str(synthetic_dataset / "benign"),
        output_dir=str(tmp_path / "predictions"),
        **{"handlers#0#_disabled_": True},  # no weights to load, as in the Zoo's tests
    )
    workflow.initialize()
    assert missing_properties(workflow) == []
    for name in ("version", "monai_version", "pytorch_version", "numpy_version"):
        assert getattr(workflow, name), name


@pytest.mark.parametrize("config", ["inference.json", "train.json"])
def test_network_inputs_and_outputs_match_metadata(config):
    """``verify_net_in_out`` for a network with two outputs: channels, shapes and dtypes of both."""
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / config))
    parser.read_meta(META_FILE)
    io = parser.get("_meta_#network_data_format")
    image = io["inputs"]["image"]
    assert all(isinstance(size, int) for size in image["spatial_shape"])
    net = parser.get_parsed_content("network_def").eval()
    net.return_embedding = False  # metadata describes the exported network
    batch = 2
    x = torch.rand(batch, image["num_channels"], *image["spatial_shape"])
    x = x.to(get_equivalent_dtype(image["dtype"], torch.Tensor))
    with torch.no_grad():
        outputs = net(x)
    assert isinstance(outputs, dict)
    assert list(outputs) == list(io["outputs"]), "output order: pred first, then cls"
    for key, spec in io["outputs"].items():
        assert outputs[key].shape == (batch, spec["num_channels"], *spec["spatial_shape"]), key
        assert outputs[key].dtype == get_equivalent_dtype(spec["dtype"], torch.Tensor), key
