"""Reading a dataset folder's datalist, made once by ``tools/prepare_datalist.py``, for the workflows."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["SPLITS", "DatasetError", "load_datalist"]

SPLITS = ("training", "validation", "test")


class DatasetError(ValueError):
    """A dataset folder or its datalist has problems; the message names the files concerned."""


def load_datalist(dataset_dir: str, datalist_path: str, split: str = "training") -> list[dict]:
    """One split of a saved datalist, with absolute ``image`` and ``masks`` paths.

    MONAI's ``load_decathlon_datalist`` is not used: it would also join ``class_name`` (``"benign"``) with
    ``dataset_dir``, where a folder of that name exists.

    Args:
        dataset_dir: the dataset folder the datalist's relative paths start from.
        datalist_path: the datalist JSON.
        split: ``"training"``, ``"validation"`` or ``"test"``.

    Returns:
        The split's entries (``image``, ``masks``, ``class``, ...).

    Raises:
        DatasetError: the datalist is missing, or names files missing from ``dataset_dir``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got '{split}'.")
    root, path = Path(dataset_dir).expanduser().resolve(), Path(datalist_path)
    if not path.is_file():
        raise DatasetError(
            f"datalist {path} not found; make it once with the repository's tool: python tools/prepare_datalist.py "
            f"--dataset_dir {root} --datalist {path} (or write it: lists 'training', 'validation', 'test' of "
            "{'image', 'masks', 'class'} entries, paths relative to the dataset folder)."
        )
    datalist = json.loads(path.read_text(encoding="utf-8"))
    entries = [entry for name in SPLITS for entry in datalist.get(name, [])]
    missing = [file for entry in entries for file in [entry["image"], *entry["masks"]] if not (root / file).is_file()]
    if missing:
        raise DatasetError(
            f"{path} names {len(missing)} file(s) missing from {root}, e.g. {missing[:3]}; it belongs to another "
            "dataset: make this folder's with tools/prepare_datalist.py, or pass --datalist with another file."
        )
    return [
        {**entry, "image": str(root / entry["image"]), "masks": [str(root / mask) for mask in entry["masks"]]}
        for entry in datalist.get(split, [])
    ]
