"""configs/metadata.json: the Model Zoo schema, versions of the installed packages, agreement with the configs."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from monai.bundle import ConfigParser

from .conftest import BUNDLE_ROOT, REPO_ROOT, SHARED_DIR, load_tool

PINS = load_tool("pins")

META_FILE = BUNDLE_ROOT / "configs" / "metadata.json"
SCHEMA_NAME = "meta_schema_20240725.json"
SCHEMA_FILE = SHARED_DIR / "schemas" / SCHEMA_NAME
NEEDS_SCHEMA = pytest.mark.skipif(not SCHEMA_FILE.is_file(), reason=f"offline schema {SCHEMA_FILE} not available")
# packages that configs need without a Python import in scripts/
CONFIG_IMPLIED_PACKAGES = {"TensorBoardStatsHandler": "tensorboard", "ProgressBar": "tqdm"}


def load_json(path) -> dict:
    with open(path) as stream:
        return json.load(stream)


@pytest.fixture(scope="module")
def metadata() -> dict:
    return load_json(META_FILE)


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


@NEEDS_SCHEMA
def test_metadata_is_valid_against_the_schema(metadata):
    import jsonschema

    assert metadata["schema"].endswith("/" + SCHEMA_NAME)
    jsonschema.validate(instance=metadata, schema=load_json(SCHEMA_FILE))


@NEEDS_SCHEMA
def test_verify_metadata_command(tmp_path):
    """The Model Zoo's check; the schema is copied where the command would download it to, so it stays offline."""
    schema = tmp_path / "eval" / "schema.json"
    schema.parent.mkdir()
    shutil.copy(SCHEMA_FILE, schema)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", str(META_FILE), "--filepath",
         str(schema)],
        capture_output=True, text=True, cwd=tmp_path, env=env,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "metadata is verified with no error" in output


def test_version_and_changelog(metadata):
    assert re.fullmatch(r"\d+\.\d+\.\d+", metadata["version"])
    assert metadata["version"] in metadata["changelog"], "the Model Zoo requires a changelog entry for the version"
    for key in ("task", "description", "authors", "copyright", "data_source", "data_type", "image_classes",
                "label_classes", "pred_classes", "intended_use"):  # fmt: skip
        assert isinstance(metadata[key], str) and metadata[key].strip(), key
    assert isinstance(metadata["eval_metrics"], dict)
    assert metadata["references"] and all(isinstance(r, str) for r in metadata["references"])
    assert any("104863" in r for r in metadata["references"]), "cite the BUSI paper"
    assert "optional_packages_version" not in metadata, "MONAI renames it to required_packages_version on load"


def test_versions_match_the_pinned_environment(metadata):
    """metadata.json states the versions the bundle was tested with: the core lock's, whatever is installed here."""
    pins = PINS.read_lock(PINS.CORE_LOCK)
    assert metadata["monai_version"] == pins["monai"]
    assert metadata["pytorch_version"] == pins["torch"]
    assert metadata["numpy_version"] == pins["numpy"]
    for name, version in metadata["required_packages_version"].items():
        assert version == pins[normalise(name)], f"{name}: metadata {version}, pinned {pins[normalise(name)]}"
    assert PINS.metadata_versions(pins, metadata) == metadata, "`python tools/pins.py metadata` would change it"


def test_core_lock_pins_every_requirement():
    """Each requirement of setup.cfg (tests included) and torch are pinned, at a version the lower bound admits."""
    pins = PINS.read_lock(PINS.CORE_LOCK)
    setup = (BUNDLE_ROOT.parent / "setup.cfg").read_text()
    for name, bound in re.findall(r"^\s+([A-Za-z0-9_.-]+)\s*(?:>=|==)\s*([0-9][^\s,]*)", setup, re.MULTILINE):
        pinned = pins.get(normalise(name))
        assert pinned, f"{name} is not pinned in {PINS.CORE_LOCK.name}"
        assert version_tuple(pinned) >= version_tuple(bound), f"{name}: pinned {pinned} below setup.cfg's {bound}"


def test_monailabel_lock_pins_the_server_stack():
    pins = PINS.read_lock(REPO_ROOT / "monailabel" / "requirements-lock.txt")
    requirements = (REPO_ROOT / "monailabel" / "requirements.txt").read_text()
    for name, version in re.findall(r"^([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^\s]+)", requirements, re.MULTILINE):
        assert pins.get(normalise(name)) == version, f"{name}: requirements.txt {version}, lock {pins.get(name)}"
    assert version_tuple(pins["numpy"]) < (2,), "pydicom-seg needs numpy<2"
    assert version_tuple(pins["pydicom"]) < (3,), "pydicom-seg needs pydicom<3"


def test_lock_parser_reads_pins_only(tmp_path):
    lock = tmp_path / "lock.txt"
    lock.write_text("# comment\nPyYAML==6.0.4\npytorch_ignite==0.5.5  # why\n-e /src\nfoo>=1\n\n")
    assert PINS.read_lock(lock) == {"pyyaml": "6.0.4", "pytorch-ignite": "0.5.5"}
    freeze = tmp_path / "freeze.txt"
    freeze.write_text("torch==2.13.0+cpu\n# Editable install\n-e /work/main\nAbsl-py==2.5.1\n")
    PINS.lock(str(freeze), str(lock), title="t")
    assert PINS.read_lock(lock) == {"absl-py": "2.5.1", "torch": "2.13.0"}


