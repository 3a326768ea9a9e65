"""Prediction back-ends agree with eager PyTorch on both outputs (segmentation and class logits).

Tiny network in eval mode with non-trivial BatchNorm statistics; batch 1 and 3 (the exports have a dynamic batch axis).

Tolerances (float32 everywhere except the mixed-precision row):

- TorchScript (``torch.jit.script``): the same kernels as eager, atol = rtol = 1e-5;
- TorchScript frozen for inference (``torch.jit.freeze`` + ``optimize_for_inference``, BatchNorm folded into the
  convolutions, as benchmarked in ``bench/``): atol = rtol = 1e-4 (measured: about 3e-6);
- ONNX Runtime (``torch.onnx.export(dynamo=False)``, opset 17, CPU provider): atol = rtol = 1e-4 (measured: about
  3e-6);
- bf16 autocast + channels-last (``scripts.inferers.AutocastInferer``, the bundle's default on CPU): softmax
  probabilities of both outputs within 0.05 of float32 at every pixel and 0.005 on average (measured: 0.011 and
  below 0.001; bf16 keeps 8 significant bits), and the same predicted classes.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
import warnings

import numpy as np
import pytest
import torch

from scripts.common import as_bool
from scripts.inferers import AutocastInferer, OnnxRuntimeNetwork, decide_autocast, select_backend
from scripts.net import MultiTaskResUNet

from .conftest import REPO_ROOT

TINY = {"channels": (8, 16, 32, 64), "strides": (2, 2, 2, 2), "decoder_channels": (32, 16, 8, 8)}
SIZE = (64, 64)
OUTPUTS = ("pred", "cls")


@pytest.fixture(scope="module")
def network() -> torch.nn.Module:
    torch.manual_seed(0)
    net = MultiTaskResUNet(**TINY)
    with torch.no_grad():  # BatchNorm affine parameters and running statistics away from their initial values
        for module in net.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
                module.momentum = None  # running statistics: cumulative average of the batches below
        net.train()
        for _ in range(4):
            net(torch.randn(4, 1, *SIZE))
    return net.eval()


def inputs(batch: int) -> torch.Tensor:
    return torch.randn(batch, 1, *SIZE, generator=torch.Generator().manual_seed(batch))


def eager(network: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return network(x)


def onnx_bytes(network: torch.nn.Module) -> bytes:
    stream = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-exporter notices and tracer warnings about shape checks
        torch.onnx.export(
            network, (inputs(2),), stream, dynamo=False, input_names=["image"], output_names=list(OUTPUTS),
            dynamic_axes={"image": {0: "batch"}, "pred": {0: "batch"}, "cls": {0: "batch"}}, opset_version=17,
        )  # fmt: skip
    return stream.getvalue()


@pytest.mark.parametrize("batch", [1, 3])
def test_torchscript_matches_eager(network, batch):
    scripted = torch.jit.script(network)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    x = inputs(batch)
    expected = eager(network, x)
    with torch.no_grad():
        found = loaded(x)
    assert list(found) == list(OUTPUTS)
    for key in OUTPUTS:
        assert found[key].shape == expected[key].shape
        torch.testing.assert_close(found[key], expected[key], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch", [1, 3])
def test_frozen_torchscript_matches_eager(network, batch):
    frozen = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.script(network)))
    x = inputs(batch)
    expected = eager(network, x)
    with torch.no_grad():
        found = frozen(x)
    for key in OUTPUTS:
        torch.testing.assert_close(found[key], expected[key], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("batch", [1, 3])
def test_onnxruntime_matches_eager(network, batch):
    onnxruntime = pytest.importorskip("onnxruntime")
    session = onnxruntime.InferenceSession(onnx_bytes(network), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == list(OUTPUTS)
    x = inputs(batch)
    expected = eager(network, x)
    pred, cls = session.run(None, {"image": x.numpy()})
    assert pred.shape == (batch, 3, *SIZE) and cls.shape == (batch, 3)
    np.testing.assert_allclose(pred, expected["pred"].numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(cls, expected["cls"].numpy(), atol=1e-4, rtol=1e-4)


def test_select_backend(network):
    assert select_backend(network, "torch") is network
    with pytest.raises(ValueError):
        select_backend(network, "tensorrt")


def test_onnxruntime_backend_exports_the_weights_loaded_after_wrapping(network):
    """The bundle's ``backend: onnxruntime``: the CheckpointLoader fills the network after the config built the
    wrapper, so the export must happen at the first call, with the loaded weights and every output."""
    pytest.importorskip("onnxruntime")
    fresh = MultiTaskResUNet(**TINY, return_embedding=True)
    wrapped = select_backend(fresh, "onnxruntime")
    assert isinstance(wrapped, OnnxRuntimeNetwork)
    fresh.load_state_dict(network.state_dict())
    x = inputs(2)
    expected = eager(fresh.eval(), x)
    inferer = AutocastInferer(enabled=False, channels_last=True, flip_views=True)
    with torch.no_grad():
        found = inferer(x, wrapped.eval())
        reference = inferer(x, fresh)
    assert set(found) == set(reference) == {"pred", "cls", "embedding", "pred_flipped", "cls_flipped",
                                            "embedding_flipped"}  # fmt: skip
    for key in found:
        torch.testing.assert_close(found[key], reference[key], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(found["cls"], expected["cls"], atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        assert wrapped(inputs(3))["pred"].shape == (3, 3, *SIZE)  # dynamic batch axis


def test_onnxruntime_backend_under_bf16_autocast_runs_float32(network):
    """``amp`` resolves to bf16 autocast on CPUs with native bf16: the export inside it must still be float32
    (traced autocast casts gave bf16 convolutions that ONNX Runtime's CPU provider rejects)."""
    pytest.importorskip("onnxruntime")
    wrapped = select_backend(network, "onnxruntime")
    x = inputs(2)
    with torch.no_grad():
        found = AutocastInferer(enabled=True, dtype="bfloat16", channels_last=True)(x, wrapped)
    for key in OUTPUTS:  # ONNX Runtime computed it in float32: as eager float32, not within bf16's tolerance only
        torch.testing.assert_close(found[key], eager(network, x)[key], atol=1e-4, rtol=1e-4)


def test_bf16_channels_last_inferer_is_close_to_float32(network):
    x = inputs(3)
    expected = eager(network, x)
    channels_last = MultiTaskResUNet(**TINY).eval().to(memory_format=torch.channels_last)
    channels_last.load_state_dict(network.state_dict())
    with torch.no_grad():
        found = AutocastInferer(enabled=True, dtype="bfloat16", channels_last=True)(x, channels_last)
    for key in OUTPUTS:
        assert found[key].dtype == torch.float32
        difference = (found[key].softmax(1) - expected[key].softmax(1)).abs()
        assert difference.max() < 0.05 and difference.mean() < 0.005, (key, float(difference.max()))
    assert torch.equal(found["cls"].argmax(1), expected["cls"].argmax(1))


def test_benchmark_backends_are_the_tested_ones(monkeypatch, network):
    """``bench/backends.py`` builds the same back-ends; what the benchmark times matches eager PyTorch."""
    import scripts.inferers as inferers

    monkeypatch.setattr(inferers, "autocast_speedup", lambda *args, **kwargs: 0.5)  # "auto" keeps float32
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    try:
        import backends
    finally:
        sys.path.remove(str(REPO_ROOT / "bench"))
    x = inputs(3)
    expected = eager(network, x)
    for name in backends.BACKENDS:
        predict = backends.make_predictor(name, network, example=x[:1])
        found = predict(x)
        for key in OUTPUTS:
            assert found[key].dtype == torch.float32 and found[key].shape == expected[key].shape
            # bf16 tolerance, as above; the default stays float32 here (autocast timed slower)
            if name.endswith("bf16"):
                difference = (found[key].softmax(1) - expected[key].softmax(1)).abs()
                assert difference.max() < 0.05 and difference.mean() < 0.005, (name, key, float(difference.max()))
            else:
                torch.testing.assert_close(found[key], expected[key], atol=1e-4, rtol=1e-4, msg=f"{name} {key}")


def test_inferer_switches_given_as_text():
    """``--amp false`` arrives from the command line as the text "false": it must switch autocast off."""
    inferer = AutocastInferer(enabled="false", channels_last="False")
    assert inferer.enabled is False and inferer.channels_last is False
    assert AutocastInferer(enabled="true").enabled is True
    with pytest.raises(ValueError, match="enabled"):
        AutocastInferer(enabled="maybe")


@pytest.mark.parametrize("native, speedup", [(True, 2.0), (True, 0.7), (True, 1.05), (False, 2.0)])
def test_auto_precision_follows_the_hardware(monkeypatch, caplog, network, native, speedup):
    """``amp="auto"`` (the configs' default) autocasts only where bf16 is native and a timed pass finds it at least
    1.1x faster than float32; the CPU without native bf16 is not timed; the choice is logged once."""
    import scripts.inferers as inferers

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    timed = []
    monkeypatch.setattr(inferers, "autocast_speedup", lambda *args, **kwargs: timed.append(kwargs) or speedup)
    assert inferers.native_bf16("cpu") is native
    assert inferers.resolve_amp("auto", "cpu") is native
    assert inferers.resolve_amp("AUTO", "meta") is False
    assert inferers.resolve_amp("auto", "cpu", dtype="float16") is False, "float16 autocast only on CUDA"
    for explicit in (True, "true", False, "False"):  # an explicit choice wins over the hardware and the timing
        assert inferers.resolve_amp(explicit, "cpu") is as_bool(explicit)
        assert decide_autocast(explicit, network, inputs(1))[0] is as_bool(explicit)
    assert not timed, "explicit choices are not timed"
    expected = native and speedup >= 1.1
    seen = []
    monkeypatch.setattr(torch, "autocast", lambda **kwargs: seen.append(kwargs) or contextlib.nullcontext())
    inferer = AutocastInferer(channels_last=False)
    assert inferer.enabled is None, "decided at the first call, from the inputs' device"
    with caplog.at_level(logging.INFO, logger=inferers.__name__), torch.no_grad():
        for _ in range(3):
            inferer(inputs(1), network)
    assert inferer.enabled is expected
    assert [kwargs["enabled"] for kwargs in seen] == [expected] * 3
    assert seen[0]["device_type"] == "cpu" and seen[0]["dtype"] == torch.bfloat16
    assert timed == ([{"backward": False}] if native else []), "timed once, forward only without gradients"
    messages = [r.getMessage() for r in caplog.records if r.name == inferers.__name__]
    assert len(messages) == 1 and ("bfloat16 autocast" if expected else "float32") in messages[0], messages
    if native:
        assert f"{speedup:.2f}x" in messages[0], messages
    assert AutocastInferer(enabled="false").enabled is False


def test_autocast_timing_leaves_the_training_untouched(network):
    """Timing a training step on the first batch must not change the network, its gradients or the random draws
    that follow; it times forward and backward where gradients are enabled."""
    from scripts.inferers import autocast_speedup

    network.train()
    try:
        state = {key: value.clone() for key, value in network.state_dict().items()}
        rng = torch.random.get_rng_state()
        speedup = autocast_speedup(network, inputs(2), backward=True, repeats=1)
        assert np.isfinite(speedup) and speedup > 0
        assert network.training, "the mode stays as it was"
        assert all(torch.equal(state[key], value) for key, value in network.state_dict().items()), "weights, stats"
        assert all(parameter.grad is None for parameter in network.parameters())
        assert torch.equal(torch.random.get_rng_state(), rng)
    finally:
        network.eval()


def test_onnxruntime_backend_is_not_autocast(network):
    enabled, reason = decide_autocast("auto", OnnxRuntimeNetwork(network), inputs(1))
    assert enabled is False and "ONNX Runtime" in reason


def test_configs_choose_precision_by_hardware():
    for name in ("train.json", "inference.json"):
        config = json.loads((REPO_ROOT / "bundle" / "configs" / name).read_text())
        assert config["amp"] == "auto" and config["inferer"]["enabled"] == "@amp", name
