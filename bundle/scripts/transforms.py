"""Dictionary transforms that MONAI lacks for 2D breast ultrasound.

MONAI loads PNG/JPG/BMP, DICOM, NIfTI and NRRD, but those files reach the network in many shapes (RGB,
RGBA, palette, 16-bit, single-slice volumes, cine DICOM). These transforms reduce all of them to one 2D
channel, build the class-coded label map from BUSI's lesion masks, and turn the two network outputs into one
label map that agrees with the predicted class.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from numbers import Integral

import cv2
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import LoadImage, MapTransform, RandomizableTransform

from .common import CLASS_NAMES
from .reliability import STATUS_OK, reliability_fields

__all__ = [
    "CLASS_NAMES",
    "pil_to_supported_mode",
    "to_single_channel_2d",
    "SingleChannel2Dd",
    "LoadLesionLabeld",
    "SpeckleDenoised",
    "RandSpeckleNoised",
    "RandDepthAttenuationd",
    "decide_class",
    "LesionLabelMapd",
    "class_from_label_map",
    "ClassFromLabeld",
    "MonaiLabelOutputd",
]

LUMINANCE_WEIGHTS = (0.299, 0.587, 0.114)
logger = logging.getLogger(__name__)


def pil_to_supported_mode(image):
    """Convert PIL modes that carry no plain intensities (palette, bilevel, CMYK, LA) to ones that do.

    Used as ``PILReader(converter=...)``; 8-bit, 16-bit, float, RGB and RGBA images pass unchanged.

    Args:
        image: a ``PIL.Image.Image``.

    Returns:
        The image in mode ``L``, ``RGB``, ``RGBA``, ``I;16``, ``I`` or ``F``.
    """
    if image.mode == "P":
        return image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("1", "LA", "La"):
        return image.convert("L")
    if image.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        return image.convert("RGB")
    return image


def to_single_channel_2d(img: torch.Tensor, reduction: str = "luminance", source: str = "") -> torch.Tensor:
    """Reduce a channel-first image to shape ``(1, X, Y)``.

    Singleton spatial axes (single-slice NIfTI/NRRD, one-frame DICOM) are dropped; of a multi-frame (cine)
    image the first frame is kept, with a warning. Colour channels become one: luminance of RGB (alpha is
    ignored), or their maximum for label maps.

    Args:
        img: channel-first image ``(C, X, Y[, Z...])``.
        reduction: ``"luminance"`` for images, ``"max"`` for label maps.
        source: file name for messages.

    Returns:
        A ``(1, X, Y)`` tensor (a MetaTensor stays a MetaTensor).

    Raises:
        ValueError: for a true 3D volume or an unsupported channel count.
    """
    if img.ndim < 3:
        raise ValueError(f"{source}: expected a 2D image, got shape {tuple(img.shape)}.")
    for axis in range(img.ndim - 1, 0, -1):  # drop singleton spatial axes, last first
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
    value = data.get(key)
    if isinstance(value, MetaTensor):
        return str(value.meta.get("filename_or_obj", key))
    return str(value) if isinstance(value, str) else str(key)


class SingleChannel2Dd(MapTransform):
    """Dictionary version of :py:func:`to_single_channel_2d`.

    Args:
        keys: keys of the items to reduce.
        reduction: ``"luminance"`` for images, ``"max"`` for label maps.
        allow_missing_keys: don't raise if a key is missing.
    """

    def __init__(self, keys: KeysCollection, reduction: str = "luminance", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.reduction = reduction

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = to_single_channel_2d(d[key], self.reduction, source=_source(d, key))
        return d


class LoadLesionLabeld(MapTransform):
    """Build the class-coded label map (0 background, 1 benign, 2 malignant) of an image.

    Two kinds of entries are accepted, so that BUSI folders and MONAI Label's image + label pairs share one
    pipeline:

    - ``masks`` (list of mask files) and ``class`` (0, 1, 2): the lesion is the union of the non-zero pixels of
      all masks and gets the class value (a normal image gets an empty map);
    - ``label`` (a label-map file with values 0, 1, 2): loaded as it is.

    The image must already be loaded under ``image_key``; the label map must match its spatial size.

    Args:
        image_key: key of the loaded image.
        label_key: key to write the ``(1, X, Y)`` label map to (and to read a label-map file from).
        masks_key: key of the list of BUSI mask files.
        class_key: key of the class index for ``masks`` entries.
        loader: loader for masks and label maps; by default a ``LoadImage`` with channel-first output.
        num_classes: number of classes, for validating label-map values.
    """

    def __init__(
        self,
        image_key: str = "image",
        label_key: str = "label",
        masks_key: str = "masks",
        class_key: str = "class",
        loader: LoadImage | None = None,
        num_classes: int = len(CLASS_NAMES),
    ) -> None:
        super().__init__(keys=[label_key], allow_missing_keys=True)
        self.image_key = image_key
        self.label_key = label_key
        self.masks_key = masks_key
        self.class_key = class_key
        self.loader = loader or LoadImage(image_only=True, ensure_channel_first=True)
        self.num_classes = num_classes

    def _load_2d(self, path: str) -> torch.Tensor:
        return to_single_channel_2d(self.loader(path), reduction="max", source=path)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        image = d[self.image_key]
        if self.masks_key in d:
            mask_files = d[self.masks_key]
            mask_files = [mask_files] if isinstance(mask_files, str) else list(mask_files)
            if not mask_files:
                raise ValueError(f"{_source(d, self.image_key)}: no mask file listed.")
            class_index = int(d[self.class_key])
            lesion = None
            for path in mask_files:
                mask = self._load_2d(path)
                self._check_size(mask, image, path, d)
                lesion = mask > 0 if lesion is None else lesion | (mask > 0)
            label = lesion.to(torch.uint8) * class_index
            label = MetaTensor(label.as_tensor() if isinstance(label, MetaTensor) else label, meta=dict(mask.meta))
        elif isinstance(d.get(self.label_key), str):
            path = d[self.label_key]
            label = self._load_2d(path)
            self._check_size(label, image, path, d)
            values = torch.unique(label)
            if values.min() < 0 or values.max() >= self.num_classes or not torch.all(values == values.round()):
                raise ValueError(
                    f"{path}: label values must be integers in 0..{self.num_classes - 1} "
                    f"(0 background, 1 benign, 2 malignant), found {values.tolist()[:10]}."
                )
            label = label.to(torch.uint8)
        else:
            raise KeyError(
                f"{_source(d, self.image_key)}: needs '{self.masks_key}' + '{self.class_key}' or '{self.label_key}'."
            )
        d[self.label_key] = label
        return d

    def _check_size(self, mask: torch.Tensor, image: torch.Tensor, path: str, d: Mapping) -> None:
        if tuple(mask.shape[1:]) != tuple(image.shape[1:]):
            raise ValueError(
                f"{path}: mask size {tuple(mask.shape[1:])} differs from image "
                f"{_source(d, self.image_key)} size {tuple(image.shape[1:])}."
            )


class SpeckleDenoised(MapTransform):
    """Reduce ultrasound speckle with an edge-preserving OpenCV filter.

    Args:
        keys: keys of ``(1, X, Y)`` images.
        method: ``"none"``, ``"median"``, ``"bilateral"`` or ``"nlmeans"`` (non-local means).
        kernel_size: median kernel size, or bilateral neighbourhood diameter.
        strength: bilateral sigma (in units of the image's intensity range / 255) or non-local means ``h``.
        allow_missing_keys: don't raise if a key is missing.
    """

    methods = ("none", "median", "bilateral", "nlmeans")

    def __init__(
        self,
        keys: KeysCollection,
        method: str = "median",
        kernel_size: int = 3,
        strength: float = 10.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if method not in self.methods:
            raise ValueError(f"denoising method must be one of {self.methods}, got '{method}'.")
        self.method = method
        self.kernel_size = kernel_size
        self.strength = strength

    def denoise(self, plane: np.ndarray) -> np.ndarray:
        """Denoise one 2D float32 plane."""
        if self.method == "median":
            return cv2.medianBlur(plane, self.kernel_size)
        low, high = float(plane.min()), float(plane.max())
        scale = (high - low) / 255.0 or 1.0
        if self.method == "bilateral":
            return cv2.bilateralFilter(plane, self.kernel_size, self.strength * scale, self.kernel_size / 2)
        as_uint8 = np.clip((plane - low) / scale, 0, 255).astype(np.uint8)
        window = 2 * (self.kernel_size // 2) + 1
        denoised = cv2.fastNlMeansDenoising(as_uint8, None, h=self.strength, templateWindowSize=window)
        return denoised.astype(np.float32) * scale + low

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        if self.method == "none":
            return d
        for key in self.key_iterator(d):
            img = d[key]
            plane = np.ascontiguousarray(img[0].detach().cpu().numpy(), dtype=np.float32)
            denoised = torch.from_numpy(self.denoise(plane))[None]
            d[key] = img.clone().copy_(denoised) if isinstance(img, torch.Tensor) else denoised
        return d


class RandSpeckleNoised(RandomizableTransform, MapTransform):
    """Multiply images by ``1 + std * N(0, 1)`` noise, smoothed to a speckle grain: scanners differ in speckle.

    MONAI's noise transforms add noise; ultrasound speckle scales with the echo intensity.

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
    """Multiply images by a gain that falls (or rises) with depth, ``exp(-a * depth)``: scanners and their
    time-gain compensation settings differ in how the echo decays from the skin downwards.

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


def decide_class(
    probs: torch.Tensor, normal_threshold: float | None = None, malignant_threshold: float | None = None
) -> int:
    """The predicted class of one image from its class probabilities ``(normal, benign, malignant)``.

    Without thresholds: the arg-max. ``malignant_threshold`` calls an image malignant whenever ``p(malignant)``
    reaches it (an operating point for high cancer sensitivity); ``normal_threshold`` calls an image normal only
    where ``p(normal)`` exceeds it. An image that is neither is benign or malignant, whichever is likelier (benign
    where ``malignant_threshold`` is set, since malignant was not reached).

    Args:
        probs: class probabilities ``(3,)``.
        normal_threshold: ``None`` or a probability.
        malignant_threshold: ``None`` or a probability.

    Returns:
        The class index.
    """
    probs = probs.flatten().float()
    if normal_threshold is None and malignant_threshold is None:
        return int(torch.argmax(probs))
    if malignant_threshold is not None and probs[2] >= malignant_threshold:
        return 2
    if normal_threshold is None:
        is_normal = bool(probs[0] >= probs[1:].max()) if malignant_threshold is None else bool(probs[0] > probs[1])
    else:
        is_normal = bool(probs[0] > normal_threshold)
    if is_normal:
        return 0
    return 1 if malignant_threshold is not None else 1 + int(torch.argmax(probs[1:]))


class LesionLabelMapd(MapTransform):
    """Turn segmentation and class probabilities into one label map that agrees with the predicted class.

    A pixel is lesion where the lesion probability (benign + malignant channels) exceeds ``threshold``; all
    lesion pixels take the predicted image class (:func:`decide_class`), and an image classified normal gets an
    empty map. An image whose status (``status_key``, see ``scripts.reliability``) is not ``"ok"`` gets an empty
    map and no class (index -1).

    Args:
        seg_key: key of segmentation probabilities ``(3, X, Y)``.
        cls_key: key of class probabilities ``(3,)``.
        label_map_key: key to write the ``(1, X, Y)`` uint8 label map to.
        cls_pred_key: key to write the predicted class index to.
        threshold: lesion probability threshold.
        normal_threshold: see :func:`decide_class`; ``None``: arg-max.
        malignant_threshold: see :func:`decide_class`; ``None``: arg-max.
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
        seg, cls = d[self.seg_key], d[self.cls_key]
        lesion = (1.0 - seg[:1]) > self.threshold
        if self.status_key is not None and d.get(self.status_key, STATUS_OK) != STATUS_OK:
            d[self.label_map_key] = torch.zeros_like(lesion, dtype=torch.uint8)
            d[self.cls_pred_key] = torch.tensor(-1)
            return d
        predicted_class = decide_class(cls, self.normal_threshold, self.malignant_threshold)
        d[self.label_map_key] = (lesion.to(torch.uint8) * predicted_class).to(torch.uint8)
        d[self.cls_pred_key] = torch.tensor(predicted_class)
        return d


def class_from_label_map(label: torch.Tensor) -> torch.Tensor:
    """Image class of a label map: its largest value (normal maps are empty).

    Args:
        label: label map ``(1, X, Y)`` or batch ``(B, 1, X, Y)``.

    Returns:
        Class index tensor: 0-d for one map, ``(B,)`` for a batch.
    """
    if label.ndim == 4:
        return label.flatten(1).amax(dim=1).long()
    return label.max().long()


class ClassFromLabeld(MapTransform):
    """Write the image class derived from a label map (see :py:func:`class_from_label_map`).

    Args:
        keys: key of the label map.
        output_key: key to write the class index to.
    """

    def __init__(self, keys: KeysCollection = "label", output_key: str = "cls_label") -> None:
        super().__init__(keys)
        self.output_key = output_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.output_key] = class_from_label_map(torch.as_tensor(d[key]))
        return d


