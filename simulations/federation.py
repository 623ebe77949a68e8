"""A federation over TLS whose sites are authenticated: the operator's and a site's steps, as functions.

The operator makes a certificate authority and the SuperLink's certificate
(:func:`init_federation`), starts the SuperLink with TLS and node
authentication, and enrols each site's node key (:func:`enrol_site`: Flower's
``flwr supernode register``, whose node id goes into ``enrolment.json``). A
site makes its own key pair (:func:`make_site_key`) and sends only the public
half; it starts its SuperNode with :func:`supernode_command`, and
:func:`diagnose_supernode` turns Flower's exit into a line that says what to
fix and who can fix it. ``fedhead federation`` (``federation_cli.py``) is the
command line over these; ``trial_federation.py`` runs all of it on loopback.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from common.config import is_plain_name
from common.enrolment import ENROLMENT_FILE, Enrolment, load_enrolment
from common.errors import ConfigError, FedHeadError
from common.paths import fedhead_home
from common.pki import CertificateFiles, check_certificate, existing_node_key, make_ca, make_node_key, make_server_certificate
from simulations.processes import SuperLinkTLS, flower_env, write_connection

log = logging.getLogger(__name__)

__all__ = [
    "FederationFiles",
    "EnrolmentError",
    "federation_dir",
    "init_federation",
    "make_site_key",
    "site_key_paths",
    "enrol_site",
    "revoke_site",
    "supernode_command",
    "diagnose_supernode",
    "split_address",
]

DEFAULT_HOSTS = ("127.0.0.1", "localhost")


class EnrolmentError(FedHeadError, RuntimeError):
    """The SuperLink did not register (or unregister) a site's key."""


@dataclass(frozen=True)
class FederationFiles:
    """The operator's folder: the CA, the SuperLink's certificate and the enrolment."""

    root: Path

    @property
    def ca(self) -> CertificateFiles:
        return CertificateFiles(self.root / "ca.crt", self.root / "ca.key")

    @property
    def server(self) -> CertificateFiles:
        return CertificateFiles(self.root / "server.crt", self.root / "server.key")

    @property
    def enrolment(self) -> Path:
        return self.root / ENROLMENT_FILE

    def superlink_tls(self) -> SuperLinkTLS:
        """The SuperLink's TLS flags, node authentication on."""
        return SuperLinkTLS(self.ca.cert, self.server.cert, self.server.key, authenticate_nodes=True)


def federation_dir(folder: Path | None = None) -> FederationFiles:
    """The operator's folder: ``folder``, else ``$FEDHEAD_HOME/federation``."""
    return FederationFiles(Path(folder) if folder else fedhead_home() / "federation")


def init_federation(files: FederationFiles, hosts: list[str], *, days: int = 365, force: bool = False) -> FederationFiles:
    """Make the CA and the SuperLink's certificate for ``hosts``; refuses to overwrite unless ``force``."""
    if files.ca.cert.exists() and not force:
        raise ConfigError(f"{files.root} already holds a federation's CA; pass --force to replace it (every site then "
                          "needs the new ca.crt)")
    ca = make_ca(files.root, days=max(days, 1))
    make_server_certificate(ca, files.root, list(hosts), days=days)
    return files


def site_key_paths(state_dir: Path) -> tuple[Path, Path]:
    """(private, public) node-key paths in a site's state-dir."""
    private = Path(state_dir) / "keys" / "node-auth"
    return private, private.with_name("node-auth.pub")


