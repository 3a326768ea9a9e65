"""Synthetic breast-ultrasound-like data in the BUSI (Kaggle) folder layout.

The real BUSI data set cannot be shipped with the bundle, so the demo command and the tests use this generator.
It writes::

    <output_dir>/{benign,malignant,normal}/<class> (N).png        image, N = 1..count
    <output_dir>/<class>/<class> (N)_mask.png                     lesion mask (all zero for ``normal``)
    <output_dir>/<class>/<class> (N)_mask_1.png                   extra mask for a few lesion images

The true lesion of an image is the union of all its mask files. Images are grayscale uint8 of varying size with
tissue layers, attenuation and speckle; benign lesions are smooth, wider-than-tall hypoechoic ovals with posterior
acoustic enhancement, malignant lesions are irregular / spiculated, often taller-than-wide, with posterior acoustic
shadowing. A few images are stored as 3-channel RGB PNG and a few masks use the other encodings seen in the real
data (0/1 ``L`` mode, RGBA 0/255). Everything is a deterministic function of the seed.

Command line::

    python tools/synthetic.py --output_dir DIR --num_per_class 12 --seed 0
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

__all__ = [
    "CLASSES",
    "MARKER_FILE",
    "case_rng",
    "generate_case",
    "generate_dataset",
    "load_binary_mask",
    "make_background",
    "make_case",
    "make_lesion_shape",
    "render_lesion",
    "to_ultrasound",
]

CLASSES = ("benign", "malignant", "normal")
LESION_CLASSES = ("benign", "malignant")
HEIGHT_RANGE = (180, 260)
WIDTH_RANGE = (200, 300)
MASK_VARIANT_FRACTION = 0.15
MASK_ENCODINGS = ("uint8", "binary", "rgba")
MARKER_FILE = ".synthetic_busi.json"
_CONTOUR_POINTS = 360


def _smooth_field(rng: np.random.Generator, height: int, width: int, cells: int, amplitude: float) -> np.ndarray:
    """Smooth multiplicative random field with mean about 1.

    Args:
        rng: random generator.
        height: output height.
        width: output width.
        cells: number of random control points along the longer side.
        amplitude: standard deviation of the field around 1.

    Returns:
        float32 array of shape (height, width).
    """
    ny = max(2, round(cells * height / max(height, width)))
    nx = max(2, round(cells * width / max(height, width)))
    coarse = rng.standard_normal((ny, nx)).astype(np.float32)
    field = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    field /= max(float(field.std()), 1e-6)
    return np.clip(1.0 + amplitude * field, 0.2, 3.0).astype(np.float32)


def _wavy_line(rng: np.random.Generator, width: int, depth: float, amplitude: float) -> np.ndarray:
    """Roughly horizontal boundary: a depth per column made of a few random sinusoids.

    Args:
        rng: random generator.
        width: number of columns.
        depth: mean depth in pixels.
        amplitude: total undulation amplitude in pixels.

    Returns:
        float32 array of shape (width,).
    """
    x = np.arange(width, dtype=np.float32)
    y = np.full(width, depth, dtype=np.float32)
    for _ in range(3):
        period = rng.uniform(0.4, 2.0) * width
        y += amplitude / 3 * rng.uniform(0.3, 1.0) * np.sin(2 * np.pi * x / period + rng.uniform(0, 2 * np.pi))
    return y + rng.uniform(-0.15, 0.15) * amplitude * (x - width / 2) / width * 4


def _draw_line(canvas: np.ndarray, xs: np.ndarray, ys: np.ndarray, value: float, thickness: int) -> None:
    """Draw an anti-aliased polyline in place on a float canvas (keeps the brighter value).

    Args:
        canvas: float32 image modified in place.
        xs: x coordinates of the polyline.
        ys: y coordinates of the polyline.
        value: line brightness.
        thickness: line thickness in pixels.
    """
    layer = np.zeros_like(canvas)
    points = np.round(np.stack([xs, ys], axis=1) * 16).astype(np.int32)
    cv2.polylines(layer, [points], False, float(value), thickness, cv2.LINE_AA, shift=4)
    np.maximum(canvas, layer, out=canvas)


def make_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Echogenicity map of normal breast tissue, before attenuation and speckle.

    From top to bottom: coupling gel (dark), bright skin line, subcutaneous fat (dark, with fat lobules),
    glandular tissue (bright, heterogeneous, with Cooper's ligaments), retromammary fat and pectoral muscle
    (striated), separated by bright fascia lines.

    Args:
        rng: random generator.
        height: image height.
        width: image width.

    Returns:
        float32 array of shape (height, width), values roughly in [0, 1].
    """
    ys = np.arange(height, dtype=np.float32)[:, None]
    xs = np.arange(width, dtype=np.float32)
    skin = _wavy_line(rng, width, rng.uniform(0.03, 0.06) * height, 2.0)
    fat_end = _wavy_line(rng, width, float(skin.mean()) + rng.uniform(0.1, 0.2) * height, 0.04 * height)
    gland_end = _wavy_line(rng, width, float(fat_end.mean()) + rng.uniform(0.4, 0.55) * height, 0.06 * height)
    retro_end = _wavy_line(rng, width, float(gland_end.mean()) + rng.uniform(0.05, 0.12) * height, 0.03 * height)
    levels = np.array(
        [
            0.04,  # gel
            rng.uniform(0.28, 0.4),  # subcutaneous fat
            rng.uniform(0.55, 0.8),  # glandular tissue
            rng.uniform(0.28, 0.4),  # retromammary fat
            rng.uniform(0.4, 0.55),  # pectoral muscle
        ],
        dtype=np.float32,
    )
    layer = (ys >= skin).astype(np.int32) + (ys >= fat_end) + (ys >= gland_end) + (ys >= retro_end)
    tissue = levels[layer]
    tissue = cv2.GaussianBlur(tissue, (0, 0), 1.5)
    tissue *= _smooth_field(rng, height, width, int(rng.integers(6, 12)), 0.2)
    muscle = layer == 4
    phase = 3.0 * _smooth_field(rng, height, width, 6, 1.0)
    stripes = 1.0 + 0.15 * np.sin(2 * np.pi * (ys + rng.uniform(-0.15, 0.15) * xs) / rng.uniform(6, 10) + phase)
    tissue[muscle] *= stripes[muscle]
    for _ in range(int(rng.integers(3, 8))):  # hypoechoic fat lobules, not lesions
        cx = rng.uniform(0, width)
        cy = rng.uniform(skin.mean() + 4, gland_end.mean())
        axes = (int(rng.uniform(0.04, 0.1) * width), int(rng.uniform(0.02, 0.05) * height))
        lobule = np.zeros_like(tissue)
        cv2.ellipse(lobule, (int(cx), int(cy)), axes, rng.uniform(-20, 20), 0, 360, 1.0, -1, cv2.LINE_AA)
        lobule = cv2.GaussianBlur(lobule, (0, 0), 2.0)
        tissue = tissue * (1 - lobule) + rng.uniform(0.28, 0.4) * lobule
    _draw_line(tissue, xs, skin, rng.uniform(0.85, 1.0), int(rng.integers(2, 4)))
    _draw_line(tissue, xs, fat_end, rng.uniform(0.7, 0.95), 1)
    _draw_line(tissue, xs, retro_end, rng.uniform(0.75, 1.0), 2)
    for _ in range(int(rng.integers(2, 5))):  # Cooper's ligaments: thin oblique curves through fat and gland
        x0 = rng.uniform(0, width)
        t = np.linspace(0, 1, 20, dtype=np.float32)
        lx = x0 + t * rng.uniform(-0.3, 0.3) * width
        ly = skin.mean() + 4 + t * rng.uniform(0.2, 0.5) * height + 4 * np.sin(t * np.pi * rng.uniform(1, 3))
        _draw_line(tissue, lx, ly, rng.uniform(0.6, 0.85), 1)
    return tissue.astype(np.float32)


