"""How far to trust one prediction: whether the input can be assessed, how uncertain the answer is, and which image
regions drove the class (Grad-CAM). Their parameters are fitted on the validation split by ``tools/calibrate.py``."""

from __future__ import annotations

import copy
import hashlib
import logging
import math
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import torch
from monai.config import KeysCollection
from monai.metrics import compute_dice
from monai.transforms import MapTransform
from monai.visualize import GradCAM

from .common import as_bool

__all__ = [
    "STATUS_OK", "NOT_ASSESSABLE", "STATUS_KEY", "REASON_KEY", "UNCERTAINTY_KEY", "DISTANCE_KEY", "RELIABILITY_KEYS",
    "image_problem", "InputCheckd", "normalized_entropy", "mahalanobis_distance", "mask_disagreement",
    "reliability_fields", "PredictionReliabilityd", "ClassActivationMapd",
]

STATUS_OK = "ok"
NOT_ASSESSABLE = "not assessable"
# keys PredictionReliabilityd writes; RELIABILITY_KEYS go into the result JSON and the predictions table
STATUS_KEY, REASON_KEY, UNCERTAINTY_KEY, DISTANCE_KEY = "status", "status_reason", "uncertainty", "embedding_distance"
RELIABILITY_KEYS = (STATUS_KEY, REASON_KEY, UNCERTAINTY_KEY)
_MAX_QUANTILE_ELEMENTS = 1 << 20
logger = logging.getLogger(__name__)


