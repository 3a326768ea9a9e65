"""Make the datalist of a folder in the BUSI / Kaggle layout: a one-off data-preparation step before training.

``<class>/<class> (N).png`` is an image, ``<class> (N)_mask.png`` its lesion mask and ``<class> (N)_mask_K.png``
further masks of the same image (the lesion is their union). Every image/mask pair is validated, exact and
near-duplicate images are grouped (a perceptual hash, and a correlation of small thumbnails that also catches
crops, black corners and other frames of the same lesion), and the split is deterministic and stratified, with no
duplicate group straddling two subsets. It is saved as a MONAI-style datalist JSON with paths relative to the
dataset folder, so it can be committed and reused without any image data; ``scripts.data.load_datalist`` reads it.

Command line::

    python tools/prepare_datalist.py --dataset_dir DIR --datalist FILE
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
if str(BUNDLE) not in sys.path:
    sys.path.insert(0, str(BUNDLE))

from scripts.common import CLASS_NAMES, atomic_write  # noqa: E402
from scripts.data import SPLITS, DatasetError  # noqa: E402
from scripts.transforms import LUMINANCE_WEIGHTS, pil_to_supported_mode  # noqa: E402

__all__ = [
    "scan_dataset",
    "perceptual_hash",
    "thumbnail_descriptors",
    "thumbnail_similarity",
    "group_duplicates",
    "split_groups",
    "create_datalist",
]

logger = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
MASK_PATTERN = re.compile(r"^(?P<stem>.+)_mask(?:_(?P<index>\d+))?$", re.IGNORECASE)
DEFAULT_HASH_THRESHOLD = 64
# Thumbnail correlation (thumbnail_descriptors, thumbnail_similarity), chosen on BUSI (780 images, 303,810 pairs):
# unrelated pairs score 0.30 in the median and 0.59 at the 99.9th percentile, copies of one frame 0.7 to 1. From 0.58
# to 0.66 other frames of one lesion (malignant (3) to (9): 0.61 to 0.67) mix with look-alikes (sectors of one
# scanner, big anechoic cysts, shadowing masses: up to 0.655), judged by eye on side-by-side pairs. At 0.59 chains of
# look-alikes merge 20 unrelated images, at 0.60 seven; from 0.61 the largest group is one lesion's 7 frames, and
# 0.62 also leaves out three look-alike pairs at 0.616 to 0.619 (it misses some other frames: normal (9) and (10)
# score 0.603). The generated images of tools/synthetic.py, which share one layered layout, score at most 0.57.
DEFAULT_SIMILARITY_THRESHOLD = 0.62
THUMBNAIL_SIZE = 32  # thumbnail side, pixels
BAND_PASS_SIGMA = THUMBNAIL_SIZE / 12  # the detail channel is the thumbnail minus this Gaussian blur
PLAIN_WEIGHT = 0.5  # weight of the plain thumbnail against the detail channel in the correlation
CROP_WIDTHS = (0.85, 0.7)  # central crops compared as well: BUSI holds copies cropped to the middle of the sector
FIELD_LEVEL, FIELD_FRACTION = 10, 0.2  # field of view: rows / columns with more than 20 % of pixels above 10
SIMILARITY_BLOCK = 256  # images per block of the pairwise comparison (bounds its memory)


def _natural_key(text: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def _read_grey(path: Path) -> np.ndarray:
    """Decode a whole image to a 2D float array (luminance of colour images, alpha ignored), as the bundle reads it."""
    if path.stat().st_size == 0:
        raise ValueError("the file is empty")
    with Image.open(path) as image:
        image.load()
        array = np.asarray(pil_to_supported_mode(image))
    if array.ndim == 3:
        array = array[..., :3].astype(np.float32) @ np.array(LUMINANCE_WEIGHTS, np.float32)
    return array.astype(np.float32)


def scan_dataset(dataset_dir: str, skip_invalid: bool = False) -> tuple[list[dict], list[dict]]:
    """List and validate the cases of a BUSI-layout folder.

    Every image and mask is decoded once. Hidden files and non-image files are ignored (and logged); names with
    spaces, parentheses and non-ASCII letters are fine.

    Args:
        dataset_dir: folder with ``normal``, ``benign`` and ``malignant`` sub-folders (any of them may be missing).
        skip_invalid: skip bad cases and report them instead of raising.

    Returns:
        ``(cases, skipped)``: cases ``{"image", "masks", "class", "class_name", "hash", "thumbnails"}`` with paths
        relative to ``dataset_dir``, in natural order; skipped ``{"file", "reason"}``.

    Raises:
        DatasetError: listing every problem (unless ``skip_invalid``), or when no valid case is found.
    """
    root = Path(dataset_dir).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found.")
    class_dirs = [(index, root / name) for index, name in enumerate(CLASS_NAMES) if (root / name).is_dir()]
    if not class_dirs:
        raise DatasetError(f"{root}: no class folder found; expected sub-folders {', '.join(CLASS_NAMES)}.")
    cases, problems, ignored = [], [], []
    for class_index, folder in class_dirs:
        images: dict[str, Path] = {}
        masks: dict[str, list[Path]] = defaultdict(list)
        for path in sorted(folder.iterdir(), key=lambda p: _natural_key(p.name)):
            if path.name.startswith(".") or not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
                ignored.append(str(path))
                continue
            match = MASK_PATTERN.match(path.stem)
            if match:
                masks[match.group("stem")].append(path)
            else:
                images[path.stem] = path
        for stem in sorted(set(masks) - set(images), key=_natural_key):
            logger.warning(f"{masks[stem][0]}: mask without an image, ignored.")
        for stem, image_path in images.items():
            case_problems, case = _check_case(root, image_path, masks.get(stem, []), class_index)
            if case_problems:
                problems.extend(case_problems)
            else:
                cases.append(case)
    if ignored:
        logger.info(f"ignored {len(ignored)} hidden or non-image files, e.g. {ignored[0]}")
    if problems and not skip_invalid:
        listing = "\n".join(f"  {p['file']}: {p['reason']}" for p in problems)
        raise DatasetError(
            f"{root}: {len(problems)} problem(s); skip them with --skip_invalid true (skip_invalid=True):\n{listing}"
        )
    for problem in problems:
        logger.warning(f"skipped {problem['file']}: {problem['reason']}")
    if not cases:
        raise DatasetError(f"{root}: no valid image with a mask found.")
    return cases, problems


def _check_case(root: Path, image_path: Path, mask_paths: list[Path], class_index: int) -> tuple[list[dict], dict]:
    """Validate one image and its masks; return ``(problems, case)``."""
    try:
        image = _read_grey(image_path)
    except Exception as error:  # PIL raises several exception types for bad files
        return [{"file": str(image_path), "reason": f"cannot read image ({error})"}], {}
    if not mask_paths:
        return [{"file": str(image_path), "reason": "no mask file (expected '<name>_mask.png')"}], {}
    problems, lesion_pixels = [], 0
    for mask_path in mask_paths:
        try:
            mask = _read_grey(mask_path)
        except Exception as error:
            problems.append({"file": str(mask_path), "reason": f"cannot read mask ({error})"})
            continue
        if mask.shape != image.shape:
            problems.append(
                {
                    "file": str(mask_path),
                    "reason": f"mask size {mask.shape[::-1]} differs from image {image.shape[::-1]}",
                }
            )
            continue
        lesion_pixels += int((mask > 0).sum())
    if problems:
        return problems, {}
    if class_index == 0 and lesion_pixels:
        logger.warning(f"{image_path}: normal image with a non-empty mask.")
    if class_index > 0 and not lesion_pixels:
        logger.warning(f"{image_path}: {CLASS_NAMES[class_index]} image with an empty mask.")
    relative = lambda p: p.relative_to(root).as_posix()  # noqa: E731
    case = {
        "image": relative(image_path),
        "masks": [relative(p) for p in mask_paths],
        "class": class_index,
        "class_name": CLASS_NAMES[class_index],
        "hash": perceptual_hash(image),
        "thumbnails": thumbnail_descriptors(image),
    }
    return [], case


def perceptual_hash(image: np.ndarray, size: int = 64, bits: int = 16) -> np.ndarray:
    """DCT perceptual hash (pHash) of a 2D image: robust to rescaling, re-encoding and small intensity changes.

    Args:
        image: 2D array.
        size: side of the downsampled image the DCT is taken of.
        bits: side of the block of low frequencies kept.

    Returns:
        Boolean vector of ``bits * bits - 1`` bits (the DC term is left out).
    """
    small = cv2.resize(image.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
    low = cv2.dct(small)[:bits, :bits].flatten()[1:]
    return low > np.median(low)


def _unit(array: np.ndarray) -> np.ndarray:
    centred = array - array.mean()
    return centred / max(float(np.sqrt((centred**2).sum())), 1e-6)


def thumbnail_descriptors(image: np.ndarray) -> np.ndarray:
    """Small normalised thumbnails of an image's field of view, for :py:func:`thumbnail_similarity`.

    The black frame around the ultrasound field is cropped away, so copies cropped or padded differently and
    rescaled copies give nearly the same thumbnails; averaging into 32 x 32 pixels washes out speckle, calipers and
    text. Each thumbnail has a plain channel (the overall layout) and a detail channel (minus a Gaussian blur and
    minus its row means: lesion borders and oblique tissue structure, not the horizontal layering that all images of
    a scanner share), each zero-mean and weighted so that the dot product of two descriptors is a correlation.

    Args:
        image: 2D array.

    Returns:
        float32 array ``(1 + len(CROP_WIDTHS), 2, THUMBNAIL_SIZE, THUMBNAIL_SIZE)``: the whole field of view, then
        central crops of it to ``CROP_WIDTHS`` of its width.
    """
    field = np.asarray(image, np.float32)
    bright = field > FIELD_LEVEL
    rows = np.flatnonzero(bright.mean(axis=1) > FIELD_FRACTION)
    columns = np.flatnonzero(bright.mean(axis=0) > FIELD_FRACTION)
    if len(rows) > 1 and len(columns) > 1:
        field = field[rows[0] : rows[-1] + 1, columns[0] : columns[-1] + 1]
    width = field.shape[1]
    descriptors = []
    for fraction in (1.0, *CROP_WIDTHS):
        kept = max(1, round(width * fraction))
        left = (width - kept) // 2
        size = (THUMBNAIL_SIZE, THUMBNAIL_SIZE)
        thumbnail = cv2.resize(field[:, left : left + kept], size, interpolation=cv2.INTER_AREA).astype(np.float64)
        detail = thumbnail - cv2.GaussianBlur(thumbnail, (0, 0), BAND_PASS_SIGMA)
        detail -= detail.mean(axis=1, keepdims=True)
        descriptors.append([np.sqrt(PLAIN_WEIGHT) * _unit(thumbnail), np.sqrt(1 - PLAIN_WEIGHT) * _unit(detail)])
    return np.asarray(descriptors, np.float32)


def thumbnail_similarity(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Correlation of thumbnails, robust to small shifts and to central crops.

    The score of two images is the largest correlation of one's whole field of view with the other's, shifted by up
    to one thumbnail pixel (3 % of the field) each way, or with one of the other's central crops. It is symmetric.

    Args:
        first: stacked :py:func:`thumbnail_descriptors` of ``n`` images, ``(n, crops, 2, size, size)``.
        second: the same for ``m`` images.

    Returns:
        ``(n, m)`` float64 scores in [-1, 1]; 1 for identical images.
    """
    first, second = np.asarray(first, np.float64), np.asarray(second, np.float64)
    size = first.shape[-1]
    whole_first, whole_second = first[:, 0].reshape(len(first), -1), second[:, 0].reshape(len(second), -1)
    padded = np.pad(first[:, 0], ((0, 0), (0, 0), (1, 1), (1, 1)))
    scores = np.full((len(first), len(second)), -1.0)
    for dy in range(3):
        for dx in range(3):
            shifted = padded[:, :, dy : dy + size, dx : dx + size].reshape(len(first), -1)
            scores = np.maximum(scores, shifted @ whole_second.T)
    for crop in range(1, first.shape[1]):
        scores = np.maximum(scores, first[:, crop].reshape(len(first), -1) @ whole_second.T)
        scores = np.maximum(scores, whole_first @ second[:, crop].reshape(len(second), -1).T)
    return scores