def _lesion_contour(rng: np.random.Generator, label: str, height: int, width: int) -> np.ndarray:
    """Lesion outline centred on the origin.

    Args:
        rng: random generator.
        label: ``"benign"`` (smooth, wider-than-tall oval) or ``"malignant"`` (irregular, spiculated).
        height: image height.
        width: image width.

    Returns:
        float array of shape (N, 2) with x, y coordinates in pixels.
    """
    theta = np.linspace(0, 2 * np.pi, _CONTOUR_POINTS, endpoint=False)
    radius = np.ones_like(theta)
    if label == "benign":
        semi_x = rng.uniform(0.08, 0.17) * width
        semi_y = semi_x / rng.uniform(1.3, 2.2)
        harmonics, max_amp = range(2, 5), 0.05  # at most a gentle macro-lobulation
        rotation = rng.uniform(-0.3, 0.3)
    else:
        size = rng.uniform(0.06, 0.11) * min(height, width)
        stretch = rng.uniform(0.8, 1.7)  # > 1: taller-than-wide
        semi_x, semi_y = size / math.sqrt(stretch), size * math.sqrt(stretch)
        harmonics, max_amp = range(2, 9), 0.12
        rotation = rng.uniform(-0.4, 0.4)
        for _ in range(int(rng.integers(3, 11))):  # spicules
            delta = np.angle(np.exp(1j * (theta - rng.uniform(0, 2 * np.pi))))
            radius += rng.uniform(0.12, 0.5) * np.exp(-0.5 * (delta / rng.uniform(0.04, 0.1)) ** 2)
        jitter = np.convolve(np.pad(rng.standard_normal(theta.size), 3, mode="wrap"), np.ones(7) / 7, mode="valid")
        radius += 0.04 * jitter
    for k in harmonics:
        radius += rng.uniform(0, max_amp) / (1 + 0.3 * (k - 2)) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    radius = np.maximum(radius, 0.3)
    x, y = semi_x * radius * np.cos(theta), semi_y * radius * np.sin(theta)
    cos_r, sin_r = math.cos(rotation), math.sin(rotation)
    return np.stack([cos_r * x - sin_r * y, sin_r * x + cos_r * y], axis=1)


