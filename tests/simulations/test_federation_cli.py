"""The operator's and a site's `fedhead federation` commands against a real SuperLink with TLS and node authentication."""

from __future__ import annotations

import contextlib
import datetime
import io
import subprocess
import sys
from pathlib import Path

import pytest

from common.enrolment import load_enrolment
from common.pki import make_server_certificate
from simulations.cli import main
from simulations.federation import diagnose_supernode, federation_dir
from simulations.processes import SuperLinkTLS, flower_env, superlink

pytestmark = pytest.mark.slow


def _cli(*args: str) -> tuple[int, str]:
    """``fedhead ARGS`` in this process, through the console script's entry point (its exit codes and error lines)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(list(args))
    return code, out.getvalue()


def _join(state: Path, address: str, ca: Path, tmp_path: Path) -> tuple[int, str]:
    out = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "federation", "join", "--superlink", address, "--ca", str(ca),
         "--data-dir", str(tmp_path), "--state-dir", str(state), "--site-name", "haukeland"],
        capture_output=True, text=True, timeout=120,
    )
    return out.returncode, out.stdout + out.stderr


@contextlib.contextmanager
def _superlink(tmp_path: Path, tls: SuperLinkTLS):
    home = tmp_path / f"home-{tls.cert.parent.name}"
    home.mkdir()
    with superlink(home, flower_env(home), simulation=False, tls=tls) as port:
        yield f"127.0.0.1:{port}"


def test_init_enrol_revoke_and_a_revoked_site_is_told_why(tmp_path):
    code, output = _cli("federation", "init", "--dir", str(tmp_path / "op"), "--host", "127.0.0.1")
    assert code == 0 and "--enable-supernode-auth" in output, output
    code, output = _cli("federation", "init", "--dir", str(tmp_path / "op"))
    assert code == 2 and "already holds a federation's CA; pass --force" in output
    files = federation_dir(tmp_path / "op")
    code, output = _cli("federation", "node-key", "--state-dir", str(tmp_path / "haukeland"))
    public = tmp_path / "haukeland" / "keys" / "node-auth.pub"
    assert code == 0 and str(public) in output and public.is_file()
    with _superlink(tmp_path, files.superlink_tls()) as address:
        code, output = _cli("federation", "enrol", "haukeland", str(public), "--superlink", address, "--dir", str(files.root))
        assert code == 0 and "enrolled haukeland as node" in output, output
        (node_id, key), = load_enrolment(files.enrolment).sites.values()
        assert key == public.read_text().strip() and f"node {node_id}" in output
        code, output = _cli("federation", "enrol", "haukeland", str(public), "--superlink", address, "--dir", str(files.root))
        assert code == 2 and "already enrolled" in output
        code, output = _cli("federation", "revoke", "haukeland", "--superlink", address, "--dir", str(files.root))
        assert code == 0 and f"revoked haukeland (node {node_id})" in output and not load_enrolment(files.enrolment).sites
        code, output = _join(tmp_path / "haukeland", address, files.ca.cert, tmp_path)
        assert code == 2 and "refused this site's node key: it is not registered, or it was revoked" in output, output
        assert "fedhead federation enrol" in output


def test_an_expired_superlink_certificate_is_named_at_the_site_and_at_the_operator(tmp_path):
    files = federation_dir(tmp_path / "op")
    assert _cli("federation", "init", "--dir", str(files.root))[0] == 0
    old = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=10)
    expired = make_server_certificate(files.ca, tmp_path / "expired", ["127.0.0.1"], days=1, valid_from=old)
    _cli("federation", "node-key", "--state-dir", str(tmp_path / "haukeland"))
    tls = SuperLinkTLS(files.ca.cert, expired.cert, expired.key)
    with _superlink(tmp_path, tls) as address:
        code, output = _join(tmp_path / "haukeland", address, files.ca.cert, tmp_path)
        assert code == 2 and "presents an expired certificate" in output and "init --force" in output, output
    # the operator hears it before enrolling anyone against it
    (files.root / "server.crt").write_bytes(expired.cert.read_bytes())
    code, output = _cli("federation", "enrol", "haukeland", str(tmp_path / "haukeland" / "keys" / "node-auth.pub"),
                        "--superlink", "127.0.0.1:9", "--dir", str(files.root))
    assert code == 2 and "expired on" in output, output


def test_join_without_a_ca_or_key_says_what_to_get_and_insecure_must_be_asked_for(tmp_path):
    code, output = _join(tmp_path / "nokey", "127.0.0.1:9", tmp_path / "missing-ca.crt", tmp_path)
    assert code == 2 and "cannot join securely" in output and "fedhead federation node-key" in output
    assert "--insecure" in output


@pytest.mark.parametrize("returncode, says", [
    (0, "it was stopped (Ctrl-C, SIGTERM"),  # Flower exits 0 after a graceful SIGINT or SIGTERM
    (-9, "it was killed (SIGKILL)"),
    (1, "exited with code 1; its log has the details"),
])
def test_a_supernode_that_ends_is_told_apart_from_one_that_fails(returncode, says):
    why = diagnose_supernode("INFO: Starting Flower SuperNode", returncode, superlink="127.0.0.1:9092", ca_cert=None, public_key=None)
    assert says in why


def test_down_by_name_stops_that_trial_alone(tmp_path):
    from simulations.trial_federation import PROCESSES_FILE, stop_trials, trial_root

    for name in ("mine", "theirs"):  # trials whose processes have ended: their lists are cleared, nothing is killed
        (trial_root(tmp_path) / name).mkdir(parents=True)
        (trial_root(tmp_path) / name / PROCESSES_FILE).write_text(f'{{"flwr_home": "{tmp_path / name}", "pids": {{}}}}')
    assert stop_trials(tmp_path, "mine") == ["mine: 0 processes stopped"]
    assert not (trial_root(tmp_path) / "mine" / PROCESSES_FILE).exists()
    assert (trial_root(tmp_path) / "theirs" / PROCESSES_FILE).exists()
    assert stop_trials(tmp_path, "mine") == []
    assert stop_trials(tmp_path) == ["theirs: 0 processes stopped"]
    code, out = _cli("federation", "down", "--name", "../theirs")
    assert code == 2 and "is not a plain name" in out


def test_node_key_never_replaces_a_private_key_and_restores_a_lost_public_half(tmp_path):
    from simulations.federation import site_key_paths

    private, public = site_key_paths(tmp_path / "site")
    assert _cli("federation", "node-key", "--state-dir", str(tmp_path / "site"))[0] == 0
    key, enrolled = private.read_bytes(), public.read_bytes()
    public.unlink()  # sent to the operator by moving it
    assert _cli("federation", "node-key", "--state-dir", str(tmp_path / "site"))[0] == 0
    assert private.read_bytes() == key and public.read_bytes() == enrolled
    public.write_bytes(b"ecdsa-sha2-nistp384 AAAAnotthisone\n")
    code, out = _cli("federation", "node-key", "--state-dir", str(tmp_path / "site"))
    assert code == 2 and "is not the public half of" in out and private.read_bytes() == key
    private.write_bytes(b"not a key")
    code, out = _cli("federation", "node-key", "--state-dir", str(tmp_path / "site"))
    assert code == 2 and "is not a readable OpenSSH private key" in out and "never replaced" in out
    assert private.read_bytes() == b"not a key"
    private.unlink()
    code, out = _cli("federation", "node-key", "--state-dir", str(tmp_path / "site"))
    assert code == 2 and "its private key node-auth is not" in out and public.exists() and not private.exists()
