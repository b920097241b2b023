"""The module's work on the MRML scene: segmentations in and out, painted slices, placement, the slice jump.

Everything here takes the scene (vtkMRMLScene) and the Segmentations module logic as arguments instead of
reaching for ``slicer.mrmlScene`` and ``slicer.modules``, so the same code runs inside Slicer and, in the
tests, against Kitware's slicer-core wheel (Slicer's MRML and segmentation libraries without Qt). Nothing
from VTK or Slicer is imported at import time: this package must load before anything is installed, and
VTK is needed only once a scene exists. The engine's file side (preparing the annotated slices, merging
them back) runs in the engine's process (``diffusionseg refine``); here only its result is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..organs import FLARE22, LabelSet, terminology_string
from . import painting

ANNOTATED_SLICES_ATTRIBUTE = "DiffusionSeg.AnnotatedSlices"  # JSON list of slice indices the user annotated
WRITTEN_LABELS_ATTRIBUTE = "DiffusionSeg.WrittenLabels"  # file of the labels last written back (bridge.painting)
UNCERTAINTY_ATTRIBUTE = "DiffusionSeg.Uncertainty"  # JSON uncertainty report of the last segmentation
TEMPORARY_NAME = "DiffusionSeg temporary"


def _voxels(volume_node) -> np.ndarray:
    """The node's voxels as a (k, j, i) numpy view, as slicer.util.arrayFromVolume gives them."""
    from vtk.util.numpy_support import vtk_to_numpy

    image = volume_node.GetImageData()
    scalars = vtk_to_numpy(image.GetPointData().GetScalars())
    return scalars.reshape(tuple(reversed(image.GetDimensions())))


def segment_name_and_terminology(segmentation, segment_id: str) -> tuple[str, str | None]:
    segment = segmentation.GetSegment(segment_id)
    return segment.GetName(), segment.GetTerminology() or None


def recorded_slices(segmentation_node) -> list[int]:
    text = segmentation_node.GetAttribute(ANNOTATED_SLICES_ATTRIBUTE)
    return [int(i) for i in json.loads(text)] if text else []


def written_path(segmentation_node) -> Path | None:
    text = segmentation_node.GetAttribute(WRITTEN_LABELS_ATTRIBUTE)
    return Path(text) if text and Path(text).is_file() else None


def axial_axis(volume_node) -> int:
    """The IJK axis of the CT that runs along its axial slices (0 = i, 2 = k)."""
    directions = [[0.0] * 3 for _ in range(3)]
    volume_node.GetIJKToRASDirections(directions)
    return painting.axial_axis(painting.lps_direction_from_ras(directions))


def remove_with_display_nodes(scene, node) -> None:
    """Remove a temporary node and its display nodes: the scene alone leaves display nodes behind (in Slicer the
    Data module's logic removes them too, but only when that logic observes the scene)."""
    if node is None:
        return
    displays = [node.GetNthDisplayNode(n) for n in range(node.GetNumberOfDisplayNodes())] if hasattr(node, "GetNumberOfDisplayNodes") else []
    scene.RemoveNode(node)
    for display in displays:
        if display is not None and scene.IsNodePresent(display):
            scene.RemoveNode(display)


