"""Resolving, verifying and staging backbone weights.

Weights come through torchvision's own API: its weights enum names the
release file, torch's hub cache (``$TORCH_HOME/hub/checkpoints``) is looked in
first, and a download is tried only when no file is there. An air-gapped site
stages the file into that cache (``fedhead weights stage FILE``) or names it
with ``weights-file``. Every file is checked against the sha256 prefix that
torchvision puts in its release name, and identified by its full sha256.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

import torch

from common.backbones import BackboneSpec, get_backbone_spec, list_backbones
from common.errors import WeightsError
from common.files import atomic_path
from common.hashing import sha256_file

__all__ = [
    "hub_checkpoint_dir",
    "expected_filename",
    "resolve_weights_file",
    "verified_weights_file",
    "read_weights_file",
    "stage_weights_file",
]

log = logging.getLogger(__name__)

_HASH_IN_NAME = re.compile(r"-([0-9a-f]{6,64})\.\w+$")
_CACHE_FILE_MODE = 0o666  # what open() creates a file with, before the umask: torch's downloads are made so


def _umask() -> int:
    """The process's umask: from /proc/self/status where Linux gives it (reading it leaves it alone), else by
    os.umask, which can only read it by setting it, and so sets it straight back."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def hub_checkpoint_dir() -> Path:
    """Where torchvision looks for downloaded weights (``torch.hub.get_dir()/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def expected_filename(spec: BackboneSpec) -> str:
    """The release file name torchvision uses for ``spec``'s weights."""
    return spec.release_file


def _check_hash_prefix(path: Path, release_name: str) -> str:
    digest = sha256_file(path)
    match = _HASH_IN_NAME.search(release_name)
    if match and not digest.startswith(match.group(1)):
        raise WeightsError(
            f"weights file {path} has sha256 {digest[:12]}..., but the release "
            f"'{release_name}' has sha256 starting {match.group(1)}; the file is "
            f"corrupt or another release. Stage the right file with "
            f"`fedhead weights stage FILE`."
        )
    return digest


def resolve_weights_file(spec: BackboneSpec, weights_file: str = "", *, allow_download: bool = True) -> Path:
    """Find the verified weights file for ``spec``.

    Order: an explicit ``weights_file``; torch's hub cache under the release
    name; a download through torchvision (where the network allows).
    """
    return verified_weights_file(spec, weights_file, allow_download=allow_download)[0]


def verified_weights_file(spec: BackboneSpec, weights_file: str = "", *, allow_download: bool = True) -> tuple[Path, str]:
    """:func:`resolve_weights_file`, with the file's sha256 computed while checking it (the file is read once)."""
    release = expected_filename(spec)
    if weights_file:
        path = Path(weights_file).expanduser()
        if not path.is_file():
            raise WeightsError(
                f"weights-file '{weights_file}' does not exist; give the path of "
                f"{release}, or stage it with `fedhead weights stage FILE`"
            )
        return path, _check_hash_prefix(path, release)
    cached = hub_checkpoint_dir() / release
    download_error = "downloads not attempted"
    if not cached.is_file() and allow_download:
        try:
            log.info("downloading %s weights (%s) through torchvision", spec.name, release)
            spec.weights.get_state_dict(progress=False, check_hash=True)
        except Exception as exc:  # network and hash errors come in many types; the cause is reported below
            download_error = f"download failed: {type(exc).__name__}: {exc}"
    if not cached.is_file():
        raise WeightsError(
            f"no weights for backbone '{spec.name}': {release} is not in torch's hub "
            f"cache ({hub_checkpoint_dir()}) and it could not be downloaded ({download_error}). Provision it "
            f"with `fedhead weights stage PATH/TO/{release}`, set run-config "
            f"weights-file=PATH, or use pretrained=false for a random backbone."
        )
    return cached, _check_hash_prefix(cached, release)


def read_weights_file(path: Path) -> dict:
    """The state dict in a weights file already resolved (and so checked) by :func:`resolve_weights_file`."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for unreadable archives
        raise WeightsError(
            f"cannot read weights file {path} ({exc}); re-stage it with `fedhead weights stage FILE`"
        ) from exc


def stage_weights_file(source: str | os.PathLike, backbone: str | None = None) -> Path:
    """Copy a weights file into torch's hub cache under its release name, after checking it.

    The backbone is found from the file name when not given. The staged file's mode is
    0666 less the umask, as torch's own downloads are. Returns the staged path.
    """
    src = Path(source).expanduser()
    if not src.is_file():
        raise WeightsError(f"'{source}' is not a file; give the path of a downloaded weights file")
    candidates = [get_backbone_spec(backbone)] if backbone else [get_backbone_spec(n) for n in list_backbones()]
    matches = [s for s in candidates if expected_filename(s) == src.name]
    if not matches:
        known = ", ".join(f"{s.name}: {expected_filename(s)}" for s in candidates)
        raise WeightsError(
            f"'{src.name}' is not a release file fedhead knows; expected one of: {known}"
        )
    spec = matches[0]
    _check_hash_prefix(src, expected_filename(spec))
    try:
        state = torch.load(src, map_location="cpu", weights_only=True)
        spec.build().load_state_dict(state, strict=True)
    except Exception as exc:  # unreadable archive or wrong architecture
        raise WeightsError(f"'{src}' does not load into {spec.name}: {exc}") from exc
    dest_dir = hub_checkpoint_dir()
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / expected_filename(spec)
    if dest.is_file() and sha256_file(dest) == sha256_file(src):
        log.info("%s is already staged at %s", src.name, dest)
        return dest
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)
        os.chmod(tmp, _CACHE_FILE_MODE & ~_umask())  # the temporary file is 0600; torch's own downloads follow the umask
    log.info("staged %s for %s at %s", src.name, spec.name, dest)
    return dest
