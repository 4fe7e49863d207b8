"""CPU inference compression: INT8 dynamic quantization of Linear layers, static (post-training, calibrated)
INT8 of convolutional trunks, a bf16 path, a before/after report.

INT8 uses ``torch.ao.quantization.quantize_dynamic`` (int8 weights per tensor, activations quantized on the
fly). Weights are packed for the oneDNN engine when torch has it: on CPUs with VNNI / AMX-INT8 its int8
GEMM is markedly faster than fbgemm's (``python -m benchmarks.quantization --engine fbgemm`` measures the
other one). The packing engine travels with the packed weights, so the process-wide engine setting is
restored afterwards. torch 2.14 marks ``torch.ao.quantization`` deprecated in favour of torchao, which is
not a dependency here; the eager and FX APIs still work and their deprecation warnings are silenced in
:func:`quantize_int8` and :func:`quantize_static_int8` only.

Static INT8 (:func:`quantize_static_int8`) is what makes a CNN faster: convolutions (fused with their
batch norm and ReLU) run on int8 activations whose ranges were observed on calibration batches; dynamic
quantization only covers Linear layers.
"""
from __future__ import annotations

import contextlib
import copy
import io
import statistics
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "Bf16Autocast",
    "QuantReport",
    "compare_models",
    "default_int8_engine",
    "latency_ms",
    "model_size_mb",
    "output_diff",
    "quantize_int8",
    "quantize_static_int8",
    "to_bf16",
]


def quantize_int8(
    model: nn.Module,
    layer_types: Sequence[type[nn.Module]] = (nn.Linear,),
    per_channel: bool = False,
    inplace: bool = False,
    engine: str | None = None,
) -> nn.Module:
    """INT8 dynamic quantization of ``layer_types`` (default every ``nn.Linear``) for CPU inference.

    Weights are int8 (per tensor, or per output channel with ``per_channel``); activations are quantized
    per batch at run time. ``engine`` picks the kernels the weights are packed for (default
    :func:`default_int8_engine`). Returns a quantized copy unless ``inplace``.
    """
    engine = engine or default_int8_engine()
    available = torch.backends.quantized.supported_engines
    if engine not in available or engine == "none":
        raise RuntimeError(f"quantized engine {engine!r} not available (have {available})")
    with warnings.catch_warnings(), _quantized_engine(engine):
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao")
        warnings.filterwarnings("ignore", message=r".*quantize_per_(tensor|channel).*deprecated")
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated")
        from torch.ao.quantization import (
            default_dynamic_qconfig,
            per_channel_dynamic_qconfig,
            quantize_dynamic,
        )

        qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
        spec = {t: qconfig for t in layer_types}
        return quantize_dynamic(model.eval(), spec, dtype=torch.qint8, inplace=inplace)


class _MethodAsForward(nn.Module):
    """``module.<method>`` as ``forward``, so that FX traces that method (e.g. ``forward_features``)."""

    def __init__(self, module: nn.Module, method: str) -> None:
        super().__init__()
        self.module, self.method = module, method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self.module, self.method)(x)


def quantize_static_int8(
    module: nn.Module,
    calibration: Iterable[torch.Tensor],
    method: str = "forward",
    engine: str = "x86",
) -> nn.Module:
    """Post-training static INT8 of a symbolically traceable module (FX graph mode): Conv+BN(+ReLU) fused,
    int8 per-channel weights, int8 activations with ranges observed on the ``calibration`` batches.

    ``method`` picks what is traced (e.g. a timm trunk's ``"forward_features"``); the returned module's
    ``forward`` computes it on fp32 inputs and returns fp32 outputs. A copy: ``module`` is left unchanged.
    """
    available = torch.backends.quantized.supported_engines
    if engine not in available:
        raise RuntimeError(f"quantized engine {engine!r} not available (have {available})")
    batches = list(calibration)
    if not batches:
        raise ValueError("static quantization needs at least one calibration batch")
    target = copy.deepcopy(module).eval()
    if method != "forward":
        target = _MethodAsForward(target, method)
    with warnings.catch_warnings(), _quantized_engine(engine), torch.inference_mode(False), torch.no_grad():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao")
        warnings.filterwarnings("ignore", message=r".*deprecated.*")
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        prepared = prepare_fx(target, get_default_qconfig_mapping(engine), example_inputs=(batches[0],))
        for batch in batches:
            prepared(batch)
        return convert_fx(prepared)


