"""Checks of the 3D Slicer extension without Slicer. Static: Python compiles and is ruff-clean for Slicer's Python,
every widget the module uses is in the .ui file with the expected class, parameter-node widgets fit their
parameters, the CMake files hold what Slicer's extension build needs, and the module imports the engine only
where its packages are installed. Against real slicer-core with stand-ins for Qt and the application
(slicer_helpers): a failed install returns the panel to idle, models are listed without torch, the
annotated-slice count follows painting (real segmentation events), MPS only on macOS, the sample is registered,
organ volumes come from Segment Statistics. The scene work itself is tested on a real CT in test_slicer_core.py."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from slicer_helpers import FAKE_ERRORS, load_module

from DiffusionSegLib.bridge import dependencies, sample_data

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
    "strategyComboBox": "QComboBox",
    "segmentButton": "QPushButton",
    "organVolumesLabel": "QLabel",
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


def parameter_default(tree: ast.Module, name: str) -> object:
    """The literal default of one parameter of the @parameterNodeWrapper class."""
    wrapped = next(c for c in tree.body if isinstance(c, ast.ClassDef) and c.name.endswith("ParameterNode"))
    statement = next(s for s in wrapped.body if isinstance(s, ast.AnnAssign) and s.target.id == name)
    return ast.literal_eval(statement.value)


def test_finetune_defaults_in_slicer_follow_the_engine():
    # The panel passes its iterations on every run, so a stale default would quietly override finetune's.
    from DiffusionSegLib.finetune import FinetuneConfig

    assert parameter_default(module_tree(), "iterations") == FinetuneConfig.iterations
    spin = ET.parse(UI).getroot().find(".//widget[@name='iterationsSpinBox']/property[@name='value']/number")
    assert int(spin.text) == FinetuneConfig.iterations


def test_strategy_menu_follows_the_strategy_table():
    """The panel offers the table's offered strategies, default first, and its tooltip is the table's."""
    from DiffusionSegLib import strategies

    strategy = next(c for c in module_tree().body if isinstance(c, ast.ClassDef) and c.name == "Strategy")
    values = [ast.literal_eval(s.value) for s in strategy.body if isinstance(s, ast.Assign)]
    assert tuple(values) == strategies.STRATEGIES and values[0] == strategies.DEFAULT_STRATEGY
    assert ast.unparse(parameter_default_node(module_tree(), "strategy")) == "Strategy.FT_DEC"
    tooltip = ET.parse(UI).getroot().find(".//widget[@name='strategyComboBox']/property[@name='toolTip']/string")
    assert tooltip.text == strategies.tooltip()  # the module also sets it from the table at set-up


def parameter_default_node(tree: ast.Module, name: str) -> ast.expr:
    wrapped = next(c for c in tree.body if isinstance(c, ast.ClassDef) and c.name.endswith("ParameterNode"))
    return next(s for s in wrapped.body if isinstance(s, ast.AnnAssign) and s.target.id == name).value


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
    # the minimum Slicer version: said in the description and enforced when configuring
    assert 'set(EXTENSION_MINIMUM_SLICER_VERSION "5.10")' in text and "Requires 3D Slicer 5.10 or later" in text
    assert re.search(r'if\("\$\{Slicer_VERSION_MAJOR\}\.\$\{Slicer_VERSION_MINOR\}" VERSION_LESS "\$\{EXTENSION_MINIMUM_SLICER_VERSION\}"\) '
                     r"message\(FATAL_ERROR", text)
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
    # the engine, its bridge subpackage, the bundled weights and the sample CT travel with the module
    assert "${CMAKE_CURRENT_SOURCE_DIR}/../DiffusionSegLib" in text and "DiffusionSegLib/${engine_file}" in text
    glob = re.search(r"file\(GLOB ENGINE_SOURCES RELATIVE \$\{ENGINE_DIR\} (.*?)\)", text).group(1).split()
    assert glob == ["${ENGINE_DIR}/*.py", "${ENGINE_DIR}/bridge/*.py"]
    assert "weights" in text and "install(DIRECTORY ${ENGINE_DIR}/weights" in text
    assert "install(DIRECTORY ${ENGINE_DIR}/sample" in text and 'PATTERN "*.nii.gz"' in text
    assert (ROOT / "DiffusionSegLib" / "sample" / sample_data.SAMPLE_FILE).is_file()
    assert "add_subdirectory(Testing)" in text and (EXTENSION / "Testing/CMakeLists.txt").is_file()


# --- what the module imports, and where ------------------------------------------------------------------------

# Methods that run only in the self-test inside Slicer may import the engine; every job runs it in a child process.
ENGINE_IMPORTS_ALLOWED_IN = {"test_DiffusionSegWorkflow"}
LIGHT_MODULES = ("DiffusionSegLib.bridge", "DiffusionSegLib.organs", "DiffusionSegLib.strategies", "DiffusionSegLib.errors",
                 "DiffusionSegLib.orientation", "DiffusionSegLib.organ_trust")  # standard library and numpy only


def test_module_imports_the_engine_only_after_installation():
    """The panel, the model list and the annotated-slice count use the bridge only: no slicerio, SimpleITK or torch
    import on the status path, and none in set-up (torch in the GUI thread is slow, and a broken one breaks the panel)."""
    tree = module_tree()
    offenders = []

    def visit(node: ast.AST, function: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, ast.FunctionDef) else function
            modules = []
            if isinstance(child, ast.ImportFrom) and child.module == "DiffusionSegLib":  # from DiffusionSegLib import strategies
                modules = [f"{child.module}.{alias.name}" for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module:
                modules = [child.module]
            elif isinstance(child, ast.Import):
                modules = [alias.name for alias in child.names]
            for module in modules:
                top = module.split(".")[0]
                heavy = top in ("torch", "SimpleITK", "slicerio", "safetensors", "skimage", "platformdirs")
                engine = top == "DiffusionSegLib" and not module.startswith(LIGHT_MODULES)
                if (heavy or engine) and function not in ENGINE_IMPORTS_ALLOWED_IN:
                    offenders.append(f"{module} in {function or 'module level'}")
            visit(child, name)

    visit(tree, None)
    assert not offenders, offenders


# --- the module against a stand-in for Slicer ------------------------------------------------------------------


class FakeWidget:
    """A Qt widget: settable properties; other calls do nothing."""

    def __init__(self) -> None:
        self.text, self.enabled = "", True

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


class FakeCombo(FakeWidget):
    def __init__(self) -> None:
        super().__init__()
        self.items: list[tuple[str, str]] = []
        self.currentIndex = -1

    def blockSignals(self, block: bool) -> bool:
        return False

    def clear(self) -> None:
        self.items, self.currentIndex = [], -1

    def addItem(self, text: str, data: str) -> None:
        self.items.append((text, data))
        self.currentIndex = max(self.currentIndex, 0)

    def findData(self, data: str) -> int:
        return next((i for i, item in enumerate(self.items) if item[1] == data), -1)

    @property
    def currentData(self) -> str | None:
        return self.items[self.currentIndex][1] if 0 <= self.currentIndex < len(self.items) else None


class FakeUI:
    def __init__(self) -> None:
        self.modelComboBox = FakeCombo()

    def __getattr__(self, name: str) -> FakeWidget:
        widget = FakeWidget()
        setattr(self, name, widget)
        return widget


def make_widget(module: types.ModuleType):
    """A DiffusionSegWidget with fake ui and parameters (setup() needs a real Slicer)."""
    widget = module.DiffusionSegWidget.__new__(module.DiffusionSegWidget)
    module.VTKObservationMixin.__init__(widget)
    widget.ui = FakeUI()
    widget.state = module.State.IDLE
    widget.logic = module.DiffusionSegLogic()
    widget._statusTimer = types.SimpleNamespace(start=lambda: None)
    widget._observedSegmentation, widget._annotationEvents, widget._annotationStatus = None, (), None
    widget._parameterNode = types.SimpleNamespace(inputVolume=object(), annotationSegmentation=None, outputSegmentation=None, model="",
                                                  device=module.Device.AUTO)
    return widget


def test_failed_install_returns_the_panel_to_idle(monkeypatch):
    module = load_module(monkeypatch)
    widget = make_widget(module)
    states, logs = [], []
    widget.setState = lambda state: (states.append(state), setattr(widget, "state", state))
    widget.addLog = logs.append
    widget.logic.missingDependencies = lambda: ["slicerio>=1.1"]

    def failing_install():
        raise RuntimeError("pip: no network")

    widget.logic.installDependencies = failing_install
    assert widget.ensureDependencies() is False
    assert states == [module.State.INSTALLING, module.State.IDLE] and widget.state == module.State.IDLE
    assert len(FAKE_ERRORS) == 1 and FAKE_ERRORS[0].startswith("Failed to install the Python packages.")  # shown to the user once
    assert "no network" in FAKE_ERRORS[0]
    assert "no network" in logs[-1] and "not installed" in widget.ui.statusLabel.text

    restarts = []
    widget.logic.installDependencies = lambda: None
    widget.logic.offerRestart = lambda: restarts.append(True)
    assert widget.ensureDependencies() is True and widget.state == module.State.IDLE and restarts == [True]


def test_models_are_listed_and_segment_enabled_before_installation(monkeypatch):
    module = load_module(monkeypatch)
    monkeypatch.setattr(module.dependencies, "torch_missing", lambda *args: dependencies.Missing("torch", "2.2", None))
    monkeypatch.setattr(module.dependencies, "missing_requirements", lambda *args, **kwargs: [dependencies.Missing("slicerio", "1.1", None)])
    widget = make_widget(module)
    widget.refreshModels()
    assert any(text.startswith("flare22-segmentor (bundled)") for text, _ in widget.ui.modelComboBox.items)
    assert widget.selectedModel().endswith("flare22-segmentor") and widget._parameterNode.model == widget.selectedModel()
    assert widget.ui.segmentButton.enabled is True
    assert "segmentor" in widget.ui.modelInfoLabel.text


def test_annotated_slice_count_follows_painting_and_entering(monkeypatch):
    module = load_module(monkeypatch)
    slicer = sys.modules["slicer"]
    widget = make_widget(module)
    counted, started = [], []
    widget.updateAnnotationStatus = lambda: counted.append(True)
    widget._statusTimer = types.SimpleNamespace(start=lambda: started.append(True))
    first, second = slicer.vtkSegmentation(), slicer.vtkSegmentation()
    widget.observeAnnotation(types.SimpleNamespace(GetSegmentation=lambda: first))
    events = {event for observed, event, *_ in widget.Observations if observed is first}
    assert slicer.vtkSegmentation.SourceRepresentationModified in events  # what a paint stroke fires
    assert {sys.modules["vtk"].vtkCommand.ModifiedEvent, slicer.vtkSegmentation.SegmentModified, slicer.vtkSegmentation.SegmentAdded,
            slicer.vtkSegmentation.SegmentRemoved} <= events
    assert counted == [True]
    first.AddEmptySegment("Segment_1", "Liver")  # the real library's events reach the debounce timer
    assert started

    # Painting happened in Segment Editor, now the user comes back: counted again, observing the current annotation only.
    widget.initializeParameterNode = lambda: None
    widget._parameterNode.annotationSegmentation = types.SimpleNamespace(GetSegmentation=lambda: second)
    widget.enter()
    assert counted == [True, True]
    assert {observed for observed, *_ in widget.Observations} == {second}
    started.clear()
    first.AddEmptySegment("Segment_2", "Spleen")
    assert not started  # the old annotation is no longer observed


def test_mps_is_offered_only_on_macos(monkeypatch):
    module = load_module(monkeypatch)
    assert ("MPS" in module.Device.__members__) == (sys.platform == "darwin")
    assert {"AUTO", "CUDA", "CPU"} <= set(module.Device.__members__)


def test_sample_is_registered_in_sample_data(monkeypatch):
    module = load_module(monkeypatch)
    registered = []
    fake = types.ModuleType("SampleData")
    fake.SampleDataLogic = types.SimpleNamespace(registerCustomSampleDataSource=lambda **kwargs: registered.append(kwargs))
    monkeypatch.setitem(sys.modules, "SampleData", fake)
    module.registerSampleData()
    assert len(registered) == 1
    source = registered[0]
    assert source["category"] == "DiffusionSeg" and source["nodeNames"] == sample_data.SAMPLE_NAME
    assert source["uris"] == sample_data.sample_path().resolve().as_uri() and source["thumbnailFileName"].endswith("DiffusionSeg.png")


def test_organ_volumes_come_from_segment_statistics(monkeypatch):
    module = load_module(monkeypatch)
    parameters: dict[str, str] = {}
    plugins = [type(name, (), {})() for name in ("LabelmapSegmentStatisticsPlugin", "ScalarVolumeSegmentStatisticsPlugin",
                                                  "ClosedSurfaceSegmentStatisticsPlugin")]

    class Logic:
        def __init__(self) -> None:
            self.plugins, self.computed = plugins, False

        def getParameterNode(self):
            return types.SimpleNamespace(SetParameter=parameters.__setitem__)

        def computeStatistics(self) -> None:
            self.computed = True

        def getStatistics(self) -> dict:
            assert self.computed
            return {"SegmentIDs": ["a"], ("a", "LabelmapSegmentStatisticsPlugin.voxel_count"): 10,
                    ("a", "LabelmapSegmentStatisticsPlugin.volume_cm3"): 12.5, ("a", "ScalarVolumeSegmentStatisticsPlugin.mean"): 50.0,
                    ("a", "ScalarVolumeSegmentStatisticsPlugin.stdev"): 5.0}

    monkeypatch.setitem(sys.modules, "SegmentStatistics", types.SimpleNamespace(SegmentStatisticsLogic=Logic))
    scene = sys.modules["slicer"].mrmlScene
    segmentationNode, volume = scene.AddNewNodeByClass("vtkMRMLSegmentationNode"), scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    segmentationNode.GetSegmentation().AddEmptySegment("a", "Spleen")
    text = module.DiffusionSegLogic().organVolumesText(segmentationNode, volume)
    assert text.splitlines()[0] == "Spleen: 12.5 mL, 50 ± 5 HU" and "Liver" in text.splitlines()[-1]
    assert parameters["Segmentation"] == segmentationNode.GetID() and parameters["ScalarVolume"] == volume.GetID()
    assert parameters["visibleSegmentsOnly"] == "False" and parameters["ClosedSurfaceSegmentStatisticsPlugin.enabled"] == "False"
    assert parameters["LabelmapSegmentStatisticsPlugin.enabled"] == parameters["ScalarVolumeSegmentStatisticsPlugin.enabled"] == "True"


# --- one Fine-tune click, one engine job ----------------------------------------------------------------------


def test_the_logic_polls_its_job_and_the_probe_with_one_timer():
    logic = ast.unparse(next(c for c in module_tree().body if isinstance(c, ast.ClassDef) and c.name == "DiffusionSegLogic"))
    assert logic.count("qt.QTimer(") == 1 and logic.count(".poll(") == 1
    assert "BackgroundRun" not in MODULE.read_text(encoding="utf-8")  # runs are started by the bridge's job object only


def test_status_says_which_organs_are_learned_and_which_kept(monkeypatch):
    module = load_module(monkeypatch)
    widget = make_widget(module)
    p = widget._parameterNode
    p.annotationSegmentation = types.SimpleNamespace(GetAttribute=lambda name: None)
    p.strategy, p.finetuneFrom, p.iterations, p.timeLimitMinutes, p.timestep, p.adaptSeconds = (
        module.Strategy.FT_DEC, module.FinetuneFrom.SELECTED, 160, 0.0, 0, 0)
    widget.refreshModels()  # selects the bundled segmentation model
    widget.logic.annotationStatus = lambda node, volume, labelSet=None: {"slices": [2, 5], "organs": ["liver", "spleen"], "slice_axis": 2,
                                                                         "unmatched": []}
    widget.updateAnnotationStatus()
    lines = widget.ui.annotationStatusLabel.text.splitlines()
    assert lines[0] == "2 annotated axial slices (3, 6)"
    assert lines[1].startswith("Learned from your slices: Liver, Spleen. Kept from the starting model (flare22-segmentor): Right kidney, ")
    assert lines[2] == widget.annotationHint()

    p.finetuneFrom = module.FinetuneFrom.BASE  # a settings change reaches updateButtons through the parameter node
    widget.updateButtons()
    assert "Not learned" in widget.ui.annotationStatusLabel.text and "Kept from" not in widget.ui.annotationStatusLabel.text

    def broken(node, volume, labelSet=None):
        raise RuntimeError("export failed")

    widget.logic.annotationStatus = broken
    widget.updateAnnotationStatus()
    widget.updateButtons()  # the error stays: no stale count comes back
    assert widget.ui.annotationStatusLabel.text == "Cannot count annotated slices: export failed"


def test_finetune_is_one_refine_job_for_the_painted_organs(monkeypatch, tmp_path):
    """Fine-tune exports the CT and the annotation and starts one `refine` run, labelled for the painted organs only; a failed
    run changes nothing in the scene and leaves no file behind."""
    import numpy as np

    from DiffusionSegLib.bridge import model_cards, scene
    from DiffusionSegLib.bridge.job import JobEnd

    module = load_module(monkeypatch, temporary=tmp_path)
    slicer = sys.modules["slicer"]
    ct, labels = module.DiffusionSegTest.syntheticCT()
    volume = slicer.util.addVolumeFromArray(ct, ijkToRAS=np.diag([-6.0, -6.0, 12.0, 1.0]), name="CT")
    logic = module.DiffusionSegLogic()
    logs, results, started = [], [], []
    logic.logCallback = logs.append
    node = logic.prepareAnnotation(volume)  # 13 organ segments, 12 of them left empty
    liver = node.GetSegmentation().GetSegmentIdBySegmentName("Liver")
    mask = np.zeros_like(labels)
    mask[[3, 7]] = labels[[3, 7]] == 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, node, liver, volume)
    monkeypatch.setattr(logic.jobs, "start_job", lambda lines, on_done, on_event=None, env=None: started.append((lines, on_done)))
    base = model_cards.BUNDLED_DIR / "flare22-segmentor"

    logic.finetune(volume, node, module.commands.FinetuneSettings(base=str(base)), "mine", "cpu", lambda *r: results.append(r))
    (lines, on_done), = started
    assert len(lines) == 1, "one engine run per click"
    args = lines[0][lines[0].index("DiffusionSegLib") + 1:]
    assert args[0] == "refine"
    flags = dict(zip(args[1::2], args[2::2], strict=True))
    assert flags["--organs"] == "liver"  # the painted organ, not the 13 segments
    assert flags["--base"] == str(base) and "--recorded-slices" not in flags and "--written" not in flags
    assert Path(flags["--image"]).is_file() and Path(flags["--annotation"]).is_file()  # exported for the engine
    written = Path(flags["--written-output"])
    assert written.parent == logic.writtenLabelsFolder() and not written.exists()
    plan = f"Learned from your slices: Liver. Kept from the starting model ({model_cards.segmentor_name(base)}): Right kidney, "
    assert any(line.startswith("Fine-tuning on 2 annotated slices. " + plan) for line in logs)

    before = slicer.util.arrayFromSegmentBinaryLabelmap(node, liver, volume).copy()
    written.parent.mkdir(parents=True, exist_ok=True)
    written.write_bytes(b"left by the engine")  # whatever the failed run may have left there goes
    on_done(JobEnd(2, "diffusionseg: error: annotation.seg.nrrd: bad", 3.0, 1))
    assert results == [(False, "Fine-tuning stopped on a problem with the input: annotation.seg.nrrd: bad", False)]
    assert not Path(flags["--annotation"]).parent.exists() and not written.exists()
    assert scene.written_path(node) is None and node.GetAttribute(scene.ANNOTATED_SLICES_ATTRIBUTE) is None
    np.testing.assert_array_equal(slicer.util.arrayFromSegmentBinaryLabelmap(node, liver, volume), before)

    tumour = node.GetSegmentation().AddEmptySegment("tumour", "my tumour")  # painted, but no organ: refused before any export
    box = np.zeros_like(labels)
    box[3, :4, :4] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(box, node, tumour, volume)
    with pytest.raises(ValueError, match="my tumour"):
        logic.finetune(volume, node, module.commands.FinetuneSettings(), None, "cpu", lambda *r: results.append(r))
    assert len(started) == 1


def test_the_panel_takes_the_organs_from_the_models_card(monkeypatch, tmp_path):
    """A model with a label set of its own: the annotation gets its segments, painting is counted and fine-tuned as its
    organs, and an organ of another set is refused naming the set (all read from model.json, without torch)."""
    import json

    import numpy as np
    from slicer_helpers import random_tiny_segmentor

    from DiffusionSegLib.bridge import model_cards
    from DiffusionSegLib.organs import LabelSet

    tumours = LabelSet.from_card([{"label": 1, "name": "tumour", "display_name": "Liver tumour", "color": [255, 0, 128]},
                                  {"label": 2, "name": "liver"}])
    folder = random_tiny_segmentor(tmp_path / "tumours", name="Tumours")
    card = json.loads((folder / "model.json").read_text())
    (folder / "model.json").write_text(json.dumps({**card, "labels": tumours.to_card()}))
    module = load_module(monkeypatch, temporary=tmp_path)
    slicer = sys.modules["slicer"]
    settings = module.commands.FinetuneSettings(base=str(folder))
    assert settings.new_label_set() == tumours == module.commands.FinetuneSettings(strategy="fs", label_set=str(folder)).new_label_set()
    assert module.commands.FinetuneSettings().new_label_set() == model_cards.label_set("flare22-segmentor")

    ct, labels = module.DiffusionSegTest.syntheticCT()
    volume = slicer.util.addVolumeFromArray(ct, ijkToRAS=np.diag([-6.0, -6.0, 12.0, 1.0]), name="CT")
    logic = module.DiffusionSegLogic()
    logs, started = [], []
    logic.logCallback = logs.append
    node = logic.prepareAnnotation(volume, None, settings.new_label_set())
    segmentation = node.GetSegmentation()
    segments = [segmentation.GetSegment(i) for i in segmentation.GetSegmentIDs()]
    assert [s.GetName() for s in segments] == ["Liver tumour", "Liver"]
    assert segments[0].GetColor() == pytest.approx((1.0, 0.0, 128 / 255))
    mask = np.zeros_like(labels)
    mask[[3, 7]] = labels[[3, 7]] == 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, node, segmentation.GetSegmentIdBySegmentName("Liver tumour"), volume)
    assert logic.annotationStatus(node, volume, tumours)["organs"] == ["tumour"]
    monkeypatch.setattr(logic.jobs, "start_job", lambda lines, on_done, on_event=None, env=None: started.append((lines, on_done)))
    logic.finetune(volume, node, settings, "mine", "cpu", lambda *r: None)
    (lines, _), = started
    args = lines[0][lines[0].index("DiffusionSegLib") + 1:]
    assert dict(zip(args[1::2], args[2::2], strict=True))["--organs"] == "tumour"
    assert any("Learned from your slices: Liver tumour. Kept from the starting model (Tumours): Liver." in line for line in logs)
    # from random weights the selected model still names the organs: passed on as --label-set
    fs = module.commands.FinetuneSettings(strategy="fs", label_set=str(folder))
    assert module.commands.refine_args("ct.nrrd", "a.seg.nrrd", "m", "r.seg.nrrd", fs)[-2:] == ["--label-set", str(folder)]

    spleen = segmentation.AddEmptySegment("spleen", "Spleen")  # a FLARE22 organ, not one of this model's
    box = np.zeros_like(labels)
    box[3, :4, :4] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(box, node, spleen, volume)
    with pytest.raises(ValueError, match=r"match none of the label set's 2 labels \(1 tumour, 2 liver\) before fine-tuning: Spleen"):
        logic.finetune(volume, node, settings, None, "cpu", lambda *r: None)
