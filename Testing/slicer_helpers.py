"""Helpers for the tests of the Slicer module: a random tiny segmentation model, painted slices, a launcher-like
wrapper, and DiffusionSeg.py loaded against Slicer's real MRML and segmentation libraries (Kitware's slicer-core
wheel) with stand-ins only for what that wheel lacks: Qt and the application (slicer.app, its event loop,
slicer.modules, message boxes, translation, the parameter node wrapper, the scripted-module base classes)."""

from __future__ import annotations

import importlib.util
import sys
import types
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DiffusionSegLib.models import ModelCard, save_model
from DiffusionSegLib.preprocessing import PreprocessingSpec
from DiffusionSegLib.segmentor import Segmentor
from DiffusionSegLib.unet import preset_config


def random_tiny_segmentor(folder: Path, name: str = "test-random-segmentor") -> Path:
    """A randomly initialised `tiny` segmentation model: exercises the mechanics in seconds, predicts nonsense."""
    torch.manual_seed(0)
    config = preset_config("tiny")
    segmentor = Segmentor(config, head_width=32)
    card = ModelCard(
        kind="segmentor",
        unet=config,
        preprocessing=PreprocessingSpec.for_size(config.image_size),
        head={"width": 32, "layers": 2},
        strategy="fs",
        preset="tiny",
        name=name,
        provenance={"note": "random initialisation, test fixture"},
    )
    return save_model(folder, card, segmentor.state_dict())


def keep_array_slices(labels: sitk.Image, indices: Iterable[int]) -> sitk.Image:
    """`labels` with only the given array-z slices painted."""
    array = sitk.GetArrayFromImage(labels)
    kept = np.zeros_like(array)
    index = list(indices)
    kept[index] = array[index]
    image = sitk.GetImageFromArray(kept)
    image.CopyInformation(labels)
    return image


# --- DiffusionSeg.py against real slicer-core, with stand-ins for Qt and the application only ---

MODULE_PATH = Path(__file__).resolve().parents[1] / "DiffusionSegExtension" / "DiffusionSeg.py"

# A wrapper that behaves like Slicer's PythonSlicer launcher: it runs the real Python as its own child and waits.
LAUNCHER = "import subprocess, sys\nsys.exit(subprocess.call(sys.argv[1:]))\n"

NO_SLICER_CORE = ("slicer-core (Slicer's MRML and segmentation libraries as a wheel) is not installed: PyPI has it for "
                  "CPython 3.10-3.13 on Linux x86_64, Windows x64 and macOS arm64 only")


def real_slicer() -> types.ModuleType:
    """The slicer package of the slicer-core wheel, or a skip where no wheel exists."""
    try:
        import slicer
    except ImportError:
        pytest.skip(NO_SLICER_CORE)
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip(f"the importable 'slicer' ({getattr(slicer, '__file__', '?')}) is not slicer-core")
    return slicer


def slicer_core_version() -> str:
    from importlib.metadata import version

    return version("slicer-core")


class SlicerApp:
    """What Slicer's application sets up for a scene: the module logics the module asks for, observing it."""

    def __init__(self, scene=None, subject_hierarchy_items: bool = False) -> None:
        """With `subject_hierarchy_items`, every data node added gets an item under the scene, as Slicer's subject
        hierarchy plugins give it (slicer-core has none of them)."""
        slicer = real_slicer()
        self.scene = scene or slicer.vtkMRMLScene()
        if subject_hierarchy_items:
            import vtk

            @vtk.calldata_type(vtk.VTK_OBJECT)
            def add_item(scene, event, node) -> None:
                sh = scene.GetSubjectHierarchyNode()
                if node.IsA("vtkMRMLDisplayableNode") and sh is not None and not sh.GetItemByDataNode(node):
                    sh.CreateItem(sh.GetSceneItemID(), node)

            self._add_item = add_item  # the observer holds no reference of its own
            self.scene.AddObserver(self.scene.NodeAddedEvent, add_item)
        self.segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
        self.volumes = slicer.vtkSlicerVolumesLogic()
        self.subject_hierarchy = slicer.vtkSlicerSubjectHierarchyModuleLogic()
        for logic in (self.segmentations, self.volumes, self.subject_hierarchy):
            logic.SetMRMLScene(self.scene)
        self.modules = types.SimpleNamespace(
            segmentations=types.SimpleNamespace(logic=lambda: self.segmentations),
            volumes=types.SimpleNamespace(logic=lambda: self.volumes),
            subjecthierarchy=types.SimpleNamespace(logic=lambda: self.subject_hierarchy),
        )

    def node_ids(self) -> set[str]:
        return {self.scene.GetNthNode(n).GetID() for n in range(self.scene.GetNumberOfNodes())}


