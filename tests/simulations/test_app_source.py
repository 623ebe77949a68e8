"""`flwr run` is given the app alone, never a tree holding the project's venv and caches."""

from __future__ import annotations

import ast

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


def test_the_staged_files_are_all_the_server_and_client_apps_import():
    """Nothing in the staged packages imports a package left out of the copy (simulations/, tests/)."""
    root = project_root()
    assert all((root / name).exists() for name in APP_FILES)
    staged_packages = {name for name in APP_FILES if (root / name).is_dir()}
    outside = []
    for package in sorted(staged_packages):
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
                outside += [f"{path.relative_to(root)}: {n}" for n in names
                            if n.split(".")[0] in {"simulations", "tests"} - staged_packages]
    assert not outside
