"""Per-organ volumes for the panel, from the results of Slicer's Segment Statistics module.

The numbers come from ``SegmentStatistics.SegmentStatisticsLogic`` (Label map and Scalar Volume plugins);
this file only picks the organ rows out of its ``getStatistics()`` dictionary and words them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..organ_trust import CHECK_BELOW, held_out_dsc
from ..organs import FLARE22, LabelSet

VOLUME_KEY = "LabelmapSegmentStatisticsPlugin.volume_cm3"
VOXELS_KEY = "LabelmapSegmentStatisticsPlugin.voxel_count"
MEAN_KEY = "ScalarVolumeSegmentStatisticsPlugin.mean"
STDEV_KEY = "ScalarVolumeSegmentStatisticsPlugin.stdev"
# Plugins whose results are shown; others (closed surface: slow, shape: not shown) are switched off.
PLUGINS = ("LabelmapSegmentStatisticsPlugin", "ScalarVolumeSegmentStatisticsPlugin")


@dataclass(frozen=True)
class OrganVolume:
    organ: str  # display name
    volume_ml: float
    mean_hu: float | None
    std_hu: float | None


def organ_volumes(statistics: Mapping, names: Mapping[str, tuple[str, str | None]],
                  label_set: LabelSet = FLARE22) -> tuple[list[OrganVolume], list[str]]:
    """(Organs found, in table order; names of the organs absent) from ``SegmentStatisticsLogic.getStatistics()``.

    `names` maps segment id -> (segment name, terminology). Segments matching no organ of `label_set` (the model's),
    and empty ones, are not listed; mL = cm3.
    """
    found: dict[int, OrganVolume] = {}
    for segment_id in statistics.get("SegmentIDs", []):
        name, terminology = names.get(segment_id, (None, None))
        organ = label_set.match(name, terminology)
        voxels = statistics.get((segment_id, VOXELS_KEY)) or 0
        if organ is None or voxels <= 0 or organ.label in found:
            continue
        mean, std = statistics.get((segment_id, MEAN_KEY)), statistics.get((segment_id, STDEV_KEY))
        found[organ.label] = OrganVolume(organ.display_name, float(statistics.get((segment_id, VOLUME_KEY)) or 0.0),
                                         None if mean is None else float(mean), None if std is None else float(std))
    return [found[o.label] for o in label_set if o.label in found], [o.display_name for o in label_set if o.label not in found]


def describe_volumes(rows: list[OrganVolume], absent: list[str], card: Mapping | None = None, warnings: list[str] = (),
                     label_set: LabelSet = FLARE22) -> str:
    """Lines for the panel, e.g. ``Liver: 1520.3 mL, 62 ± 18 HU, held-out DSC 0.93``, then the organs not found and the warnings.

    `card`: the segmenting model's card; its held-out DSC is shown per organ and organs below ``CHECK_BELOW`` (or not
    measured) are marked "check". `warnings`: the engine's warnings about this scan (volumes, anatomy).
    """
    figures = held_out_dsc(card) if card is not None else None
    by_display = {o.display_name: o.name for o in label_set}
    lines = []
    for row in rows:
        text = f"{row.organ}: {row.volume_ml:.1f} mL"
        if row.mean_hu is not None:
            text += f", {row.mean_hu:.0f} ± {row.std_hu or 0:.0f} HU"
        if figures is not None:
            dsc = figures.get(by_display.get(row.organ, ""))
            text += ", held-out DSC not measured: check" if dsc is None else f", held-out DSC {dsc:.2f}" + (": check" if dsc < CHECK_BELOW else "")
        lines.append(text)
    if absent:
        lines.append("Not found: " + ", ".join(absent))
    if figures is not None:
        lines.append(f"Held-out DSC: this model on patients it was not trained on; check the organs marked (below {CHECK_BELOW:.2f}) "
                     "before using them.")
    lines += [f"Warning: {w}" for w in warnings]
    return "\n".join(lines)
