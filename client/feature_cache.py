"""On-disk cache of trunk outputs, so the frozen backbone runs once per image.

An entry is keyed by everything its values depend on: the backbone weights'
sha256, the preprocessing, the cut point, the data's fingerprint and the
augmentation view. It is one safetensors file whose metadata repeats the key
and records a sha256 of the tensor bytes; a file whose key, shape or content
hash does not match is stale or corrupt, and is rebuilt, never reused.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from common.files import atomic_path
from common.hashing import sha256_json, sha256_tensor

__all__ = ["FeatureCache", "CacheLookup"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclass
class CacheLookup:
    """Features plus how they were obtained."""

    features: torch.Tensor
    hit: bool
    forwards: int  # images passed through the trunk to produce them (0 on a hit)


class FeatureCache:
    """A folder of feature files; thread- and process-safe through atomic renames."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    @staticmethod
    def key(parts: dict) -> str:
        """The entry name for a key: sha256 of its canonical JSON."""
        return sha256_json({"format": FORMAT_VERSION, **parts})

    def path(self, parts: dict) -> Path:
        """The file an entry lives in."""
        return self.root / f"{self.key(parts)}.safetensors"

    def load(self, parts: dict, num_items: int) -> torch.Tensor | None:
        """The cached features for ``parts``, or None if absent, stale or corrupt."""
        path = self.path(parts)
        if not path.exists():
            return None
        problem = None
        try:
            with safe_open(path, framework="pt") as entry:
                meta = entry.metadata() or {}
                features = entry.get_tensor("features") if "features" in entry.keys() else None
            if meta.get("key") != self.key(parts):
                problem = "its key does not match"
            elif features is None or features.shape[0] != num_items:
                problem = f"it holds {None if features is None else features.shape[0]} items, expected {num_items}"
            elif sha256_tensor(features) != meta.get("sha256"):
                problem = "its content hash does not match (corrupt)"
        except (SafetensorError, OSError, ValueError) as exc:
            problem = f"it cannot be read ({exc})"
        if problem:
            log.warning("feature cache entry %s is stale or corrupt: %s; rebuilding it", path.name, problem)
            path.unlink(missing_ok=True)
            return None
        return features

    def store(self, parts: dict, features: torch.Tensor) -> Path:
        """Write an entry atomically."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.path(parts)
        features = features.contiguous()
        metadata = {
            "key": self.key(parts),
            "sha256": sha256_tensor(features),
            "parts": json.dumps(parts, sort_keys=True),
        }
        with atomic_path(path) as tmp:
            save_file({"features": features}, tmp, metadata=metadata)
        return path

    def get_or_compute(self, parts: dict, num_items: int, compute: Callable[[], torch.Tensor]) -> CacheLookup:
        """Load the entry, or compute, store and return it (counting the forward passes)."""
        cached = self.load(parts, num_items)
        if cached is not None:
            return CacheLookup(cached, hit=True, forwards=0)
        features = compute()
        self.store(parts, features)
        return CacheLookup(features, hit=False, forwards=num_items)
