"""The Model Zoo archive: layout, exports, and the unpacked bundle running from elsewhere.

The archive is built by ``tools/package.py`` from a temporary copy of ``bundle/`` (with decoy files that must
not be shipped) holding ``bundle/models/model.pt`` when there is one, otherwise a freshly initialised network.
It is then fetched with ``python -m monai.bundle download --url file://...`` (or unzipped) into a temporary folder
outside the repository, where inference and one training epoch run with only ``--bundle_root`` (plus data /
output paths and a tiny network for training) set, from a working directory outside the bundle.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from PIL import Image

from .conftest import BUNDLE_ROOT, REPO_ROOT, TINY_NETWORK_ARGS, load_tool

NAME = "breast_ultrasound_segmentation_classification"
SHIPPED_DIRS = ("configs", "docs", "scripts")
ATOL = 1e-4  # fp32, ONNX Runtime CPU and TorchScript against eager PyTorch
RTOL = 1e-4


package_tool = load_tool("package")


def clean_env() -> dict:
    """The test's environment without PYTHONPATH, so ``scripts`` can only come from the bundle being run."""
    return {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "PYTHONUNBUFFERED": "1"}


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, env=clean_env())
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def build_network(config: Path):
    parser = ConfigParser()
    parser.read_config(str(config))
    network = parser.get_parsed_content("network_def").eval()
    network.return_embedding = False  # as exported
    return network


