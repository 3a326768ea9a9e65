"""Place the bundle in MONAI Label's stock ``monaibundle`` sample app, offline.

Run with the MONAI Label environment's Python (``monailabel/setup_env.sh`` creates it)::

    .venv-monailabel/bin/python monailabel/prepare_app.py --app runs/monailabel/monaibundle

1. The bundle is checked for what MONAI Label needs (``compat.py``); if it lacks any of it, the script stops with
   an error naming each missing piece, before it changes anything. The bundle is served as it is, never patched.
2. The sample app comes from the MONAI Label package itself (``monailabel apps --download --name monaibundle``
   copies it from the installed ``sample-apps`` folder; no network). Its ``main.py`` is kept, unchanged, as
   ``monaibundle_main.py``; the app's ``main.py`` becomes ``app_main.py`` of this folder (a subclass of the stock
   app that adds active learning), with ``activelearning.py`` beside it. Both are refreshed on every run.
3. ``bundle/`` is copied to ``<app>/model/breast_ultrasound_segmentation_classification`` (the folder name gives
   MONAI Label the task type, *segmentation*), without run outputs (``eval``, ``logs``, ``cache``, ``data``, saved
   split files). Weights: ``bundle/models/model.pt`` when present (of an ensemble, its first member only, because
   MONAI Label fine-tunes one network), else a freshly initialised network written to the copy only.
4. An existing copy keeps its ``models/`` (weights fine-tuned through MONAI Label survive a restart), except
   initialised weights never trained, which ``bundle/models/model.pt`` replaces once it exists; configs and
   scripts are refreshed from ``bundle/``. ``--fresh`` replaces the copy whole.

Prints one JSON line: the app folder, the bundle copy and where the weights came from.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import compat

BUNDLE_NAME = "breast_ultrasound_segmentation_classification"
REPO_ROOT = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns("eval", "logs", "cache", "data", "__pycache__", "*.pyc", "datalist_*.json", ".*")
INITIALISED_MARKER = ".initialised"
HERE = Path(__file__).resolve().parent
STOCK_MAIN = "monaibundle_main.py"  # the stock app's main.py, loaded by ours (app_main.py)
APP_CODE = {"app_main.py": "main.py", "activelearning.py": "activelearning.py"}  # this folder's file -> app's file
APP_CLASS = "class BreastUltrasoundApp("  # tells our main.py from the stock one
logger = logging.getLogger("prepare_app")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def copy_sample_app(app: Path) -> None:
    """Copy the stock monaibundle app out of the installed MONAI Label package (``monailabel apps --download``).

    Its ``main.py`` goes to ``monaibundle_main.py``. An app prepared before this step existed has the stock
    ``main.py`` still in place: it is renamed. What the app folder already holds (``model/``: fine-tuned weights)
    is kept.
    """
    stock, main = app / STOCK_MAIN, app / "main.py"
    if stock.is_file():
        return
    if main.is_file() and APP_CLASS not in main.read_text(encoding="utf-8"):
        main.rename(stock)
        return
    app.parent.mkdir(parents=True, exist_ok=True)
    staging = app.parent / f".{app.name}.download"
    shutil.rmtree(staging, ignore_errors=True)
    command = [sys.executable, "-m", "monailabel.main", "apps", "--download", "--name", "monaibundle"]
    subprocess.run([*command, "--output", str(staging)], check=True, stdout=subprocess.DEVNULL)
    downloaded = staging / "monaibundle"
    (downloaded / "main.py").rename(downloaded / STOCK_MAIN)
    app.mkdir(exist_ok=True)
    for item in downloaded.iterdir():
        if not (app / item.name).exists():
            item.rename(app / item.name)
    shutil.rmtree(staging)


def install_app_code(app: Path) -> None:
    """Put this folder's ``app_main.py`` (as ``main.py``) and ``activelearning.py`` into the app."""
    for source, target in APP_CODE.items():
        shutil.copy2(HERE / source, app / target)


