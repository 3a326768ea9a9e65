"""Inferer with mixed precision and channels-last memory layout on any device."""

from __future__ import annotations

import logging
from typing import Any

import torch
from monai.inferers import Inferer
from monai.utils import look_up_option

from .common import as_bool

__all__ = ["AutocastInferer", "OnnxRuntimeNetwork", "native_bf16", "resolve_amp", "select_backend"]

AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
AUTO = "auto"
logger = logging.getLogger(__name__)


def native_bf16(device_type: str) -> bool:
    """Whether ``device_type`` computes bf16 natively, so that bf16 autocast is faster than float32.

    On a CPU without AVX-512 (AVX2 only) oneDNN emulates bf16 and autocast is about 10x slower than float32.

    Args:
        device_type: ``"cpu"`` or ``"cuda"`` (anything else: ``False``).

    Returns:
        ``True`` for a CUDA device that supports bf16 and for a CPU whose oneDNN has bf16 kernels.
    """
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def resolve_amp(amp: bool | str, device_type: str, dtype: str = "bfloat16") -> bool:
    """The bundle's precision rule: autocast where the hardware has it, float32 elsewhere; an explicit choice wins.

    Args:
        amp: ``"auto"``, or a bool / ``"true"`` / ``"false"`` that is taken as given.
        device_type: the device the network runs on.
        dtype: the autocast dtype; ``"auto"`` enables ``"float16"`` on CUDA only.

    Returns:
        Whether to autocast.
    """
    if str(amp).strip().lower() != AUTO:
        return as_bool(amp, "amp")
    if dtype == "float16":
        return device_type == "cuda"
    return native_bf16(device_type)


class AutocastInferer(Inferer):
    """Run the network under ``torch.autocast`` for the inputs' device type and return float32 outputs.

    MONAI's engines only autocast on CUDA; this inferer gives the same speed-up on CPU (bf16), and the
    channels-last layout lets oneDNN and cuDNN pick faster convolution kernels.

    Args:
        enabled: ``"auto"`` (default): autocast where the device computes ``dtype`` natively (CUDA, CPUs with
            AVX-512 bf16 kernels) and float32 elsewhere, decided at the first call from the inputs' device and
            logged once (see :func:`resolve_amp`); ``True`` / ``False`` (or their text) force it on or off.
        dtype: ``"bfloat16"`` or ``"float16"`` (float16 on CUDA only; it needs a gradient scaler to train).
        channels_last: convert inputs to channels-last memory format (convert the network too); text is accepted.
        flip_views: also run the network on the image mirrored along its first spatial axis and return, for a dict
            output, each output mirrored back under ``<key>_flipped`` (the outputs themselves stay those of the
            image as given); ``scripts.reliability`` measures the uncertainty from the two views.
    """

    def __init__(
        self, enabled: bool | str = AUTO, dtype: str = "bfloat16", channels_last: bool | str = True,
        flip_views: bool | str = False,
    ) -> None:  # fmt: skip
        super().__init__()
        self.amp = enabled if str(enabled).strip().lower() == AUTO else as_bool(enabled, "enabled")
        self.dtype_name = dtype
        self.dtype = look_up_option(dtype, AUTOCAST_DTYPES)
        self.channels_last = as_bool(channels_last, "channels_last")
        self.flip_views = as_bool(flip_views, "flip_views")
        self.enabled: bool | None = None if self.amp == AUTO else self.amp

    def _resolve(self, device_type: str) -> bool:
        if self.enabled is None:
            self.enabled = resolve_amp(self.amp, device_type, self.dtype_name)
            logger.info(
                f"precision: {self.dtype_name} autocast ({device_type} computes it natively)"
                if self.enabled
                else f"precision: float32 ({device_type} has no native {self.dtype_name}; --amp True forces autocast)"
            )
        return self.enabled

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> Any:
        """Run ``network(inputs)``.

        Args:
            inputs: batch of images ``(B, C, X, Y)``; a MetaTensor is passed on as a plain tensor, which spares
                the per-operation metadata bookkeeping inside the network.
            network: the model.
            args: further positional arguments of the network.
            kwargs: further keyword arguments of the network.

        Returns:
            The network's outputs (a tensor or a dict of tensors) in float32.
        """
        inputs = inputs.as_tensor() if hasattr(inputs, "as_tensor") else inputs
        if self.channels_last and inputs.ndim == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        enabled = self._resolve(inputs.device.type)
        with torch.autocast(device_type=inputs.device.type, dtype=self.dtype, enabled=enabled):
            outputs = network(inputs, *args, **kwargs)
            flipped = network(inputs.flip(2), *args, **kwargs) if self.flip_views else None
        if not isinstance(outputs, dict):
            return outputs.float()
        outputs = {key: value.float() for key, value in outputs.items()}
        if flipped is not None:
            for key, value in flipped.items():
                spatial = value.ndim == inputs.ndim
                outputs[f"{key}_flipped"] = (value.flip(2) if spatial else value).float()
        return outputs