def make_lesion_shape(
    rng: np.random.Generator,
    label: str,
    height: int,
    width: int,
    scale: float = 1.0,
    avoid: np.ndarray | None = None,
) -> np.ndarray | None:
    """Binary mask of one lesion placed inside the glandular region of the image.

    Args:
        rng: random generator.
        label: ``"benign"`` or ``"malignant"``.
        height: image height.
        width: image width.
        scale: size factor applied to the outline (e.g. smaller for a second lesion).
        avoid: optional boolean mask of pixels the lesion (with a small gap) must not touch.

    Returns:
        bool array of shape (height, width), or None when no free position was found for ``avoid``.
    """
    contour = _lesion_contour(rng, label, height, width) * scale
    lo, hi = contour.min(axis=0), contour.max(axis=0)
    top, bottom, margin = 0.15 * height, 0.85 * height, 0.05 * width
    fit = min(1.0, (bottom - top) / (hi[1] - lo[1]), (width - 2 * margin) / (hi[0] - lo[0]))
    contour, lo, hi = contour * fit, lo * fit, hi * fit
    keep_out = None if avoid is None else cv2.dilate(avoid.astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
    for _ in range(20 if avoid is not None else 1):
        cx = rng.uniform(margin - lo[0], width - margin - hi[0])
        cy = rng.uniform(top - lo[1], min(bottom - hi[1], max(top - lo[1], 0.62 * height)))
        mask = np.zeros((height, width), np.uint8)
        points = np.round((contour + [cx, cy]) * 16).astype(np.int32)
        cv2.fillPoly(mask, [points], 1, cv2.LINE_8, shift=4)
        if keep_out is None or not np.any(keep_out & (mask > 0)):
            return mask > 0
    return None


def render_lesion(rng: np.random.Generator, tissue: np.ndarray, mask: np.ndarray, label: str) -> np.ndarray:
    """Draw a hypoechoic lesion and its posterior acoustic feature into an echogenicity map.

    Benign: homogeneous dark interior, optional thin echogenic capsule, posterior enhancement.
    Malignant: heterogeneous dark interior, optional thick echogenic halo, posterior shadowing.

    Args:
        rng: random generator.
        tissue: float32 echogenicity map of shape (H, W).
        mask: bool lesion mask of shape (H, W); exactly these pixels get the lesion echogenicity.
        label: ``"benign"`` or ``"malignant"``.

    Returns:
        New float32 echogenicity map.
    """
    height, width = mask.shape
    out = tissue.copy()
    rows = np.arange(height, dtype=np.float32)[:, None]
    columns = mask.any(axis=0)
    bottom = np.where(columns, height - 1 - np.argmax(mask[::-1], axis=0), height).astype(np.float32)
    extent = np.nonzero(mask.any(axis=1))[0]
    lesion_height = float(extent[-1] - extent[0] + 1)
    depth = np.maximum(rows - bottom, 0.0)
    below = (rows > bottom).astype(np.float32)
    if label == "benign":
        gain = rng.uniform(0.3, 0.7) if rng.random() > 0.1 else 0.0
        effect = 1.0 + gain * below * np.exp(-depth / (lesion_height * rng.uniform(0.8, 1.6)))
        interior = rng.uniform(0.06, 0.18) * _smooth_field(rng, height, width, 8, 0.15)
        rim, rim_gain = (3, rng.uniform(1.2, 1.5)) if rng.random() < 0.5 else (0, 1.0)
    else:
        loss = rng.uniform(0.35, 0.7) if rng.random() > 0.15 else rng.uniform(0.0, 0.15)
        effect = 1.0 - loss * below * (1 - np.exp(-depth / 4.0)) * np.exp(-depth / (2.0 * height))
        interior = rng.uniform(0.05, 0.2) * _smooth_field(rng, height, width, 20, 0.35)
        rim, rim_gain = (int(rng.integers(5, 9)), rng.uniform(1.1, 1.35)) if rng.random() < 0.4 else (0, 1.0)
    effect = cv2.GaussianBlur(effect.astype(np.float32), (0, 0), sigmaX=2.5, sigmaY=0.5)
    out *= effect
    if rim:
        halo = cv2.dilate(mask.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (rim, rim))) > 0
        out[halo & ~mask] *= rim_gain
    out[mask] = interior[mask]
    return out


