"""A site's node_config, validated once: names, folders, defaults, every problem at once."""

from __future__ import annotations

import os

import pytest

from common.errors import ConfigError
from common.site_config import build_site_config


def test_a_real_site_keeps_its_state_in_its_own_folder(tmp_path, digits_npz):
    site = build_site_config({"site-name": "oslo", "data-dir": str(digits_npz), "state-dir": str(tmp_path / "st")})
    assert site.site_name == "oslo" and site.data_dir == digits_npz.resolve()
    assert site.cache_dir == (tmp_path / "st").resolve() / "features" and (tmp_path / "st").is_dir()
    assert site.device == "auto" and not site.simulated


def test_a_simulated_site_defaults_to_fedhead_home(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDHEAD_HOME", str(tmp_path / "home"))
    site = build_site_config({"partition-id": 2, "num-partitions": 4})
    assert site.simulated and site.site_name == "site-2"
    assert site.state_dir == (tmp_path / "home" / "sites" / "site-2").resolve()


def test_a_site_without_data_is_told_how_to_give_it():
    with pytest.raises(ConfigError, match="data-dir='/path/to/images'"):
        build_site_config({"site-name": "oslo"})


def test_every_problem_is_reported_at_once(tmp_path):
    with pytest.raises(ConfigError) as info:
        build_site_config({"site-name": "../etc", "data-dir": str(tmp_path / "nope"), "device": "tpu", "colour": 1})
    text = str(info.value)
    for expected in ("'site-name' = '../etc'", "does not exist", "'device' = 'tpu'", "unknown node-config key 'colour'"):
        assert expected in text


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_an_unwritable_state_dir_is_refused_naming_it(tmp_path, digits_npz):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(ConfigError, match="state-dir .*locked.* is not a writable folder"):
        build_site_config({"data-dir": str(digits_npz), "state-dir": str(locked / "state")})


def test_a_state_dir_that_is_a_file_is_refused_naming_it(tmp_path, digits_npz):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="state-dir '.*a-file' is not a writable folder"):
        build_site_config({"data-dir": str(digits_npz), "state-dir": str(blocker)})
