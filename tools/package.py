"""Build the MONAI Model Zoo archive of the bundle: ``<name>_v<version>.zip``.

The archive holds one top folder, ``breast_ultrasound_segmentation_classification/``, in the Model Zoo layout::

    configs/   metadata.json, inference.json, train.json, evaluate.json, logging.conf (no local datalists)
    models/    model.pt (required), model.ts (TorchScript) and model.onnx, exported from model.pt here
    scripts/   the Python modules the configs name and the modules they import (checked by importing them)
    docs/      README.md (model card), data_license.txt
    LICENSE
    large_files.yml   only with ``--large_files_url``, when a file is larger than ``large_file_limit_mb``

Nothing is written into the bundle folder: the files are staged in a temporary copy, the exports are made there
with the stock ``python -m monai.bundle ckpt_export`` / ``onnx_export`` commands, then zipped with fixed
timestamps in a fixed order. Training outputs (``eval/``, ``logs/``, ``cache/``, ``data/``, the resumable
``models/checkpoint.pt``), byte code, hidden files and the datalists that ``tools/prepare_datalist.py`` writes next
to the configs are left out.

Command line (from the repository root)::

    python tools/package.py --output_dir dist
    python tools/package.py --output_dir dist --keep_datalists "['datalist_Dataset_BUSI_with_GT.json']"
    python tools/package.py --output_dir dist --large_files_url <base URL> --exclude_large_files   # Model Zoo
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

BUNDLE_NAME = "breast_ultrasound_segmentation_classification"
REPO_ROOT = Path(__file__).resolve().parents[1]
LARGE_FILE_LIMIT_MB = 25
ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)
TOP_LEVEL_FILES = ("LICENSE",)
TOP_LEVEL_DIRS = ("configs", "scripts", "docs", "models")
MODEL_FILES = ("model.pt", "model.ts", "model.onnx", "embedding_stats.pt")
KEPT_MODEL_FILES = ("model.pt", "embedding_stats.pt")  # re-exports replace the others
REQUIRED_FILES = (
    "LICENSE",
    "configs/metadata.json",
    "configs/inference.json",
    "configs/logging.conf",
    "docs/README.md",
    "docs/data_license.txt",
    "models/model.pt",
    "scripts/__init__.py",
)
SKIPPED_NAMES = ("__pycache__", ".ipynb_checkpoints")
SKIPPED_SUFFIXES = (".pyc", ".pyo")

# `python -m monai.bundle ...` argument lists, run with the bundle folder as the working directory.
TORCHSCRIPT_EXPORT = [
    "ckpt_export", "network_def", "--filepath", "models/model.ts", "--ckpt_file", "models/model.pt",
    "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json", "--key_in_ckpt", "model",
    "--network_def#return_embedding", "False",
]  # fmt: skip
ONNX_CONVERTER_KWARGS = {
    "dynamo": False,  # the torch.export-based exporter needs onnxscript; the TorchScript-based one does not
    "input_names": ["image"],
    "output_names": ["pred", "cls"],
    "dynamic_axes": {"image": [0], "pred": [0], "cls": [0]},
    "opset_version": 17,
}
ONNX_EXPORT = [
    "onnx_export", "network_def", "--filepath", "models/model.onnx", "--ckpt_file", "models/model.pt",
    "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json", "--key_in_ckpt", "model",
    "--use_trace", "True", "--converter_kwargs", json.dumps(ONNX_CONVERTER_KWARGS),
    "--network_def#return_embedding", "False",
]  # fmt: skip


def _skipped(path: Path) -> bool:
    """Whether a file or folder is left out of the archive (byte code, caches, hidden files)."""
    return path.name in SKIPPED_NAMES or path.name.startswith(".") or path.suffix in SKIPPED_SUFFIXES


def _copy_tree(source: Path, target: Path, keep=lambda path: True) -> None:
    """Copy the files of ``source`` to ``target``, recursively, without skipped names.

    Args:
        source: folder to copy.
        target: destination folder (created).
        keep: predicate on each source file; files for which it is false are not copied.
    """
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if any(_skipped(Path(part)) for part in relative.parts) or not path.is_file() or not keep(path):
            continue
        destination = target / relative
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, destination)


def needed_scripts(bundle_dir: Path) -> list[str]:
    """The ``scripts`` modules that the configs name (``scripts.<module>``), with the modules they import.

    Returns:
        Sorted module names, ``__init__`` included.
    """
    configs = "".join(path.read_text() for path in sorted((bundle_dir / "configs").glob("*.json")))
    queue, needed = set(re.findall(r"\bscripts\.(\w+)", configs)), {"__init__"}
    while queue:
        module = queue.pop()
        needed.add(module)
        tree = ast.parse((bundle_dir / "scripts" / f"{module}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:  # from .module import ..., from . import module
                imported = [node.module] if node.module else [alias.name for alias in node.names]
                queue.update(set(imported) - needed)
    return sorted(needed)


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_bundle_command(args: Sequence[str], cwd: Path) -> None:
    """Run ``python -m monai.bundle <args>`` in ``cwd``, so that ``scripts`` is imported from that bundle.

    Args:
        args: command and arguments.
        cwd: bundle folder.

    Raises:
        RuntimeError: when the command fails, with the end of its output.
    """
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args], cwd=cwd, env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        tail = f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
        raise RuntimeError(f"`python -m monai.bundle {args[0]}` failed:\n{tail}")


def write_large_files_list(stage: Path, limit_mb: float, url: str | None, exclude: bool) -> list[str]:
    """List the files above ``limit_mb`` in ``large_files.yml`` (the Model Zoo's download list).

    Args:
        stage: staged bundle folder.
        limit_mb: size limit in MB (10**6 bytes).
        url: base URL under which each large file is published as ``<url>/<relative path>``; without one the large
            files stay in the archive, unlisted (a complete archive that the Model Zoo repository would not take).
        exclude: remove the large files from the staged folder (users fetch them with
            ``python -m monai.bundle download_large_files``); otherwise they stay in the archive too.

    Returns:
        The relative paths of the listed files.

    Raises:
        ValueError: when large files are to be excluded but there is no ``url`` to fetch them from.
    """
    large = sorted(p for p in stage.rglob("*") if p.is_file() and p.stat().st_size > limit_mb * 1e6)
    if not large:
        return []
    if not url:
        names = [p.relative_to(stage).as_posix() for p in large]
        if exclude:
            raise ValueError(f"{names} exceed {limit_mb} MB: publish them and give --large_files_url.")
        print(f"{names} exceed {limit_mb} MB and stay in the archive; for the Model Zoo repository publish them and "
              "give --large_files_url and --exclude_large_files.", file=sys.stderr)
        return []
    lines = ["large_files:"]
    for path in large:
        relative = path.relative_to(stage).as_posix()
        lines += [
            f'  - path: "{relative}"',
            f'    url: "{url.rstrip("/")}/{relative}"',
            f'    hash_val: "{_md5(path)}"',
            '    hash_type: "md5"',
        ]
        if exclude:
            path.unlink()
    (stage / "large_files.yml").write_text("\n".join(lines) + "\n")
    return [p.relative_to(stage).as_posix() for p in large]


def stage_bundle(
    bundle_dir: Path, stage: Path, export: bool = True, keep_datalists: Sequence[str] = ()
) -> None:
    """Copy what the archive ships from ``bundle_dir`` into ``stage`` and make the exports there.

    Args:
        bundle_dir: the bundle folder (with configs/, scripts/, docs/, models/model.pt, LICENSE).
        stage: empty destination folder.
        export: export models/model.ts and models/model.onnx from models/model.pt; otherwise copy the ones
            present in ``bundle_dir/models``.
        keep_datalists: names of ``configs/datalist_*.json`` files to ship (by default none is shipped: they
            name files of a local dataset).

    Raises:
        FileNotFoundError: when a required file is missing.
    """
    for name in TOP_LEVEL_FILES:
        if (bundle_dir / name).is_file():
            shutil.copy2(bundle_dir / name, stage / name)

    scripts = [f"{module}.py" for module in needed_scripts(bundle_dir)]

    def keep(path: Path) -> bool:
        relative = path.relative_to(bundle_dir)
        if relative.parts[0] == "scripts":
            return relative.as_posix() in (f"scripts/{name}" for name in scripts)
        if relative.parts[0] == "configs" and path.name.startswith("datalist") and path.name not in keep_datalists:
            return False
        if relative.parts[0] == "models":
            return path.name in KEPT_MODEL_FILES or (not export and path.name in MODEL_FILES)
        return True

    for name in TOP_LEVEL_DIRS:
        if (bundle_dir / name).is_dir():
            _copy_tree(bundle_dir / name, stage / name, keep)
    missing = [name for name in REQUIRED_FILES if not (stage / name).is_file()]
    if missing:
        hint = " (models/model.pt is written by the training workflow)" if "models/model.pt" in missing else ""
        raise FileNotFoundError(f"{bundle_dir} lacks {missing}{hint}.")
    modules = ", ".join(f"scripts.{name[:-3]}" for name in scripts if name != "__init__.py")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}  # import from the stage only
    command = [sys.executable, "-c", f"import {modules}"]
    result = subprocess.run(command, cwd=stage, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"the staged scripts/ does not import: {result.stderr[-2000:]}")
    if export:
        run_bundle_command(TORCHSCRIPT_EXPORT, cwd=stage)
        run_bundle_command(ONNX_EXPORT, cwd=stage)


def write_zip(stage: Path, zip_path: Path, top: str) -> None:
    """Zip ``stage`` as ``top/...`` with fixed timestamps and sorted entries (same input, same bytes)."""
    files = sorted(p for p in stage.rglob("*") if p.is_file())
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in files:
            info = zipfile.ZipInfo(f"{top}/{path.relative_to(stage).as_posix()}", date_time=ZIP_DATE_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, path.read_bytes())


def package(
    bundle_dir: str = str(REPO_ROOT / "bundle"),
    output_dir: str = str(REPO_ROOT / "dist"),
    name: str = BUNDLE_NAME,
    export: bool = True,
    keep_datalists: Sequence[str] = (),
    large_file_limit_mb: float = LARGE_FILE_LIMIT_MB,
    large_files_url: str | None = None,
    exclude_large_files: bool = False,
) -> str:
    """Build ``<output_dir>/<name>_v<version>.zip`` from a bundle folder.

    Args:
        bundle_dir: the bundle folder; it is only read.
        output_dir: folder for the archive (created); it must not be inside ``bundle_dir``.
        name: bundle name, the archive's top folder.
        export: export TorchScript and ONNX from models/model.pt with the stock MONAI commands.
        keep_datalists: ``configs/datalist_*.json`` names to ship, e.g. the BUSI split (file names only).
        large_file_limit_mb: with ``large_files_url``, files above this size are listed in ``large_files.yml``.
        large_files_url: base URL where large files are published (the Model Zoo repository needs it when there are
            any); without it they stay in the archive, unlisted.
        exclude_large_files: leave large files out of the archive (Model Zoo repository layout).

    Returns:
        Path of the archive.
    """
    source = Path(bundle_dir).resolve()
    out = Path(output_dir).resolve()
    if out == source or source in out.parents:
        raise ValueError(f"output_dir {out} must not be inside the bundle folder {source}.")
    metadata = json.loads((source / "configs" / "metadata.json").read_text())
    version = metadata["version"]
    if version not in metadata.get("changelog", {}):
        raise ValueError(f"metadata.json: version {version} has no changelog entry.")
    if isinstance(keep_datalists, str):
        keep_datalists = [keep_datalists]
    out.mkdir(parents=True, exist_ok=True)
    zip_path = out / f"{name}_v{version}.zip"
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp) / name
        stage.mkdir()
        stage_bundle(source, stage, export=export, keep_datalists=tuple(keep_datalists))
        write_large_files_list(stage, large_file_limit_mb, large_files_url, exclude_large_files)
        partial = zip_path.with_name(zip_path.name + ".partial")
        write_zip(stage, partial, name)
        os.replace(partial, zip_path)
    return str(zip_path)


if __name__ == "__main__":
    import fire

    fire.Fire(package)
