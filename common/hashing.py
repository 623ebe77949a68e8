"""Hashing used on both sides: canonical JSON, tensors, parameter sets, files.

One definition of each digest, so a site, the server and an auditor who
recompute a hash from the same content always get the same hex string.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch is not imported for hashing: the CLI starts without it
    import torch

__all__ = ["canonical_json", "sha256_json", "sha256_tensor", "sha256_arrays", "sha256_safetensors", "sha256_file"]


def canonical_json(obj: Any) -> bytes:
    """``obj`` as canonical JSON bytes: sorted keys, no spaces, UTF-8, NaN refused."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def sha256_json(obj: Any) -> str:
    """Hex sha256 of ``obj``'s canonical JSON."""
    return hashlib.sha256(canonical_json(obj)).hexdigest()


def _as_numpy(value: torch.Tensor | np.ndarray) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch.Tensor
        return value.detach().cpu().contiguous().numpy()
    return np.ascontiguousarray(value)


def sha256_tensor(tensor: torch.Tensor | np.ndarray) -> str:
    """Hex sha256 of one tensor's raw bytes (C order)."""
    return hashlib.sha256(_as_numpy(tensor).tobytes()).hexdigest()


def sha256_arrays(arrays: Mapping[str, torch.Tensor | np.ndarray]) -> str:
    """Hex sha256 over a named set of arrays: names, shapes, dtypes and bytes, in name order.

    Torch tensors and numpy arrays of the same values give the same digest, so
    a state dict, an ArrayRecord's arrays and a safetensors file agree.
    """
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = _as_numpy(arrays[name])
        digest.update(name.encode())
        digest.update(str(tuple(array.shape)).encode())
        digest.update(array.dtype.str.encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def sha256_safetensors(path: str | os.PathLike) -> str | None:
    """:func:`sha256_arrays` of the tensors in a ``.safetensors`` file (a saved head); None if there is none."""
    if not Path(path).is_file():
        return None
    from safetensors.numpy import load_file

    return sha256_arrays(load_file(str(path)))


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (memoised on path, size and mtime)."""
    st = os.stat(path)
    return _sha256_file_cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=64)
def _sha256_file_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
