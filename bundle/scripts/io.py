"""Reading inputs and writing predictions for the inference workflow; every output is written atomically."""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from monai.data import ImageReader, ITKReader, NibabelReader, PILReader
from monai.utils import ensure_tuple, optional_import
from PIL import Image

from .common import CLASS_NAMES, LESION_COLOURS, as_bool, atomic_write, display_image, stem_of, suffix_of, write_table
from .reliability import reliability_fields
from .transforms import pil_to_supported_mode

itk, _ = optional_import("itk")
nib, _ = optional_import("nibabel")
pydicom, _ = optional_import("pydicom")
Events, _ = optional_import("ignite.engine", name="Events")

__all__ = [
    "IMAGE_SUFFIXES", "MAX_IMAGE_PIXELS", "BundleImageReader", "check_image_file", "list_images", "save_label_map",
    "save_overlay", "save_explanation", "PredictionWriter",
]

logger = logging.getLogger(__name__)
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom")
IMAGE_SUFFIXES = PIL_SUFFIXES + NIFTI_SUFFIXES + (".nrrd", ".nhdr", ".mha", ".mhd") + DICOM_SUFFIXES
MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # pixels x frames (8192 x 8192): larger files are refused before decoding
MASK_NAME = re.compile(r"_mask(_\d+)?$", re.IGNORECASE)


def is_dicom(path: str | os.PathLike) -> bool:
    """A ``.dcm`` / ``.dicom`` file, or a file without suffix that starts like DICOM (``DICM`` at byte 128)."""
    suffix = suffix_of(path)
    if suffix:
        return suffix in DICOM_SUFFIXES
    try:
        with open(path, "rb") as stream:
            return stream.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _header_shape(path: str, dicom: Any) -> tuple[int, ...]:
    """The image's size along each axis (frames and slices included), read from its header."""
    suffix = suffix_of(path)
    if suffix in PIL_SUFFIXES:
        with Image.open(path) as image:
            return image.size
    if suffix in NIFTI_SUFFIXES:
        return nib.load(path).shape[:3]
    if dicom is not None:
        if "PixelData" not in dicom or "Rows" not in dicom or "Columns" not in dicom:
            raise ValueError("not a DICOM image (no pixel data)")
        return int(dicom.Columns), int(dicom.Rows), int(dicom.get("NumberOfFrames", 1) or 1)
    image_io = itk.ImageIOFactory.CreateImageIO(path, itk.CommonEnums.IOFileMode_ReadMode)
    if image_io is None:
        raise ValueError("ITK cannot read this file type")
    image_io.SetFileName(path)
    image_io.ReadImageInformation()
    return tuple(image_io.GetDimensions(i) for i in range(image_io.GetNumberOfDimensions()))


def check_image_file(path: str, max_pixels: int | None = None) -> None:
    """Check from the header that the file exists, is not empty and has at most ``max_pixels`` (all frames or slices
    together; default ``MAX_IMAGE_PIXELS``); a ``ValueError`` names the file and the reason.

    DICOM pixels are decoded by pydicom, which raises Python errors where ITK's GDCM dies with SIGFPE (a corrupt
    encapsulated pixel stream, even when only the header is read); a transfer syntax pydicom cannot decode (e.g.
    JPEG Lossless without pylibjpeg) is left to GDCM unchecked.
    """
    limit = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        if not os.path.isfile(path):
            raise ValueError("no such file")
        if os.path.getsize(path) == 0:
            raise ValueError("the file is empty")
        dicom = pydicom.dcmread(path, force=True) if is_dicom(path) else None
        shape = _header_shape(path, dicom)
        if math.prod(shape) > limit:
            raise ValueError(
                f"the image is too large ({' x '.join(map(str, shape))}: {math.prod(shape):,} pixels, limit "
                f"{limit:,}); refused before decoding to bound memory"
            )
        if dicom is not None and _pydicom_decodes(dicom):
            dicom.pixel_array  # noqa: B018 - decoding is the check
    except Exception as error:  # every reader has its own exception types
        reason = error if isinstance(error, ValueError) else f"{type(error).__name__}: {error}"
        raise ValueError(f"{path}: cannot read this image ({reason})") from error


def _pydicom_decodes(dataset: Any) -> bool:
    """Whether pydicom can decode the pixels of ``dataset`` (a transfer syntax it knows a working decoder for)."""
    from pydicom.pixels import get_decoder

    syntax = dataset.file_meta.get("TransferSyntaxUID") if hasattr(dataset, "file_meta") else None
    try:
        return syntax is None or get_decoder(syntax).is_available
    except NotImplementedError:
        return False


