"""Shared fixtures and helpers: the bundle folder on sys.path, small generated datasets, a tiny network, bundle runs."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

# Test networks are tiny: one intra-op thread per process is as fast, and the workflow tests start several
# processes that would otherwise oversubscribe a small machine (set before torch is imported).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE_ROOT = REPO_ROOT / "bundle"
SHARED_DIR = REPO_ROOT.parent / "shared"
TOOLS_DIR = REPO_ROOT / "tools"
TRAIN_CONFIG = "bundle/configs/train.json"
EVALUATE_CONFIGS = "['bundle/configs/train.json','bundle/configs/evaluate.json']"
# config overrides that train and run a tiny residual network instead of the shipped one
TINY_NETWORK = {
    "network_def#encoder": "residual",
    "network_def#pretrained": False,
    "network_def#channels": [8, 16, 32, 64],
    "network_def#strides": [2, 2, 2, 2],
    "network_def#decoder_channels": [32, 16, 8, 8],
    "image_size": [64, 64],
}
TINY_NETWORK_ARGS = [arg for key, value in TINY_NETWORK.items() for arg in (f"--{key}", str(value))]  # for fire
RSS_WRAPPER = (  # runs `python -m monai.bundle` and writes its peak resident memory to the file named first
    "import atexit, resource, runpy, sys\n"
    "out = sys.argv.pop(1)\n"
    "atexit.register(lambda: open(out, 'w').write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)))\n"
    "sys.argv[0] = 'monai.bundle'\n"
    "runpy.run_module('monai.bundle', run_name='__main__', alter_sys=True)\n"
)
for _path in (BUNDLE_ROOT, TOOLS_DIR):  # the bundle's scripts; tools/synthetic.py, the test-data generator
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))


def load_tool(name: str) -> ModuleType:
    """Import ``tools/<name>.py`` (the tools are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"tools_{name}", REPO_ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bundle_command(*args: str, rss_file: Path | None = None) -> list[str]:
    """``python -m monai.bundle run ARGS``; with ``rss_file``, the process writes its peak RSS (KiB) there."""
    if rss_file is None:
        return [sys.executable, "-m", "monai.bundle", "run", *args]
    return [sys.executable, "-c", RSS_WRAPPER, str(rss_file), "run", *args]


def run_bundle(*args: str, ok: bool = True, rss_file: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m monai.bundle run`` from the repository root, as a user would; ``ok``: it must succeed, else
    it must fail."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        bundle_command(*args, rss_file=rss_file), cwd=REPO_ROOT, capture_output=True, text=True, env=env
    )
    output = f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    assert (result.returncode == 0) == ok, output
    return result


def tiny_model_file(path: Path, seed: int = 0) -> Path:
    """A randomly initialised ``TINY_NETWORK`` saved as ``{"model": state_dict}``, like training's model.pt."""
    import torch

    from scripts.net import MultiTaskResUNet

    torch.manual_seed(seed)
    network = MultiTaskResUNet(**{key.split("#", 1)[1]: value for key, value in TINY_NETWORK.items() if "#" in key})
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": network.state_dict()}, path)
    return path


def predict(inputs: Path, out: Path, model: Path, *extra: str, ok: bool = True, rss_file: Path | None = None):
    """Run inference.json with the tiny network's weights ``model`` on ``inputs``, writing to ``out``."""
    return run_bundle(
        "--config_file", "bundle/configs/inference.json", "--dataset_dir", str(inputs), "--output_dir", str(out),
        "--ckpt_path", str(model), *TINY_NETWORK_ARGS, *extra, ok=ok, rss_file=rss_file,
    )  # fmt: skip


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory) -> Path:
    """A small generated dataset in the BUSI layout (12 images per class), shared by the session."""
    from synthetic import generate_dataset

    root = tmp_path_factory.mktemp("synthetic") / "Dataset_synthetic"
    generate_dataset(str(root), num_per_class=12, seed=0)
    return root


@pytest.fixture(scope="session")
def synthetic_datalist(synthetic_dataset, tmp_path_factory) -> Path:
    """The split of ``synthetic_dataset``, made by ``tools/prepare_datalist.py`` as a user does once before training."""
    from prepare_datalist import create_datalist

    path = tmp_path_factory.mktemp("datalist") / "datalist.json"
    create_datalist(str(synthetic_dataset), str(path))
    return path