def default_int8_engine() -> str:
    """``"onednn"`` when this torch build has it (fastest int8 GEMM on x86 with VNNI / AMX), else the current
    engine (``fbgemm`` / ``x86`` / ``qnnpack`` on ARM)."""
    engines = torch.backends.quantized.supported_engines
    return "onednn" if "onednn" in engines else torch.backends.quantized.engine


@contextlib.contextmanager
def _quantized_engine(engine: str):  # noqa: ANN202 - generator context manager
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


class Bf16Autocast(nn.Module):
    """Runs the wrapped fp32 model under CPU bf16 autocast and returns fp32 tensors."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = self.model(*args, **kwargs)
        return _map_tensors(out, lambda t: t.float() if t.is_floating_point() else t)


def to_bf16(model: nn.Module, mode: str = "cast") -> nn.Module:
    """bf16 inference copy: ``"cast"`` converts the weights (half the size; feed bf16 inputs or let the
    first layer cast), ``"autocast"`` keeps fp32 weights and wraps the model in :class:`Bf16Autocast`."""
    model = copy.deepcopy(model).eval()
    if mode == "cast":
        return _CastInputs(model.to(torch.bfloat16), torch.bfloat16)
    if mode == "autocast":
        return Bf16Autocast(model)
    raise ValueError(f"mode must be 'cast' or 'autocast', got {mode!r}")


class _CastInputs(nn.Module):
    """Casts floating inputs to ``dtype`` and floating outputs back to fp32."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        def cast(t: torch.Tensor) -> torch.Tensor:
            return t.to(self.dtype) if t.is_floating_point() else t

        out = self.model(*_map_tensors(args, cast), **_map_tensors(kwargs, cast))
        return _map_tensors(out, lambda t: t.float() if t.is_floating_point() else t)


def _map_tensors(obj: Any, fn: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple | list):
        return type(obj)(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def _tensors(obj: Any) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    _map_tensors(obj, out.append)
    return out


def model_size_mb(model: nn.Module) -> float:
    """Size of the serialized ``state_dict`` in MiB (in-memory ``torch.save``: quantized packed weights
    cannot be written as safetensors; nothing is written to disk)."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell() / 2**20


@dataclass
class QuantReport:
    """Before / after comparison. ``max_rel_diff`` = max |ref - cand| / max |ref| over all output tensors."""

    size_mb_before: float
    size_mb_after: float
    latency_ms_before: float
    latency_ms_after: float
    speedup: float
    max_abs_diff: float
    max_rel_diff: float

    @property
    def size_ratio(self) -> float:
        return self.size_mb_before / self.size_mb_after

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "size_ratio": self.size_ratio}


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple | list):
        return model(*inputs)
    return model(inputs)


@torch.inference_mode()
def latency_ms(model: nn.Module, example_inputs: Any, repeats: int = 10, warmup: int = 2) -> float:
    """Median wall-clock milliseconds of one forward pass."""
    for _ in range(warmup):
        _call(model, example_inputs)
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        _call(model, example_inputs)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@torch.inference_mode()
def compare_models(
    reference: nn.Module, candidate: nn.Module, example_inputs: Any, repeats: int = 10, warmup: int = 2
) -> QuantReport:
    """Size, median latency and output difference of ``candidate`` against ``reference`` (both eval mode).

    ``example_inputs``: a tensor, a tuple of positional inputs or a dict of keyword inputs.
    """
    max_abs, max_rel = output_diff(reference, candidate, example_inputs)
    lat_before = latency_ms(reference, example_inputs, repeats, warmup)
    lat_after = latency_ms(candidate, example_inputs, repeats, warmup)
    return QuantReport(
        size_mb_before=model_size_mb(reference),
        size_mb_after=model_size_mb(candidate),
        latency_ms_before=lat_before,
        latency_ms_after=lat_after,
        speedup=lat_before / lat_after,
        max_abs_diff=max_abs,
        max_rel_diff=max_rel,
    )


@torch.inference_mode()
def output_diff(reference: nn.Module, candidate: nn.Module, example_inputs: Any) -> tuple[float, float]:
    """(max |ref - cand|, that divided by max |ref|) over all output tensors, both models in eval mode."""
    reference.eval()
    candidate.eval()
    ref = [t.float() for t in _tensors(_call(reference, example_inputs))]
    cand = [t.float() for t in _tensors(_call(candidate, example_inputs))]
    if len(ref) != len(cand) or any(a.shape != b.shape for a, b in zip(ref, cand, strict=True)):
        raise ValueError("reference and candidate outputs differ in structure")
    max_abs = max(float((a - b).abs().max()) for a, b in zip(ref, cand, strict=True))
    scale = max(float(a.abs().max()) for a in ref)
    return max_abs, max_abs / max(scale, 1e-12)
