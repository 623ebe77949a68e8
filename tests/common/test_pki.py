"""The federation's certificates and node keys: what Flower and a TLS client accept, and what they must refuse."""

from __future__ import annotations

import datetime
import ssl
import stat

from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from common.pki import check_certificate, make_ca, make_node_key, make_server_certificate


def test_the_server_certificate_verifies_against_its_ca_for_the_names_sites_dial(tmp_path):
    ca = make_ca(tmp_path / "ca")
    server = make_server_certificate(ca, tmp_path / "server", ["127.0.0.1", "localhost", "superlink.hospital.example"])
    for host in ("127.0.0.1", "localhost", "superlink.hospital.example"):
        assert check_certificate(server.cert, ca.cert, host=host) == []
    # Python's own TLS stack agrees: the chain loads and the key matches the certificate
    context = ssl.create_default_context(cafile=str(ca.cert))
    context.load_cert_chain(server.cert, server.key)
    assert stat.S_IMODE(server.key.stat().st_mode) == 0o600 and stat.S_IMODE(ca.key.stat().st_mode) == 0o600


def test_a_wrong_host_another_ca_and_an_expired_certificate_are_each_named(tmp_path):
    ca, other = make_ca(tmp_path / "ca"), make_ca(tmp_path / "other")
    server = make_server_certificate(ca, tmp_path / "server", ["127.0.0.1"])
    assert check_certificate(server.cert, ca.cert, host="10.0.0.5") == [
        f"{server.cert} is for 127.0.0.1, not 10.0.0.5, the address sites dial"]
    (problem,) = check_certificate(server.cert, other.cert, host="127.0.0.1")
    assert "was not issued by the CA" in problem or "does not verify" in problem
    old = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=30)
    expired = make_server_certificate(ca, tmp_path / "expired", ["127.0.0.1"], days=1, valid_from=old)
    (problem,) = check_certificate(expired.cert, ca.cert, host="127.0.0.1")
    assert "expired on" in problem and "fedhead federation init" in problem


def test_a_node_key_is_p384_in_the_openssh_formats_flower_reads(tmp_path):
    public = make_node_key(tmp_path / "keys" / "node-auth")
    private = load_ssh_private_key((tmp_path / "keys" / "node-auth").read_bytes(), password=None)
    assert private.curve.name == "secp384r1"
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert load_ssh_public_key(public.read_bytes()).public_numbers() == private.public_key().public_numbers()
    assert stat.S_IMODE((tmp_path / "keys" / "node-auth").stat().st_mode) == 0o600
