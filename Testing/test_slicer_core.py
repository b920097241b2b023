"""The module's scene work (DiffusionSegLib.bridge.scene, and the Logic on top of it) against Slicer's real MRML and
segmentation libraries (Kitware's slicer-core wheel) on a real CT, abdomen-ct-a: the annotation segmentation, reading
painted slices, exporting the CT and the annotation, importing the engine's result, write-back, the subject
hierarchy, the slice jump and pruning. Voxels and geometry are checked against SimpleITK; nothing may be left in the
scene. slicer-core has no Qt and no application: slicer_helpers.SlicerApp sets up the module logics Slicer would,
and the subject-hierarchy items Slicer's plugins would make for loaded data are made here."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import same_geometry, shared_data
from slicer_helpers import SlicerApp, keep_array_slices, load_module, real_slicer, slicer_core_version

from DiffusionSegLib import seg_nrrd
from DiffusionSegLib.bridge import painting, scene
from DiffusionSegLib.bridge.slice_ranking import REPORT_VERSION
from DiffusionSegLib.imageio import read_labels
from DiffusionSegLib.organs import ORGANS, match_organ, organ_by_label, terminology_string
from DiffusionSegLib.writeback import prepare_annotation, write_back

slicer = real_slicer()  # skips the whole file where no slicer-core wheel exists

PAINTED = [75, 90, 100]  # array z (k) slices of abdomen-ct-a through the liver (organs lie on slices 57-111)
TUMOUR_BOX = (slice(5, 15), slice(5, 15))  # (j, i) in the corner of the slice: outside every organ


def test_slicer_core_version_is_one_the_module_supports():
    # .ci/run reruns this file on each older wheel it claims (PYTHONPATH first): make sure that one is what loaded
    expected = os.environ.get("DIFFUSIONSEG_SLICER_CORE")
    if expected:
        assert slicer_core_version() == expected
        assert Path(sys.modules["slicer_core"].__file__).parent.parent == Path(os.environ["PYTHONPATH"].split(os.pathsep)[0])
    major, minor = (int(p) for p in slicer_core_version().split(".")[:2])
    assert (major, minor) >= (5, 10), slicer_core_version()
    # the constants the module observes are the library's, not guessed ones
    assert (slicer.vtkSegmentation.SegmentAdded, slicer.vtkSegmentation.SegmentRemoved, slicer.vtkSegmentation.SegmentModified) == (62102, 62103, 62104)


@pytest.fixture
def case(tmp_path):
    """abdomen-ct-a loaded into a fresh scene as Slicer loads it, under Patient / Study in the subject hierarchy."""
    ct_path, labels_path = shared_data("abdomen-ct-a", "ct.nii.gz"), shared_data("abdomen-ct-a", "labels.nii.gz")
    app = SlicerApp()
    storage = app.scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(ct_path))
    volume = app.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "abdomen-ct-a")
    assert storage.ReadData(volume)
    volume.SetAndObserveStorageNodeID(storage.GetID())
    volume.CreateDefaultDisplayNodes()
    sh = app.scene.GetSubjectHierarchyNode()
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient"), "Study")
    sh.CreateItem(study, volume)
    return {"app": app, "ops": scene.SceneOps(app.scene, app.segmentations), "volume": volume, "study": study, "tmp": tmp_path,
            "ct_path": ct_path, "ct": sitk.ReadImage(str(ct_path)), "labels": sitk.ReadImage(str(labels_path))}


def paint(app: SlicerApp, node, volume, labels: np.ndarray) -> None:
    """Paint FLARE22 `labels` (k, j, i) into the organ segments of `node`, as Segment Editor would."""
    import vtk
    from vtk.util.numpy_support import numpy_to_vtk

    labelmap = app.volumes.CreateAndAddLabelVolume(volume, "painted")
    image = labelmap.GetImageData()
    image.GetPointData().SetScalars(numpy_to_vtk(np.ascontiguousarray(labels, dtype=np.uint8).ravel(), deep=True))
    segmentation = node.GetSegmentation()
    organ_ids = {match_organ(*scene.segment_name_and_terminology(segmentation, i)): i for i in segmentation.GetSegmentIDs()}
    ids = vtk.vtkStringArray()
    for organ in ORGANS:
        ids.InsertNextValue(organ_ids[organ])  # value v goes to the v-th id
    try:
        assert app.segmentations.ImportLabelmapToSegmentationNode(labelmap, node, ids)
    finally:
        scene.remove_with_display_nodes(app.scene, labelmap)


def segment_voxels(app: SlicerApp, node, segment_id: str, volume) -> np.ndarray:
    """One segment as a 0/1 array on the CT grid."""
    import vtk

    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    labelmap = app.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    try:
        assert app.segmentations.ExportSegmentsToLabelmapNode(node, ids, labelmap, volume)
        return np.array(scene._voxels(labelmap))
    finally:
        color = labelmap.GetDisplayNode().GetColorNode() if labelmap.GetDisplayNode() else None
        if color is not None:
            app.scene.RemoveNode(color)
        scene.remove_with_display_nodes(app.scene, labelmap)


def check_organ_segments(node, present: set[int]) -> None:
    """Each segment of `node` is an organ with its name, colour and terminology (and the 13 organs each once)."""
    segmentation = node.GetSegmentation()
    seen = []
    for segment_id in segmentation.GetSegmentIDs():
        segment = segmentation.GetSegment(segment_id)
        organ = match_organ(segment.GetName(), segment.GetTerminology())
        if organ is None:
            continue
        seen.append(organ.label)
        assert segment.GetName() == organ.display_name
        assert np.allclose(segment.GetColor(), organ.color_float, atol=1e-6)
        assert segment.GetTerminology() == terminology_string(organ)
        assert match_organ(None, segment.GetTerminology()) == organ
    assert sorted(seen) == sorted(present)


def test_terminology_strings_parse_in_the_real_terminologies_logic():
    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    for organ in ORGANS:
        entry = slicer.vtkSlicerTerminologyEntry()
        assert logic.DeserializeTerminologyEntry(terminology_string(organ), entry), organ.name
        assert entry.GetTypeObject().GetCodeValue() == organ.type.value
        assert entry.GetCategoryObject().GetCodeValue() == organ.category.value
        assert (entry.GetTypeModifierObject().GetCodeValue() or None) == (organ.modifier.value if organ.modifier else None)
        assert logic.SerializeTerminologyEntry(entry) == terminology_string(organ)


def test_prepare_annotation_and_painted_slices_on_a_real_ct(case):
    app, ops, volume = case["app"], case["ops"], case["volume"]
    before = app.node_ids()
    node = ops.prepare_annotation(volume)
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 13 and segmentation.GetNumberOfLayers() == 1
    check_organ_segments(node, {o.label for o in ORGANS})
    assert node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()) is volume
    sh = app.scene.GetSubjectHierarchyNode()
    assert sh.GetItemParent(sh.GetItemByDataNode(node)) == case["study"]
    assert ops.annotation_status(node, volume) == {"slices": [], "organs": [], "slice_axis": 2, "unmatched": []}

    truth = keep_array_slices(case["labels"], PAINTED)
    paint(app, node, volume, sitk.GetArrayFromImage(truth))
    added = app.node_ids() - before
    assert len(added) == 2  # the annotation and its display node: nothing of the export or the painting is left
    labels, unmatched = ops.labels_on_volume(node, volume)
    assert np.array_equal(labels, sitk.GetArrayFromImage(truth)) and unmatched == []  # voxel for voxel
    status = ops.annotation_status(node, volume)
    present = sorted({int(v) for v in np.unique(sitk.GetArrayFromImage(truth)) if v})
    assert status["slices"] == PAINTED and status["organs"] == [organ_by_label(v).name for v in present]
    assert app.node_ids() - before == added

    # prepared again (e.g. Annotate clicked twice): nothing added, nothing lost
    ops.prepare_annotation(volume, node)
    assert segmentation.GetNumberOfSegments() == 13
    assert np.array_equal(ops.labels_on_volume(node, volume)[0], sitk.GetArrayFromImage(truth))


def test_exports_match_simpleitk_and_leave_the_nodes_alone(case):
    app, ops, volume, tmp = case["app"], case["ops"], case["volume"], case["tmp"]
    node = ops.prepare_annotation(volume)
    truth = keep_array_slices(case["labels"], PAINTED)
    paint(app, node, volume, sitk.GetArrayFromImage(truth))
    before = app.node_ids()
    exported = sitk.ReadImage(str(ops.export_volume(volume, tmp / "ct.nrrd")))
    assert same_geometry(exported, case["ct"])
    assert np.array_equal(sitk.GetArrayFromImage(exported), sitk.GetArrayFromImage(case["ct"]))
    reread = read_labels(ops.export_segmentation(node, tmp / "annotation.seg.nrrd"), case["ct"])
    assert np.array_equal(sitk.GetArrayFromImage(reread), sitk.GetArrayFromImage(truth))
    assert app.node_ids() == before  # the temporary storage nodes are gone
    assert volume.GetStorageNode().GetFileName() == str(case["ct_path"])  # the CT still belongs to its own file
    assert node.GetStorageNode() is None


def test_new_segmentation_import_and_placement(case):
    app, ops, volume, tmp = case["app"], case["ops"], case["volume"], case["tmp"]
    before = app.node_ids()
    node = ops.new_segmentation(volume, "organs")
    result = tmp / "result.seg.nrrd"
    seg_nrrd.write_segmentation(case["labels"], result)  # the engine's single-layer file: 12 organs present
    started = time.monotonic()
    ops.import_segmentation(result, node, volume)
    seconds = time.monotonic() - started
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 12
    assert segmentation.GetNumberOfLayers() == 1, "one shared labelmap layer, not one full-size layer per segment"
    present = {int(v) for v in np.unique(sitk.GetArrayFromImage(case["labels"])) if v}
    check_organ_segments(node, present)
    labels, _ = ops.labels_on_volume(node, volume)
    assert np.array_equal(labels, sitk.GetArrayFromImage(case["labels"]))
    assert node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()) is volume
    sh = app.scene.GetSubjectHierarchyNode()
    assert sh.GetItemParent(sh.GetItemByDataNode(node)) == case["study"]
    assert len(app.node_ids() - before) == 2 and before <= app.node_ids()  # the node and its display node only
    assert seconds < 30, seconds

    # placing an item that exists moves it; one without an item (a node added by a script) gets one
    other = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "scripted")
    assert not sh.GetItemByDataNode(other)
    ops.place_beside(other, volume)
    assert sh.GetItemParent(sh.GetItemByDataNode(other)) == case["study"]
    sh.SetItemParent(sh.GetItemByDataNode(other), sh.GetSceneItemID())
    ops.place_beside(other, volume)
    assert sh.GetItemParent(sh.GetItemByDataNode(other)) == case["study"]


def load_user_segmentation(app: SlicerApp, path: Path):
    """The user's own segmentation file, loaded into a node that keeps its storage node (as Slicer's Add Data does)."""
    storage = app.scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    node = app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my annotation")
    assert storage.ReadData(node)
    node.SetAndObserveStorageNodeID(storage.GetID())
    node.CreateDefaultDisplayNodes()
    return node


def test_write_back_keeps_painted_slices_the_users_segment_and_file(case):
    app, ops, volume, tmp = case["app"], case["ops"], case["volume"], case["tmp"]
    truth = sitk.GetArrayFromImage(case["labels"])
    # The user's file: a 'Tumour' segment under Slicer's first default id, which the engine uses for the liver.
    user = ops.new_segmentation(volume, "user")
    tumour = np.zeros(truth.shape, dtype=np.uint8)
    tumour[(PAINTED[0], *TUMOUR_BOX)] = 1
    user.GetSegmentation().AddEmptySegment("Segment_1", "Tumour", (1.0, 1.0, 0.0))
    tumour_labelmap = app.volumes.CreateAndAddLabelVolume(volume, "tumour")
    from vtk.util.numpy_support import numpy_to_vtk

    tumour_labelmap.GetImageData().GetPointData().SetScalars(numpy_to_vtk(tumour.ravel(), deep=True))
    import vtk

    ids = vtk.vtkStringArray()
    ids.InsertNextValue("Segment_1")
    assert app.segmentations.ImportLabelmapToSegmentationNode(tumour_labelmap, user, ids)
    scene.remove_with_display_nodes(app.scene, tumour_labelmap)
    user_file = ops.export_segmentation(user, tmp / "my annotation.seg.nrrd")
    scene.remove_with_display_nodes(app.scene, user)

    node = load_user_segmentation(app, user_file)
    storage, digest = node.GetStorageNode(), hashlib.sha256(user_file.read_bytes()).hexdigest()
    ops.prepare_annotation(volume, node)
    paint(app, node, volume, sitk.GetArrayFromImage(keep_array_slices(case["labels"], PAINTED)))
    assert node.GetSegmentation().GetSegment("Segment_1").GetName() == "Tumour"
    before = app.node_ids()

    # The engine's side of the fine-tune job (refine), from files: the CT, the painted slices and a prediction that differs
    # everywhere, merged. The engine refuses a painted segment that is no organ, as the status line tells the user, so the
    # slices go without the tumour.
    ct = ops.export_volume(volume, tmp / "ct.nrrd")
    organs_only = tmp / "organs-only.seg.nrrd"
    seg_nrrd.write_segmentation(keep_array_slices(case["labels"], PAINTED), organs_only)
    painted = tmp / "painted.seg.nrrd"
    summary = prepare_annotation(ct, organs_only, painted)
    assert summary["slices"] == PAINTED
    predicted = np.where(truth > 0, 3, 0).astype(np.uint8)  # everything called spleen
    prediction_image = sitk.GetImageFromArray(predicted)
    prediction_image.CopyInformation(case["labels"])
    prediction = tmp / "prediction.seg.nrrd"
    seg_nrrd.write_segmentation(prediction_image, prediction)
    report = tmp / "uncertainty.json"
    report.write_text(json.dumps({"version": REPORT_VERSION, "slice_axis": 2, "num_slices": truth.shape[0], "slices": []}))

    merged, first = tmp / "merged.seg.nrrd", painting.new_written_path(tmp / "written-labels")
    write_back(ct, prediction, painted, merged, summary["slices"], first)
    ops.write_back(volume, node, merged, summary["slices"], report, first)
    segmentation = node.GetSegmentation()
    labels, unmatched = ops.labels_on_volume(node, volume)
    assert np.array_equal(labels[PAINTED], truth[PAINTED])  # painted slices kept voxel for voxel
    others = [k for k in range(truth.shape[0]) if k not in PAINTED]
    assert np.array_equal(labels[others], predicted[others])
    assert segmentation.GetSegment("Segment_1").GetName() == "Tumour"  # the user's segment keeps its id
    assert np.array_equal(segment_voxels(app, node, "Segment_1", volume), tumour)
    assert unmatched == ["Tumour"]
    check_organ_segments(node, {o.label for o in ORGANS})  # all 13 organs, ready to paint again
    assert segmentation.GetNumberOfLayers() == 1
    assert node.GetStorageNode() is storage and storage.GetFileName() == str(user_file)
    assert hashlib.sha256(user_file.read_bytes()).hexdigest() == digest  # the user's file is not written
    assert app.node_ids() == before  # no temporary node, display node or colour table left behind
    written = scene.written_path(node)
    assert written == first
    assert np.array_equal(painting.load_written_labels(written, labels.shape), labels)  # what tells corrections from output
    assert json.loads(node.GetAttribute(scene.ANNOTATED_SLICES_ATTRIBUTE)) == PAINTED
    assert ops.annotation_status(node, volume)["slices"] == PAINTED  # the model's output does not count as annotated

    # the next round's write-back brings a written-labels file of its own, which replaces the previous one
    second = painting.new_written_path(tmp / "written-labels")
    write_back(ct, prediction, painted, merged, summary["slices"], second)
    ops.write_back(volume, node, merged, summary["slices"], report, second)
    assert scene.written_path(node) == second and list((tmp / "written-labels").iterdir()) == [second]
    assert node.GetSegmentation().GetNumberOfLayers() == 1 and app.node_ids() == before


def test_logic_on_the_real_scene_suggests_jumps_and_prunes(case, monkeypatch, tmp_path):
    app, volume = case["app"], case["volume"]
    module = load_module(monkeypatch, app, temporary=tmp_path)
    logic = module.DiffusionSegLogic()
    node = logic.prepareAnnotation(volume)
    paint(app, node, volume, sitk.GetArrayFromImage(keep_array_slices(case["labels"], PAINTED)))
    assert logic.annotationStatus(node, volume)["slices"] == PAINTED
    n = volume.GetImageData().GetDimensions()[2]
    slices = [{"index": k, "uncertainty": 0.9 if k in (PAINTED[0], 20) else 0.1, "body_fraction": 0.5} for k in range(n)]
    node.SetAttribute(module.UNCERTAINTY_ATTRIBUTE, json.dumps({"version": REPORT_VERSION, "slice_axis": 2, "num_slices": n, "slices": slices}))
    assert logic.suggestSlice(node, node, volume) == (20, 0.9, n - len(PAINTED))  # slice 75 is painted already

    red = app.scene.AddNewNodeByClass("vtkMRMLSliceNode")
    red.SetLayoutName("Red")
    logic.jumpToSlice(volume, 20)
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    dims = volume.GetImageData().GetDimensions()
    expected = matrix.MultiplyPoint([(dims[0] - 1) / 2, (dims[1] - 1) / 2, 20, 1])[:3]
    centre = [red.GetSliceToRAS().GetElement(row, 3) for row in range(3)]
    assert np.allclose(centre, expected, atol=1e-3)

    folder = logic.writtenLabelsFolder()
    folder.mkdir(parents=True)
    used, unused = folder / "used.npz", folder / "unused.npz"
    for path in (used, unused):
        path.write_bytes(b"x")
        os.utime(path, (time.time() - 400 * 86400,) * 2)
    node.SetAttribute(scene.WRITTEN_LABELS_ATTRIBUTE, str(used))
    logic.pruneWrittenLabels()
    assert used.exists() and not unused.exists()


def test_annotation_status_needs_no_engine_packages(case, monkeypatch, tmp_path):
    app, volume = case["app"], case["volume"]
    module = load_module(monkeypatch, app, temporary=tmp_path)
    logic = module.DiffusionSegLogic()
    node = logic.prepareAnnotation(volume)
    paint(app, node, volume, sitk.GetArrayFromImage(keep_array_slices(case["labels"], PAINTED)))
    for name in ("slicerio", "SimpleITK", "torch"):  # what a fresh Slicer lacks (SimpleITK: its extras)
        monkeypatch.setitem(sys.modules, name, None)
    for name in [m for m in sys.modules if m.startswith("DiffusionSegLib.") and not m.startswith(("DiffusionSegLib.bridge", "DiffusionSegLib.organs"))]:
        monkeypatch.delitem(sys.modules, name)
    assert logic.annotationStatus(node, volume)["slices"] == PAINTED


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_module_self_test_on_slicer_core(monkeypatch, tmp_path):
    """The module's own self-test (what Slicer's ctest runs): annotate a synthetic CT, fine-tune 3 CPU iterations in the
    engine's child process, write back, segment with the new model, check the scene, suggest and jump."""
    app = SlicerApp(subject_hierarchy_items=True)
    module = load_module(monkeypatch, app, temporary=tmp_path)
    app.scene.AddNewNodeByClass("vtkMRMLSliceNode").SetLayoutName("Red")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    test = module.DiffusionSegTest()
    test.runTest()
    assert app.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 2  # the annotation and the result, no temporaries