class OnnxRuntimeNetwork(torch.nn.Module):
    """Run a network through ONNX Runtime's CPU provider, with the network's own inputs and dict outputs.

    At the first call the wrapped network, with the weights it holds then (a ``CheckpointLoader`` has loaded them
    by the time the engine runs), is exported with MONAI's ``convert_to_onnx`` (TorchScript-based exporter,
    opset 17, dynamic batch) and an inference session is built from it in memory. On a CPU without native bf16
    the network alone runs about 1.5x (256 px) to 2.6x (128 px) faster than float32 PyTorch (``bench/``).

    Args:
        network: the network; its outputs must be a tensor or a dict of tensors.
        threads: intra-op threads of the session; default: ``torch.get_num_threads()``.
    """

    def __init__(self, network: torch.nn.Module, threads: int | None = None) -> None:
        super().__init__()
        self.network = network
        self.threads = threads
        self.session: Any = None
        self.output_names: list[str] = []
        self.dict_outputs = True

    def _build(self, inputs: torch.Tensor) -> None:
        import onnxruntime
        from monai.networks.utils import convert_to_onnx

        self.network.eval()
        with torch.no_grad():
            outputs = self.network(inputs)
        self.dict_outputs = isinstance(outputs, dict)
        self.output_names = list(outputs) if self.dict_outputs else ["output"]
        dynamic_axes = {name: {0: "batch"} for name in ["image", *self.output_names]}
        model = convert_to_onnx(
            self.network, (inputs,), input_names=["image"], output_names=self.output_names, opset_version=17,
            dynamic_axes=dynamic_axes, dynamo=False,
        )  # fmt: skip
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self.threads or torch.get_num_threads()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = onnxruntime.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        threads = options.intra_op_num_threads
        logger.info(f"backend: ONNX Runtime {onnxruntime.__version__}, CPU provider, {threads} threads")

    def forward(self, inputs: torch.Tensor) -> Any:
        """Predict a float32 batch ``(B, C, H, W)``; returns the network's outputs as float32 CPU tensors."""
        inputs = inputs.float().cpu().contiguous()
        if self.session is None:
            self._build(inputs)
        outputs = self.session.run(self.output_names, {"image": inputs.numpy()})
        tensors = [torch.from_numpy(output) for output in outputs]
        return dict(zip(self.output_names, tensors)) if self.dict_outputs else tensors[0]


def select_backend(network: torch.nn.Module, backend: str = "torch") -> torch.nn.Module:
    """The network itself for ``"torch"``, or wrapped in :class:`OnnxRuntimeNetwork` for ``"onnxruntime"``.

    Args:
        network: the PyTorch network the checkpoint is loaded into.
        backend: ``"torch"`` or ``"onnxruntime"`` (CPU only; needs the ``onnxruntime`` package).

    Returns:
        What the engine should call.
    """
    backend = look_up_option(str(backend).strip().lower(), ("torch", "onnxruntime"))
    if backend == "torch":
        return network
    try:
        import onnxruntime  # noqa: F401
    except ImportError as error:
        raise ImportError("backend 'onnxruntime' needs the onnxruntime package: pip install onnxruntime") from error
    return OnnxRuntimeNetwork(network)
