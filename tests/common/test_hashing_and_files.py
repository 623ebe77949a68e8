"""The shared digests and the atomic file write that every run and site file goes through."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.errors import ConfigError
from common.files import atomic_path, ensure_writable_dir, write_json_atomic
from common.hashing import canonical_json, sha256_arrays, sha256_json


def test_a_parameter_set_hashes_the_same_from_torch_and_numpy():
    weight = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    digest = sha256_arrays({"w": weight, "b": torch.zeros(3)})
    assert digest == sha256_arrays({"b": np.zeros(3, np.float32), "w": weight.numpy()})
    assert digest != sha256_arrays({"w": weight.reshape(4, 3), "b": torch.zeros(3)})  # shape counts
    assert digest != sha256_arrays({"w": weight.double(), "b": torch.zeros(3)})  # dtype counts
    assert digest != sha256_arrays({"v": weight, "b": torch.zeros(3)})  # names count


def test_canonical_json_ignores_key_order_and_refuses_nan():
    assert canonical_json({"b": 1, "a": [1.5, "x"]}) == b'{"a":[1.5,"x"],"b":1}'
    assert sha256_json({"a": 1, "b": 2}) == sha256_json({"b": 2, "a": 1})
    with pytest.raises(ValueError):
        canonical_json({"a": float("nan")})


def test_a_failed_write_leaves_the_old_file_and_no_litter(tmp_path):
    target = tmp_path / "summary.json"
    write_json_atomic(target, {"status": "finished"})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half a fi")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == '{\n  "status": "finished"\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_a_folder_that_cannot_be_written_is_named(tmp_path):
    blocker = tmp_path / "runs"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match=r"run-dir '.*runs/x' is not a writable folder \(Not a directory\)"):
        ensure_writable_dir(blocker / "x", "run-dir")
    assert ensure_writable_dir(tmp_path / "new" / "deep", "run-dir").is_dir()
