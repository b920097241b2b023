"""Helpers for the tests of the Slicer module: a random tiny segmentation model, painted slices, a launcher-like
wrapper, and a stand-in for the few parts of 3D Slicer that DiffusionSeg.py touches (so widget and logic
methods run under pytest)."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
from collections.abc import Iterable
from pathlib import Path

import numpy as np
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


# --- a stand-in for the parts of 3D Slicer the module touches, to run widget and logic methods without Slicer ---

MODULE_PATH = Path(__file__).resolve().parents[1] / "DiffusionSegExtension" / "DiffusionSeg.py"

# A wrapper that behaves like Slicer's PythonSlicer launcher: it runs the real Python as its own child and waits.
LAUNCHER = "import subprocess, sys\nsys.exit(subprocess.call(sys.argv[1:]))\n"


class FakeNode:
    """An MRML node: an id, a name, attributes, an optional display node."""

    def __init__(self, scene: FakeScene, className: str, name: str = "") -> None:
        self.scene, self.className, self.name = scene, className, name
        self.attributes: dict[str, str] = {}
        self.displayNode: FakeNode | None = None
        self.hidden = False

    def GetID(self) -> str:
        return f"{self.className}{id(self)}"

    def GetName(self) -> str:
        return self.name

    def GetDisplayNode(self) -> FakeNode | None:
        return self.displayNode

    def GetColorNode(self) -> FakeNode | None:
        return getattr(self, "colorNode", None)

    def GetAttribute(self, name: str) -> str | None:
        return self.attributes.get(name)

    def SetAttribute(self, name: str, value: str) -> None:
        self.attributes[name] = value

    def HideFromEditorsOn(self) -> None:
        self.hidden = True

    def GetSegmentation(self) -> FakeSegmentation:
        if not hasattr(self, "segmentation"):
            self.segmentation = FakeSegmentation({})
        return self.segmentation

    def StartModify(self) -> int:
        return 0

    def __getattr__(self, name: str):
        """Other MRML calls (geometry references, display nodes) change nothing these tests look at."""
        if name[:1].isupper():
            return lambda *args, **kwargs: None
        raise AttributeError(name)


class FakeScene:
    """The MRML scene: which nodes exist."""

    def __init__(self) -> None:
        self.nodes: list[FakeNode] = []

    def AddNewNodeByClass(self, className: str, name: str = "") -> FakeNode:
        node = FakeNode(self, className, name)
        self.nodes.append(node)
        return node

    def RemoveNode(self, node: FakeNode | None) -> None:
        if node in self.nodes:
            self.nodes.remove(node)
            if node.displayNode is not None:  # Slicer removes a node's display nodes with it, not what they reference
                self.RemoveNode(node.displayNode)

    def GenerateUniqueName(self, name: str) -> str:
        return f"{name}_{len(self.nodes)}"


class FakeSegmentation:
    """vtkSegmentation: segment ids, names and terminology."""

    SourceRepresentationModified, SegmentAdded, SegmentRemoved, SegmentModified = 62100, 62101, 62102, 62103

    def __init__(self, segments: dict[str, str]) -> None:
        self.segments = dict(segments)  # id -> name

    def GetSegmentIDs(self) -> list[str]:
        return list(self.segments)

    def GetSegment(self, segmentId: str):
        name = self.segments[segmentId]
        return types.SimpleNamespace(GetName=lambda: name, GetTerminology=lambda: "")

    def RemoveSegment(self, segmentId: str) -> None:
        del self.segments[segmentId]

    def CopySegmentFromSegmentation(self, source: FakeSegmentation, segmentId: str) -> bool:
        target = segmentId if segmentId not in self.segments else f"{segmentId}_copy"  # Slicer makes the id unique too
        self.segments[target] = source.segments[segmentId]
        return True


class FakeObservationMixin:
    """slicer.util.VTKObservationMixin: records what is observed."""

    def __init__(self) -> None:
        self.observers: list[tuple[object, object, object]] = []

    def addObserver(self, obj, event, method) -> None:
        self.observers.append((obj, event, method))

    def removeObserver(self, obj, event, method) -> None:
        self.observers = [o for o in self.observers if o != (obj, event, method)]

    def removeObservers(self) -> None:
        self.observers = []


@contextlib.contextmanager
def try_with_error_display(message=None, show=True, waitCursor=False):
    """slicer.util.tryWithErrorDisplay as Slicer 5.10-5.12 define it: shows the error, then re-raises it."""
    try:
        yield
    except Exception:
        FAKE_ERRORS.append(message)
        raise


FAKE_ERRORS: list[str | None] = []


class _Base:
    def __init__(self, *args, **kwargs) -> None:
        pass


class _Timer:
    def __init__(self) -> None:
        self.running = False

    def setSingleShot(self, value: bool) -> None:
        pass

    def setInterval(self, ms: int) -> None:
        pass

    def connect(self, signal: str, slot) -> None:
        pass

    def start(self) -> None:
        self.running = True

    def stop(self) -> None:
        self.running = False


def fake_slicer_modules(scene: FakeScene) -> dict[str, types.ModuleType]:
    """Modules named slicer, slicer.util, qt, vtk, ... with just what DiffusionSeg.py uses, backed by `scene`."""
    slicer = types.ModuleType("slicer")
    slicer.mrmlScene = scene
    slicer.app = types.SimpleNamespace(connect=lambda *a: None, processEvents=lambda: None, temporaryPath="/tmp")
    slicer.vtkMRMLScalarVolumeNode = type("vtkMRMLScalarVolumeNode", (), {})
    slicer.vtkMRMLSegmentationNode = type("vtkMRMLSegmentationNode", (), {})
    slicer.vtkSegmentation = FakeSegmentation
    slicer.modules = types.SimpleNamespace()
    util = types.ModuleType("slicer.util")
    util.VTKObservationMixin = FakeObservationMixin
    util.tryWithErrorDisplay = try_with_error_display
    util.errorDisplay = lambda *a, **k: FAKE_ERRORS.append(a[0] if a else None)
    util.confirmOkCancelDisplay = lambda *a, **k: True
    util.confirmYesNoDisplay = lambda *a, **k: False
    util.getNodesByClass = lambda className: [n for n in scene.nodes if n.className == className]
    slicer.util = util
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls
    wrapper.WithinRange = lambda low, high: (low, high)
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest"):
        setattr(scripted, name, type(name, (_Base,), {}))
    qt = types.ModuleType("qt")
    qt.QTimer = _Timer
    vtk = types.ModuleType("vtk")
    vtk.vtkCommand = types.SimpleNamespace(ModifiedEvent=33)
    vtk.vtkStringArray = lambda: types.SimpleNamespace(InsertNextValue=lambda value: None)
    return {"slicer": slicer, "slicer.util": util, "slicer.i18n": i18n, "slicer.parameterNodeWrapper": wrapper,
            "slicer.ScriptedLoadableModule": scripted, "qt": qt, "vtk": vtk}


def load_module_with_fake_slicer(monkeypatch, scene: FakeScene | None = None) -> types.ModuleType:
    """DiffusionSeg.py imported against the stand-in Slicer (a fresh module object each time)."""
    FAKE_ERRORS.clear()
    for name, module in fake_slicer_modules(scene or FakeScene()).items():
        monkeypatch.setitem(sys.modules, name, module)
    spec = importlib.util.spec_from_file_location("DiffusionSegUnderTest", MODULE_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
