"""Where a site computes: the device it names, and the precision of feature extraction.

``device='auto'`` means the first CUDA GPU when torch sees one, else the CPU;
naming ``cuda`` on a machine without one is an error that says so, never a
silent fall-back. A GPU extracts in true float32 by default: images resized
on the CPU as a CPU site does, TF32 off, so its features share cache entries
with the CPU's. ``precision='float16'`` is the fast path: images resized on
the GPU and the trunk under float16 autocast, within
:data:`MIXED_PRECISION_TOLERANCE` of float32 and cached apart. Both
tolerances are checked by a test that runs where CUDA is. bfloat16 is not offered: on an H100 its
features were up to 18% away from float32's (relative L2 per image, MobileNetV2
at 64 px). The CPU always extracts in float32.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from common.errors import ConfigError

__all__ = ["PRECISIONS", "GPU_FLOAT32_TOLERANCE", "MIXED_PRECISION_TOLERANCE", "Extraction", "resolve_device", "resolve_extraction"]

PRECISIONS = ("auto", "float32", "float16")

# The largest relative L2 distance, per image, between a GPU's features and
# the CPU's float32 ones that the CUDA test accepts.
GPU_FLOAT32_TOLERANCE = 1e-3
MIXED_PRECISION_TOLERANCE = {"float16": 6e-2}


def resolve_device(requested: str = "auto") -> torch.device:
    """The torch device for a site's ``device`` setting (``auto``, ``cpu``, ``cuda``, ``cuda:N``)."""
    requested = requested.strip().lower()
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cpu":
        return torch.device("cpu")
    if not requested.startswith("cuda"):
        raise ConfigError(f"device {requested!r}: choose auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        build = f"torch {torch.__version__}" + (f" built for CUDA {torch.version.cuda}" if torch.version.cuda else " without CUDA")
        raise ConfigError(
            f"device {requested!r}, but torch sees no CUDA GPU ({build}); check the driver with nvidia-smi, "
            "or set device='auto' to use the CPU when no GPU is there"
        )
    device = torch.device(requested)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"device {requested!r}, but torch sees {torch.cuda.device_count()} CUDA GPU(s) "
            f"(cuda:0 to cuda:{torch.cuda.device_count() - 1}); name one of those"
        )
    return device


@dataclass(frozen=True)
class Extraction:
    """How the frozen trunk runs: on which device, and in which precision."""

    device: torch.device = torch.device("cpu")
    precision: str = "float32"  # float32, or the autocast dtype's name on CUDA

    @property
    def mixed(self) -> bool:
        """True when the trunk runs under autocast."""
        return self.precision != "float32"

    def numerics(self) -> contextlib.AbstractContextManager:
        """The context one batch runs in: autocast when mixed, TF32 off for float32 on a GPU."""
        if self.mixed:
            return torch.autocast(device_type=self.device.type, dtype=getattr(torch, self.precision))
        if self.device.type == "cuda":
            stack = contextlib.ExitStack()
            cudnn = torch.backends.cudnn
            stack.enter_context(cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic, allow_tf32=False))
            stack.callback(torch.set_float32_matmul_precision, torch.get_float32_matmul_precision())
            torch.set_float32_matmul_precision("highest")  # no TF32 in linear layers either (vgg16, vit_b_16)
            return stack
        return contextlib.nullcontext()

    def describe(self) -> str:
        """``cpu float32``, ``cuda:0 float16 autocast`` and the like, for logs."""
        return f"{self.device} {self.precision}" + (" autocast" if self.mixed else "")


def resolve_extraction(device: str = "auto", precision: str = "auto") -> Extraction:
    """The device and precision a site's trunk runs in; mixed precision only on CUDA."""
    where = resolve_device(device)
    precision = precision.strip().lower()
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        precision = "float32"
    elif precision != "float32" and where.type != "cuda":
        raise ConfigError(f"precision {precision!r} needs a CUDA device (this site runs on {where}); use float32 or auto")
    return Extraction(where, precision)
