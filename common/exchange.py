"""The head-only parameter exchange: only trainable parameters travel.

The server sends the trainable part as an ArrayRecord and checks every reply
against the layout it expects; a site loads what it receives only after the
same check. Both sides use :func:`validate_arrays`.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import nn

from common.errors import ReplyError
from common.model import trainable_parameters

__all__ = ["MAX_ABS_PARAMETER", "Layout", "trainable_layout", "to_arrayrecord", "validate_arrays", "load_arrayrecord", "arrays_nbytes"]

Layout = dict[str, tuple[tuple[int, ...], str]]

# No trained head or open block holds a parameter this large; a value beyond it
# is a malformed or hostile update, refused before it can dominate an average.
MAX_ABS_PARAMETER = 1e4


def trainable_layout(module: nn.Module) -> Layout:
    """Name -> (shape, numpy dtype name) of every trainable parameter."""
    return {
        name: (tuple(p.shape), str(p.detach().cpu().numpy().dtype))
        for name, p in trainable_parameters(module)
    }


def to_arrayrecord(module: nn.Module) -> ArrayRecord:
    """The trainable parameters of ``module`` as an ArrayRecord (nothing else)."""
    return ArrayRecord(
        {name: Array(p.detach().cpu().numpy().copy()) for name, p in trainable_parameters(module)}
    )


def validate_arrays(record: ArrayRecord, layout: Layout) -> list[str]:
    """Every way ``record`` differs from ``layout``: keys, shapes, dtypes, non-finite or huge values."""
    problems: list[str] = []
    received = set(record.keys())
    expected = set(layout)
    for name in sorted(expected - received):
        problems.append(f"missing array '{name}'")
    for name in sorted(received - expected):
        problems.append(f"unexpected array '{name}'")
    for name in sorted(expected & received):
        shape, dtype = layout[name]
        array = record[name]
        if tuple(array.shape) != shape:
            problems.append(f"'{name}' has shape {tuple(array.shape)}, expected {shape}")
            continue
        if array.dtype != dtype:
            problems.append(f"'{name}' has dtype {array.dtype}, expected {dtype}")
            continue
        try:
            values = array.numpy()
        except (ValueError, TypeError, OSError, EOFError) as exc:  # malformed bytes from a peer
            problems.append(f"'{name}' cannot be decoded: {exc}")
            continue
        if tuple(values.shape) != shape or values.dtype != np.dtype(dtype):
            problems.append(f"'{name}' decodes to {values.dtype}{tuple(values.shape)}, expected {dtype}{shape}")
            continue
        finite = np.isfinite(values)
        if not finite.all():
            problems.append(f"'{name}' has {int(values.size - finite.sum())} non-finite values (NaN or inf)")
        elif values.size and float(np.abs(values).max()) > MAX_ABS_PARAMETER:
            problems.append(
                f"'{name}' has values up to {float(np.abs(values).max()):.3g}, beyond the sane magnitude {MAX_ABS_PARAMETER:g}"
            )
    return problems


def load_arrayrecord(module: nn.Module, record: ArrayRecord) -> None:
    """Copy ``record`` into the trainable parameters of ``module`` after validating it."""
    problems = validate_arrays(record, trainable_layout(module))
    if problems:
        raise ReplyError("received parameters do not fit this model: " + "; ".join(problems))
    params = dict(trainable_parameters(module))
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(torch.from_numpy(record[name].numpy()))


def arrays_nbytes(record: ArrayRecord) -> int:
    """Bytes of parameter data in ``record`` (the payload, without framing)."""
    return int(sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in record.values()))