def group_duplicates(
    hashes: Sequence[np.ndarray],
    threshold: int = DEFAULT_HASH_THRESHOLD,
    thumbnails: Sequence[np.ndarray] | None = None,
    similarity_threshold: float = DEFAULT_SIMILARITY_THRESHOLD,
) -> list[int]:
    """Group images whose hashes differ in at most ``threshold`` bits or whose thumbnails correlate at least
    ``similarity_threshold``, transitively (union-find).

    Args:
        hashes: one boolean hash per image.
        threshold: largest Hamming distance that counts as a (near-)duplicate.
        thumbnails: one :py:func:`thumbnail_descriptors` per image, or ``None`` to group by hash only.
        similarity_threshold: smallest :py:func:`thumbnail_similarity` that counts as a (near-)duplicate.

    Returns:
        A group index per image, numbered from 0 in order of first appearance.
    """
    matrix = np.asarray(hashes, dtype=bool)
    parent = list(range(len(matrix)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(matrix)):
        distances = (matrix[i + 1 :] != matrix[i]).sum(axis=1)
        for j in np.flatnonzero(distances <= threshold) + i + 1:
            parent[find(int(j))] = find(i)
    if thumbnails is not None:
        stack = np.asarray(thumbnails)
        for start in range(0, len(stack), SIMILARITY_BLOCK):
            scores = thumbnail_similarity(stack[start : start + SIMILARITY_BLOCK], stack[start:])
            for i, j in zip(*np.nonzero(scores >= similarity_threshold)):
                if j > i:
                    parent[find(start + int(j))] = find(start + int(i))
    numbering: dict[int, int] = {}
    return [numbering.setdefault(find(i), len(numbering)) for i in range(len(matrix))]


def split_groups(
    groups: Sequence[int], classes: Sequence[int], fractions: Sequence[float], seed: int = 0
) -> list[int]:
    """Assign whole duplicate groups to subsets, stratified by class.

    A group's class is the most frequent class among its members (ties go to the more severe class). Within each
    class, groups are shuffled with ``seed`` and each goes to the subset furthest below its target image count.

    Args:
        groups: group index per image.
        classes: class index per image.
        fractions: target fraction of images per subset (summing to 1).
        seed: random seed.

    Returns:
        Subset index per image.
    """
    members: dict[int, list[int]] = defaultdict(list)
    for image, group in enumerate(groups):
        members[group].append(image)
    group_class = {}
    for group, images in members.items():
        counts = Counter(classes[i] for i in images)
        group_class[group] = max(counts, key=lambda c: (counts[c], c))
    rng = np.random.default_rng(seed)
    assignment = [0] * len(groups)
    for class_index in sorted(set(group_class.values())):
        class_groups = sorted(g for g, c in group_class.items() if c == class_index)
        class_groups = [class_groups[i] for i in rng.permutation(len(class_groups))]
        total = sum(len(members[g]) for g in class_groups)
        filled = np.zeros(len(fractions))
        for group in class_groups:
            deficit = np.asarray(fractions) * total - filled
            subset = int(np.argmax(deficit))
            filled[subset] += len(members[group])
            for image in members[group]:
                assignment[image] = subset
    return assignment


def _atomic_write_json(path: Path, content: dict) -> None:
    text = json.dumps(content, indent=1, ensure_ascii=False)
    atomic_write(path, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))