class _Timer:
    """qt.QTimer: started timers fire their timeout() slots from the application's processEvents()."""

    running_timers: list[_Timer] = []

    def __init__(self) -> None:
        self.running, self.single_shot, self.slots = False, False, []

    def setSingleShot(self, value: bool) -> None:
        self.single_shot = value

    def setInterval(self, ms: int) -> None:
        pass

    def connect(self, signal: str, slot) -> None:
        assert signal == "timeout()", signal
        self.slots.append(slot)

    def start(self) -> None:
        self.running = True
        if self not in _Timer.running_timers:
            _Timer.running_timers.append(self)

    def stop(self) -> None:
        self.running = False


def process_events() -> None:
    """slicer.app.processEvents(): one round of the running timers."""
    for timer in list(_Timer.running_timers):
        if not timer.running:
            _Timer.running_timers.remove(timer)
            continue
        if timer.single_shot:
            timer.stop()
        for slot in timer.slots:
            slot()


FAKE_ERRORS: list[str | None] = []  # texts of the error message boxes shown


class _Base:
    def __init__(self, *args, **kwargs) -> None:
        pass


def qt_and_application_modules() -> dict[str, types.ModuleType]:
    """The modules slicer-core does not have: qt, slicer.i18n, slicer.parameterNodeWrapper, slicer.ScriptedLoadableModule."""
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls
    wrapper.WithinRange = lambda low, high: (low, high)
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest"):
        setattr(scripted, name, type(name, (_Base,), {}))

    class Test(_Base):  # unittest's assertions for the self-test
        def __getattr__(self, name):
            import unittest

            return getattr(unittest.TestCase(), name)

    scripted.ScriptedLoadableModuleTest = type("ScriptedLoadableModuleTest", (Test,), {"delayDisplay": lambda self, message, *a: None})
    qt = types.ModuleType("qt")
    qt.QTimer = _Timer
    qt.Qt = types.SimpleNamespace(WaitCursor=3)
    return {"slicer.i18n": i18n, "slicer.parameterNodeWrapper": wrapper, "slicer.ScriptedLoadableModule": scripted, "qt": qt}


def load_module(monkeypatch, app: SlicerApp | None = None, temporary: Path | None = None) -> types.ModuleType:
    """DiffusionSeg.py imported against real slicer-core on `app`'s scene (a fresh module object each time).

    Only Qt and the application are stand-ins; everything MRML, VTK and slicer.util's scene helpers is the real thing.
    """
    slicer = real_slicer()
    app = app or SlicerApp()
    FAKE_ERRORS.clear()
    _Timer.running_timers.clear()
    for name, module in qt_and_application_modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    application = types.SimpleNamespace(connect=lambda *a: None, processEvents=process_events, temporaryPath=str(temporary or "/tmp"),
                                        testingEnabled=lambda: False, setOverrideCursor=lambda cursor: None,
                                        restoreOverrideCursor=lambda: None)
    monkeypatch.setattr(slicer, "app", application, raising=False)
    monkeypatch.setattr(slicer, "mrmlScene", app.scene, raising=False)
    monkeypatch.setattr(slicer, "modules", app.modules, raising=False)
    # message boxes are Qt: recorded instead of shown
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, *a, **k: FAKE_ERRORS.append(text))
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda *a, **k: True)
    monkeypatch.setattr(slicer.util, "confirmYesNoDisplay", lambda *a, **k: False)
    monkeypatch.setattr(slicer.util, "delayDisplay", lambda *a, **k: None)
    spec = importlib.util.spec_from_file_location("DiffusionSegUnderTest", MODULE_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
