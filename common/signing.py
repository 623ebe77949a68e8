"""Ed25519 keys and signatures (the ``cryptography`` package), as the audit log and site receipts use them.

A private key lives in one PEM file (PKCS#8, unencrypted, mode 0600) that is
created on first use; a public key travels as 64 hex digits (the raw 32
bytes) inside signed records, and as a PEM file (``server.pub``) beside a run.
Signatures are 128 hex digits over the exact bytes given.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.errors import ConfigError
from common.files import atomic_path

__all__ = [
    "load_or_create_key",
    "public_hex",
    "public_pem",
    "load_public_key",
    "sign_hex",
    "verify_hex",
]


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 private key in ``path``, created (mode 0600) if the file does not exist."""
    path = Path(path)
    if path.exists():
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{path} is not an unencrypted PEM private key ({exc}); move it away to make a new one") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{path} holds a {type(key).__name__}, not an Ed25519 key; move it away to make a new one")
        return key
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
    return key


def public_hex(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """The public key as 64 hex digits (its raw 32 bytes)."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def public_pem(key: Ed25519PrivateKey) -> bytes:
    """The public key as a PEM file's bytes."""
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_public_key(path: Path) -> str:
    """The Ed25519 public key in a PEM file (or a file of 64 hex digits), as hex."""
    data = Path(path).read_bytes()
    text = data.decode("ascii", "replace").strip()
    if len(text) == 64 and all(c in "0123456789abcdef" for c in text.lower()):
        return text.lower()
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise ConfigError(f"{path} is neither a PEM public key nor 64 hex digits ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path} holds a {type(key).__name__}, not an Ed25519 public key")
    return public_hex(key)


def sign_hex(key: Ed25519PrivateKey, data: bytes) -> str:
    """The signature of ``data``, as hex."""
    return key.sign(data).hex()


def verify_hex(public_key_hex: str, data: bytes, signature_hex: str) -> bool:
    """True when ``signature_hex`` is ``public_key_hex``'s signature of ``data``; False for anything malformed."""
    try:
        public = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_key_hex))
        public.verify(bytes.fromhex(signature_hex), data)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
