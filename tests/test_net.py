"""Network shapes, configurability and TorchScript."""

from __future__ import annotations

import pytest
import torch

from scripts.net import ClassificationHead, MultiTaskResUNet, ResidualEncoder

TINY = {"channels": (8, 16, 32), "strides": (2, 2, 2), "decoder_channels": (16, 8, 8)}


@pytest.mark.parametrize("size", [(64, 64), (96, 64)])
def test_output_shapes(size):
    net = MultiTaskResUNet(**TINY).eval()
    outputs = net(torch.randn(2, 1, *size))
    assert set(outputs) == {"pred", "cls"}
    assert outputs["pred"].shape == (2, 3, *size)
    assert outputs["cls"].shape == (2, 3)


def test_encoder_features_follow_strides():
    encoder = ResidualEncoder(2, 1, channels=(4, 8, 16), strides=(1, 2, 2))
    features = encoder(torch.randn(1, 1, 32, 32))
    assert [tuple(f.shape[1:]) for f in features] == [(1, 32, 32), (4, 32, 32), (8, 16, 16), (16, 8, 8)]
    assert encoder.out_channels == [1, 4, 8, 16]


def test_widths_and_depth_are_arguments():
    small = MultiTaskResUNet(**TINY)
    deep = MultiTaskResUNet(channels=(8, 16, 32, 64), strides=(2, 2, 2, 2), decoder_channels=(32, 16, 8, 8))
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert count(deep) > count(small)
    assert len(deep.encoder.stages) == 4
    with pytest.raises(ValueError, match="decoder_channels"):
        MultiTaskResUNet(channels=(8, 16), strides=(2, 2), decoder_channels=(8,))


def test_classification_head_reads_bottleneck():
    head = ClassificationHead(2, in_channels=32, num_classes=3, hidden_channels=16).eval()
    assert head(torch.randn(4, 32, 5, 7)).shape == (4, 3)


def test_torchscript_matches_eager():
    net = MultiTaskResUNet(**TINY).eval()
    scripted = torch.jit.script(net)
    x = torch.randn(1, 1, 64, 64)
    eager, traced = net(x), scripted(x)
    for key in ("pred", "cls"):
        torch.testing.assert_close(traced[key], eager[key])


def test_gradients_reach_shared_encoder_from_both_heads():
    net = MultiTaskResUNet(**TINY)
    first_conv = next(net.encoder.parameters())
    for head in ("pred", "cls"):
        net.zero_grad()
        net(torch.randn(2, 1, 64, 64))[head].sum().backward()
        assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0
