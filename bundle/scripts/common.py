"""Definitions the bundle's modules share: class names, lesion colours, config switches, durable writes."""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "CLASS_NAMES", "LESION_COLOURS", "as_bool", "atomic_write", "display_image", "remove_stale_temporaries", "stem_of",
    "suffix_of", "write_table",
]

CLASS_NAMES: tuple[str, ...] = ("normal", "benign", "malignant")
# RGB colour of each label-map value: 1 benign lesion, 2 malignant lesion (background stays the image)
LESION_COLOURS: dict[int, tuple[int, int, int]] = {1: (0, 200, 0), 2: (230, 0, 0)}
TEMPORARY_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.tmp(\.[^.]+)*$")  # as atomic_write names them
logger = logging.getLogger(__name__)


def as_bool(value: bool | str, name: str = "value") -> bool:
    """A config switch given as a bool or as text: ``--amp false`` on the command line arrives as the string
    ``"false"`` (python-fire only converts ``False``), which Python would take as true."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", "none", ""):
        return False
    raise ValueError(f"{name} must be true or false, got {value!r}.")


def suffix_of(path: str | os.PathLike) -> str:
    """Lower-case file suffix, with ``.nii.gz`` kept whole."""
    name = Path(path).name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def stem_of(path: str | os.PathLike) -> str:
    """File name without its suffix (``.nii.gz`` counted as one)."""
    name = Path(path).name
    return name[: len(name) - len(suffix_of(name))]


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Write ``path`` through ``write(temporary_path)``, flush it to disk, then move it into place in one step: a kill
    or a failure at any moment leaves the previous file or the new one, never a partial file.

    The temporary path keeps the final suffix, which writers such as nibabel and ITK read the format from.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{stem_of(path)}.{os.getpid()}.tmp{suffix_of(path)}")
    try:
        write(str(temporary))
        with open(temporary, "rb+") as stream:
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    with contextlib.suppress(OSError):  # make the rename itself durable
        descriptor = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    return path


def write_table(path: str | os.PathLike, rows: Sequence[dict]) -> Path:
    """Write rows as CSV atomically, with the keys of the first row as header."""

    def write(temporary: str) -> None:
        with open(temporary, "w", newline="", encoding="utf-8") as stream:
            writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    return atomic_write(path, write)


def remove_stale_temporaries(folder: Path) -> None:
    """Remove the temporary files that :py:func:`atomic_write` in a killed process left in ``folder``."""
    for path in folder.iterdir() if folder.is_dir() else []:
        match = TEMPORARY_NAME.match(path.name)
        if match is None or int(match["pid"]) == os.getpid():
            continue
        try:
            os.kill(int(match["pid"]), 0)  # raises if the writer is no longer running
        except ProcessLookupError:
            path.unlink(missing_ok=True)
            logger.info(f"removed {path}, left by an interrupted save")
        except PermissionError:  # a running process of another user
            pass


def display_image(image: np.ndarray) -> np.ndarray:
    """Scale a ``(X, Y)`` image to uint8 ``(H, W)`` for display (1st-99th percentile window)."""
    low, high = np.percentile(image, (1, 99))
    scaled = np.clip((image - low) / max(high - low, 1e-6), 0, 1) * 255
    return scaled.astype(np.uint8).T