def to_ultrasound(rng: np.random.Generator, tissue: np.ndarray) -> np.ndarray:
    """Turn an echogenicity map into a B-mode-like image.

    Applies depth attenuation, multiplicative Rayleigh speckle, an anisotropic point-spread blur (speckle grains
    are elongated laterally), a small noise floor and log-like compression.

    Args:
        rng: random generator.
        tissue: float32 echogenicity map of shape (H, W).

    Returns:
        uint8 array of shape (H, W).
    """
    height, width = tissue.shape
    depth = np.arange(height, dtype=np.float32)[:, None] / height
    attenuation = np.exp(-rng.uniform(0.5, 1.3) * depth)
    speckle = rng.rayleigh(math.sqrt(2 / math.pi), (height, width)).astype(np.float32)
    signal = tissue * attenuation * speckle
    signal = cv2.GaussianBlur(signal, (0, 0), sigmaX=rng.uniform(1.0, 1.6), sigmaY=rng.uniform(0.5, 0.9))
    signal += 0.015 * rng.rayleigh(1.0, (height, width)).astype(np.float32)
    image = np.clip(signal * rng.uniform(0.85, 1.1), 0.0, 1.0) ** rng.uniform(0.75, 0.95)
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def _split_mask(rng: np.random.Generator, mask: np.ndarray) -> list[np.ndarray]:
    """Split one lesion mask into two non-empty pieces along a random straight line.

    Args:
        rng: random generator.
        mask: bool lesion mask.

    Returns:
        Two disjoint bool masks whose union is ``mask`` (or ``[mask]`` if it cannot be split).
    """
    ys, xs = np.nonzero(mask)
    angle = rng.uniform(0, np.pi)
    projection = xs * math.cos(angle) + ys * math.sin(angle)
    cut = np.quantile(projection, rng.uniform(0.3, 0.7))
    first = np.zeros_like(mask)
    first[ys[projection <= cut], xs[projection <= cut]] = True
    second = mask & ~first
    return [first, second] if first.any() and second.any() else [mask]


def make_case(
    rng: np.random.Generator, label: str, height: int, width: int, extra_mask: bool = False
) -> tuple[np.ndarray, list[np.ndarray]]:
    """One synthetic ultrasound image and its lesion masks.

    Args:
        rng: random generator; the result is a deterministic function of its state.
        label: one of ``CLASSES``.
        height: image height.
        width: image width.
        extra_mask: for lesion classes, return two masks: either a second (smaller) lesion or the lesion split
            into two pieces. Ignored for ``"normal"``.

    Returns:
        ``(image, masks)``: uint8 image of shape (height, width) and a list of bool masks of the same shape
        whose union is the lesion region (a single all-False mask for ``"normal"``).

    Raises:
        ValueError: for an unknown label.
    """
    if label not in CLASSES:
        raise ValueError(f"label must be one of {CLASSES}, got {label!r}.")
    tissue = make_background(rng, height, width)
    if label == "normal":
        return to_ultrasound(rng, tissue), [np.zeros((height, width), bool)]
    lesions = [make_lesion_shape(rng, label, height, width)]
    masks = lesions
    if extra_mask:
        second = None
        if rng.random() < 0.5:  # a second lesion beside the first, out of its posterior shadow / enhancement
            beside = np.broadcast_to(lesions[0].any(axis=0), (height, width))
            second = make_lesion_shape(rng, label, height, width, scale=rng.uniform(0.4, 0.65), avoid=beside)
        lesions = lesions + [second] if second is not None else lesions
        masks = lesions if second is not None else _split_mask(rng, lesions[0])
    for lesion in lesions:
        tissue = render_lesion(rng, tissue, lesion, label)
    return to_ultrasound(rng, tissue), masks