def image_problem(image: torch.Tensor, min_size: int = 32, min_contrast: float = 0.05) -> str:
    """Why an image shows nothing the model can assess (too small, near-uniform), or ``""`` when it passes.

    Args:
        image: ``(C, X, Y)`` image as loaded, before any intensity scaling.
        min_size: smallest accepted side in pixels.
        min_contrast: smallest accepted ``(p99 - p1) / max(|p99|, |p1|)``: scale free, for 8-bit, 16-bit and float
            images alike (an ultrasound frame is near 1, a blank one 0).
    """
    spatial = tuple(int(s) for s in image.shape[1:])
    if min(spatial) < min_size:
        return f"image smaller than {min_size} pixels {spatial}"
    values = torch.as_tensor(image).detach().float().flatten()
    values = values[:: max(1, values.numel() // _MAX_QUANTILE_ELEMENTS)]
    low, high = torch.quantile(values, torch.tensor([0.01, 0.99])).tolist()
    contrast = (high - low) / max(abs(high), abs(low), 1e-12)
    if contrast < min_contrast:
        return f"near-uniform image (contrast {contrast:.3f})"
    return ""


class InputCheckd(MapTransform):
    """Write why the loaded image cannot be assessed (:py:func:`image_problem`) to ``output_key``; place it right
    after loading (a ``Lambdad`` would do, but ``Invertd`` would then try to invert it)."""

    def __init__(
        self, keys: KeysCollection = "image", output_key: str = "input_problem", min_size: int = 32,
        min_contrast: float = 0.05,
    ) -> None:  # fmt: skip
        super().__init__(keys)
        self.output_key = output_key
        self.min_size = min_size
        self.min_contrast = min_contrast

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.output_key] = image_problem(d[key], self.min_size, self.min_contrast)
        return d


def normalized_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy of probabilities ``(..., C)`` over the last axis divided by ``log(C)``: 0 certain, 1 uniform."""
    p = probs.float().clamp_min(1e-12)
    return -(p * p.log()).sum(dim=-1) / math.log(probs.shape[-1])


def mahalanobis_distance(embedding: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Mahalanobis distance of embeddings ``(..., D)`` to a Gaussian given by its mean and precision matrix."""
    centred = embedding.float() - mean
    return torch.einsum("...i,ij,...j->...", centred, precision, centred).clamp_min(0).sqrt()


def _load_statistics(path: str | None, checkpoint: str | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The training embeddings' mean and precision, where fitted for the weights in ``checkpoint``."""
    if path is None or not Path(path).is_file():
        if path is not None:
            logger.warning(f"no embedding statistics at {path}: inputs unlike the training images are not flagged")
        return None
    stats = torch.load(path, map_location="cpu", weights_only=True)
    if checkpoint is not None and Path(checkpoint).is_file() and stats.get("ckpt_sha256"):
        if hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest() != stats["ckpt_sha256"]:
            logger.warning(f"{path} was fitted for other weights than {checkpoint}: inputs unlike the training "
                           "images are not flagged until tools/calibrate.py is run for these weights")
            return None
    return stats["mean"].float(), stats["precision"].float()


def mask_disagreement(lesion: torch.Tensor, lesion_other: torch.Tensor, threshold: float = 0.5) -> float:
    """1 - Dice between the lesion masks (lesion probability above ``threshold``) of two views; 0 when both are
    empty (MONAI's ``compute_dice`` with ``ignore_empty=False``)."""
    masks = [(torch.as_tensor(m) > threshold).reshape(1, 1, -1).float() for m in (lesion, lesion_other)]
    return 1.0 - float(compute_dice(*masks, include_background=True, ignore_empty=False))


def reliability_fields(item: Mapping[Hashable, object], keys: Sequence[str] = RELIABILITY_KEYS) -> dict[str, object]:
    """The reliability values of one item as plain JSON/CSV values (floats rounded), for the keys it holds."""
    return {key: round(float(item[key]), 6) if isinstance(item[key], float) else item[key]
            for key in keys if key in item}  # fmt: skip


class PredictionReliabilityd(MapTransform):
    """Per image: an uncertainty score, the embedding's distance to the training images, and a status, written to
    ``UNCERTAINTY_KEY``, ``DISTANCE_KEY`` (NaN without statistics), ``STATUS_KEY`` and ``REASON_KEY``.

    The uncertainty is the normalized entropy of the class probabilities; with the mirrored view's outputs
    (``<key>_flipped`` of ``AutocastInferer(flip_views=True)``) it is the mean of the entropy of the two views' mean
    probabilities and their lesion-mask disagreement, the score that ranked mistakes best on validation. The status
    is ``"not assessable"`` (with a reason) when the input check found a problem or the embedding lies farther than
    ``max_distance`` from the training images, ``"ok"`` otherwise.

    Args:
        cls_key: key of the class probabilities ``(C,)``.
        seg_key: key of the segmentation probabilities ``(3, X, Y)`` (channel 0: background).
        embedding_key: key of the image's embedding ``(D,)``; missing: no distance.
        problem_key: key of :py:class:`InputCheckd`'s reason; missing: the input passes.
        embedding_stats: ``.pt`` file of the training embeddings' ``mean``, ``precision`` and the ``ckpt_sha256`` of
            their weights (``tools/calibrate.py``); ``None`` or missing: no distance.
        max_distance: Mahalanobis distance above which an image is not assessable; ``None``: never.
        checkpoint: the weights in use; statistics fitted for other weights are not used (with a warning).
    """

    def __init__(
        self,
        cls_key: str = "cls",
        seg_key: str = "pred",
        embedding_key: str = "embedding",
        problem_key: str = "input_problem",
        embedding_stats: str | None = None,
        max_distance: float | None = None,
        checkpoint: str | None = None,
    ) -> None:
        super().__init__(keys=cls_key)
        self.cls_key = cls_key
        self.seg_key = seg_key
        self.embedding_key = embedding_key
        self.problem_key = problem_key
        self.stats = _load_statistics(embedding_stats, checkpoint)
        self.max_distance = max_distance

    def uncertainty(self, d: Mapping[Hashable, object]) -> float:
        """The uncertainty score of one item (see the class description)."""
        probs = torch.as_tensor(d[self.cls_key]).detach().float().cpu().reshape(-1)
        flipped_cls, flipped_seg = f"{self.cls_key}_flipped", f"{self.seg_key}_flipped"
        if flipped_cls not in d or flipped_seg not in d:
            return float(normalized_entropy(probs))
        mean = (probs + torch.as_tensor(d[flipped_cls]).detach().float().cpu().reshape(-1)) / 2
        seg, seg_flipped = (torch.as_tensor(d[k]).detach().float().cpu() for k in (self.seg_key, flipped_seg))
        return float((normalized_entropy(mean) + mask_disagreement(1.0 - seg[0], 1.0 - seg_flipped[0])) / 2)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        d[UNCERTAINTY_KEY] = self.uncertainty(d)
        distance = float("nan")
        if self.stats is not None and self.embedding_key in d:
            embedding = torch.as_tensor(d[self.embedding_key]).detach().float().cpu().reshape(-1)
            distance = float(mahalanobis_distance(embedding, *self.stats))
        d[DISTANCE_KEY] = distance
        reason = str(d.get(self.problem_key) or "")
        if not reason and self.max_distance is not None and distance > self.max_distance:
            reason = f"unlike the training images (embedding distance {distance:.1f} > {self.max_distance:.1f})"
        d[STATUS_KEY] = NOT_ASSESSABLE if reason else STATUS_OK
        d[REASON_KEY] = reason
        return d


class _ClassLogits(torch.nn.Module):
    """The class logits of a multi-task network alone, the single output MONAI's CAM classes expect."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)["cls"]


class ClassActivationMapd(MapTransform):
    """MONAI's ``GradCAM`` of the predicted class on the last encoder stage (the feature map the classification
    head pools), resized to a reference image's size; images without a class (``cls_pred`` < 0) get none.

    It runs on a copy of the network (Grad-CAM hooks it), made at the first call and given the network's weights at
    every call (a checkpoint may be loaded later), with autograd on inside the engine's no-grad mode.

    Args:
        network: the multi-task network (its encoder has ``stages``); the PyTorch one also with another back-end.
        image_key: the preprocessed image, as the network saw it, ``(C, H, W)``.
        cls_pred_key: predicted class index.
        reference_key: image whose spatial size the map takes.
        output_key: where the map goes, ``(1, X, Y)`` in [0, 1].
        enabled: compute the map (text is accepted); off, the data pass through.
        layer: the network's module to explain (in every member of a ``MultiTaskEnsemble``, whose map is the mean of
            the members' maps); default: the last encoder stage.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        image_key: str = "image",
        cls_pred_key: str = "cls_pred",
        reference_key: str = "display_image",
        output_key: str = "cam",
        enabled: bool | str = False,
        layer: str | None = None,
    ) -> None:
        super().__init__(keys=image_key)
        self.network = network
        self.image_key = image_key
        self.cls_pred_key = cls_pred_key
        self.reference_key = reference_key
        self.output_key = output_key
        self.enabled = as_bool(enabled, "enabled")
        self.layer = layer
        self._copy: torch.nn.Module | None = None
        self._cam: GradCAM | None = None

    def _gradcam(self) -> GradCAM:
        if self._cam is None:
            self._copy = copy.deepcopy(self.network).float()
            self._cam = GradCAM(nn_module=_ClassLogits(self._copy), target_layers=self._layers(self._copy))
        else:
            self._copy.load_state_dict(self.network.state_dict())
        return self._cam

    def _layers(self, network: torch.nn.Module) -> list[str]:
        """The explained layer, once per member of a ``MultiTaskEnsemble``, named inside ``_ClassLogits``."""
        members = list(getattr(network, "members", [network]))
        prefixes = ["network."] if members == [network] else [f"network.members.{i}." for i in range(len(members))]
        default = f"encoder.stages.{len(members[0].encoder.stages) - 1}"
        return [prefix + (self.layer or default) for prefix in prefixes]

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        predicted = int(torch.as_tensor(d[self.cls_pred_key]).reshape(-1)[0]) if self.enabled else -1
        if predicted < 0:
            return d
        with torch.inference_mode(False), torch.enable_grad():  # the engine predicts without autograd
            cam = self._gradcam()
            image = torch.as_tensor(d[self.image_key]).detach().float().clone()
            image = image.to(next(self.network.parameters()).device)[None].requires_grad_(True)
            # an ensemble's map is the mean of its members' maps (each explains the ensemble's class score)
            layers = range(len(cam.nn_module.target_layers))
            heat = torch.stack([cam(image, class_idx=predicted, layer_idx=i)[0].detach() for i in layers]).mean(0)
        size = torch.as_tensor(d[self.reference_key]).shape[1:]
        heat = torch.nn.functional.interpolate(heat[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
        d[self.output_key] = heat.clamp(0.0, 1.0).cpu()
        return d
