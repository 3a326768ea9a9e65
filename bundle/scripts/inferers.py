"""Inferer with mixed precision and channels-last memory layout on any device, and the ONNX Runtime back-end."""

from __future__ import annotations

import copy
import logging
import math
import time
from typing import Any

import torch
from monai.inferers import Inferer
from monai.networks.utils import convert_to_onnx
from monai.utils import look_up_option, optional_import

from .common import as_bool

__all__ = [
    "AutocastInferer", "OnnxRuntimeNetwork", "autocast_speedup", "decide_autocast", "native_bf16", "resolve_amp",
    "select_backend",
]

onnxruntime, has_onnxruntime = optional_import("onnxruntime")
AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
AUTO = "auto"
logger = logging.getLogger(__name__)


def native_bf16(device_type: str) -> bool:
    """Whether ``device_type`` computes bf16 natively (a CPU without AVX-512 emulates it, 10x slower than float32)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def resolve_amp(amp: bool | str, device_type: str, dtype: str = "bfloat16") -> bool:
    """Whether to autocast: for ``amp="auto"`` where ``device_type`` computes ``dtype`` natively (float16: CUDA
    only), otherwise as ``amp`` (a bool or its text) says."""
    if str(amp).strip().lower() != AUTO:
        return as_bool(amp, "amp")
    return device_type == "cuda" if dtype == "float16" else native_bf16(device_type)


def _total(outputs: Any) -> torch.Tensor:
    tensors = outputs.values() if isinstance(outputs, dict) else [outputs]
    return sum(value.float().mean() for value in tensors if torch.is_floating_point(value))


def autocast_speedup(
    network: torch.nn.Module, inputs: torch.Tensor, dtype: str = "bfloat16", backward: bool = False, repeats: int = 2
) -> float:
    """How many times faster a pass of ``network`` on ``inputs`` runs on the CPU under ``dtype`` autocast than in
    float32. Native bf16 does not make bf16 faster: with the same AVX-512 BF16 flags, a training step of the bundle's
    network takes 1.4-1.6x as long under bf16 autocast as in float32 on a 2-core Intel Xeon, and as long on an AMD
    EPYC (``bench/results/precision``).

    A copy of the network is timed, with the random number generators restored afterwards, so that the network's
    weights, gradients and normalisation statistics and the random draws of a training stay as they are.

    Args:
        network: the network, in the mode (train or eval) of the passes that will follow.
        inputs: a batch as the network will get it.
        dtype: ``"bfloat16"`` (``"float16"`` is timed as well, though CPUs rarely compute it natively).
        backward: time forward and backward passes (a training step without the optimiser), else forward passes
            without gradients.
        repeats: timed passes per precision, after one untimed pass each (oneDNN builds its kernels then); the
            fastest counts.

    Returns:
        float32 time divided by autocast time: above 1, autocast is faster.
    """
    probe = copy.deepcopy(network)
    fastest = {False: math.inf, True: math.inf}
    with torch.random.fork_rng(devices=[]), torch.set_grad_enabled(backward):
        for repeat in range(repeats + 1):
            for enabled in (False, True):  # alternating, so that other load on the machine slows both alike
                start = time.perf_counter()
                with torch.autocast("cpu", dtype=look_up_option(dtype, AUTOCAST_DTYPES), enabled=enabled):
                    outputs = probe(inputs)
                if backward:
                    _total(outputs).backward()
                    probe.zero_grad(set_to_none=True)
                if repeat:
                    fastest[enabled] = min(fastest[enabled], time.perf_counter() - start)
    return fastest[False] / fastest[True]


def decide_autocast(
    amp: bool | str, network: torch.nn.Module, inputs: torch.Tensor, dtype: str = "bfloat16",
    min_speedup: float = 1.1,
) -> tuple[bool, str]:  # fmt: skip
    """Whether to autocast ``network`` on ``inputs``, and why (for the log). ``amp="auto"``: on CUDA where it
    computes ``dtype`` natively; on a CPU only where it computes ``dtype`` natively and :func:`autocast_speedup`
    (forward and backward passes when gradients are enabled, as in training) finds autocast at least
    ``min_speedup`` times faster than float32. Otherwise as ``amp`` (a bool or its text) says.

    Args:
        amp: ``"auto"``, or a bool or its text.
        network: the network the passes will run (an :class:`OnnxRuntimeNetwork` never autocasts).
        inputs: the first batch.
        dtype: ``"bfloat16"`` or ``"float16"``.
        min_speedup: the speed-up autocast must show on a CPU; the margin keeps float32, the exact choice, where the
            two run about as fast, so that timing noise does not flip the decision between runs.

    Returns:
        ``(autocast, reason)``.
    """
    device = inputs.device.type
    if str(amp).strip().lower() != AUTO:
        enabled = as_bool(amp, "amp")
        return enabled, f"{dtype} autocast forced" if enabled else "float32 (amp off)"
    if isinstance(network, OnnxRuntimeNetwork):
        return False, "float32 (ONNX Runtime back-end)"
    if not resolve_amp(AUTO, device, dtype):
        return False, f"float32 ({device} has no native {dtype}; --amp True forces autocast)"
    if device != "cpu":
        return True, f"{dtype} autocast ({device} computes it natively)"
    if isinstance(network, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
        network = network.module  # a copy of the wrapper would join the other ranks' collectives
    backward = torch.is_grad_enabled()
    speedup = autocast_speedup(network, inputs, dtype, backward=backward)
    what = "training step" if backward else "forward pass"
    if speedup >= min_speedup:
        return True, f"{dtype} autocast (native on this CPU; a {what} timed {speedup:.2f}x faster than float32)"
    return False, (
        f"float32 (this CPU computes {dtype} natively, but a {what} timed {speedup:.2f}x the speed of float32, "
        f"below {min_speedup}x; --amp True forces autocast)"
    )


class AutocastInferer(Inferer):
    """Run the network under ``torch.autocast`` for the inputs' device type (MONAI's engines autocast on CUDA only)
    with channels-last inputs, and return float32 outputs.

    Args:
        enabled: ``"auto"``: :func:`decide_autocast` for the network and the first inputs (on a CPU with native
            bf16, a timed pass of each precision), decided and logged at the first call; ``True`` / ``False`` (or
            their text) force autocast on or off.
        dtype: ``"bfloat16"`` or ``"float16"`` (CUDA only; it needs a gradient scaler to train).
        channels_last: convert inputs to channels-last memory format (convert the network too); text is accepted.
        flip_views: also run the network on the image mirrored along its first spatial axis and add each output of
            a dict, mirrored back, as ``<key>_flipped`` (``scripts.reliability`` compares the views).
        min_speedup: see :func:`decide_autocast`.
    """

    def __init__(
        self, enabled: bool | str = AUTO, dtype: str = "bfloat16", channels_last: bool | str = True,
        flip_views: bool | str = False, min_speedup: float = 1.1,
    ) -> None:  # fmt: skip
        super().__init__()
        self.enabled: bool | None = None if str(enabled).strip().lower() == AUTO else as_bool(enabled, "enabled")
        self.dtype_name = dtype
        self.dtype = look_up_option(dtype, AUTOCAST_DTYPES)
        self.channels_last = as_bool(channels_last, "channels_last")
        self.flip_views = as_bool(flip_views, "flip_views")
        self.min_speedup = min_speedup

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> Any:
        """``network(inputs, *args, **kwargs)`` in float32 (a tensor or a dict of tensors)."""
        inputs = inputs.as_tensor() if hasattr(inputs, "as_tensor") else inputs  # no per-operation metadata work
        if self.channels_last and inputs.ndim == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        device = inputs.device.type
        if self.enabled is None:  # "auto", decided once
            self.enabled, reason = decide_autocast(AUTO, network, inputs, self.dtype_name, self.min_speedup)
            logger.info(f"precision: {reason}")
        with torch.autocast(device_type=device, dtype=self.dtype, enabled=self.enabled):
            outputs = network(inputs, *args, **kwargs)
            flipped = network(inputs.flip(2), *args, **kwargs) if self.flip_views else {}
        if not isinstance(outputs, dict):
            return outputs.float()
        outputs = {key: value.float() for key, value in outputs.items()}
        for key, value in flipped.items():  # mirrored back, where the output is spatial
            outputs[f"{key}_flipped"] = (value.flip(2) if value.ndim == inputs.ndim else value).float()
        return outputs


class OnnxRuntimeNetwork(torch.nn.Module):
    """Run a network through ONNX Runtime's CPU provider (1.5x to 2.6x faster than float32 PyTorch without native
    bf16, ``bench/``), exported by MONAI's ``convert_to_onnx`` at the first call, with the weights loaded by then.

    Args:
        network: the network; its outputs must be a tensor or a dict of tensors. The session runs with
            ``torch.get_num_threads()`` intra-op threads.
    """

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network
        self.session: Any = None  # built at the first call

    def _build(self, inputs: torch.Tensor) -> None:
        self.network.eval()
        # exported in float32 even when called under bf16 autocast (AutocastInferer on a CPU with native bf16):
        # traced autocast casts would put bf16 convolutions in the graph, which ONNX Runtime's CPU provider rejects
        with torch.no_grad(), torch.autocast(inputs.device.type, enabled=False):
            outputs = self.network(inputs)
            self.dict_outputs = isinstance(outputs, dict)
            self.output_names = list(outputs) if self.dict_outputs else ["output"]
            dynamic_axes = {name: {0: "batch"} for name in ["image", *self.output_names]}
            model = convert_to_onnx(
                self.network, (inputs,), input_names=["image"], output_names=self.output_names, opset_version=17,
                dynamic_axes=dynamic_axes, dynamo=False,
            )  # fmt: skip
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = onnxruntime.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])
        logger.info(f"backend: ONNX Runtime {onnxruntime.__version__}, CPU, {options.intra_op_num_threads} threads")

    def forward(self, inputs: torch.Tensor) -> Any:
        """The network's outputs for a ``(B, C, H, W)`` batch, as float32 CPU tensors."""
        inputs = inputs.float().cpu().contiguous()
        if self.session is None:
            self._build(inputs)
        outputs = self.session.run(self.output_names, {"image": inputs.numpy()})
        tensors = [torch.from_numpy(output) for output in outputs]
        return dict(zip(self.output_names, tensors)) if self.dict_outputs else tensors[0]


def select_backend(network: torch.nn.Module, backend: str = "torch") -> torch.nn.Module:
    """The network for ``backend="torch"``, or wrapped in :class:`OnnxRuntimeNetwork` for ``"onnxruntime"``."""
    backend = look_up_option(str(backend).strip().lower(), ("torch", "onnxruntime"))
    if backend == "torch":
        return network
    if not has_onnxruntime:
        raise ImportError("backend 'onnxruntime' needs the onnxruntime package: pip install onnxruntime")
    return OnnxRuntimeNetwork(network)
