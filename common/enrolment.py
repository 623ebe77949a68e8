"""The federation's enrolment: which authenticated SuperNode is which site.

``fedhead federation enrol`` registers a site's node key with the SuperLink
(``flwr supernode register``), which answers with the node id it will give
that key; the pair is kept in ``enrolment.json``::

    {"sites": {"oslo": {"node_id": 1234, "public_key": "ecdsa-sha2-nistp384 AAAA..."}}}

The server reads it through the ``enrolment`` run-config key and names each
node by it: a name a site writes into its own reply is checked against it,
never taken on trust.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from common.config import is_plain_name
from common.errors import DataError
from common.files import write_json_atomic

__all__ = ["ENROLMENT_FILE", "Enrolment", "load_enrolment"]

ENROLMENT_FILE = "enrolment.json"


@dataclass(frozen=True)
class Enrolment:
    """Site name -> (node id, node public key), both ways."""

    sites: dict[str, tuple[int, str]]

    @property
    def names(self) -> dict[int, str]:
        """Node id -> enrolled site name."""
        return {node_id: name for name, (node_id, _) in self.sites.items()}

    @property
    def public_keys(self) -> dict[str, str]:
        """Site name -> its node's public key (OpenSSH)."""
        return {name: key for name, (_, key) in self.sites.items()}

    def with_site(self, name: str, node_id: int, public_key: str) -> "Enrolment":
        """A copy with ``name`` (re-)enrolled."""
        return Enrolment({**self.sites, name: (int(node_id), public_key)})

    def save(self, path: Path) -> None:
        """Write it as ``enrolment.json``."""
        data = {"sites": {n: {"node_id": i, "public_key": k} for n, (i, k) in sorted(self.sites.items())}}
        write_json_atomic(path, data)


def load_enrolment(path: str | Path, *, missing_ok: bool = False) -> Enrolment:
    """Read ``enrolment.json``; DataError naming the problem when it is not one (or is absent, unless ``missing_ok``)."""
    path = Path(path)
    if not path.exists():
        if missing_ok:
            return Enrolment({})
        raise DataError(f"enrolment file {path} does not exist; enrol the sites with `fedhead federation enrol` "
                        "or leave run-config 'enrolment' empty")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is not an enrolment file ({exc}); re-create it with `fedhead federation enrol`") from None
    sites, problems = {}, []
    entries = data.get("sites") if isinstance(data, dict) else None
    if not isinstance(entries, dict):
        raise DataError(f"{path} has no 'sites' object; re-create it with `fedhead federation enrol`")
    for name, entry in entries.items():
        node_id = entry.get("node_id") if isinstance(entry, dict) else None
        key = entry.get("public_key") if isinstance(entry, dict) else None
        if not is_plain_name(name) or isinstance(node_id, bool) or not isinstance(node_id, int) or not isinstance(key, str):
            problems.append(f"site {name!r}: needs a plain name, an integer node_id and a public_key")
        else:
            sites[name] = (node_id, key)
    ids = [i for i, _ in sites.values()]
    if len(set(ids)) != len(ids):
        problems.append("two sites share a node id")
    if problems:
        raise DataError(f"{path}: " + "; ".join(problems))
    return Enrolment(sites)