class BundleImageReader(ImageReader):
    """One MONAI image reader for every supported format, with bounded memory and errors that name the file.

    After :py:func:`check_image_file` (``max_pixels``: as there), PNG/JPG/BMP/TIFF go to ``PILReader`` (with
    ``pil_to_supported_mode``), NIfTI to ``NibabelReader``, DICOM, NRRD and MetaImage to ``ITKReader``.
    ``LoadImage`` passes a file whose ``read`` fails on to the next reader (MONAI's ITK reader decodes a 20000 x 20000
    PNG that PIL refuses; GDCM can crash on a corrupt DICOM), so ``read`` only records the names and all checks and
    decoding happen in ``get_data``, whose ``ValueError`` reaches the caller.
    """

    def __init__(self, max_pixels: int | None = None) -> None:
        super().__init__()
        self.max_pixels = max_pixels
        self.pil = PILReader(converter=pil_to_supported_mode)
        self.nibabel = NibabelReader()
        self.itk = ITKReader()

    def verify_suffix(self, filename: Sequence[str | os.PathLike] | str | os.PathLike) -> bool:
        return all(suffix_of(f) in IMAGE_SUFFIXES or is_dicom(f) for f in ensure_tuple(filename))

    def read(self, data: Sequence[str | os.PathLike] | str | os.PathLike, **kwargs) -> list[str]:
        return [str(f) for f in ensure_tuple(data)]

    def get_data(self, img: list[str]) -> tuple[np.ndarray, dict]:
        for path in img:
            check_image_file(path, self.max_pixels)
        suffix = suffix_of(img[0])
        reader = self.pil if suffix in PIL_SUFFIXES else self.nibabel if suffix in NIFTI_SUFFIXES else self.itk
        try:
            return reader.get_data(reader.read(img if len(img) > 1 else img[0]))
        except Exception as error:  # every reader has its own exception types
            raise ValueError(f"{img[0]}: cannot read this image ({type(error).__name__}: {error})") from error


def list_images(
    path: str,
    output_dir: str | None = None,
    exclude_masks: bool = True,
    skip_invalid: bool = True,
    max_pixels: int | None = None,
) -> list[dict[str, str]]:
    """List the images to predict: one file, or every supported image under a folder (recursively), sorted.

    Hidden, non-image and (by default) BUSI ``_mask`` files are left out (logged); DICOM without a suffix is
    recognised by content. Each image is decoded once, as ``LoadImage`` will: an unreadable one is logged, listed in
    ``<output_dir>/skipped.csv`` and skipped (with ``skip_invalid``; else its ``ValueError`` is raised).

    Args:
        path: an image file or a folder.
        output_dir: where to write ``skipped.csv``.
        exclude_masks: leave out files whose name ends with ``_mask`` or ``_mask_<k>``.
        skip_invalid: skip unreadable images instead of raising.
        max_pixels: as in :py:func:`check_image_file`.

    Returns:
        ``[{"image": absolute path}, ...]``; a ``ValueError`` if there is none.
    """
    root = Path(path).expanduser().resolve()
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such file or folder.")
    candidates = [root]
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file())
        candidates = [
            p
            for p in files
            if not any(part.startswith(".") for part in p.relative_to(root).parts)
            and (suffix_of(p) in IMAGE_SUFFIXES or is_dicom(p))
            and not (exclude_masks and MASK_NAME.search(stem_of(p)))
        ]
        ignored = [str(p.relative_to(root)) for p in sorted(set(files) - set(candidates))]
        if ignored:
            shown = ", ".join(ignored[:5]) + (f" and {len(ignored) - 5} more" if len(ignored) > 5 else "")
            logger.info(f"{root}: left out {len(ignored)} hidden, mask or non-image files: {shown}.")
    images, skipped, reader = [], [], BundleImageReader(max_pixels)
    for candidate in map(str, candidates):
        try:
            reader.get_data([candidate])
            images.append({"image": candidate})
        except ValueError as error:
            if not skip_invalid:
                raise
            logger.warning(f"skipped: {error}")
            skipped.append({"file": candidate, "reason": str(error)})
    if skipped and output_dir:
        write_table(Path(output_dir) / "skipped.csv", skipped)
    if not images:
        raise ValueError(f"{root}: no readable image ({', '.join(IMAGE_SUFFIXES)}) found; skipped {len(skipped)}.")
    return images


