"""Static checks of the 3D Slicer extension (no Slicer here): Python compiles and is ruff-clean for Slicer's
Python, every widget the module uses is in the .ui file with the expected class, parameter-node widgets fit
their parameters, and the CMake files hold what Slicer's extension build needs."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXTENSION = ROOT / "DiffusionSegExtension"
MODULE = EXTENSION / "DiffusionSeg.py"
UI = EXTENSION / "Resources" / "UI" / "DiffusionSeg.ui"

# The class each widget the module touches must have (what the code calls on it depends on it).
EXPECTED_WIDGETS = {
    "inputVolumeSelector": "qMRMLNodeComboBox",
    "outputSegmentationSelector": "qMRMLNodeComboBox",
    "annotationSegmentationSelector": "qMRMLNodeComboBox",
    "modelComboBox": "QComboBox",
    "deviceComboBox": "QComboBox",
    "deviceWarningLabel": "QLabel",
    "segmentButton": "QPushButton",
    "annotateButton": "QPushButton",
    "annotationStatusLabel": "QLabel",
    "finetuneButton": "QPushButton",
    "suggestButton": "QPushButton",
    "suggestionLabel": "QLabel",
    "modelInfoLabel": "QLabel",
    "deleteModelButton": "QPushButton",
    "openModelsFolderButton": "QPushButton",
    "refreshModelsButton": "QPushButton",
    "progressBar": "QProgressBar",
    "statusLabel": "QLabel",
    "logTextEdit": "QPlainTextEdit",
}

# Which widget classes Slicer's parameterNodeWrapper connectGui can tie to which parameter type.
CONNECTABLE = {
    "node": {"qMRMLNodeComboBox"},
    "enum": {"QComboBox", "ctkComboBox"},
    "int": {"QSpinBox", "QSlider", "ctkSliderWidget", "QDoubleSpinBox"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget", "ctkDoubleSpinBox"},
    "str": {"QLineEdit", "QLabel", "QTextEdit"},
    "bool": {"QCheckBox", "ctkCheckBox", "QPushButton"},
}


def python_files() -> list[Path]:
    return sorted(EXTENSION.rglob("*.py"))


def ui_widgets() -> dict[str, str]:
    return {w.get("name"): w.get("class") for w in ET.parse(UI).getroot().iter("widget")}


def ui_parameter_widgets() -> dict[str, tuple[str, str]]:
    """SlicerParameterName -> (widget name, widget class)."""
    found = {}
    for widget in ET.parse(UI).getroot().iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                found[prop.findtext("string")] = (widget.get("name"), widget.get("class"))
    return found


def module_tree() -> ast.Module:
    return ast.parse(MODULE.read_text(encoding="utf-8"))


def used_widget_names(tree: ast.Module) -> set[str]:
    """Names used as self.ui.<name> and in findChild(widget, "<name>")."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui":
            if isinstance(node.value.value, ast.Name) and node.value.value.id == "self":
                names.add(node.attr)
        if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "findChild":
            names.update(a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str))
    return names


def parameter_types(tree: ast.Module) -> dict[str, str]:
    """Parameters of the @parameterNodeWrapper class, by kind (node, enum, int, float, str, bool)."""
    enums = {c.name for c in tree.body if isinstance(c, ast.ClassDef) and any(getattr(b, "attr", None) == "Enum" for b in c.bases)}
    wrapped = [c for c in tree.body if isinstance(c, ast.ClassDef) and any(getattr(d, "id", None) == "parameterNodeWrapper" for d in c.decorator_list)]
    assert len(wrapped) == 1, "the module defines one typed parameter node"
    kinds = {}
    for statement in wrapped[0].body:
        if isinstance(statement, ast.AnnAssign):
            annotation = statement.annotation
            if isinstance(annotation, ast.Subscript) and getattr(annotation.value, "id", None) == "Annotated":
                annotation = annotation.slice.elts[0]
            name = ast.unparse(annotation)
            kinds[statement.target.id] = "node" if name.startswith("vtkMRML") else "enum" if name in enums else name
    return kinds


@pytest.mark.parametrize("path", python_files(), ids=lambda p: p.name)
def test_module_python_compiles(path):
    compile(path.read_text(encoding="utf-8"), str(path), "exec", dont_inherit=True)


