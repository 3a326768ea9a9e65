"""End to end: the bundle served by MONAI Label's stock monaibundle app, driven like 3D Slicer drives it.

The server runs in its own environment (``.venv-monailabel``, made by ``monailabel/setup_env.sh``: MONAI Label
0.8.5 needs torchvision, the registry's CUDA torch build and numpy<2, so it cannot share the core ``.venv``). The
first run installs it (about 4 minutes); later runs reuse it. The test is skipped only when that environment
cannot be created because the package registry is unreachable.

One module-scoped session starts the real server with the documented command (``monailabel/start.sh``) on
127.0.0.1 and a free port, on generated studies (PNG, RGB PNG, JPG, single-slice NRRD, plus a single-slice NIfTI
uploaded through the client), and runs ``monailabel/e2e_client.py`` in the server's environment: MONAI Label's own
Python client (``monailabel.client.MONAILabelClient``, the one the Slicer module uses) calls info, infer (also with
the parameters the Slicer module adds: an 8-bit NRRD result), the active learning loop (uncertainty scoring, next
sample, its label, next sample), save label, train (one epoch) and infer again. The tests below check what came
back; the server is always stopped.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from .conftest import REPO_ROOT

MONAILABEL_DIR = REPO_ROOT / "monailabel"
VENV = Path(os.environ.get("MONAILABEL_VENV", REPO_ROOT / ".venv-monailabel"))
PYTHON = VENV / "bin" / "python"
MODEL = "breast_ultrasound_segmentation_classification"
SCORING, STRATEGY = "bundle_uncertainty", "uncertainty"  # monailabel/activelearning.py
CLASS_NAMES = ("normal", "benign", "malignant")
SEGMENT_NAMES = ["benign", "malignant"]  # label values 1 and 2
SLICER_PLUGIN = VENV / "monailabel" / "plugins" / "slicer" / "MONAILabel"  # the module's code, as installed
EX_UNREACHABLE = 75  # monailabel/setup_env.sh: the package registry cannot be reached
SETUP_TIMEOUT = 1800
SERVER_START_TIMEOUT = 300
NRRD_SPACING, NRRD_ORIGIN = (0.2, 0.3, 1.0), (10.0, -5.0, 2.0)
NIFTI_AFFINE = np.array([[-0.25, 0, 0, 30.0], [0, -0.25, 0, 12.0], [0, 0, 1.0, -4.0], [0, 0, 0, 1]])


def load_compat():
    spec = importlib.util.spec_from_file_location("monailabel_compat", MONAILABEL_DIR / "compat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(path: Path, chars: int = 6000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


@pytest.fixture(scope="module")
def monailabel_env() -> Path:
    """The MONAI Label environment, made on first use and reused; skipped only if the registry is unreachable."""
    start = time.monotonic()
    result = subprocess.run(
        ["bash", str(MONAILABEL_DIR / "setup_env.sh")],
        capture_output=True, text=True, timeout=SETUP_TIMEOUT, env={**os.environ, "MONAILABEL_VENV": str(VENV)},
    )  # fmt: skip
    if result.returncode == EX_UNREACHABLE:
        said = [line for line in result.stderr.splitlines() if "Errno" in line or line.startswith("ERROR")]
        pytest.skip(
            "MONAI Label environment cannot be created: the package registry is unreachable "
            f"(monailabel/setup_env.sh exit {EX_UNREACHABLE}); pip: {' | '.join(said[:1] + said[-1:])[-500:]}"
        )
    assert result.returncode == 0, f"monailabel/setup_env.sh failed ({result.returncode}):\n{result.stderr[-6000:]}"
    print(f"MONAI Label environment ready in {time.monotonic() - start:.0f} s: {VENV}")
    return PYTHON


def write_studies(root: Path) -> dict:
    """Generated images in the formats a Slicer user brings, and their class-coded label maps."""
    from synthetic import generate_dataset, load_binary_mask

    source = root / "generated"
    generate_dataset(str(source), num_per_class=2, seed=3, rgb_fraction=0.5, extra_mask_fraction=0.0)
    studies, uploads, labels = root / "studies", root / "uploads", root / "labels"
    for folder in (studies, uploads, labels):
        folder.mkdir()
    cases = {}
    for value, name in enumerate(CLASS_NAMES):
        for index in (1, 2):
            stem = source / name / f"{name} ({index})"
            mask = np.zeros_like(load_binary_mask(f"{stem}_mask.png"), dtype=np.uint8)
            for mask_file in sorted(stem.parent.glob(f"{stem.name}_mask*.png")):
                mask |= load_binary_mask(mask_file).astype(np.uint8)
            cases[f"{name}_{index}"] = (Image.open(f"{stem}.png"), (mask * value).astype(np.uint8))

    def png(image_id, slicer_label=False):  # RGB or grey PNG, as generated
        image, label = cases[image_id]
        image.save(studies / f"{image_id}.png")
        if slicer_label:  # what Slicer's Submit Label sends for a PNG: a single-slice NIfTI on the image's grid
            label_file = labels / f"{image_id}.nii.gz"
            itk.imwrite(itk.image_from_array(np.ascontiguousarray(label[None])), str(label_file))
        else:
            label_file = labels / f"{image_id}.png"
            Image.fromarray(label).save(label_file)
        return {"image": studies / f"{image_id}.png", "label": label_file, "format": "png"}

    def jpg(image_id):
        image, label = cases[image_id]
        image.convert("L").save(studies / f"{image_id}.jpg", quality=95)
        Image.fromarray(label).save(labels / f"{image_id}.png")
        return {"image": studies / f"{image_id}.jpg", "label": labels / f"{image_id}.png", "format": "jpg"}

    def nrrd(image_id):  # a single-slice volume with geometry, and its label map as Slicer exports it (NIfTI)
        image, label = cases[image_id]
        grey = np.asarray(image.convert("L"), dtype=np.int16)
        volume = itk.image_from_array(np.ascontiguousarray(grey[None]))
        volume.SetSpacing(NRRD_SPACING)
        volume.SetOrigin(NRRD_ORIGIN)
        itk.imwrite(volume, str(studies / f"{image_id}.nrrd"), compression=True)
        label_volume = itk.image_from_array(np.ascontiguousarray(label[None]))
        label_volume.CopyInformation(volume)
        itk.imwrite(label_volume, str(labels / f"{image_id}.nii.gz"))
        return {"image": studies / f"{image_id}.nrrd", "label": labels / f"{image_id}.nii.gz", "format": "nrrd"}

    def uploaded_nifti(image_id):  # a volume saved by Slicer (single-slice NIfTI) and uploaded by the client
        image, label = cases[image_id]
        grey = np.asarray(image.convert("L"), dtype=np.int16).T[:, :, None]
        nib.save(nib.Nifti1Image(grey, NIFTI_AFFINE), uploads / f"{image_id}.nii.gz")
        nib.save(nib.Nifti1Image(label.T[:, :, None], NIFTI_AFFINE), labels / f"{image_id}.nii.gz")
        return {"image": uploads / f"{image_id}.nii.gz", "label": labels / f"{image_id}.nii.gz", "format": "nifti"}

    return {
        "normal_1": png("normal_1"),
        "benign_1": png("benign_1", slicer_label=True),
        "malignant_1": png("malignant_1"),
        "benign_2": jpg("benign_2"),
        "malignant_2": nrrd("malignant_2"),
        "normal_2": uploaded_nifti("normal_2"),
    }


def file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def session(monailabel_env, tmp_path_factory):
    """Start the server, drive it with MONAI Label's client, stop the server; return what was observed."""
    work = tmp_path_factory.mktemp("monailabel")
    studies = write_studies(work)
    app = work / "app"
    port = free_port()
    server_tmp = work / "server-tmp"
    server_tmp.mkdir()
    # the generated studies are shapes, not breast ultrasound: the embedding check would rightly call them not
    # assessable (tests/test_prediction_reliability.py covers it), so the served copy leaves it off
    served = work / "bundle"
    shutil.copytree(REPO_ROOT / "bundle", served, ignore=shutil.ignore_patterns("eval", "logs", "cache", "__pycache__"))
    inference_config = served / "configs" / "inference.json"
    config = {**json.loads(inference_config.read_text()), "max_embedding_distance": None}
    inference_config.write_text(json.dumps(config))
    env = {
        **os.environ,
        "MONAILABEL_BUNDLE": str(served),
        "MONAILABEL_VENV": str(VENV),
        "MONAILABEL_APP": str(app),
        "MONAI_LABEL_SESSION_PATH": str(work / "sessions"),
        "TMPDIR": str(server_tmp),
        "PYTHONUNBUFFERED": "1",
    }
    log_path = work / "server.log"
    started = time.monotonic()
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            ["bash", str(MONAILABEL_DIR / "start.sh"), str(work / "studies"), str(port)],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            assert server.poll() is None, f"the server exited with {server.returncode}:\n{tail(log_path)}"
            try:
                with urllib.request.urlopen(f"{url}/info/", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"no answer from {url} in {SERVER_START_TIMEOUT} s:\n{tail(log_path)}"
            time.sleep(1)
        startup_seconds = time.monotonic() - started
        bundle_copy = app / "model" / MODEL
        weights_before = file_sha(bundle_copy / "models" / "model.pt")
        by_id = {image_id: case for image_id, case in studies.items()}
        plan = {
            "url": url,
            "model": MODEL,
            "out_dir": str(work / "results"),
            "upload": [{"id": "normal_2", "file": str(studies["normal_2"]["image"])}],
            "infer_before": list(by_id),
            "infer_slicer": list(by_id),
            "labels": [
                {
                    "id": image_id,
                    "file": str(case["label"]),
                    "label_info": [{"name": "benign", "idx": 1}, {"name": "malignant", "idx": 2}],
                }
                for image_id, case in by_id.items()
            ],
            # force: score every image again, although MONAI Label's own scoring at start-up has just done it
            "active_learning": {"scoring": SCORING, "params": {"force": True}, "strategy": STRATEGY, "timeout": 600},
            "train": {"max_epochs": 1, "val_split": 0.2},
            "train_timeout": 900,
            "infer_after": ["benign_1", "malignant_2"],
        }
        (work / "plan.json").write_text(json.dumps(plan))
        driver = subprocess.run(
            [str(monailabel_env), str(MONAILABEL_DIR / "e2e_client.py"), str(work / "plan.json"),
             str(work / "report.json")],
            capture_output=True, text=True, timeout=1500, cwd=work,
        )  # fmt: skip
        assert driver.returncode == 0, f"client failed:\n{driver.stderr[-4000:]}\nserver log:\n{tail(log_path)}"
        report = json.loads((work / "report.json").read_text())
        yield {
            "report": report,
            "studies": studies,
            "app": app,
            "bundle_copy": bundle_copy,
            "weights_before": weights_before,
            "log": log_path,
            "work": work,
            "startup_seconds": startup_seconds,
        }
    finally:
        stop_server(server)


def stop_server(server: subprocess.Popen) -> None:
    """Stop the server and its children (training runs) by their own process group, politely first."""
    if server.poll() is not None:
        return
    for sig, wait in ((signal.SIGINT, 20), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    try:  # children left in the group (a training run) go too
        os.killpg(server.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def check_result(case: dict, result: dict) -> np.ndarray:
    """One inference result: label file at the image's size and geometry, uint8 0/1/2 agreeing with the class."""
    params = result["json"]
    assert params["label_names"] == {"benign": 1, "malignant": 2}
    assert params["class"] in CLASS_NAMES and params["class_index"] == CLASS_NAMES.index(params["class"])
    probabilities = params["probabilities"]
    assert list(probabilities) == list(CLASS_NAMES)
    assert abs(sum(probabilities.values()) - 1) < 1e-3 and all(0 <= p <= 1 for p in probabilities.values())
    assert params["class"] == max(probabilities, key=probabilities.get)
    path = Path(result["file"])
    assert path.is_file(), result
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    # a JPEG image gets a PNG label map: a lossy JPEG label file would alter label values at lesion borders
    expected_suffix = {"png": ".png", "jpg": ".png", "nrrd": ".nrrd", "nifti": ".nii.gz"}[case["format"]]
    assert suffix == expected_suffix, path
    if case["format"] in ("png", "jpg"):
        with Image.open(path) as label_file, Image.open(case["image"]) as image_file:
            assert label_file.mode == "L", "8-bit grey label map expected"
            label = np.asarray(label_file)
            assert label.shape == image_file.size[::-1]
    else:
        label_image = itk.imread(str(path))
        label = itk.array_from_image(label_image)
        source = itk.imread(str(case["image"]))
        assert tuple(itk.size(label_image)) == tuple(itk.size(source)), "label size differs from the image"
        np.testing.assert_allclose(label_image.GetSpacing(), source.GetSpacing(), atol=1e-6)
        np.testing.assert_allclose(label_image.GetOrigin(), source.GetOrigin(), atol=1e-6)
        np.testing.assert_allclose(
            itk.array_from_matrix(label_image.GetDirection()), itk.array_from_matrix(source.GetDirection()), atol=1e-6
        )
        assert label.dtype == np.uint8
        label = label.reshape(label.shape[-2:])
    values = set(np.unique(label).tolist())
    assert values <= {0, params["class_index"]}, f"label values {values} disagree with class {params['class']}"
    assert params["lesion_pixels"] == int((label > 0).sum())
    return label


def configured_label_colors() -> dict:
    """The bundle's lesion colours by segment name (``scripts.common``), as the server must send them."""
    from scripts.common import CLASS_NAMES, LESION_COLOURS

    return {CLASS_NAMES[value]: list(rgb) for value, rgb in LESION_COLOURS.items()}


def check_slicer_result(case: dict, result: dict) -> None:
    """A result for the Slicer module's parameters: an 8-bit NRRD label map at the image's size, 2D for PNG/JPG."""
    params = result["json"]
    path = Path(result["file"])
    assert path.is_file() and path.suffix == ".nrrd", result
    label_image = itk.imread(str(path))
    label = itk.array_from_image(label_image)
    assert label.dtype == np.uint8
    if case["format"] in ("png", "jpg"):  # a 2D label map, as Slicer loads it over the 2D image
        assert label_image.GetImageDimension() == 2, label.shape
        with Image.open(case["image"]) as image_file:
            assert tuple(itk.size(label_image)) == image_file.size
    else:  # single-slice volumes keep their slice axis and geometry
        source = itk.imread(str(case["image"]))
        assert tuple(itk.size(label_image)) == tuple(itk.size(source)), "label size differs from the image"
        np.testing.assert_allclose(label_image.GetSpacing(), source.GetSpacing(), atol=1e-6)
        np.testing.assert_allclose(label_image.GetOrigin(), source.GetOrigin(), atol=1e-6)
    values = set(np.unique(label).tolist())
    assert values <= {0, 1, 2}
    assert values <= {0, params["class_index"]}, f"label values {values} disagree with class {params['class']}"
    assert params["lesion_pixels"] == int((label > 0).sum())


def test_info_names_the_model_and_its_segments(session):
    report = session["report"]
    info = report["info"]
    assert info["labels"] == ["benign", "malignant"]
    model = info["models"][MODEL]
    assert model["type"] == "segmentation" and model["dimension"] == 2
    assert model["labels"] == {"benign": 1, "malignant": 2}
    assert MODEL in info["trainers"]
    assert set(session["studies"]) - {"normal_2"} <= set(report["datastore_ids"])
    assert report["upload"] and report["upload"][0]["image"] == "normal_2"
    compat = load_compat()  # prepare_app.py refuses a bundle that lacks any of it; nothing is patched in
    assert compat.missing(REPO_ROOT / "bundle") == []
    assert compat.missing(session["bundle_copy"]) == []


@pytest.mark.parametrize("image_id", ["normal_1", "benign_1", "malignant_1", "benign_2", "malignant_2", "normal_2"])
def test_inference_returns_a_label_map_at_the_image_geometry_and_the_class(session, image_id):
    case = session["studies"][image_id]
    check_result(case, session["report"]["infer_before"][image_id])


@pytest.mark.parametrize("image_id", ["normal_1", "benign_1", "malignant_1", "benign_2", "malignant_2", "normal_2"])
def test_inference_with_the_slicer_modules_parameters_returns_an_8bit_nrrd(session, image_id):
    """Slicer always asks for ``.nrrd`` and ``uint8``: PNG/JPG images get a 2D NRRD label map."""
    report = session["report"]
    case = session["studies"][image_id]
    check_slicer_result(case, report["infer_slicer"][image_id])
    # same weights and image as infer_before: the same prediction, whatever the file format
    before, slicer = report["infer_before"][image_id]["json"], report["infer_slicer"][image_id]["json"]
    assert slicer["class"] == before["class"]
    for name in CLASS_NAMES:
        assert abs(slicer["probabilities"][name] - before["probabilities"][name]) < 1e-3, (name, slicer, before)


def test_result_json_names_and_colours_the_segments(session):
    """What the Slicer module reads: segment names by label value (as /info says), and the bundle's colours."""
    report = session["report"]
    info = report["info"]
    colours = configured_label_colors()
    assert colours == {"benign": [0, 200, 0], "malignant": [230, 0, 0]}
    results = {
        f"{step} {image_id}": result
        for step in ("infer_before", "infer_slicer", "infer_after")
        for image_id, result in report.get(step, {}).items()
    }
    assert results
    for name, result in results.items():
        label_names = result["json"]["label_names"]
        # the module names the segments of the label map in label-value order (onClickSegmentation)
        by_value = [segment for segment, _ in sorted(label_names.items(), key=lambda item: item[1])]
        assert by_value == SEGMENT_NAMES == info["labels"], name
        assert label_names == info["models"][MODEL]["labels"], name
        assert result["json"]["label_colors"] == colours, name


def test_slicer_module_has_no_colours_for_the_segment_names(monailabel_env):
    """The guide says: the module colours segments only from its anatomy table, which has no benign/malignant."""
    table_file = SLICER_PLUGIN / "MONAILabelLib" / "labelcolors.py"
    if not table_file.is_file():
        pytest.skip(f"the Slicer module's colour table is not installed: {table_file}")
    spec = importlib.util.spec_from_file_location("monailabel_slicer_labelcolors", table_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    table = module.GenericAnatomyColors
    assert table, "empty colour table"
    for name in SEGMENT_NAMES:
        assert name not in table, f"Slicer now has a colour for '{name}': update bundle/docs/monailabel_slicer.md"
    module_file = SLICER_PLUGIN / "MONAILabel.py"
    if module_file.is_file():
        code = module_file.read_text(errors="replace")
        assert "GenericAnatomyColors.get(name.lower())" in code, "the module looks colours up differently now"
        assert "label_colors" not in code, "the module reads label_colors now: update bundle/docs/monailabel_slicer.md"


def served_uncertainty(result: dict) -> tuple[float, str]:
    """``uncertainty`` and ``status`` of an inference result (the bundle's contract with the active learning)."""
    params = result["json"]
    assert {"uncertainty", "status"} <= set(params), f"the bundle returns no uncertainty or status: {sorted(params)}"
    assert 0 <= params["uncertainty"] <= 1 and params["status"] in ("ok", "not assessable"), params
    return params["uncertainty"], params["status"]


def most_uncertain_first(scores: dict[str, tuple[float, str]]) -> list[str]:
    """The documented order: status "ok" before "not assessable", then uncertainty, highest first, then id."""
    return sorted(scores, key=lambda image_id: (scores[image_id][1] != "ok", -scores[image_id][0], image_id))


def test_info_offers_the_uncertainty_scoring_and_strategy(session):
    info = session["report"]["info"]
    assert SCORING in info["scoring"], info["scoring"]
    assert list(info["strategies"])[0] == STRATEGY, "the uncertainty strategy should come first in Slicer's list"
    assert {"random", "first"} <= set(info["strategies"]), "the stock strategies stay"


def test_scoring_stores_the_uncertainty_that_inference_returns(session):
    report = session["report"]
    steps = report["active_learning"]
    assert steps["scoring"]["status"] == "DONE", f"{steps['scoring']}\nserver log:\n{tail(session['log'])}"
    summary, studies = steps["summary"], session["studies"]
    assert summary["failed"] == [] and summary["unlabeled"] == summary["scored"] == len(studies), summary
    weights = session["weights_before"][:16]  # scores say which weights gave them
    assert summary["weights"] == weights, summary
    for image_id in studies:
        uncertainty, status = served_uncertainty(report["infer_before"][image_id])
        stored = steps["datastore"][image_id]  # what GET /datastore shows
        assert abs(stored["uncertainty"] - uncertainty) < 1e-4, (image_id, stored, uncertainty)
        assert stored["uncertainty_status"] == status and stored["uncertainty_weights"] == weights, (image_id, stored)


def test_next_sample_is_the_most_uncertain_unlabelled_image(session):
    """Next sample, label it, next sample: each time the unlabelled image with the highest /infer uncertainty."""
    report = session["report"]
    steps = report["active_learning"]
    scores = {image_id: served_uncertainty(report["infer_before"][image_id]) for image_id in session["studies"]}
    first, second = steps["samples"]
    assert steps["label"]["image"] == first["id"]
    remaining = {image_id: score for image_id, score in scores.items() if image_id != first["id"]}
    for sample, unlabelled in ((first, scores), (second, remaining)):
        expected = most_uncertain_first(unlabelled)[0]
        got = scores[sample["id"]]
        # the server ranks its stored scores, /infer's up to float rounding: a near-tie may go either way
        near_tie = got[1] == scores[expected][1] and abs(got[0] - scores[expected][0]) < 1e-4
        assert sample["id"] == expected or near_tie, (sample, expected, unlabelled)
        assert sample["uncertainty"] == steps["datastore"][sample["id"]]["uncertainty"], sample  # info comes along
    assert second["id"] != first["id"]


def test_uncertainty_contract_and_order(monailabel_env):
    """``activelearning.py`` in the server's environment: a result out of the contract is a clear error; the order."""
    code = """if True:
        import importlib.util, json, sys
        spec = importlib.util.spec_from_file_location("activelearning", sys.argv[1])
        al = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(al)
        errors = []
        for result in ({"class": "benign"}, {"uncertainty": 1.5, "status": "ok"}, {"uncertainty": 0.2, "status": "?"}):
            try:
                al.read_uncertainty(result)
            except al.UncertaintyContractError as error:
                errors.append(str(error))
        infos = {"c": {"uncertainty": 0.5, "uncertainty_status": "ok"}, "d": {},
                 "b": {"uncertainty": 0.9, "uncertainty_status": "not assessable"},
                 "a": {"uncertainty": 0.5, "uncertainty_status": "ok"},
                 "e": {"uncertainty": 0.7, "uncertainty_status": "ok"}}
        ok = al.read_uncertainty({"uncertainty": 0.25, "status": "not assessable"})
        print(json.dumps({"errors": errors, "order": al.rank(infos), "ok": ok}))
    """
    result = subprocess.run(
        [str(monailabel_env), "-c", code, str(MONAILABEL_DIR / "activelearning.py")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(out["errors"]) == 3, out
    assert "no 'uncertainty' and no 'status'" in out["errors"][0] and "update the served bundle" in out["errors"][0]
    assert "[0, 1]" in out["errors"][1] and "'?'" in out["errors"][2]
    assert out["order"] == ["e", "a", "c", "b", "d"]  # ok by uncertainty (ties by id), not assessable, unscored
    assert out["ok"] == [0.25, "not assessable"]


def test_training_from_saved_labels_updates_the_served_weights(session):
    report = session["report"]
    assert [entry.get("image") for entry in report["labels"]] == list(session["studies"])
    final_labels = sorted(p.name for p in (session["work"] / "studies" / "labels" / "final").iterdir())
    assert len(final_labels) == len(session["studies"]), final_labels
    status = report["train_status"]
    details = "\n".join(status["details"])
    assert status["status"] == "DONE", f"{status}\nserver log:\n{tail(session['log'])}"
    assert "Restored all variables from" in details, "training did not start from the served weights"
    assert "Training Finished" in details
    assert report["train_params"]["max_epochs"] == 1
    weights_after = file_sha(session["bundle_copy"] / "models" / "model.pt")
    assert weights_after != session["weights_before"], "training did not write new weights"
    changed = []
    for image_id, after in report["infer_after"].items():
        before = report["infer_before"][image_id]
        label_after = check_result(session["studies"][image_id], after)
        label_before = check_result(session["studies"][image_id], before)
        # a confident model can keep its rounded probabilities after one epoch: the label map shows the change too
        changed.append(after["json"]["probabilities"] != before["json"]["probabilities"]
                       or not np.array_equal(label_after, label_before))  # fmt: skip
    assert any(changed), "inference still uses the old weights"
    log = session["log"].read_text(errors="replace")
    assert "Reload model from cache" in log


def test_server_results_match_the_bundle_inference_workflow(session, monailabel_env, tmp_path):
    """The served label maps equal what the bundle's own inference command writes with the same weights."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for image_id in session["report"]["infer_after"]:
        source = session["studies"][image_id]["image"]
        (inputs / source.name).symlink_to(source)
    bundle = session["bundle_copy"]
    result = subprocess.run(
        [str(monailabel_env), "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
         "--bundle_root", str(bundle), "--dataset_dir", str(inputs), "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    rows = json.loads((tmp_path / "out" / "predictions.json").read_text())["predictions"]
    for row in rows:
        image_id = Path(row["image"]).name.split(".")[0]
        served = session["report"]["infer_after"][image_id]
        served_probabilities = served["json"]["probabilities"]
        for name in CLASS_NAMES:
            assert abs(row[f"p_{name}"] - served_probabilities[name]) < 0.02, (image_id, row, served_probabilities)
        reference = itk.array_from_image(itk.imread(row["label_map"]))
        served_map = itk.array_from_image(itk.imread(served["file"]))
        assert reference.shape == served_map.shape, image_id
        if row["predicted_class"] == served["json"]["class"]:
            agreement = float((reference == served_map).mean())
            assert agreement > 0.99, (image_id, agreement)
