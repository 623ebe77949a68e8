"""Certificates and node keys for a federation, with the ``cryptography`` package.

- a trial certificate authority (:func:`make_ca`) that signs the SuperLink's
  TLS certificate (:func:`make_server_certificate`), with the host names and
  addresses the sites dial as subject alternative names;
- a SuperNode's authentication key pair (:func:`make_node_key`): ECDSA P-384,
  the private half in OpenSSH PEM and the public half in OpenSSH one-line
  format, as ``flower-supernode --auth-supernode-private-key`` and
  ``flwr supernode register`` read them.

Private keys are written readable by their owner only.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import ConfigError

__all__ = ["CertificateFiles", "make_ca", "make_server_certificate", "make_node_key", "node_public_key", "check_certificate"]

_NOW = datetime.datetime.now


@dataclass(frozen=True)
class CertificateFiles:
    """A certificate and its private key on disk (PEM)."""

    cert: Path
    key: Path


def _write_private(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    return path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedhead trial federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(folder: Path, *, days: int = 365, common_name: str = "fedhead trial CA") -> CertificateFiles:
    """A self-signed certificate authority: ``ca.crt`` and ``ca.key`` in ``folder``."""
    key = ec.generate_private_key(ec.SECP384R1())
    now = _NOW(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name)).issuer_name(_name(common_name))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return CertificateFiles(folder / "ca.crt", _write_private(folder / "ca.key", _pem_key(key)))


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def make_server_certificate(
    ca: CertificateFiles, folder: Path, names: list[str], *, days: int = 365, valid_from: datetime.datetime | None = None
) -> CertificateFiles:
    """The SuperLink's TLS certificate (``server.crt``, ``server.key``), signed by ``ca``, valid for ``names``.

    ``names`` are the host names and IP addresses the sites dial (each a
    subject alternative name). ``valid_from`` (default now) shifts the
    validity window, e.g. to make an expired certificate for a test.
    """
    if not names:
        raise ConfigError("the SuperLink's certificate needs at least one host name or address the sites dial")
    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    ca_key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP384R1())
    start = valid_from or _NOW(datetime.timezone.utc) - datetime.timedelta(minutes=5)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0])).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(_san(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return CertificateFiles(folder / "server.crt", _write_private(folder / "server.key", _pem_key(key)))


def make_node_key(private_path: Path) -> Path:
    """A SuperNode's ECDSA P-384 key pair: ``private_path`` (OpenSSH PEM) and ``private_path.pub``; returns the .pub path."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    _write_private(private_path, private)
    public_path = private_path.with_name(private_path.name + ".pub")
    public_path.write_bytes(node_public_key(key) + b"\n")
    return public_path


def existing_node_key(private_path: Path, public_path: Path) -> Path:
    """Check a node key pair already made; restore a missing public half from the private key. Never replaces the private key.

    ConfigError when the private key does not load or the public half is not its own.
    """
    keep = ("it is never replaced, since the operator enrolled its public half; if you mean to start over, move it "
            "away yourself, run node-key again and send the new public key to the operator to enrol")
    try:
        key = serialization.load_ssh_private_key(private_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{private_path} is not a readable OpenSSH private key ({exc}); {keep}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP384R1):
        raise ConfigError(f"{private_path} is not an ECDSA P-384 key, which Flower's node authentication needs; {keep}")
    own = node_public_key(key)
    if not public_path.exists():
        public_path.write_bytes(own + b"\n")  # the public half is derived, so restoring it changes nothing enrolled
        return public_path
    try:
        given = public_path.read_bytes().split()[:2]
    except OSError as exc:
        raise ConfigError(f"{public_path} cannot be read ({exc}); remove it and run node-key again to rewrite it") from exc
    if given != own.split()[:2]:
        raise ConfigError(f"{public_path} is not the public half of {private_path}; remove it and run node-key again "
                          "to rewrite it from the private key")
    return public_path


def node_public_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The OpenSSH one-line public key of a node's private key."""
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def check_certificate(cert_path: Path, ca_path: Path, *, host: str) -> list[str]:
    """What is wrong with ``cert_path`` for a site dialling ``host`` and trusting ``ca_path``: one line per problem."""
    problems = []
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    ca = x509.load_pem_x509_certificate(ca_path.read_bytes())
    now = _NOW(datetime.timezone.utc)
    if now < cert.not_valid_before_utc:
        problems.append(f"{cert_path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    if now > cert.not_valid_after_utc:
        problems.append(f"{cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC; make a new one "
                        "with `fedhead federation init --force`")
    if cert.issuer != ca.subject:
        problems.append(f"{cert_path} was not issued by the CA in {ca_path}")
    else:
        try:
            cert.verify_directly_issued_by(ca)
        except Exception:  # noqa: BLE001 - any failure is "not signed by this CA"
            problems.append(f"{cert_path}'s signature does not verify with the CA in {ca_path}")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(n) for n in san.get_values_for_type(x509.DNSName)] + [str(a) for a in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        names = []
    if host not in names:
        problems.append(f"{cert_path} is for {', '.join(names) or 'no host'}, not {host}, the address sites dial")
    return problems
