"""Prediction back-ends of the multi-task network, as benchmarked and as tested (tests/test_inference_backends.py).

Every predictor takes a float32 batch ``(B, 1, H, W)`` and returns ``{"pred": (B, 3, H, W), "cls": (B, 3)}`` float32
logits, like the eager network.

- ``eager``: PyTorch float32, ``torch.inference_mode``;
- ``eager_channels_last``: ``scripts.inferers.AutocastInferer`` with autocast off: float32, channels-last;
- ``eager_bf16``: the same with bf16 autocast forced on (``--amp True``);
- ``default``: the bundle's default (``amp: auto``): bf16 autocast where the CPU computes bf16 natively and a timed
  forward pass of each precision finds it at least 1.1x faster, else float32; channels-last;
- ``torchscript``: ``torch.jit.script`` of the network, frozen and ``optimize_for_inference`` (BatchNorm folded
  into the convolutions), float32;
- ``torchscript_bf16``: the same, of a bfloat16 channels-last copy of the network (weights and activations in
  bf16, no autocast; inputs cast to bf16, outputs back to float32);
- ``onnxruntime``: ``torch.onnx.export(dynamo=False)`` (opset 17, dynamic batch) run by ONNX Runtime's CPU
  provider with all graph optimisations, float32;
- ``compiled`` (optional, not in :data:`BACKENDS`): ``torch.compile`` with the inductor back-end, float32.
"""

from __future__ import annotations

import copy
import io
import os
import sys
import warnings
from collections.abc import Callable

import torch

BUNDLE_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundle")
if BUNDLE_ROOT not in sys.path:
    sys.path.insert(0, BUNDLE_ROOT)

from scripts.inferers import AutocastInferer  # noqa: E402

BACKENDS = ("eager", "eager_channels_last", "eager_bf16", "default", "torchscript", "torchscript_bf16", "onnxruntime")
# torch.compile (inductor) builds C++ kernels at the first call of each input shape: minutes on a small CPU
OPTIONAL_BACKENDS = ("compiled",)
OUTPUTS = ("pred", "cls")
Predictor = Callable[[torch.Tensor], dict]


def export_onnx(network: torch.nn.Module, example: torch.Tensor) -> bytes:
    """The network as ONNX (TorchScript-based exporter, opset 17, dynamic batch axis)."""
    stream = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            network, (example,), stream, dynamo=False, input_names=["image"], output_names=list(OUTPUTS),
            dynamic_axes={"image": {0: "batch"}, "pred": {0: "batch"}, "cls": {0: "batch"}}, opset_version=17,
        )  # fmt: skip
    return stream.getvalue()


def make_predictor(name: str, network: torch.nn.Module, example: torch.Tensor, threads: int | None = None) -> Predictor:
    """Build one back-end from an eval-mode float32 network (the network itself is not modified).

    Args:
        name: one of :data:`BACKENDS`.
        network: the network (copied where a back-end changes it).
        example: an input batch for tracing / export, ``(B, 1, H, W)``.
        threads: intra-op threads of ONNX Runtime; default: ``torch.get_num_threads()``.
    """
    network = network.eval()
    if name == "eager":

        def predict(x: torch.Tensor) -> dict:
            with torch.inference_mode():
                return network(x)

        return predict
    if name in ("eager_channels_last", "eager_bf16", "default"):
        channels_last = copy.deepcopy(network).to(memory_format=torch.channels_last)
        amp = {"eager_channels_last": False, "eager_bf16": True, "default": "auto"}[name]
        inferer = AutocastInferer(enabled=amp, dtype="bfloat16", channels_last=True)

        def predict(x: torch.Tensor) -> dict:
            with torch.inference_mode():
                return inferer(x, channels_last)

        predict.inferer = inferer  # what "auto" chose, after the first call: predict.inferer.enabled
        return predict
    if name == "torchscript":
        scripted = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.script(copy.deepcopy(network))))

        def predict(x: torch.Tensor) -> dict:
            with torch.inference_mode():
                return scripted(x)

        return predict
    if name == "torchscript_bf16":
        bf16 = copy.deepcopy(network).to(dtype=torch.bfloat16, memory_format=torch.channels_last)
        scripted = torch.jit.freeze(torch.jit.script(bf16))

        def predict(x: torch.Tensor) -> dict:
            with torch.inference_mode():
                x = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
                return {key: value.float() for key, value in scripted(x).items()}

        return predict
    if name == "onnxruntime":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        session = onnxruntime.InferenceSession(
            export_onnx(network, example), options, providers=["CPUExecutionProvider"]
        )

        def predict(x: torch.Tensor) -> dict:
            pred, cls = session.run(None, {"image": x.numpy()})
            return {"pred": torch.from_numpy(pred), "cls": torch.from_numpy(cls)}

        return predict
    if name == "compiled":
        compiled = torch.compile(copy.deepcopy(network), backend="inductor", dynamic=False)

        def predict(x: torch.Tensor) -> dict:
            with torch.inference_mode():
                return compiled(x)

        return predict
    raise ValueError(f"back-end must be one of {BACKENDS + OPTIONAL_BACKENDS}, got '{name}'.")