def _rgb_colours(colours: Mapping[str, Sequence[int]], names: Sequence[str]) -> dict[str, list[int]]:
    """Check colours by class name and return them as plain lists (JSON values).

    Args:
        colours: RGB colour of each class, three integers in 0-255.
        names: the known class names.

    Returns:
        ``{name: [r, g, b]}`` in the order given.

    Raises:
        ValueError: for a name not in ``names`` or a colour that is not three integers in 0-255.
    """
    checked = {}
    for name, colour in colours.items():
        if name not in names:
            raise ValueError(f"label_colors: '{name}' is not a class name {list(names)}.")
        rgb = list(colour)
        is_byte = [isinstance(c, Integral) and not isinstance(c, bool) and 0 <= c <= 255 for c in rgb]
        if len(rgb) != 3 or not all(is_byte):
            raise ValueError(f"label_colors['{name}']: expected 3 integers in 0-255 (RGB), got {rgb}.")
        checked[name] = [int(c) for c in rgb]
    return checked


class MonaiLabelOutputd(MapTransform):
    """Shape an inference result the way MONAI Label (and the viewers it serves, such as 3D Slicer) expects it.

    MONAI Label's bundle inference saves ``output_key`` as the label file, in the input's format and, when the array
    has more than two axes, with the input's geometry; it returns ``result_key`` as the JSON of the response. This
    writes the ``(1, X, Y)`` label map as a uint8 array of the input file's own spatial shape (``(X, Y)`` for
    PNG/JPG, ``(X, Y, 1)`` for a single-slice NIfTI/NRRD as 3D Slicer saves them) and the class with its
    probabilities as plain JSON values. For a JPEG input it asks for a PNG label file (``result_extension``):
    MONAI Label would otherwise save the label map in the input's lossy format. The bundle's own inference
    workflow reads none of these keys.

    MONAI Label adds ``label_names`` (segment name to label value) to the JSON itself; a 2D single-channel label
    map carries no colours, and 3D Slicer's MONAI Label module colours segments only from its own anatomy colour
    table, by name. ``label_colors`` puts the bundle's segment colours in the JSON, for clients that apply them.

    Args:
        label_map_key: key of the ``(1, X, Y)`` label map at the input's size.
        cls_key: key of the class probabilities ``(num_classes,)``.
        cls_pred_key: key of the predicted class index (the arg-max of the probabilities if missing).
        image_key: key of the input image, a MetaTensor whose ``spatial_shape`` is the file's shape.
        output_key: key to write the label map to (MONAI Label's ``pred``).
        result_key: key to write the JSON result to (MONAI Label's ``result``).
        class_names: class names in index order.
        extension_key: key of MONAI Label's label file extension, set for JPEG inputs unless already given.
        label_colors: RGB colour (three integers 0-255) of each segment, by class name, returned in the JSON as
            ``label_colors``; ``None`` leaves it out.
        reliability_keys: keys copied into the JSON when present (``scripts.reliability``: ``status``, its
            reason, ``uncertainty``); an image that is not assessable gets ``class`` ``None``, index -1 and no
            probabilities.

    Raises:
        ValueError: when ``label_colors`` names an unknown class or a colour is not three integers in 0-255.
    """

    lossy_suffixes = (".jpg", ".jpeg")

    def __init__(
        self,
        label_map_key: str = "seg_pred",
        cls_key: str = "cls",
        cls_pred_key: str = "cls_pred",
        image_key: str = "image",
        output_key: str = "pred",
        result_key: str = "result",
        class_names: tuple[str, ...] | list[str] = CLASS_NAMES,
        extension_key: str = "result_extension",
        label_colors: dict[str, Sequence[int]] | None = None,
        reliability_keys: Sequence[str] = ("status", "status_reason", "uncertainty"),
    ) -> None:
        super().__init__(keys=[label_map_key, cls_key])
        self.label_map_key = label_map_key
        self.cls_key = cls_key
        self.cls_pred_key = cls_pred_key
        self.image_key = image_key
        self.output_key = output_key
        self.result_key = result_key
        self.class_names = list(class_names)
        self.extension_key = extension_key
        self.label_colors = None if label_colors is None else _rgb_colours(label_colors, self.class_names)
        self.reliability_keys = list(reliability_keys)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        label_map = torch.as_tensor(d[self.label_map_key]).detach().cpu()[0].to(torch.uint8).numpy()
        image = d.get(self.image_key)
        shape = image.meta.get("spatial_shape") if isinstance(image, MetaTensor) else None
        shape = [int(s) for s in np.asarray(shape).reshape(-1)] if shape is not None else []
        if len(shape) > 2 and tuple(shape[:2]) == label_map.shape:
            label_map = label_map.reshape(label_map.shape + (1,) * (len(shape) - 2))
        probabilities = torch.as_tensor(d[self.cls_key]).detach().float().cpu().reshape(-1).tolist()
        predicted = int(d[self.cls_pred_key]) if self.cls_pred_key in d else int(np.argmax(probabilities))
        source = str(image.meta.get("filename_or_obj", "")) if isinstance(image, MetaTensor) else ""
        if source.lower().endswith(self.lossy_suffixes) and not d.get(self.extension_key):
            d[self.extension_key] = ".png"
        d[self.output_key] = np.ascontiguousarray(label_map)
        d[self.result_key] = {
            "class": self.class_names[predicted] if predicted >= 0 else None,
            "class_index": predicted,
            "probabilities": {name: round(float(p), 6) for name, p in zip(self.class_names, probabilities)}
            if predicted >= 0 else {},
            "lesion_pixels": int((label_map > 0).sum()),
        }
        d[self.result_key].update(reliability_fields(d, self.reliability_keys))
        if self.label_colors is not None:
            d[self.result_key]["label_colors"] = {name: list(rgb) for name, rgb in self.label_colors.items()}
        return d