def label_map_suffix(source: str) -> str:
    """Output format of a label map: PNG for 2D picture formats, NIfTI for NIfTI, NRRD for the rest."""
    suffix = suffix_of(source)
    return ".png" if suffix in PIL_SUFFIXES else ".nii.gz" if suffix in NIFTI_SUFFIXES else ".nrrd"


def save_label_map(label_map: np.ndarray, source: str, path: str | os.PathLike) -> Path:
    """Save an ``(X, Y)`` label map (MONAI's axis order) as ``path`` (``.png``, ``.nii.gz`` or ``.nrrd``) with the
    size and geometry (NIfTI affine; ITK origin, spacing, direction) of its ``source`` image."""
    label_map = np.ascontiguousarray(label_map, dtype=np.uint8)
    suffix = suffix_of(path)
    if suffix == ".png":
        return atomic_write(path, lambda tmp: Image.fromarray(label_map.T).save(tmp, format="PNG"))
    if suffix in NIFTI_SUFFIXES:
        reference = nib.load(source)
        data = label_map.reshape(label_map.shape + (1,) * (len(reference.shape) - 2))  # one slice or frame
        header = reference.header.copy()
        header.set_data_dtype(np.uint8)
        return atomic_write(path, lambda tmp: nib.save(nib.Nifti1Image(data, reference.affine, header), tmp))
    reader = itk.ImageFileReader.New(FileName=str(source))
    reader.UpdateOutputInformation()
    reference = reader.GetOutput()
    array = label_map.T if reference.GetImageDimension() == 2 else label_map.T[None]
    image = itk.image_from_array(np.ascontiguousarray(array))  # itk reads the buffer, not the strides
    image.SetOrigin(reference.GetOrigin())
    image.SetSpacing(reference.GetSpacing())
    image.SetDirection(reference.GetDirection())
    return atomic_write(path, lambda tmp: itk.imwrite(image, tmp, compression=True))


def _save_picture(picture: np.ndarray, path: str | os.PathLike, caption: str) -> Path:
    """Save an RGB uint8 ``(H, W, 3)`` picture as PNG, with ``caption`` written in its top-left corner."""
    if caption:
        scale = max(picture.shape[1] / 600, 0.4)
        cv2.putText(picture, caption, (5, int(20 * scale) + 5), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1)
    return atomic_write(path, lambda tmp: Image.fromarray(picture).save(tmp, format="PNG"))


def save_overlay(
    image: np.ndarray, label_map: np.ndarray, path: str | os.PathLike, caption: str = "", alpha: float = 0.35
) -> Path:
    """Save a PNG of the ``(X, Y)`` label map over the ``(X, Y)`` image, lesions filled (opacity ``alpha``) and
    outlined in their ``LESION_COLOURS``, with ``caption`` in the top-left corner."""
    overlay = cv2.cvtColor(display_image(image), cv2.COLOR_GRAY2RGB)
    labels = np.ascontiguousarray(label_map.T, dtype=np.uint8)
    for value, colour in LESION_COLOURS.items():
        region = (labels == value).astype(np.uint8)
        if region.any():
            fill = overlay.copy()
            fill[region > 0] = colour
            overlay = cv2.addWeighted(fill, alpha, overlay, 1 - alpha, 0)
            contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(overlay, contours, -1, colour, 1)
    return _save_picture(overlay, path, caption)


def save_explanation(image: np.ndarray, heat: np.ndarray, path: str | os.PathLike, caption: str = "") -> Path:
    """Save a PNG of an ``(X, Y)`` class-activation map in [0, 1] as a heat map (blue low, red high) blended with the
    ``(X, Y)`` image, with ``caption`` in the top-left corner."""
    grey = cv2.cvtColor(display_image(image), cv2.COLOR_GRAY2RGB)
    heat_map = cv2.applyColorMap(np.ascontiguousarray(np.clip(heat.T, 0, 1) * 255, dtype=np.uint8), cv2.COLORMAP_JET)
    return _save_picture(cv2.addWeighted(cv2.cvtColor(heat_map, cv2.COLOR_BGR2RGB), 0.4, grey, 0.6, 0), path, caption)