def test_module_python_is_ruff_clean_for_python_312():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    result = subprocess.run([ruff, "check", "--target-version", "py312", "--no-cache", *map(str, python_files())],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_used_widget_exists_with_the_expected_class():
    widgets = ui_widgets()
    used = used_widget_names(module_tree())
    assert used, "the module uses widgets from its .ui file"
    unknown = used - set(EXPECTED_WIDGETS)
    assert not unknown, f"add the expected class of {sorted(unknown)} to EXPECTED_WIDGETS"
    for name in sorted(used):
        assert name in widgets, f"{name} is used by DiffusionSeg.py but missing from {UI.name}"
        assert widgets[name] == EXPECTED_WIDGETS[name], f"{name} is a {widgets[name]} in {UI.name}, expected {EXPECTED_WIDGETS[name]}"


def test_parameter_widgets_fit_their_parameters():
    kinds = parameter_types(module_tree())
    connected = ui_parameter_widgets()
    assert set(connected) <= set(kinds), f"widgets name unknown parameters: {sorted(set(connected) - set(kinds))}"
    for parameter, (widget, cls) in connected.items():
        assert cls in CONNECTABLE[kinds[parameter]], f"{widget} ({cls}) cannot show {kinds[parameter]} parameter {parameter}"
    # the model list is filled by the module (the wrapper would replace its items with fixed choices)
    assert "model" not in connected
    assert {"inputVolume", "device", "strategy", "iterations", "timeLimitMinutes", "timestep"} <= set(connected)


def test_node_selectors_get_the_scene():
    root = ET.parse(UI).getroot()
    receivers = {c.findtext("receiver") for c in root.iter("connection") if c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    selectors = {name for name, cls in ui_widgets().items() if cls == "qMRMLNodeComboBox"}
    assert selectors and selectors <= receivers
    assert root.find("widget").get("class") == "qMRMLWidget"
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    assert {cls for cls in ui_widgets().values() if not cls.startswith("Q")} <= declared


def test_module_defines_the_slicer_classes():
    classes = {c.name: [ast.unparse(b) for b in c.bases] for c in module_tree().body if isinstance(c, ast.ClassDef)}
    assert classes["DiffusionSeg"] == ["ScriptedLoadableModule"]
    assert classes["DiffusionSegWidget"][0] == "ScriptedLoadableModuleWidget"
    assert classes["DiffusionSegLogic"] == ["ScriptedLoadableModuleLogic"]
    assert classes["DiffusionSegTest"] == ["ScriptedLoadableModuleTest"]
    # the logic reports through callbacks: it never reaches for the widget or its ui
    logic = next(c for c in module_tree().body if isinstance(c, ast.ClassDef) and c.name == "DiffusionSegLogic")
    assert "self.ui" not in ast.unparse(logic) and "Widget" not in ast.unparse(logic)


def cmake(path: Path) -> str:
    """CMake text without comments, whitespace collapsed."""
    text = re.sub(r'("[^"]*")|#[^\n]*', lambda m: m.group(1) or "", path.read_text(encoding="utf-8"))  # a # inside quotes stays
    return re.sub(r"\s+", " ", text)


def test_extension_cmake_has_what_slicer_needs():
    text = cmake(ROOT / "CMakeLists.txt")
    assert re.search(r"cmake_minimum_required\(VERSION \d", text)
    assert "project(DiffusionSeg)" in text
    for variable in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        assert re.search(rf'set\(EXTENSION_{variable} "[^"]+"\)', text), f"EXTENSION_{variable} is not set"
    assert 'set(EXTENSION_CATEGORY "Segmentation")' in text and 'set(EXTENSION_DEPENDS "PyTorch")' in text
    order = ["find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(DiffusionSegExtension)",
             "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"]
    positions = [text.find(item) for item in order]
    assert -1 not in positions and positions == sorted(positions), f"expected in this order: {order}"


def test_module_cmake_builds_and_tests_the_scripted_module():
    text = cmake(EXTENSION / "CMakeLists.txt")
    assert "set(MODULE_NAME DiffusionSeg)" in text
    macro = re.search(r"slicerMacroBuildScriptedModule\((.*?)\)", text).group(1)
    assert "NAME ${MODULE_NAME}" in macro and "SCRIPTS ${MODULE_PYTHON_SCRIPTS}" in macro
    assert "RESOURCES ${MODULE_PYTHON_RESOURCES}" in macro and "WITH_GENERIC_TESTS" in macro
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    scripts = re.search(r"set\(MODULE_PYTHON_SCRIPTS (.*?)\)", text).group(1)
    resources = re.search(r"set\(MODULE_PYTHON_RESOURCES (.*?)\)", text).group(1)
    assert "${MODULE_NAME}.py" in scripts and "${ENGINE_SCRIPTS}" in scripts
    for resource in resources.split():
        assert (EXTENSION / resource.replace("${MODULE_NAME}", "DiffusionSeg")).is_file(), resource
    assert (EXTENSION / "Resources/Icons/DiffusionSeg.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the engine and its bundled weights travel with the module
    assert "${CMAKE_CURRENT_SOURCE_DIR}/../DiffusionSegLib" in text and "DiffusionSegLib/${engine_file}" in text
    assert "weights" in text and "install(DIRECTORY ${ENGINE_DIR}/weights" in text
    assert "add_subdirectory(Testing)" in text and (EXTENSION / "Testing/CMakeLists.txt").is_file()
