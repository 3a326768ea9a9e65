"""Data preparation for folders in the BUSI / Kaggle layout.

``<class>/<class> (N).png`` is an image, ``<class> (N)_mask.png`` its lesion mask and ``<class> (N)_mask_K.png``
further masks of the same image (the lesion is their union). This module validates every image/mask pair,
groups exact and near-duplicate images with a perceptual hash, and makes a deterministic, stratified split in
which a duplicate group never straddles two subsets. The split is saved as a MONAI-style datalist JSON with
paths relative to the dataset folder, so it can be committed and reused without any image data.

Command line::

    python bundle/scripts/data.py --dataset_dir DIR --datalist_path FILE
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

__all__ = [
    "CLASS_NAMES",
    "DatasetError",
    "scan_dataset",
    "perceptual_hash",
    "group_duplicates",
    "split_groups",
    "create_datalist",
    "load_or_create_datalist",
]

logger = logging.getLogger(__name__)
CLASS_NAMES = ("normal", "benign", "malignant")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
MASK_PATTERN = re.compile(r"^(?P<stem>.+)_mask(?:_(?P<index>\d+))?$", re.IGNORECASE)
SPLITS = ("training", "validation", "test")
DEFAULT_HASH_THRESHOLD = 64


class DatasetError(ValueError):
    """A dataset folder has problems; the message lists every file concerned."""


def _natural_key(text: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def _read_grey(path: Path) -> np.ndarray:
    """Decode a whole image to a 2D float array (luminance of colour images, alpha ignored)."""
    if path.stat().st_size == 0:
        raise ValueError("the file is empty")
    with Image.open(path) as image:
        image.load()
        if image.mode == "P":
            image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        if image.mode in ("1", "LA", "La", "CMYK", "YCbCr"):
            image = image.convert("L" if image.mode in ("1", "LA", "La") else "RGB")
        array = np.asarray(image)
    if array.ndim == 3:
        array = array[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return array.astype(np.float32)


def scan_dataset(dataset_dir: str, skip_invalid: bool = False) -> tuple[list[dict], list[dict]]:
    """List and validate the cases of a BUSI-layout folder.

    Every image and mask is decoded once. Hidden files and non-image files are ignored (and logged); names with
    spaces, parentheses and non-ASCII letters are fine.

    Args:
        dataset_dir: folder with ``normal``, ``benign`` and ``malignant`` sub-folders (any of them may be missing).
        skip_invalid: skip bad cases and report them instead of raising.

    Returns:
        ``(cases, skipped)``: cases ``{"image", "masks", "class", "class_name", "hash"}`` with paths relative to
        ``dataset_dir``, in natural order; skipped ``{"file", "reason"}``.

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
        raise DatasetError(f"{root}: {len(problems)} problem(s); pass skip_invalid=True to skip them:\n{listing}")
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


def group_duplicates(hashes: Sequence[np.ndarray], threshold: int = DEFAULT_HASH_THRESHOLD) -> list[int]:
    """Group images whose hashes differ in at most ``threshold`` bits, transitively (union-find).

    Args:
        hashes: one boolean hash per image.
        threshold: largest Hamming distance that counts as a (near-)duplicate.

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
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as stream:
            json.dump(content, stream, indent=1, ensure_ascii=False)
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def create_datalist(
    dataset_dir: str,
    datalist_path: str,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
    hash_threshold: int = DEFAULT_HASH_THRESHOLD,
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
        skip_invalid: skip bad cases (listed under ``"skipped"``) instead of raising.

    Returns:
        The datalist: ``training``/``validation``/``test`` lists of ``{"image", "masks", "class", "class_name",
        "group"}`` (paths relative to ``dataset_dir``), ``duplicate_groups``, ``skipped`` and a summary header.
    """
    cases, skipped = scan_dataset(dataset_dir, skip_invalid=skip_invalid)
    groups = group_duplicates([case.pop("hash") for case in cases], hash_threshold)
    fractions = (1.0 - val_fraction - test_fraction, val_fraction, test_fraction)
    subsets = split_groups(groups, [case["class"] for case in cases], fractions, seed)
    datalist: dict = {
        "description": "BUSI-layout split: stratified by class, duplicate groups never straddle subsets",
        "seed": seed,
        "fractions": dict(zip(SPLITS, fractions)),
        "duplicate_hash": f"DCT perceptual hash (255 bits), Hamming distance <= {hash_threshold}",
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


def _absolute(entry: dict, root: Path) -> dict:
    return {**entry, "image": str(root / entry["image"]), "masks": [str(root / m) for m in entry["masks"]]}


def load_or_create_datalist(
    dataset_dir: str, datalist_path: str, split: str | None = None, **kwargs
) -> dict | list[dict]:
    """Load the saved split, or create it on first use, with absolute paths for the workflows.

    Args:
        dataset_dir: the dataset folder.
        datalist_path: the datalist JSON; created with :py:func:`create_datalist` (``kwargs``) if missing.
        split: ``"training"``, ``"validation"`` or ``"test"`` to get one list; ``None`` for all three.
        kwargs: arguments of :py:func:`create_datalist`.

    Returns:
        One list of entries, or ``{split: entries}``, with absolute ``image`` and ``masks`` paths.

    Raises:
        DatasetError: the saved datalist names files missing from ``dataset_dir``.
    """
    root = Path(dataset_dir).expanduser().resolve()
    path = Path(datalist_path)
    if path.is_file():
        with open(path, encoding="utf-8") as stream:
            datalist = json.load(stream)
        missing = [
            file
            for entry in (e for s in SPLITS for e in datalist.get(s, []))
            for file in [entry["image"], *entry["masks"]]
            if not (root / file).is_file()
        ]
        if missing:
            raise DatasetError(
                f"{path} names {len(missing)} file(s) missing from {root}, e.g. {missing[:3]}; it belongs to another "
                "dataset: delete it to make a new split, or pass --datalist with another file."
            )
    else:
        datalist = create_datalist(str(root), str(path), **kwargs)
    lists = {s: [_absolute(entry, root) for entry in datalist.get(s, [])] for s in SPLITS}
    if split is None:
        return lists
    if split not in lists:
        raise ValueError(f"split must be one of {SPLITS}, got '{split}'.")
    return lists[split]


def main(dataset_dir: str, datalist_path: str, skip_invalid: bool = False, **kwargs) -> None:
    """Create (or verify) a datalist and print its summary."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    load_or_create_datalist(dataset_dir, datalist_path, skip_invalid=skip_invalid, **kwargs)
    with open(datalist_path, encoding="utf-8") as stream:
        datalist = json.load(stream)
    print(json.dumps(datalist["counts"], indent=1))
    groups = datalist["duplicate_groups"]
    print(f"{len(groups)} duplicate groups ({sum(len(g['members']) for g in groups)} images)")
    for group in (g for g in groups if g["conflicting"]):
        print("  conflicting:", ", ".join(group["members"]))
    for item in datalist["skipped"]:
        print("  skipped:", item["file"], "-", item["reason"])


if __name__ == "__main__":
    import fire

    fire.Fire(main)