def copy_bundle(source: Path, target: Path, fresh: bool) -> None:
    """Copy the bundle; an existing copy keeps its ``models`` folder unless ``fresh``."""
    kept_models = None
    if target.exists():
        if not fresh and (target / "models").is_dir():
            kept_models = target.parent / f".{target.name}.models"
            shutil.rmtree(kept_models, ignore_errors=True)
            (target / "models").rename(kept_models)
        shutil.rmtree(target)
    shutil.copytree(source, target, ignore=IGNORE)
    if kept_models is not None:
        shutil.rmtree(target / "models", ignore_errors=True)
        kept_models.rename(target / "models")
    (target / "models").mkdir(exist_ok=True)


@contextlib.contextmanager
def _bundle_scripts(bundle: Path) -> Iterator[None]:
    """Make ``bundle``'s ``scripts`` package importable for the duration."""
    sys.path.insert(0, str(bundle))
    try:
        yield
    finally:
        sys.path.remove(str(bundle))


def initialise_weights(bundle: Path, seed: int = 0) -> None:
    """Write ``models/model.pt`` (``{"model": state_dict}``) of a freshly initialised network into the copy."""
    import torch
    from monai.bundle import ConfigParser

    with _bundle_scripts(bundle):
        parser = ConfigParser()
        parser.read_config(str(bundle / "configs" / "inference.json"))
        parser["bundle_root"] = str(bundle)
        torch.manual_seed(seed)
        network = parser.get_parsed_content("network_def", instantiate=True)
        torch.save({"model": network.state_dict()}, bundle / "models" / "model.pt")


def keep_first_member(model: Path) -> int:
    """Of an ensemble's weights (``scripts.net.MultiTaskEnsemble``), keep only the first member's, in place: MONAI
    Label fine-tunes one network with ``train.json``. Returns the number of members ``model`` held (1: untouched)."""
    import torch

    with _bundle_scripts(model.parents[1]):  # the bundle copy that holds ``models/model.pt``
        from scripts.handlers import atomic_save  # an interrupted run leaves the copy's weights whole
        from scripts.net import ENSEMBLE_PREFIX, ensemble_members, member_state

    state = torch.load(model, map_location="cpu", weights_only=True)["model"]
    if any(name.startswith(ENSEMBLE_PREFIX) for name in state):
        atomic_save({"model": member_state(state, 0)}, model)
    return ensemble_members(state)


def prepare(app: Path, bundle_source: Path, fresh: bool = False, check_bundle: bool = True) -> dict:
    """Set up ``app`` with the bundle; see the module docstring.

    Raises:
        compat.BundleNotReadyError: when ``check_bundle`` and the bundle lacks what MONAI Label needs.
    """
    if check_bundle:
        compat.check(bundle_source)
    app = app.resolve()
    copy_sample_app(app)
    install_app_code(app)
    target = app / "model" / BUNDLE_NAME
    copy_bundle(bundle_source.resolve(), target, fresh)
    weights = "kept (existing copy)"
    model = target / "models" / "model.pt"
    marker = target / "models" / INITIALISED_MARKER  # digest of weights this script initialised
    source_model = bundle_source / "models" / "model.pt"
    untouched_init = marker.is_file() and model.is_file() and marker.read_text().strip() == digest(model)
    if not model.is_file() or (untouched_init and source_model.is_file()):
        marker.unlink(missing_ok=True)
        if source_model.is_file():
            shutil.copy2(source_model, model)
            weights = str(source_model)
        else:
            initialise_weights(target)
            marker.write_text(digest(model) + "\n")
            weights = "freshly initialised (bundle/models/model.pt is missing)"
    members = keep_first_member(model)
    if members > 1:
        weights += f" (the first of its {members} ensemble members: MONAI Label fine-tunes one network)"
    return {"app": str(app), "bundle": str(target), "weights": weights}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--app", default=str(REPO_ROOT / "runs" / "monailabel" / "monaibundle"), help="app folder")
    parser.add_argument("--bundle", default=str(REPO_ROOT / "bundle"), help="bundle to place in the app")
    parser.add_argument("--fresh", action="store_true", help="replace an existing copy, weights included")
    parser.add_argument(
        "--no-check", action="store_true", help="place the bundle even if it lacks what MONAI Label needs (compat.py)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[prepare_app] %(levelname)s %(message)s")
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    try:
        result = prepare(Path(args.app), Path(args.bundle), args.fresh, not args.no_check)
    except compat.BundleNotReadyError as error:
        logger.error("%s", error)
        sys.exit(1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