def create_datalist(
    dataset_dir: str,
    datalist_path: str,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    hash_threshold: int = DEFAULT_HASH_THRESHOLD,
    similarity_threshold: float = DEFAULT_SIMILARITY_THRESHOLD,
    skip_invalid: bool = False,
) -> dict:
    """Validate a BUSI-layout folder, group duplicates, split, and save the datalist atomically.

    Args:
        dataset_dir: the dataset folder.
        datalist_path: JSON file to write.
        val_fraction: fraction of images for validation.
        test_fraction: fraction of images for testing.
        seed: seed of the split.
        hash_threshold: largest perceptual-hash distance between duplicates.
        similarity_threshold: smallest thumbnail correlation between duplicates (:py:func:`thumbnail_similarity`).
        skip_invalid: skip bad cases (listed under ``"skipped"``) instead of raising.

    Returns:
        The datalist: ``training``/``validation``/``test`` lists of ``{"image", "masks", "class", "class_name",
        "group"}`` (paths relative to ``dataset_dir``), ``duplicate_groups``, ``skipped`` and a summary header.
    """
    cases, skipped = scan_dataset(dataset_dir, skip_invalid=skip_invalid)
    hashes, thumbnails = [case.pop("hash") for case in cases], [case.pop("thumbnails") for case in cases]
    groups = group_duplicates(hashes, hash_threshold, thumbnails, similarity_threshold)
    fractions = (1.0 - val_fraction - test_fraction, val_fraction, test_fraction)
    subsets = split_groups(groups, [case["class"] for case in cases], fractions, seed)
    datalist: dict = {
        "description": "BUSI-layout split: stratified by class, duplicate groups never straddle subsets",
        "seed": seed,
        "fractions": dict(zip(SPLITS, fractions)),
        "duplicate_hash": f"DCT perceptual hash (255 bits), Hamming distance <= {hash_threshold}",
        "duplicate_similarity": f"thumbnail correlation ({THUMBNAIL_SIZE} px, shifts, crops) >= {similarity_threshold}",
    }
    for split in SPLITS:
        datalist[split] = []
    for case, group, subset in zip(cases, groups, subsets):
        datalist[SPLITS[subset]].append({**case, "group": group})
    datalist["counts"] = {
        split: dict(Counter(entry["class_name"] for entry in datalist[split])) for split in SPLITS
    }
    by_group: dict[int, list[dict]] = defaultdict(list)
    for case, group in zip(cases, groups):
        by_group[group].append(case)
    datalist["duplicate_groups"] = [
        {
            "group": group,
            "members": [m["image"] for m in members],
            "classes": sorted({m["class_name"] for m in members}),
            "conflicting": len({m["class"] for m in members}) > 1,
        }
        for group, members in sorted(by_group.items())
        if len(members) > 1
    ]
    datalist["skipped"] = skipped
    _atomic_write_json(Path(datalist_path), datalist)
    conflicting = sum(g["conflicting"] for g in datalist["duplicate_groups"])
    logger.info(
        f"saved {datalist_path}: {datalist['counts']}; {len(datalist['duplicate_groups'])} duplicate groups, "
        f"{conflicting} with conflicting classes; {len(skipped)} skipped"
    )
    return datalist


def main(dataset_dir: str, datalist: str, skip_invalid: bool = False, **kwargs) -> None:
    """Create the datalist of ``dataset_dir`` in ``datalist`` (replacing it) and print its summary.

    Args:
        dataset_dir: the dataset folder.
        datalist: JSON file to write.
        skip_invalid: skip bad cases instead of stopping.
        kwargs: further arguments of :py:func:`create_datalist`.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    created = create_datalist(dataset_dir, datalist, skip_invalid=skip_invalid, **kwargs)
    print(json.dumps(created["counts"], indent=1))
    groups = created["duplicate_groups"]
    print(f"{len(groups)} duplicate groups ({sum(len(g['members']) for g in groups)} images)")
    for group in (g for g in groups if g["conflicting"]):
        print("  conflicting:", ", ".join(group["members"]))
    for item in created["skipped"]:
        print("  skipped:", item["file"], "-", item["reason"])


if __name__ == "__main__":
    import fire

    fire.Fire(main)
