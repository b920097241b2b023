"""pyproject.toml declares what the code imports: the engine's imports are core dependencies, Training's may add the `train` extra."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# import name -> distribution name, where they differ
DISTRIBUTIONS = {"PIL": "pillow", "skimage": "scikit-image", "yaml": "pyyaml", "SimpleITK": "simpleitk", "nrrd": "pynrrd"}
OURS = {"DiffusionSegLib", "Training"}


def third_party_imports(folder: Path) -> dict[str, str]:
    """Top-level modules imported anywhere under `folder` (function-level imports too) -> a file that imports it."""
    found: dict[str, str] = {}
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in OURS and top != "slicer" and top not in ("qt", "ctk", "vtk"):
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def distribution(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower()


@pytest.fixture(scope="module")
def project() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def test_engine_imports_only_core_dependencies_and_uses_all_of_them(project):
    declared = {distribution(r) for r in project["dependencies"]}
    imported = {DISTRIBUTIONS.get(name, name).lower(): where for name, where in third_party_imports(ROOT / "DiffusionSegLib").items()}
    undeclared = {name: where for name, where in imported.items() if name not in declared}
    assert undeclared == {}, f"imported by the engine but not in [project] dependencies: {undeclared}"
    training = {DISTRIBUTIONS.get(name, name).lower() for name in third_party_imports(ROOT / "Training")}
    assert declared - set(imported) - training == set(), "declared but imported nowhere"


def test_training_imports_are_core_or_the_train_extra(project):
    allowed = {distribution(r) for r in [*project["dependencies"], *project["optional-dependencies"]["train"]]}
    imported = {DISTRIBUTIONS.get(name, name).lower(): where for name, where in third_party_imports(ROOT / "Training").items()}
    assert {name: where for name, where in imported.items() if name not in allowed} == {}
    # YAML settings are Training's alone: the engine (and the Slicer module segmenting with it) never needs pyyaml.
    assert "pyyaml" in imported and "pyyaml" not in {distribution(r) for r in project["dependencies"]}


def test_the_test_extra_pulls_what_the_tests_need(project):
    test_extra = {distribution(r) for r in project["optional-dependencies"]["test"]}
    assert {"pytest", "pytest-timeout", "pyyaml"} <= test_extra  # CI installs .[test] and runs Training's YAML tests
