"""Transforms MONAI lacks for 2D breast ultrasound: any image flavour to one 2D channel, BUSI's masks to a class-coded
label map, scanner-like augmentation, and the two network outputs to one label map that agrees with the class."""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence

import cv2
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import LoadImage, MapTransform, RandomizableTransform, SpatialCrop
from monai.transforms.utils import generate_spatial_bounding_box
from monai.utils import convert_to_tensor

from .common import CLASS_NAMES, LESION_COLOURS
from .reliability import STATUS_OK, reliability_fields

__all__ = [
    "pil_to_supported_mode", "to_single_channel_2d", "SingleChannel2Dd", "LoadLesionLabeld", "RandSpeckleNoised",
    "RandDepthAttenuationd", "RandLesionZoomd", "RandLesionFreeCropd", "decide_class", "LesionLabelMapd",
    "class_from_label_map", "MonaiLabelOutputd",
]

LUMINANCE_WEIGHTS = (0.299, 0.587, 0.114)
logger = logging.getLogger(__name__)


def pil_to_supported_mode(image):
    """``PILReader(converter=...)``: palette, bilevel, CMYK and grey + alpha images to modes of plain intensities
    (``L``, ``RGB`` or ``RGBA``); other modes pass unchanged."""
    if image.mode == "P":
        return image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("1", "LA", "La"):
        return image.convert("L")
    if image.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        return image.convert("RGB")
    return image


def to_single_channel_2d(img: torch.Tensor, reduction: str = "luminance", source: str = "") -> torch.Tensor:
    """Reduce a channel-first image ``(C, X, Y[, Z...])`` to ``(1, X, Y)`` (a MetaTensor stays one): singleton
    spatial axes dropped, the first frame of a cine image kept (with a warning), colour channels reduced to their
    luminance (alpha ignored) or, for label maps (``reduction="max"``), their maximum.

    Args:
        img: channel-first image.
        reduction: ``"luminance"`` for images, ``"max"`` for label maps.
        source: file name for messages.

    Raises:
        ValueError: naming ``source``, for an image with fewer than two spatial axes or an unsupported channel count.
    """
    if img.ndim < 3:
        raise ValueError(f"{source}: expected a 2D image, got shape {tuple(img.shape)}.")
    for axis in range(img.ndim - 1, 0, -1):  # last first, so that the indices of the others stay valid
        if img.ndim > 3 and img.shape[axis] == 1:
            img = img.squeeze(axis)
    if img.ndim > 3:
        logger.warning(f"{source}: {tuple(img.shape[3:])} frames or slices, using the first one.")
        img = img[(slice(None),) * 3 + (0,) * (img.ndim - 3)]
    channels = img.shape[0]
    if channels == 1:
        return img
    if reduction == "max":  # label maps: any colour channel, never alpha
        return img[: 3 if channels == 4 else channels].amax(dim=0, keepdim=True)
    if channels == 2:  # grey + alpha
        return img[:1]
    if channels in (3, 4):
        weights = torch.as_tensor(LUMINANCE_WEIGHTS, dtype=torch.float32, device=img.device).view(3, 1, 1)
        return (img[:3].float() * weights).sum(dim=0, keepdim=True)
    raise ValueError(f"{source}: cannot reduce {channels} channels to one.")


def _source(data: Mapping, key: Hashable) -> str:
    """The file an item's value came from, for messages."""
    value = data.get(key)
    if isinstance(value, MetaTensor):
        return str(value.meta.get("filename_or_obj", key))
    return str(value) if isinstance(value, str) else str(key)