@pytest.fixture(scope="module")
def bundle_copy(tmp_path_factory) -> Path:
    """A copy of bundle/ with weights and with files the archive must leave out."""
    copy = tmp_path_factory.mktemp("source") / "bundle"
    for name in SHIPPED_DIRS:
        shutil.copytree(BUNDLE_ROOT / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(BUNDLE_ROOT / "LICENSE", copy / "LICENSE")
    (copy / "models").mkdir()
    if (BUNDLE_ROOT / "models" / "model.pt").is_file():
        shutil.copy(BUNDLE_ROOT / "models" / "model.pt", copy / "models" / "model.pt")
    else:
        torch.manual_seed(0)
        network = build_network(BUNDLE_ROOT / "configs" / "inference.json")
        torch.save({"model": network.state_dict()}, copy / "models" / "model.pt")
    decoys = ["scripts/__pycache__/net.cpython-311.pyc", "eval/metrics.json", "logs/train.log",
              "configs/datalist_Dataset_synthetic.json", "models/checkpoint.pt", "models/model.ts",
              "docs/.notes.md", "scripts/unused_tool.py"]  # fmt: skip
    for decoy in decoys:
        (copy / decoy).parent.mkdir(parents=True, exist_ok=True)
        (copy / decoy).write_text("must not be shipped")
    return copy


@pytest.fixture(scope="module")
def archive(bundle_copy, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    result = run(["tools/package.py", "--bundle_dir", str(bundle_copy), "--output_dir", str(out)], cwd=REPO_ROOT)
    version = json.loads((BUNDLE_ROOT / "configs" / "metadata.json").read_text())["version"]
    path = out / f"{NAME}_v{version}.zip"
    assert result.stdout.strip().splitlines()[-1] == str(path)
    return path


@pytest.fixture(scope="module")
def unpacked(archive, tmp_path_factory) -> Path:
    """The archive fetched with ``python -m monai.bundle download --url file://...``."""
    root = tmp_path_factory.mktemp("downloaded")
    run(["-m", "monai.bundle", "download", "--name", NAME, "--url", archive.as_uri(), "--bundle_dir", str(root)],
        cwd=root)  # fmt: skip
    return root / NAME


def test_archive_layout(archive, bundle_copy):
    with zipfile.ZipFile(archive) as zf:
        names = [n for n in zf.namelist() if not n.endswith("/")]
        assert zf.testzip() is None
    assert all(n.startswith(f"{NAME}/") for n in names)
    files = {n[len(NAME) + 1 :] for n in names}
    for required in package_tool.REQUIRED_FILES + ("models/model.ts", "models/model.onnx"):
        assert required in files, required
    assert {p.split("/")[0] for p in files} <= {"configs", "docs", "scripts", "models", "LICENSE", "large_files.yml"}
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc") or "/." in f or f.startswith(".")]
    assert not [f for f in files if f.startswith(("eval/", "logs/")) or "datalist" in f]
    assert {f for f in files if f.startswith("models/")} == {"models/model.pt", "models/model.ts", "models/model.onnx"}
    assert "scripts/unused_tool.py" not in files, "scripts/ carries only what the configs need"
    for name in SHIPPED_DIRS:
        shipped = {p.relative_to(BUNDLE_ROOT).as_posix() for p in (BUNDLE_ROOT / name).rglob("*")
                   if p.is_file() and "__pycache__" not in p.parts and not p.name.startswith("datalist")}  # fmt: skip
        assert shipped <= files, f"{name}: {shipped - files} not shipped"


def test_large_files_stay_in_an_archive_built_without_a_url(unpacked):
    large = sorted(p.relative_to(unpacked).as_posix() for p in unpacked.rglob("*")
                   if p.is_file() and p.stat().st_size > package_tool.LARGE_FILE_LIMIT_MB * 1e6)  # fmt: skip
    assert not (unpacked / "large_files.yml").exists()
    assert (unpacked / "models" / "model.pt").is_file()
    # the shipped ensemble's weights are above the Model Zoo's limit; a freshly initialised network is not
    model_pt = BUNDLE_ROOT / "models" / "model.pt"
    if model_pt.is_file() and model_pt.stat().st_size > package_tool.LARGE_FILE_LIMIT_MB * 1e6:
        assert "models/model.pt" in large


def test_download_unpacks_the_archive(archive, unpacked):
    with zipfile.ZipFile(archive) as zf:
        expected = {n[len(NAME) + 1 :]: zf.read(n) for n in zf.namelist() if not n.endswith("/")}
    found = {p.relative_to(unpacked).as_posix(): p.read_bytes() for p in unpacked.rglob("*") if p.is_file()}
    assert found == expected


def test_weights_are_the_source_weights(bundle_copy, unpacked):
    assert (unpacked / "models/model.pt").read_bytes() == (bundle_copy / "models/model.pt").read_bytes()


@pytest.fixture(scope="module")
def eager(unpacked):
    network = build_network(unpacked / "configs" / "inference.json")
    network.load_state_dict(torch.load(unpacked / "models" / "model.pt", weights_only=True)["model"])
    return network


def metadata_input_shape(bundle: Path) -> tuple[int, ...]:
    image = json.loads((bundle / "configs/metadata.json").read_text())["network_data_format"]["inputs"]["image"]
    return (image["num_channels"], *image["spatial_shape"])


@pytest.mark.parametrize("batch", [1, 3])
def test_torchscript_export_matches_eager(unpacked, eager, batch):
    scripted = torch.jit.load(str(unpacked / "models" / "model.ts"), map_location="cpu")
    x = torch.rand(batch, *metadata_input_shape(unpacked), generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        expected, found = eager(x), scripted(x)
    assert list(found) == ["pred", "cls"]
    for key in expected:
        torch.testing.assert_close(found[key], expected[key], atol=ATOL, rtol=RTOL)


def test_torchscript_export_takes_other_sizes_divisible_by_32(unpacked, eager):
    scripted = torch.jit.load(str(unpacked / "models" / "model.ts"), map_location="cpu")
    x = torch.rand(2, 1, 128, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, found = eager(x), scripted(x)
    for key in expected:
        torch.testing.assert_close(found[key], expected[key], atol=ATOL, rtol=RTOL)


def test_torchscript_export_carries_metadata_and_config(unpacked):
    extra = {"metadata.json": "", "inference.json": ""}
    torch.jit.load(str(unpacked / "models" / "model.ts"), _extra_files=extra)
    metadata = json.loads((unpacked / "configs/metadata.json").read_text())
    assert json.loads(extra["metadata.json"])["version"] == metadata["version"]
    assert json.loads(extra["inference.json"])["network_def"]["_target_"] == "scripts.net.multitask_network"


@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_export_matches_eager(unpacked, eager, batch):
    import onnxruntime

    model = str(unpacked / "models" / "model.onnx")
    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    assert [o.name for o in session.get_outputs()] == ["pred", "cls"]
    assert all(isinstance(t.shape[0], str) for t in [*session.get_inputs(), *session.get_outputs()]), "dynamic batch"
    x = torch.rand(batch, *metadata_input_shape(unpacked), generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        expected = eager(x)
    pred, cls = session.run(None, {"image": x.numpy()})
    np.testing.assert_allclose(pred, expected["pred"].numpy(), atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(cls, expected["cls"].numpy(), atol=ATOL, rtol=RTOL)


def readme_command(marker: str) -> list[str]:
    """The ``python -m monai.bundle <marker> ...`` command of the model card, split like a shell would."""
    readme = (BUNDLE_ROOT / "docs" / "README.md").read_text()
    lines = [line for line in readme.splitlines() if line.startswith(f"python -m monai.bundle {marker} ")]
    assert len(lines) == 1, marker
    return shlex.split(lines[0])[3:]


def test_documented_export_commands_are_the_packaging_commands():
    assert readme_command("ckpt_export") == package_tool.TORCHSCRIPT_EXPORT
    documented = readme_command("onnx_export")
    index = documented.index("--converter_kwargs") + 1
    assert json.loads(documented[index]) == package_tool.ONNX_CONVERTER_KWARGS
    assert documented[:index] == package_tool.ONNX_EXPORT[:index]


def test_inference_in_the_downloaded_bundle(unpacked, synthetic_dataset, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for source in ("malignant/malignant (1).png", "normal/normal (2).png"):
        shutil.copy(synthetic_dataset / source, images / Path(source).name)
    out = tmp_path / "out"
    cwd = unpacked.parent
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('scripts') is not None)"
    run(["-c", probe], cwd=cwd)  # `scripts` is not importable from here but through --bundle_root
    run(["-m", "monai.bundle", "run", "--config_file", str(unpacked / "configs" / "inference.json"),
         "--bundle_root", str(unpacked), "--dataset_dir", str(images), "--output_dir", str(out)], cwd=cwd)  # fmt: skip
    with open(out / "predictions.csv", newline="") as stream:
        rows = {Path(row["image"]).name: row for row in csv.DictReader(stream)}
    assert set(rows) == {"malignant (1).png", "normal (2).png"}
    for name, row in rows.items():
        stem = name[: -len(".png")]
        label_map = np.array(Image.open(out / f"{stem}_seg.png"))
        assert label_map.shape == np.array(Image.open(images / name).convert("L")).shape
        predicted = ["normal", "benign", "malignant"].index(row["predicted_class"])
        assert set(np.unique(label_map)) <= {0, predicted}
    assert not (unpacked / "eval").exists(), "outputs go to --output_dir"


def test_one_training_epoch_in_the_unpacked_bundle(archive, synthetic_dataset, synthetic_datalist, tmp_path):
    root = tmp_path / "unzipped"
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(root)
    bundle = root / NAME
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    before = hashlib.sha256((bundle / "models" / "model.pt").read_bytes()).hexdigest()
    shutil.copy(synthetic_datalist, bundle / "configs" / f"datalist_{synthetic_dataset.name}.json")  # the default
    run(["-m", "monai.bundle", "run", "training", "--config_file", str(bundle / "configs" / "train.json"),
         "--bundle_root", str(bundle), "--dataset_dir", str(synthetic_dataset), "--max_epochs", "1",
         "--batch_size", "4", *TINY_NETWORK_ARGS], cwd=elsewhere)  # fmt: skip
    # default paths resolved against --bundle_root: split read next to the configs, checkpoint in models/, logs in eval/
    checkpoint = bundle / "models" / "model.pt"
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() != before
    state = torch.load(checkpoint, weights_only=True)["model"]
    assert state["encoder.stages.0.conv.unit0.conv.weight"].shape[0] == 8  # the tiny network was trained
    assert any(p.name.startswith("events.out.tfevents") for p in (bundle / "eval").iterdir())
    assert not list(elsewhere.iterdir()), "nothing is written to the working directory"


def test_large_files_list_and_download(tmp_path):
    """Files above the limit are listed with their md5 and come back with ``download_large_files``."""
    published = tmp_path / "published"
    (published / "models").mkdir(parents=True)
    payload = np.random.default_rng(0).bytes(1_500_000)
    (published / "models" / "model.pt").write_bytes(payload)
    stage = tmp_path / NAME
    shutil.copytree(published, stage)
    (stage / "configs").mkdir()
    (stage / "configs" / "metadata.json").write_text("{}")
    with pytest.raises(ValueError, match="large_files_url"):
        package_tool.write_large_files_list(stage, 1, None, exclude=True)
    assert package_tool.write_large_files_list(stage, 1, None, exclude=False) == []
    assert not (stage / "large_files.yml").exists() and (stage / "models" / "model.pt").read_bytes() == payload
    listed = package_tool.write_large_files_list(stage, 1, published.as_uri(), exclude=True)
    assert listed == ["models/model.pt"] and not (stage / "models" / "model.pt").exists()
    assert hashlib.md5(payload).hexdigest() in (stage / "large_files.yml").read_text()
    run(["-m", "monai.bundle", "download_large_files", "--bundle_path", str(stage)], cwd=tmp_path)
    assert (stage / "models" / "model.pt").read_bytes() == payload


def test_archive_is_reproducible_and_needs_weights(bundle_copy, tmp_path):
    first = package_tool.package(str(bundle_copy), str(tmp_path / "a"), export=False)
    second = package_tool.package(str(bundle_copy), str(tmp_path / "b"), export=False)
    assert Path(first).read_bytes() == Path(second).read_bytes()
    no_weights = tmp_path / "no_weights"
    shutil.copytree(bundle_copy, no_weights, ignore=shutil.ignore_patterns("model.pt"))
    with pytest.raises(FileNotFoundError, match="models/model.pt"):
        package_tool.package(str(no_weights), str(tmp_path / "c"))
    with pytest.raises(ValueError, match="inside the bundle"):
        package_tool.package(str(bundle_copy), str(bundle_copy / "dist"))


def test_scripts_that_the_configs_need_only_are_shipped_and_must_import(bundle_copy, tmp_path):
    assert package_tool.needed_scripts(bundle_copy) == sorted(
        ["__init__", *(p.stem for p in (BUNDLE_ROOT / "scripts").glob("*.py") if p.stem != "__init__")]
    ), "every module of bundle/scripts is named by a config or imported by one that is"
    absolute_import = tmp_path / "absolute_import"
    shutil.copytree(bundle_copy, absolute_import)
    (absolute_import / "scripts" / "helper.py").write_text("VALUE = 1\n")
    losses = absolute_import / "scripts" / "losses.py"
    losses.write_text(losses.read_text() + "\nfrom scripts import helper  # noqa\n")  # not followed by the scan
    with pytest.raises(RuntimeError, match="does not import"):
        package_tool.package(str(absolute_import), str(tmp_path / "out"), export=False)
