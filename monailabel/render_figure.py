"""Render the figure of the Slicer guide from a real MONAI Label response on a synthetic image (no real data).

Run with the MONAI Label environment's Python::

    .venv-monailabel/bin/python monailabel/render_figure.py --weights bundle/models/model.pt \\
        --out bundle/docs/monailabel_slicer_overlay.png

It serves a copy of ``bundle/`` holding ``--weights`` (``monailabel/start.sh`` on a free loopback port), asks for
the auto-segmentation of one generated B-mode image with MONAI Label's client, and draws two panels: the returned
label map over the image as Slicer shows a segment (fill and outline), with the class and probabilities of the
response, and the corrected label map a user would save (the generator's lesion mask). Only generated pixels are
drawn: no image of a real data set.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL = "breast_ultrasound_segmentation_classification"


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


COLOURS = load_module(REPO_ROOT / "bundle" / "scripts" / "common.py").LESION_COLOURS


def overlay(grey: np.ndarray, label: np.ndarray, alpha: float = 0.35) -> Image.Image:
    """Grey image with each label value filled (``alpha``) and outlined, as a Slicer segment is drawn."""
    rgb = np.repeat(grey[..., None], 3, axis=-1).astype(np.float32)
    for value, colour in COLOURS.items():
        region = label == value
        if not region.any():
            continue
        rgb[region] = (1 - alpha) * rgb[region] + alpha * np.array(colour, np.float32)
        inner = region.copy()  # pixels whose 4 neighbours are inside too; the rest is the outline
        core = region[1:-1, 1:-1]
        inner[1:-1, 1:-1] = core & region[:-2, 1:-1] & region[2:, 1:-1] & region[1:-1, :-2] & region[1:-1, 2:]
        rgb[region & ~inner] = colour
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def panel(image: Image.Image, title: str, lines: list[str], font, small) -> Image.Image:
    width, height = image.size
    canvas = Image.new("RGB", (width, height + 42 + 22 * len(lines)), (20, 20, 24))
    canvas.paste(image, (0, 30))
    draw = ImageDraw.Draw(canvas)
    draw.text((8, 6), title, fill=(235, 235, 235), font=font)
    for k, line in enumerate(lines):
        draw.text((8, height + 36 + 22 * k), line, fill=(210, 210, 210), font=small)
    return canvas


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=str(REPO_ROOT / "bundle" / "models" / "model.pt"))
    ap.add_argument("--out", default=str(REPO_ROOT / "bundle" / "docs" / "monailabel_slicer_overlay.png"))
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()

    sys.path.insert(0, str(REPO_ROOT / "tools"))
    from monailabel.client import MONAILabelClient
    from synthetic import make_case

    server_module = load_module(REPO_ROOT / "monailabel" / "server.py")
    work = Path(tempfile.mkdtemp(prefix="monailabel_figure_"))
    bundle = work / "bundle"
    shutil.copytree(REPO_ROOT / "bundle", bundle, ignore=shutil.ignore_patterns("eval", "logs", "__pycache__"))
    (bundle / "models").mkdir(exist_ok=True)
    shutil.copy2(args.weights, bundle / "models" / "model.pt")
    studies = work / "studies"
    studies.mkdir()
    image, masks = make_case(np.random.default_rng([args.seed, 0]), "benign", 460, 560)
    truth = np.any(np.stack(masks), axis=0).astype(np.uint8) * 1
    Image.fromarray(image).save(studies / "synthetic_benign.png")

    server, url = server_module.start(studies, work, env={"MONAILABEL_BUNDLE": str(bundle)})
    try:
        # not the server's TMPDIR (work): the server deletes its temporary result file, whose name the client reuses
        client = MONAILabelClient(url, tmpdir=tempfile.mkdtemp(dir=work))
        path, result = client.infer(MODEL, "synthetic_benign", {})
        predicted = np.asarray(Image.open(path))
    finally:
        server_module.stop(server)

    font = ImageFont.load_default(size=18)
    small = ImageFont.load_default(size=15)
    probabilities = result["probabilities"]
    left = panel(
        overlay(image, predicted),
        "1. Auto segmentation (MONAI Label result)",
        [
            f"class: {result['class']}   lesion pixels: {result['lesion_pixels']}",
            "   ".join(f"p({name}) = {p:.2f}" for name, p in probabilities.items()),
        ],
        font,
        small,
    )
    right = panel(
        overlay(image, truth),
        "2. Corrected, then Submit Label",
        ["label map saved: 0 background, 1 benign, 2 malignant", "(here: the generator's lesion mask, benign)"],
        font,
        small,
    )
    figure = Image.new("RGB", (left.width + right.width + 10, max(left.height, right.height)), (20, 20, 24))
    figure.paste(left, (0, 0))
    figure.paste(right, (left.width + 10, 0))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.save(out, optimize=True)
    print(f"{out}: {result['class']} {probabilities}; synthetic image, weights {args.weights}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