class SingleChannel2Dd(MapTransform):
    """Dictionary version of :py:func:`to_single_channel_2d`."""

    def __init__(self, keys: KeysCollection, reduction: str = "luminance", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.reduction = reduction

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = to_single_channel_2d(d[key], self.reduction, source=_source(d, key))
        return d


class LoadLesionLabeld(MapTransform):
    """Load the class-coded label map (0 background, 1 benign, 2 malignant) of an already loaded image.

    BUSI entries give ``masks`` (the lesion is the union of their non-zero pixels) and ``class`` (the value of the
    lesion); MONAI Label entries give a ``label`` map file, loaded as it is. Either must match the ``image``'s size.
    The ``(1, X, Y)`` label map goes to ``label``.

    Args:
        loader: loader of masks and label maps; by default a ``LoadImage`` with channel-first output.
    """

    image_key, label_key, masks_key, class_key = "image", "label", "masks", "class"  # the datalist's keys

    def __init__(self, loader: LoadImage | None = None) -> None:
        super().__init__(keys=[self.label_key], allow_missing_keys=True)
        self.loader = loader or LoadImage(image_only=True, ensure_channel_first=True)

    def _load_2d(self, path: str, d: Mapping) -> torch.Tensor:
        """A mask or label map as ``(1, X, Y)``, checked against the image's size."""
        mask = to_single_channel_2d(self.loader(path), reduction="max", source=path)
        image_size, mask_size = tuple(d[self.image_key].shape[1:]), tuple(mask.shape[1:])
        if mask_size != image_size:
            raise ValueError(
                f"{path}: mask size {mask_size} differs from image {_source(d, self.image_key)} size {image_size}."
            )
        return mask

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        if self.masks_key in d:
            mask_files = d[self.masks_key]
            mask_files = [mask_files] if isinstance(mask_files, str) else list(mask_files)
            if not mask_files:
                raise ValueError(f"{_source(d, self.image_key)}: no mask file listed.")
            masks = [self._load_2d(path, d) for path in mask_files]
            lesion = torch.stack([convert_to_tensor(mask, track_meta=False) > 0 for mask in masks]).any(dim=0)
            label = MetaTensor(lesion.to(torch.uint8) * int(d[self.class_key]), meta=dict(masks[-1].meta))
        elif isinstance(d.get(self.label_key), str):
            path = d[self.label_key]
            label = self._load_2d(path, d)
            values = torch.unique(label)
            if values.min() < 0 or values.max() >= len(CLASS_NAMES) or not torch.all(values == values.round()):
                raise ValueError(
                    f"{path}: label values must be integers in 0..{len(CLASS_NAMES) - 1} "
                    f"(0 background, 1 benign, 2 malignant), found {values.tolist()[:10]}."
                )
            label = label.to(torch.uint8)
        else:
            raise KeyError(
                f"{_source(d, self.image_key)}: needs '{self.masks_key}' + '{self.class_key}' or '{self.label_key}'."
            )
        d[self.label_key] = label
        return d


class RandSpeckleNoised(RandomizableTransform, MapTransform):
    """Multiply images by ``1 + std * N(0, 1)`` noise smoothed to a speckle grain (MONAI's noise transforms add
    noise; speckle scales with the echo, and scanners differ in it).

    Args:
        keys: keys of ``(1, X, Y)`` images scaled to about ``[0, 1]``.
        prob: probability of applying it.
        std: range the noise standard deviation is drawn from.
        grain: range of the Gaussian sigma (pixels) that correlates neighbouring noise values.
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.1,
        std: Sequence[float] = (0.05, 0.2),
        grain: Sequence[float] = (0.0, 1.0),
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.std, self.grain = std, grain

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        std, sigma = self.R.uniform(*self.std), self.R.uniform(*self.grain)
        for key in self.key_iterator(d):
            noise = self.R.standard_normal(d[key].shape[1:]).astype(np.float32)
            if sigma > 0.3:
                noise = cv2.GaussianBlur(noise, (0, 0), sigma)
                noise /= max(float(noise.std()), 1e-6)
            d[key] = d[key] * (1.0 + std * torch.as_tensor(noise)[None]).clamp_min(0.0)
        return d


class RandDepthAttenuationd(RandomizableTransform, MapTransform):
    """Multiply images by a gain ``exp(-a * depth)``: scanners and their time-gain compensation differ in how the
    echo decays with depth.

    Args:
        keys: keys of ``(1, X, Y)`` images (``Y``, the second spatial axis, is depth, as BUSI PNGs load).
        prob: probability of applying it.
        attenuation: range of ``a``, the log gain lost from top to bottom (negative: brighter with depth).
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.1,
        attenuation: Sequence[float] = (-0.3, 1.0),
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.attenuation = attenuation

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        a = self.R.uniform(*self.attenuation)
        for key in self.key_iterator(d):
            depth = torch.linspace(0.0, 1.0, d[key].shape[-1], dtype=torch.float32)
            d[key] = d[key] * torch.exp(-a * depth)
        return d


class _RandWindowCropd(RandomizableTransform, MapTransform):
    """Base of the random crops that draw their window from the label map: with probability ``prob``, cut every key
    to :py:meth:`window` (``None``: leave the data whole)."""

    label_key: str

    def window(self, label: torch.Tensor) -> tuple[list[int], list[int]] | None:
        """The crop window ``(start, end)`` per spatial axis for one ``(C, X, Y)`` label map, or ``None``."""
        raise NotImplementedError

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        window = self.window(d[self.label_key])
        if window is None:
            return d
        crop = SpatialCrop(roi_start=window[0], roi_end=window[1])
        for key in self.key_iterator(d):
            d[key] = crop(d[key])
        return d


class RandLesionZoomd(_RandWindowCropd):
    """Crop a window around the lesion so that a later resize shows it larger: at the network's input size small
    lesions keep few pixels, and their margins tell benign from malignant.

    The window has the image's aspect (the resize that follows squashes it as it squashes the whole image), spans
    ``margin`` times the lesion's bounding box on its longer relative side, at least ``min_fraction`` of the image
    side, and lies at a random place that keeps the whole lesion (every labelled pixel) inside. An image with an
    empty label gets a window of a random side in ``[min_fraction, 1]`` at a random place, so that zooming in does
    not mean "lesion".

    Args:
        keys: keys of ``(C, X, Y)`` images and labels cropped alike.
        label_key: key of the label map whose non-zero pixels are the lesion.
        prob: probability of cropping.
        margin: range the window side over the lesion's box side is drawn from (1 touches the lesion).
        min_fraction: smallest window side, as a fraction of the image side.
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_key: str = "label",
        prob: float = 0.3,
        margin: Sequence[float] = (1.5, 4.0),
        min_fraction: float = 0.3,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if not 0.0 < min_fraction <= 1.0 or min(margin) < 1.0:
            raise ValueError(f"min_fraction must be in (0, 1] and margin at least 1, got {min_fraction} and {margin}.")
        self.label_key, self.margin, self.min_fraction = label_key, margin, min_fraction

    def window(self, label: torch.Tensor) -> tuple[list[int], list[int]]:
        """Draw the crop window ``(start, end)`` for one ``(C, X, Y)`` label map."""
        size = label.shape[1:]
        low, high = generate_spatial_bounding_box(label)
        if any(h > lo for lo, h in zip(low, high)):
            box_fraction = max((h - lo) / s for lo, h, s in zip(low, high, size))
            fraction = box_fraction * self.R.uniform(*self.margin)
        else:  # an empty box from the far corner to the origin: every window position keeps it inside
            low, high = list(size), [0] * len(size)
            fraction = self.R.uniform(self.min_fraction, 1.0)
        fraction = min(max(fraction, self.min_fraction), 1.0)
        start, end = [], []
        for lo, hi, s in zip(low, high, size):
            side = max(int(round(fraction * s)), hi - lo)
            first = self.R.randint(max(0, hi - side), min(lo, s - side) + 1)
            start.append(first)
            end.append(first + side)
        return start, end


class RandLesionFreeCropd(_RandWindowCropd):
    """Crop a window that shows no lesion, so that an image with a lesion also lends normal tissue: BUSI has about
    130 normal images, too few for the network to learn what normal breast tissue looks like on other images.

    The window has the image's aspect and a side drawn from ``[min_fraction, max_fraction]`` of the image side. On a
    lesion image it keeps clear of the lesion's bounding box widened by ``gap`` times the box on each side and of
    everything deeper than the lesion (its posterior shadowing or enhancement belongs to it); its label map is then
    empty, so the image counts as normal. Up to ``tries`` random places are tried; where none fits, the image is left
    whole. An image with an empty label gets a window of the same size distribution, so that the window's scale
    carries no class.

    Args:
        keys: keys of ``(C, X, Y)`` images and labels cropped alike.
        label_key: key of the label map whose non-zero pixels are the lesion.
        prob: probability of cropping.
        min_fraction: smallest window side, as a fraction of the image side.
        max_fraction: largest window side, as a fraction of the image side.
        gap: clearance around the lesion's box, as a fraction of the box's side.
        depth_axis: spatial axis that runs away from the probe (1 for images loaded by MONAI's ``PILReader``, whose
            first spatial axis is the image width).
        tries: random window places tried per image.
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_key: str = "label",
        prob: float = 0.2,
        min_fraction: float = 0.25,
        max_fraction: float = 0.5,
        gap: float = 0.25,
        depth_axis: int = 1,
        tries: int = 30,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if not 0.0 < min_fraction <= max_fraction <= 1.0 or gap < 0.0 or tries < 1:
            raise ValueError(
                f"need 0 < min_fraction <= max_fraction <= 1, gap >= 0 and tries >= 1, got {min_fraction}, "
                f"{max_fraction}, {gap} and {tries}."
            )
        self.label_key, self.min_fraction, self.max_fraction = label_key, min_fraction, max_fraction
        self.gap, self.depth_axis, self.tries = gap, depth_axis, tries

    def _keep_out(self, label: torch.Tensor) -> tuple[list[int], list[int]] | None:
        """The region a window must not touch, ``(start, end)`` per spatial axis; ``None`` for an empty label."""
        size = label.shape[1:]
        low, high = generate_spatial_bounding_box(label)
        if not all(h > lo for lo, h in zip(low, high)):
            return None
        start, end = [], []
        for axis, (lo, hi, s) in enumerate(zip(low, high, size)):
            widen = int(round(self.gap * (hi - lo)))
            start.append(max(lo - widen, 0))
            end.append(s if axis == self.depth_axis else min(hi + widen, s))
        return start, end

    def window(self, label: torch.Tensor) -> tuple[list[int], list[int]] | None:
        """Draw a lesion-free crop window ``(start, end)`` for one ``(C, X, Y)`` label map; ``None`` if none fits."""
        size = label.shape[1:]
        keep_out = self._keep_out(label)
        for _ in range(self.tries):
            fraction = self.R.uniform(self.min_fraction, self.max_fraction)
            sides = [max(int(round(fraction * s)), 1) for s in size]
            start = [self.R.randint(0, s - side + 1) for s, side in zip(size, sides)]
            end = [first + side for first, side in zip(start, sides)]
            if keep_out is None or any(e <= k0 or b >= k1 for b, e, k0, k1 in zip(start, end, *keep_out)):
                return start, end
        return None


def decide_class(
    probs: torch.Tensor, normal_threshold: float | None = None, malignant_threshold: float | None = None
) -> int:
    """The class index of one image from its probabilities ``(normal, benign, malignant)``.

    Without thresholds: the arg-max. An image is malignant whenever ``p(malignant)`` reaches ``malignant_threshold``
    (an operating point for cancer sensitivity), and normal only where ``p(normal)`` exceeds ``normal_threshold``
    (``None``: where it exceeds ``p(benign)``); otherwise the likelier of benign and malignant (benign where
    ``malignant_threshold`` was not reached).
    """
    probs = probs.flatten().float()
    if normal_threshold is None and malignant_threshold is None:
        return int(torch.argmax(probs))
    if malignant_threshold is not None and probs[2] >= malignant_threshold:
        return 2
    if probs[0] > (probs[1] if normal_threshold is None else normal_threshold):
        return 0
    return 1 if malignant_threshold is not None else 1 + int(torch.argmax(probs[1:]))


class LesionLabelMapd(MapTransform):
    """One label map that agrees with the predicted class: the lesion (benign + malignant probability above
    ``threshold``) takes the class of :py:func:`decide_class`, and is empty for a normal image or one whose status
    (``scripts.reliability``) is not ``"ok"`` (class index -1).

    Args:
        seg_key: key of segmentation probabilities ``(3, X, Y)``.
        cls_key: key of class probabilities ``(3,)``.
        label_map_key: key to write the ``(1, X, Y)`` uint8 label map to.
        cls_pred_key: key to write the predicted class index to.
        threshold: lesion probability threshold.
        normal_threshold: see :py:func:`decide_class`.
        malignant_threshold: see :py:func:`decide_class`.
        status_key: key of the prediction's status; ``None`` or missing: every image is assessed.
    """

    def __init__(
        self,
        seg_key: str = "pred",
        cls_key: str = "cls",
        label_map_key: str = "seg_pred",
        cls_pred_key: str = "cls_pred",
        threshold: float = 0.5,
        normal_threshold: float | None = None,
        malignant_threshold: float | None = None,
        status_key: str | None = None,
    ) -> None:
        super().__init__(keys=[seg_key, cls_key])
        self.seg_key = seg_key
        self.cls_key = cls_key
        self.label_map_key = label_map_key
        self.cls_pred_key = cls_pred_key
        self.threshold = threshold
        self.normal_threshold = normal_threshold
        self.malignant_threshold = malignant_threshold
        self.status_key = status_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        lesion = (1.0 - d[self.seg_key][:1]) > self.threshold
        assessed = self.status_key is None or d.get(self.status_key, STATUS_OK) == STATUS_OK
        predicted = decide_class(d[self.cls_key], self.normal_threshold, self.malignant_threshold) if assessed else -1
        d[self.label_map_key] = lesion.to(torch.uint8) * max(predicted, 0)
        d[self.cls_pred_key] = torch.tensor(predicted)
        return d


def class_from_label_map(label: torch.Tensor) -> torch.Tensor:
    """Image class of a label map ``(1, X, Y)`` (0-d) or a batch ``(B, 1, X, Y)`` (``(B,)``): its largest value."""
    return label.flatten(start_dim=label.ndim - 3).amax(dim=-1).long()


class MonaiLabelOutputd(MapTransform):
    """Shape an inference result the way MONAI Label (and 3D Slicer through it) expects it.

    MONAI Label saves ``pred`` as the label file, in the input's format, and returns ``result`` as the JSON response.
    This writes the label map as uint8 of the input file's own spatial shape (``(X, Y, 1)`` for a single-slice
    NIfTI/NRRD), asks for a PNG label file for a JPEG input (``result_extension``, unless given), and puts
    the class, its probabilities, the reliability values and the RGB colour of each segment (``LESION_COLOURS``) in
    the JSON (3D Slicer colours segments only from its own table, by name; other clients may apply them).

    Args:
        label_map_key: key of the ``(1, X, Y)`` label map at the input's size.
        cls_key: key of the class probabilities ``(num_classes,)``.
        cls_pred_key: key of the predicted class index (the arg-max of the probabilities if missing; -1: the image
            is not assessable, and the JSON gets class ``None`` and no probabilities).
        image_key: key of the input image, a MetaTensor whose ``spatial_shape`` is the file's shape.
        class_names: class names in index order.
    """

    output_key, result_key, extension_key = "pred", "result", "result_extension"  # MONAI Label's names
    lossy_suffixes = (".jpg", ".jpeg")

    def __init__(
        self,
        label_map_key: str = "seg_pred",
        cls_key: str = "cls",
        cls_pred_key: str = "cls_pred",
        image_key: str = "image",
        class_names: Sequence[str] = CLASS_NAMES,
    ) -> None:
        super().__init__(keys=[label_map_key, cls_key])
        self.label_map_key = label_map_key
        self.cls_key = cls_key
        self.cls_pred_key = cls_pred_key
        self.image_key = image_key
        self.class_names = list(class_names)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        label_map = torch.as_tensor(d[self.label_map_key]).detach().cpu()[0].to(torch.uint8).numpy()
        image = d.get(self.image_key)
        meta = image.meta if isinstance(image, MetaTensor) else {}
        shape = [int(s) for s in np.asarray(meta.get("spatial_shape", [])).reshape(-1)]
        if len(shape) > 2 and tuple(shape[:2]) == label_map.shape:
            label_map = label_map.reshape(label_map.shape + (1,) * (len(shape) - 2))
        probabilities = torch.as_tensor(d[self.cls_key]).detach().float().cpu().reshape(-1).tolist()
        predicted = int(d[self.cls_pred_key]) if self.cls_pred_key in d else int(np.argmax(probabilities))
        if str(meta.get("filename_or_obj", "")).lower().endswith(self.lossy_suffixes) and not d.get(self.extension_key):
            d[self.extension_key] = ".png"  # MONAI Label would save the label map in the input's lossy format
        d[self.output_key] = np.ascontiguousarray(label_map)
        assessed = predicted >= 0
        rounded = {name: round(float(p), 6) for name, p in zip(self.class_names, probabilities)}
        d[self.result_key] = {
            "class": self.class_names[predicted] if assessed else None,
            "class_index": predicted,
            "probabilities": rounded if assessed else {},
            "lesion_pixels": int((label_map > 0).sum()),
            **reliability_fields(d),
            "label_colors": {self.class_names[value]: list(rgb) for value, rgb in LESION_COLOURS.items()},
        }
        return d
