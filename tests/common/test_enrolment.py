"""The federation's enrolment file: which authenticated node is which site."""

from __future__ import annotations

import json

import pytest

from common.enrolment import Enrolment, load_enrolment
from common.errors import DataError


def test_an_enrolment_round_trips_and_names_nodes(tmp_path):
    path = tmp_path / "enrolment.json"
    Enrolment({}).with_site("oslo", 11, "ecdsa-sha2-nistp384 AAA").with_site("bergen", 12, "ecdsa-sha2-nistp384 BBB").save(path)
    enrolment = load_enrolment(path)
    assert enrolment.names == {11: "oslo", 12: "bergen"}
    assert enrolment.public_keys == {"oslo": "ecdsa-sha2-nistp384 AAA", "bergen": "ecdsa-sha2-nistp384 BBB"}


def test_a_missing_or_malformed_enrolment_is_named(tmp_path):
    with pytest.raises(DataError, match="does not exist; enrol the sites with `fedhead federation enrol`"):
        load_enrolment(tmp_path / "nowhere.json")
    assert load_enrolment(tmp_path / "nowhere.json", missing_ok=True).sites == {}
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="is not an enrolment file"):
        load_enrolment(bad)
    bad.write_text(json.dumps({"sites": {"../x": {"node_id": 1, "public_key": "k"}, "b": {"node_id": "2", "public_key": "k"}}}))
    with pytest.raises(DataError, match=r"site '\.\./x': needs a plain name.*site 'b': needs"):
        load_enrolment(bad)
    bad.write_text(json.dumps({"sites": {"a": {"node_id": 1, "public_key": "k"}, "b": {"node_id": 1, "public_key": "k"}}}))
    with pytest.raises(DataError, match="two sites share a node id"):
        load_enrolment(bad)