def make_site_key(state_dir: Path) -> Path:
    """The site's node key pair in its state-dir (made once; kept after); returns the public half's path.

    An existing private key is checked and kept, never replaced: the operator enrolled its public half.
    """
    private, public = site_key_paths(state_dir)
    if private.exists() or private.is_symlink():
        public = existing_node_key(private, public)
        if private.is_file() and private.stat().st_mode & 0o077:
            log.warning("%s can be read by other users; make it private: chmod 600 %s", private, private)
        return public
    if public.exists():
        raise ConfigError(
            f"{public} is here but its private key {private.name} is not: the enrolled key can no longer be used. "
            "Move the .pub away, run node-key again, and send the new public key to the operator to enrol "
            "(and to revoke the old one)"
        )
    return make_node_key(private)


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` into its parts; ConfigError naming the problem otherwise."""
    match = re.fullmatch(r"\[?([^\]\s]+?)\]?:(\d{1,5})", address.strip())
    if not match or not 0 < int(match.group(2)) < 65536:
        raise ConfigError(f"SuperLink address {address!r}: give HOST:PORT, e.g. superlink.example.org:8000")
    return match.group(1), int(match.group(2))


def _flwr(files: FederationFiles, superlink: str, args: list[str]) -> subprocess.CompletedProcess:
    """Run ``flwr ARGS`` against ``superlink`` over TLS, trusting the federation's CA."""
    host, port = split_address(superlink)
    home = files.root / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    connection = write_connection(home, port, "federation", ca_cert=files.ca.cert, host=host)
    return subprocess.run(["flwr", *args, connection, "--format", "json"], env=flower_env(home),
                          capture_output=True, text=True, timeout=120)


def _json_reply(out: subprocess.CompletedProcess) -> dict:
    text = out.stdout
    start = text.find("{")
    try:
        return json.loads(text[start:]) if start >= 0 else {}
    except ValueError:
        return {}


def enrol_site(files: FederationFiles, site: str, public_key: Path, *, superlink: str) -> int:
    """Register ``site``'s node key with the SuperLink and record it in the enrolment; return its node id."""
    if not is_plain_name(site):
        raise ConfigError(f"site name {site!r}: use letters, digits, '.', '_' or '-' (it names the site in every record)")
    key_text = Path(public_key).read_text(encoding="utf-8").strip()
    if not key_text.startswith("ecdsa-sha2-nistp"):
        raise ConfigError(f"{public_key} is not a node public key (OpenSSH ECDSA); the site makes it with "
                          "`fedhead federation node-key --state-dir DIR`")
    check_superlink_certificate(files, split_address(superlink)[0])  # a certificate sites will refuse: say so now
    enrolment = load_enrolment(files.enrolment, missing_ok=True)
    if site in enrolment.sites:
        raise ConfigError(f"site {site!r} is already enrolled (node {enrolment.sites[site][0]}); "
                          f"`fedhead federation revoke {site}` first to enrol a new key")
    out = _flwr(files, superlink, ["supernode", "register", str(public_key), "--name", site])
    reply = _json_reply(out)
    node_id = reply.get("node-id")
    if out.returncode != 0 or not isinstance(node_id, int):
        detail = (reply.get("error-message") or out.stderr.strip() or out.stdout.strip() or f"exit {out.returncode}")
        raise EnrolmentError(f"the SuperLink at {superlink} did not register {site}'s key: {detail}")
    enrolment.with_site(site, node_id, key_text).save(files.enrolment)
    return node_id


def revoke_site(files: FederationFiles, site: str, *, superlink: str) -> int:
    """Unregister ``site``'s node from the SuperLink and drop it from the enrolment; return the node id revoked."""
    enrolment = load_enrolment(files.enrolment, missing_ok=True)
    if site not in enrolment.sites:
        raise ConfigError(f"site {site!r} is not enrolled; enrolled: {', '.join(sorted(enrolment.sites)) or 'none'}")
    node_id = enrolment.sites[site][0]
    out = _flwr(files, superlink, ["supernode", "unregister", str(node_id)])
    if out.returncode != 0:
        detail = _json_reply(out).get("error-message") or out.stderr.strip() or out.stdout.strip()
        raise EnrolmentError(f"the SuperLink at {superlink} did not unregister {site} (node {node_id}): {detail}")
    Enrolment({k: v for k, v in enrolment.sites.items() if k != site}).save(files.enrolment)
    return node_id


def supernode_command(
    *, superlink: str, ca_cert: Path | None, private_key: Path | None, node_config: dict[str, str], port: int | None = None,
) -> list[str]:
    """``flower-supernode``'s command line: TLS trusting ``ca_cert`` and the node key, or ``--insecure`` when both are None."""
    split_address(superlink)
    config = " ".join(f"{k}='{v}'" for k, v in node_config.items())
    command = ["flower-supernode", "--superlink", superlink, "--node-config", config]
    if ca_cert is None and private_key is None:
        command.append("--insecure")
    else:
        if ca_cert is None or private_key is None:
            raise ConfigError("a secure SuperNode needs both the federation's CA certificate and its own node key")
        command += ["--root-certificates", str(ca_cert), "--auth-supernode-private-key", str(private_key)]
    return command + (["--port", str(port)] if port else [])


def diagnose_supernode(log_text: str, returncode: int | None, *, superlink: str, ca_cert: Path | None, public_key: Path | None) -> str:
    """What a SuperNode's exit means, for the person who can fix it."""
    text = log_text
    if "certificate has expired" in text or "CERTIFICATE_VERIFY_FAILED" in text and "expired" in text:
        return (f"the SuperLink at {superlink} presents an expired certificate: the operator renews it "
                "(`fedhead federation init --force`) and sends the sites the new ca.crt")
    if "Hostname mismatch" in text or "IP address mismatch" in text:
        return (f"the SuperLink's certificate is not made out for {split_address(superlink)[0]}: the operator re-makes it "
                f"with `fedhead federation init --host {split_address(superlink)[0]} --force`, or dial a name it carries")
    if "CERTIFICATE_VERIFY_FAILED" in text or "SSL/TLS handshake" in text:
        return (f"this site does not trust the SuperLink at {superlink}: its certificate was not issued by the CA in "
                f"{ca_cert}. Get the federation's current ca.crt from the operator")
    if "Failed to activate SuperNode" in text or "code: 2004" in text:
        return (f"the SuperLink at {superlink} refused this site's node key: it is not registered, or it was revoked, "
                f"or a SuperNode with this key is still connected (after a crash the SuperLink admits the key again "
                f"about a minute later; a node stopped with Ctrl-C can rejoin at once). To enrol, send {public_key} to "
                f"the operator (`fedhead federation enrol SITE {public_key.name if public_key else 'KEY.pub'}`)")
    if "Connection attempt failed" in text or "UNAVAILABLE" in text:
        return f"no SuperLink answers at {superlink}: check the address and that the operator's SuperLink is running"
    if returncode == 0:
        return "it was stopped (Ctrl-C, SIGTERM or `systemctl stop`); `fedhead federation join` starts it again"
    if returncode is not None and returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:  # a number Python has no name for
            name = f"signal {-returncode}"
        return (f"it was killed ({name}) and sent no goodbye; `fedhead federation join` "
                "starts it again, and the SuperLink admits its key about a minute after the crash")
    return f"flower-supernode exited with code {returncode}; its log has the details"


def check_superlink_certificate(files: FederationFiles, host: str) -> None:
    """ConfigError, one line per problem, if the SuperLink's certificate will not do for sites dialling ``host``."""
    if not files.server.cert.exists():
        raise ConfigError(f"{files.root} has no SuperLink certificate; make one with `fedhead federation init`")
    problems = check_certificate(files.server.cert, files.ca.cert, host=host)
    if problems:
        raise ConfigError("the SuperLink's certificate will not do:\n  - " + "\n  - ".join(problems))