def third_party_modules() -> set[str]:
    """Top-level modules that bundle/scripts imports (also inside functions and through ``optional_import``)."""
    modules = set()
    for path in sorted((BUNDLE_ROOT / "scripts").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
            elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "optional_import" and node.args:
                if isinstance(node.args[0], ast.Constant):
                    modules.add(str(node.args[0].value).split(".")[0])
    return {m for m in modules if m not in sys.stdlib_module_names and m not in ("__future__", "scripts")}


def test_required_packages_cover_what_the_bundle_imports(metadata):
    listed = {normalise(name) for name in metadata["required_packages_version"]} | {"monai", "torch", "numpy"}
    distributions = importlib.metadata.packages_distributions()
    for module in sorted(third_party_modules()):
        names = {normalise(d) for d in distributions.get(module, [module])}
        assert names & listed or {n.split("-")[0] for n in names} & listed, f"`{module}` ({names}) not listed"
    configs = "".join(p.read_text() for p in (BUNDLE_ROOT / "configs").glob("*.json"))
    for target, package in CONFIG_IMPLIED_PACKAGES.items():
        if target in configs:
            assert package in listed, f"{target} in the configs needs {package}"


def test_required_packages_are_in_setup_cfg(metadata):
    setup = (BUNDLE_ROOT.parent / "setup.cfg").read_text()
    requirements = {normalise(m) for m in re.findall(r"^\s+([A-Za-z0-9_.-]+)\s*[<>=!~]", setup, re.MULTILINE)}
    missing = {normalise(n) for n in metadata["required_packages_version"]} - requirements
    assert not missing, f"setup.cfg install_requires lacks {missing}"


def test_network_data_format_order_and_shapes(metadata):
    io = metadata["network_data_format"]
    assert list(io["inputs"])[0] == "image"
    assert list(io["outputs"])[:2] == ["pred", "cls"]
    image, pred, cls = io["inputs"]["image"], io["outputs"]["pred"], io["outputs"]["cls"]
    assert image["spatial_shape"] == pred["spatial_shape"], "segmentation logits have the input's size"
    assert cls["spatial_shape"] == [], "class logits are (B, num_classes)"
    for entry in (image, pred, cls):
        assert len(entry["channel_def"]) == entry["num_channels"]


@pytest.mark.parametrize("config", ["inference.json", "train.json"])
def test_metadata_agrees_with_config(metadata, config):
    parsed = load_json(BUNDLE_ROOT / "configs" / config)
    parser = ConfigParser(parsed)
    io = metadata["network_data_format"]
    assert parsed["image_size"] == io["inputs"]["image"]["spatial_shape"]
    assert parser.get_parsed_content("network_def#in_channels") == io["inputs"]["image"]["num_channels"]
    assert parser.get_parsed_content("network_def#seg_out_channels") == io["outputs"]["pred"]["num_channels"]
    assert parser.get_parsed_content("network_def#num_classes") == io["outputs"]["cls"]["num_channels"]
    assert list(io["outputs"]["cls"]["channel_def"].values()) == parsed["class_names"]
    assert io["outputs"]["pred"]["channel_def"]["0"] == "background"
    assert list(io["outputs"]["pred"]["channel_def"].values())[1:] == parsed["class_names"][1:]


@pytest.mark.parametrize("config", ["inference.json", "evaluate.json"])
def test_inference_and_training_build_the_same_network(config):
    train = load_json(BUNDLE_ROOT / "configs" / "train.json")
    if config == "evaluate.json":  # merged over train.json: it overrides single entries of its network_def
        network = {**train["network_def"], **{key.split("#", 1)[1]: value
                                              for key, value in load_json(BUNDLE_ROOT / "configs" / config).items()
                                              if key.startswith("network_def#")}}  # fmt: skip
    else:
        network = load_json(BUNDLE_ROOT / "configs" / config)["network_def"]
    assert network["_target_"] == "scripts.net.multitask_network"  # one network or an ensemble of them
    assert network.get("pretrained", False) is False, "inference takes its weights from model.pt"

    def architecture(definition: dict) -> dict:
        # neither the pretrained switch, the extra embedding output nor the training-only stochastic depth changes
        # the weights; the network's class or an ensemble of it is chosen by scripts.net.multitask_network
        skipped = ("pretrained", "return_embedding", "encoder_drop_path", "_target_", "_desc_", "num_members")
        return {k: v for k, v in definition.items() if k not in skipped}

    assert architecture(train["network_def"]) == architecture(network), "model.pt from training must load"


def test_inference_preprocesses_images_as_training_and_validation():
    """inference.json repeats the image steps of train.json's deterministic transforms (its load and resize steps; the
    Zoo's habit); they must stay the same steps in the same order. Label-only steps, type conversions and the input
    check are left out."""
    train = load_json(BUNDLE_ROOT / "configs" / "train.json")
    inference = load_json(BUNDLE_ROOT / "configs" / "inference.json")
    skipped = ("scripts.transforms.LoadLesionLabeld", "SelectItemsd", "EnsureTyped", "Lambdad")
    skipped += ("scripts.reliability.InputCheckd",)
    per_key = ("keys", "mode", "anti_aliasing")  # arguments given per key: the image is the first key

    def image_steps(transforms: list) -> list:
        return [
            {k: v[0] if k in per_key and isinstance(v, list) else v for k, v in t.items()}
            for t in transforms
            if t["_target_"] not in skipped
        ]

    assert train["deterministic_transforms"] == "$@load_transforms + @crop_to_scan_transforms + @resize_transforms"
    trained_on = image_steps(train["load_transforms"] + train["crop_to_scan_transforms"] + train["resize_transforms"]
                             + train["normalize_transforms"])  # fmt: skip
    assert [t["_target_"] for t in trained_on][-4:] == [
        "Resized", "MedianSmoothd", "ScaleIntensityRangePercentilesd", "NormalizeIntensityd"
    ]  # fmt: skip
    assert image_steps(inference["preprocessing"]["transforms"]) == trained_on