class PredictionWriter:
    """Ignite handler that writes, per image, the label map, an overlay and a row of class probabilities.

    Per input ``<name>.<ext>`` it writes ``<name>_seg.<png|nii.gz|nrrd>`` (label map at the input's size and
    geometry: 0 background, 1 benign, 2 malignant lesion), ``<name>_overlay.png`` and, with ``explanation_maps``,
    ``<name>_cam.png``, in the input's sub-folder under ``output_dir``; at the end ``predictions.csv`` and
    ``predictions.json`` list per image the class, probabilities and reliability columns (none for an image that is
    not assessable, whose label map is empty).

    Each item of ``engine.state.output`` holds, at the input's size, the ``(1, X, Y)`` label map ``seg_pred``, the
    class probabilities ``cls``, the predicted class ``cls_pred`` (-1: not assessable), the image ``display_image``,
    the class-activation map ``cam`` and the ``RELIABILITY_KEYS`` of ``scripts.reliability``.

    Args:
        output_dir: output folder.
        input_root: folder the inputs were listed from, to mirror sub-folders (``None``: flat output).
        class_names: class names, index order.
        explanation_maps: write the class-activation maps and their column (text is accepted).
    """

    label_map_key, cls_prob_key, cls_pred_key = "seg_pred", "cls", "cls_pred"
    image_key, explanation_key = "display_image", "cam"

    def __init__(
        self,
        output_dir: str,
        input_root: str | None = None,
        class_names: Sequence[str] = CLASS_NAMES,
        explanation_maps: bool | str = False,
    ) -> None:
        self.output_dir = Path(output_dir)
        root = Path(input_root).expanduser().resolve() if input_root else None
        self.input_root = root if root is not None and root.is_dir() else None
        self.class_names = list(class_names)
        self.explanation_maps = as_bool(explanation_maps, "explanation_maps")
        self.rows: list[dict] = []

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.write_batch)
        engine.add_event_handler(Events.COMPLETED, self.write_tables)

    def reset(self, engine=None) -> None:
        self.rows = []

    def output_stem(self, source: str) -> Path:
        """Output path without suffix for a source image."""
        source_path = Path(source).resolve()
        folder = self.output_dir
        if self.input_root is not None and self.input_root in source_path.parents:
            folder = folder / source_path.parent.relative_to(self.input_root)
        return folder / stem_of(source_path)

    def write_one(self, item: dict) -> dict:
        """Write the files of one prediction and return its table row."""
        image = item[self.image_key]
        source = str(image.meta["filename_or_obj"])
        label_map = torch.as_tensor(item[self.label_map_key])[0].cpu().numpy().astype(np.uint8)
        probabilities = torch.as_tensor(item[self.cls_prob_key]).float().cpu().numpy().reshape(-1)
        predicted = int(item[self.cls_pred_key])
        assessed = predicted >= 0
        stem = self.output_stem(source)
        display = torch.as_tensor(image)[0].float().cpu().numpy()
        caption = f"{self.class_names[predicted]} {probabilities[predicted]:.2f}" if assessed else "not assessable"
        row = {
            "image": source,
            "label_map": str(save_label_map(label_map, source, f"{stem}_seg{label_map_suffix(source)}")),
            "overlay": str(save_overlay(display, label_map, f"{stem}_overlay.png", caption)),
        }
        if self.explanation_maps:
            heat = item.get(self.explanation_key)
            caption = f"Grad-CAM: {self.class_names[predicted]}" if assessed else ""
            row["explanation_map"] = "" if heat is None else str(
                save_explanation(display, torch.as_tensor(heat)[0].float().cpu().numpy(), f"{stem}_cam.png", caption))
        row["predicted_class"] = self.class_names[predicted] if assessed else ""
        row.update({f"p_{name}": round(float(p), 6) if assessed else None
                    for name, p in zip(self.class_names, probabilities)})  # fmt: skip
        row["lesion_pixels"] = int((label_map > 0).sum())
        row.update(reliability_fields(item))
        return row

    def write_batch(self, engine) -> None:
        outputs = engine.state.output
        self.rows.extend(self.write_one(item) for item in (outputs if isinstance(outputs, list) else [outputs]))

    def write_tables(self, engine=None) -> None:
        if not self.rows:
            return
        write_table(self.output_dir / "predictions.csv", self.rows)
        text = json.dumps({"class_names": self.class_names, "predictions": self.rows}, indent=2)
        atomic_write(self.output_dir / "predictions.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        logger.info(f"wrote {len(self.rows)} predictions to {self.output_dir}")
