"""`flwr run` is given the app alone, never a tree holding the project's venv and caches."""

from __future__ import annotations

from simulations.app_source import APP_FILES, staged_app
from simulations.run_inputs import project_root


def test_the_staged_app_holds_what_the_apps_import_and_nothing_of_the_venv_or_caches(tmp_path):
    root = tmp_path / "checkout"
    for path in ("pyproject.toml", "common/config.py", "client/app.py", "server/app.py", "server/templates/report.html.j2",
                 "common/__pycache__/config.cpython-311.pyc", ".venv/lib/torch/__init__.py", ".cache/fedhead/x.safetensors",
                 "runs/demo/summary.json", "tests/test_x.py"):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text("x")
    with staged_app(root, tmp_path / "flwr-home") as source:
        staged = sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file())
        assert staged == ["client/app.py", "common/config.py", "pyproject.toml", "server/app.py", "server/templates/report.html.j2"]
    assert not source.exists()  # removed after the run


def test_the_project_has_every_file_the_app_is_staged_from():
    root = project_root()
    assert all((root / name).exists() for name in APP_FILES)
    assert "simulations" not in APP_FILES  # the ServerApp and ClientApp import common/, client/ and server/ only