class SceneOps:
    """The module's scene operations on `scene`, exporting labelmaps through `segmentations_logic`
    (Slicer's vtkSlicerSegmentationsModuleLogic, ``slicer.modules.segmentations.logic()``)."""

    def __init__(self, scene, segmentations_logic) -> None:
        self.scene = scene
        self.segmentations_logic = segmentations_logic

    # --- files ---

    def export_volume(self, volume_node, path: Path) -> Path:
        """Write a volume with a temporary storage node, leaving the node's own storage (and file name) alone."""
        storage = self.scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        try:
            storage.SetFileName(str(path))
            storage.UseCompressionOff()
            if not storage.WriteData(volume_node):
                raise RuntimeError(f"Cannot write {volume_node.GetName()} to {path}")
        finally:
            self.scene.RemoveNode(storage)
        return Path(path)

    def export_segmentation(self, segmentation_node, path: Path) -> Path:
        """Write a segmentation as Slicer saves it (.seg.nrrd), with a temporary storage node."""
        storage = self.scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
        try:
            storage.SetFileName(str(path))
            if not storage.WriteData(segmentation_node):
                raise RuntimeError(f"Cannot write {segmentation_node.GetName()} to {path}")
        finally:
            self.scene.RemoveNode(storage)
        return Path(path)

    def import_segmentation(self, path: Path, segmentation_node, volume_node, label_set: LabelSet = FLARE22) -> None:
        """Replace the organ segments (organs of `label_set`, the model's) of `segmentation_node` by those of a .seg.nrrd
        and tie it to the CT.

        The file is read into a temporary node: ReadData makes its storage node the node's own, so reading
        into `segmentation_node` directly would unlink it from the file it was loaded from or saved to.
        Segments that match no organ (a tumour, a landmark) are the user's and keep their ids. Segments
        are copied one at a time, and each copy gets a full-size labelmap layer of its own (13 layers for
        one engine result); they are merged back into shared layers wherever they do not overlap.
        """
        loaded = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", self.scene.GenerateUniqueName(TEMPORARY_NAME))
        loaded.HideFromEditorsOn()
        storage = self.scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
        try:
            storage.SetFileName(str(path))
            if not storage.ReadData(loaded):
                raise RuntimeError(f"Cannot read the segmentation {path}")
            target, source = segmentation_node.GetSegmentation(), loaded.GetSegmentation()
            was_modifying = segmentation_node.StartModify()
            try:
                ids = list(target.GetSegmentIDs())
                organ_ids = painting.segment_organ_ids([segment_name_and_terminology(target, i) for i in ids], label_set)
                for segment_id, organ in zip(ids, organ_ids, strict=True):
                    if organ is not None:
                        target.RemoveSegment(segment_id)
                for segment_id in list(source.GetSegmentIDs()):
                    target.CopySegmentFromSegmentation(source, segment_id)
                target.CollapseBinaryLabelmaps(False)  # False: overlapping segments keep layers of their own
            finally:
                segmentation_node.EndModify(was_modifying)
        finally:
            self.scene.RemoveNode(storage)
            remove_with_display_nodes(self.scene, loaded)
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        segmentation_node.SetNodeReferenceID(segmentation_node.GetReferenceImageGeometryReferenceRole(), volume_node.GetID())
        segmentation_node.CreateDefaultDisplayNodes()

    def write_back(self, volume_node, annotation_node, merged: Path, slices: list[int], report: Path, written: Path,
                   label_set: LabelSet = FLARE22) -> None:
        """Load the engine's merged result (``diffusionseg refine --result``: the new prediction with the annotated
        `slices` as painted) into the annotation node and remember what was written: the annotated slices, the merged
        labels the engine saved (`written`, its ``--written-output``) and the uncertainty report.

        `written` takes the place of the segmentation's previous written-labels file, which is deleted: one file per
        segmentation, a new name each round, so a failed round never leaves the node pointing at labels it does not hold.
        """
        report_text = Path(report).read_text(encoding="utf-8")  # read first: a missing report changes nothing
        previous = written_path(annotation_node)
        self.import_segmentation(merged, annotation_node, volume_node, label_set)
        annotation_node.SetAttribute(ANNOTATED_SLICES_ATTRIBUTE, json.dumps(sorted(slices)))
        annotation_node.SetAttribute(WRITTEN_LABELS_ATTRIBUTE, str(written))
        if previous is not None and previous.resolve() != Path(written).resolve():
            previous.unlink(missing_ok=True)
        annotation_node.SetAttribute(UNCERTAINTY_ATTRIBUTE, report_text)

    # --- nodes and the subject hierarchy ---

    def place_beside(self, node, volume_node) -> None:
        """Put `node` under the CT's parent (study) in the subject hierarchy.

        Slicer's subject hierarchy plugins give every new data node an item; where none exists yet (a node
        added by a script, or a scene without those plugins) one is made here under the same parent.
        """
        sh = self.scene.GetSubjectHierarchyNode()
        volume_item = sh.GetItemByDataNode(volume_node)
        parent = sh.GetItemParent(volume_item) if volume_item else sh.GetSceneItemID()
        item = sh.GetItemByDataNode(node)
        if item:
            sh.SetItemParent(item, parent)
        else:
            sh.CreateItem(parent, node)

    def new_segmentation(self, volume_node, suffix: str):
        node = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volume_node.GetName()} {suffix}")
        node.CreateDefaultDisplayNodes()
        node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        self.place_beside(node, volume_node)
        return node

    def segmentation_nodes(self) -> list:
        return [self.scene.GetNthNodeByClass(n, "vtkMRMLSegmentationNode") for n in range(self.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"))]

    # --- annotation ---

    def prepare_annotation(self, volume_node, segmentation_node=None, label_set: LabelSet = FLARE22):
        """A segmentation with a segment for every organ of `label_set` (the model's; missing ones added empty, with
        terminology where the set has it), ready to paint."""
        if segmentation_node is None:
            segmentation_node = self.new_segmentation(volume_node, "annotation")
        else:
            segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        segmentation = segmentation_node.GetSegmentation()
        present = {organ.label for organ in filter(None, (label_set.match(*segment_name_and_terminology(segmentation, i))
                                                          for i in segmentation.GetSegmentIDs()))}
        for organ in label_set:
            if organ.label in present:
                continue
            segment_id = segmentation.AddEmptySegment(f"Segment_{organ.label}", organ.display_name, organ.color_float)
            segment = segmentation.GetSegment(segment_id)
            if (terminology := terminology_string(organ)) is not None:
                segment.SetTerminology(terminology)
            segment.SetNameAutoGenerated(False)
            segment.SetColorAutoGenerated(False)
        segmentation_node.SetNodeReferenceID(segmentation_node.GetReferenceImageGeometryReferenceRole(), volume_node.GetID())
        return segmentation_node

    def labels_on_volume(self, segmentation_node, volume_node, label_set: LabelSet = FLARE22) -> tuple[np.ndarray, list[str]]:
        """The segmentation as ids of `label_set` on the CT grid (k, j, i) and the names of non-empty segments matching none of its organs."""
        import vtk

        segmentation = segmentation_node.GetSegmentation()
        ids = list(segmentation.GetSegmentIDs())
        labelmap_node = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        try:
            segment_ids = vtk.vtkStringArray()
            for segment_id in ids:
                segment_ids.InsertNextValue(segment_id)
            # with a reference volume the labelmap has exactly its grid; value = position in `ids` + 1
            if not self.segmentations_logic.ExportSegmentsToLabelmapNode(segmentation_node, segment_ids, labelmap_node, volume_node):
                raise RuntimeError(f"Cannot export the segments of {segmentation_node.GetName()}")
            values = np.array(_voxels(labelmap_node))
            if values.shape != tuple(reversed(volume_node.GetImageData().GetDimensions())):
                raise RuntimeError("The exported labelmap does not match the CT grid; is the segmentation transformed?")
            names = [segment_name_and_terminology(segmentation, i) for i in ids]
            labels, unmatched = painting.organ_labels(values, painting.segment_organ_ids(names, label_set))
        finally:
            # The export adds a "<name>_ColorTable" node for the labelmap; it goes with it (as slicer.util's array helpers do).
            display = labelmap_node.GetDisplayNode()
            color = display.GetColorNode() if display else None
            if color is not None:
                self.scene.RemoveNode(color)
            remove_with_display_nodes(self.scene, labelmap_node)
        return labels, [segmentation.GetSegment(ids[n]).GetName() for n in unmatched]

    def annotation_status(self, segmentation_node, volume_node, label_set: LabelSet = FLARE22) -> dict:
        """Annotated axial slices, the organs of `label_set` they label (`painting.annotated_organs`) and unmatched segment
        names (numpy only: runs before any install). The engine's ``refine`` takes the same slices and organs from the files."""
        labels, unmatched = self.labels_on_volume(segmentation_node, volume_node, label_set)
        axis = axial_axis(volume_node)
        # written for another CT grid (None): fall back to what was recorded
        written = painting.load_written_labels(written_path(segmentation_node), labels.shape)
        slices = painting.annotated_slices(labels, axis, written, recorded_slices(segmentation_node))
        return {**painting.annotation_summary(labels, slices, axis, written, label_set), "unmatched": unmatched}

    def written_paths_in_use(self) -> list[Path]:
        """The written-labels files of the segmentations in the scene (kept when old ones are pruned)."""
        return [p for p in map(written_path, self.segmentation_nodes()) if p is not None]

    # --- views ---

    def slice_centre(self, volume_node, index: int) -> tuple[float, float, float]:
        """RAS of the centre of axial slice `index` of the CT."""
        import vtk

        ijk = [(n - 1) / 2.0 for n in volume_node.GetImageData().GetDimensions()]
        ijk[axial_axis(volume_node)] = index
        matrix = vtk.vtkMatrix4x4()
        volume_node.GetIJKToRASMatrix(matrix)
        r, a, s = matrix.MultiplyPoint([*ijk, 1.0])[:3]
        return r, a, s

    def jump_to_slice(self, volume_node, index: int) -> None:
        """Centre all slice views on axial slice `index` of the CT."""
        if not self.scene.GetNumberOfNodesByClass("vtkMRMLSliceNode"):
            return  # no views to move
        slice_node = self.scene.GetNthNodeByClass(0, "vtkMRMLSliceNode")
        cls = type(slice_node)  # the class, for its static jump (vtkMRMLSliceNode is not imported here)
        cls.JumpAllSlices(self.scene, *self.slice_centre(volume_node, index), cls.CenteredJumpSlice)