def case_rng(seed: int, label: str, index: int) -> np.random.Generator:
    """Independent random generator of one case, so each file depends only on (seed, class, index).

    Args:
        seed: data set seed (non-negative).
        label: one of ``CLASSES``.
        index: 1-based case number.

    Returns:
        A new ``numpy.random.Generator``.
    """
    return np.random.default_rng([seed, CLASSES.index(label), index])


def generate_case(seed: int, label: str, index: int, extra_mask: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
    """The case ``generate_dataset`` writes as ``<label> (<index>)``, with its size drawn from the seed.

    Args:
        seed: data set seed (non-negative).
        label: one of ``CLASSES``.
        index: 1-based case number.
        extra_mask: see ``make_case``.

    Returns:
        ``(image, masks)`` as returned by ``make_case``.
    """
    rng = case_rng(seed, label, index)
    height = int(rng.integers(HEIGHT_RANGE[0], HEIGHT_RANGE[1] + 1))
    width = int(rng.integers(WIDTH_RANGE[0], WIDTH_RANGE[1] + 1))
    return make_case(rng, label, height, width, extra_mask=extra_mask)


def load_binary_mask(path: str | Path) -> np.ndarray:
    """Read a mask PNG in any of the encodings used here (or in BUSI) as a bool array.

    Args:
        path: mask file.

    Returns:
        bool array of shape (H, W): True where any channel (alpha excluded) is non-zero.
    """
    with Image.open(path) as image:
        data = np.asarray(image)
    if data.ndim == 3:
        data = data[..., :3].max(axis=-1)
    return data > 0


def _save_image(path: Path, image: np.ndarray, rgb: bool) -> None:
    """Write an image as grayscale or as RGB with identical planes.

    Args:
        path: output file.
        image: uint8 array (H, W).
        rgb: save as 3-channel RGB.
    """
    data = np.repeat(image[..., None], 3, axis=-1) if rgb else image
    Image.fromarray(data, "RGB" if rgb else "L").save(path, format="PNG")


def _save_mask(path: Path, mask: np.ndarray, encoding: str) -> None:
    """Write a bool mask with one of ``MASK_ENCODINGS``.

    Args:
        path: output file.
        mask: bool array (H, W).
        encoding: ``"uint8"`` (L, 0/255), ``"binary"`` (L, 0/1) or ``"rgba"`` (RGBA, 0/255, opaque alpha).
    """
    if encoding == "binary":
        data, mode = mask.astype(np.uint8), "L"
    elif encoding == "rgba":
        value = mask.astype(np.uint8) * 255
        data, mode = np.stack([value, value, value, np.full_like(value, 255)], axis=-1), "RGBA"
    else:
        data, mode = mask.astype(np.uint8) * 255, "L"
    Image.fromarray(data, mode).save(path, format="PNG")


def _pick(rng: np.random.Generator, count: int, fraction: float) -> set[int]:
    """Choose exactly ``round(fraction * count)`` of the 1-based indices ``1..count``.

    Args:
        rng: random generator.
        count: number of cases.
        fraction: share to pick, in [0, 1].

    Returns:
        Set of chosen indices.
    """
    return {int(i) + 1 for i in rng.permutation(count)[: math.floor(fraction * count + 0.5)]}


def _resolve_counts(num_per_class: int | Mapping[str, int]) -> dict[str, int]:
    """Validate ``num_per_class`` and expand it to a count for every class.

    Args:
        num_per_class: one count for all classes, or a mapping class -> count (missing classes get 0).

    Returns:
        Mapping of every class in ``CLASSES`` to its count.

    Raises:
        ValueError: for unknown classes or counts that are not non-negative integers.
    """
    counts = dict.fromkeys(CLASSES, num_per_class) if not isinstance(num_per_class, Mapping) else {}
    if isinstance(num_per_class, Mapping):
        unknown = set(num_per_class) - set(CLASSES)
        if unknown:
            raise ValueError(f"num_per_class has unknown classes {sorted(unknown)}; expected {CLASSES}.")
        counts = {c: num_per_class.get(c, 0) for c in CLASSES}
    for label, count in counts.items():
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
            raise ValueError(f"count for {label!r} must be a non-negative integer, got {count!r}.")
    return {c: int(n) for c, n in counts.items()}


def _prepare_output(root: Path) -> None:
    """Create the output folder, or clear the files of an earlier synthetic data set in it.

    Args:
        root: output folder.

    Raises:
        ValueError: when ``root`` is a non-empty folder that was not written by this generator (protects real
            data), or is not a folder.
    """
    if root.exists() and not root.is_dir():
        raise ValueError(f"output_dir {str(root)!r} exists and is not a directory.")
    if root.is_dir() and any(root.iterdir()) and not (root / MARKER_FILE).is_file():
        raise ValueError(
            f"output_dir {str(root)!r} is not empty and holds no {MARKER_FILE}: refusing to write synthetic data "
            "into a folder this generator did not create (it might hold real data)."
        )
    for label in CLASSES:
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        pattern = re.compile(rf"^{label} \(\d+\)(_mask(_\d+)?)?\.png$")
        for path in folder.iterdir():
            if path.is_file() and pattern.match(path.name):
                path.unlink()


def generate_dataset(
    output_dir: str,
    num_per_class: int | Mapping[str, int] = 10,
    seed: int = 0,
    rgb_fraction: float = 0.1,
    extra_mask_fraction: float = 0.1,
    mask_encoding_variety: bool = True,
) -> dict[str, int]:
    """Write a synthetic data set in the BUSI layout.

    Per class, exactly ``round(fraction * count)`` cases get each variation, chosen deterministically from the
    seed: RGB images (``rgb_fraction``), an extra ``_mask_1`` file (``extra_mask_fraction``, lesion classes only)
    and, with ``mask_encoding_variety``, ``MASK_VARIANT_FRACTION`` of the cases get masks stored as 0/1 ``L`` or
    RGBA 0/255 instead of 0/255 ``L``. The same arguments give byte-identical files.

    Args:
        output_dir: folder to write; created if missing. It must be empty or hold an earlier synthetic data set
            (marked by ``MARKER_FILE``), whose image and mask files are removed first.
        num_per_class: number of images per class, or a mapping class -> number (missing classes get 0).
        seed: non-negative random seed.
        rgb_fraction: share of images saved as 3-channel RGB (identical planes), in [0, 1].
        extra_mask_fraction: share of benign / malignant images with an extra ``_mask_1`` file, in [0, 1].
        mask_encoding_variety: vary the mask encoding for a few cases like the real data; False: all 0/255 ``L``.

    Returns:
        Mapping class -> number of images written.

    Raises:
        ValueError: for invalid arguments or an output folder that is not empty and not a synthetic data set.
    """
    counts = _resolve_counts(num_per_class)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    for name, value in (("rgb_fraction", rgb_fraction), ("extra_mask_fraction", extra_mask_fraction)):
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value!r}.")
    root = Path(output_dir)
    _prepare_output(root)
    for label in CLASSES:
        count = counts[label]
        options = np.random.default_rng([int(seed), CLASSES.index(label), 0])
        rgb = _pick(options, count, float(rgb_fraction))
        extra = _pick(options, count, float(extra_mask_fraction) if label in LESION_CLASSES else 0.0)
        variants = sorted(_pick(options, count, MASK_VARIANT_FRACTION if mask_encoding_variety else 0.0))
        encoding = {index: MASK_ENCODINGS[1 + i % 2] for i, index in enumerate(variants)}
        for index in range(1, count + 1):
            image, masks = generate_case(int(seed), label, index, extra_mask=index in extra)
            stem = root / label / f"{label} ({index})"
            _save_image(stem.with_name(f"{stem.name}.png"), image, index in rgb)
            for k, mask in enumerate(masks):
                suffix = "_mask" if k == 0 else f"_mask_{k}"
                _save_mask(stem.with_name(f"{stem.name}{suffix}.png"), mask, encoding.get(index, "uint8"))
    marker = {
        "generator": "tools/synthetic.py",
        "seed": int(seed),
        "num_per_class": counts,
        "rgb_fraction": float(rgb_fraction),
        "extra_mask_fraction": float(extra_mask_fraction),
        "mask_encoding_variety": bool(mask_encoding_variety),
    }
    (root / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
    return counts


if __name__ == "__main__":
    import fire

    fire.Fire(generate_dataset)
