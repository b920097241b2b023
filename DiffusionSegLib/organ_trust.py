"""How far to trust each organ of a segmentation: the model's held-out accuracy and plausible volumes.

Standard library only, so the Slicer module (through the bridge) and the engine read the same figures.

- **Held-out DSC** comes from the model card (``provenance.metrics.held_out.organ_dsc``): the model's recipe
  trained without a patient and scored on it (leave one patient out). An organ below ``CHECK_BELOW`` is marked
  "check": 0.7 is the overlap usually read as good agreement (Zijdenbos et al., "Morphometric analysis of white
  matter lesions in MR images", IEEE Trans Med Imaging 13(4):716-724, 1994), and below it a reader should look
  at the organ before using it. An organ no held-out patient labels has no figure and is marked "check" too.
- **Volume ranges** bound the solid organs whose size is stable in adults. Geraghty et al. ("Normal organ
  volume assessment from abdominal CT", Abdominal Imaging 29(4):482-490, 2004; 149 adults, hand-traced)
  report mean volumes of 1411 / 1710 mL (liver, women / men), 179.8 / 238.4 mL (spleen), 156.5 / 193.1 mL
  (kidney) and 64.4 / 87.4 mL (pancreas). The range kept here runs from half the women's mean to twice the
  men's: wide enough that normal anatomy of either sex stays inside, so a volume outside it is either a
  segmentation error (an organ missed in part, a neighbour swallowed) or real pathology (hepatomegaly,
  splenomegaly, a resected or atrophic organ) and worth a look either way. Hollow and tubular structures
  (stomach, duodenum, gallbladder, aorta, vena cava, oesophagus) and the adrenals vary too much with filling
  and field of view to bound. An organ that reaches the first or last axial slice is cut off by the scan,
  so its volume is not judged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

CHECK_BELOW = 0.70

# organ name -> (women's mean mL, men's mean mL), Geraghty et al. 2004
_REFERENCE_MEANS_ML = {
    "liver": (1411.0, 1710.0),
    "spleen": (179.8, 238.4),
    "right kidney": (156.5, 193.1),
    "left kidney": (156.5, 193.1),
    "pancreas": (64.4, 87.4),
}
VOLUME_RANGES_ML: dict[str, tuple[float, float]] = {name: (women / 2, men * 2) for name, (women, men) in _REFERENCE_MEANS_ML.items()}
VOLUME_SOURCE = "Geraghty et al., Abdominal Imaging 2004 (half the women's to twice the men's mean volume)"


@dataclass(frozen=True)
class OrganTrust:
    organ: str
    held_out_dsc: float | None  # mean over held-out patients that label the organ; None: not measured
    check: bool  # below CHECK_BELOW, or not measured while the card measures other organs
    volume_note: str | None = None  # set when the volume is outside its adult range
    measured: bool = True  # False: the model's card holds no held-out figures at all (e.g. a user's fine-tuned model)

    def describe(self) -> str:
        parts = []
        if not self.measured:
            parts.append("no held-out figures for this model")
        elif self.held_out_dsc is None:
            parts.append("held-out DSC not measured: check")
        else:
            parts.append(f"held-out DSC {self.held_out_dsc:.2f}" + (": check" if self.check else ""))
        if self.volume_note:
            parts.append(self.volume_note)
        return "; ".join(parts)


def held_out_dsc(card: Mapping) -> dict[str, float] | None:
    """Per-organ held-out DSC from a model card (its JSON as a dict), or None when the card has none."""
    metrics = (card.get("provenance") or {}).get("metrics") or {}
    held_out = metrics.get("held_out") if isinstance(metrics, Mapping) else None
    if not isinstance(held_out, Mapping) or not isinstance(held_out.get("organ_dsc"), Mapping):
        return None
    return {str(name): float(value) for name, value in held_out["organ_dsc"].items() if value is not None}


def volume_note(organ: str, volume_ml: float, cut_off: bool = False) -> str | None:
    """Why `volume_ml` is not a plausible adult `organ`, or None when it is (or cannot be judged)."""
    bounds = VOLUME_RANGES_ML.get(organ)
    if bounds is None or cut_off or volume_ml <= 0:
        return None
    low, high = bounds
    if volume_ml < low:
        return f"{volume_ml:.1f} mL is below the adult range {low:.0f}-{high:.0f} mL: part of it may be missed, or it is small"
    if volume_ml > high:
        return f"{volume_ml:.1f} mL is above the adult range {low:.0f}-{high:.0f} mL: a neighbour may be included, or it is enlarged"
    return None


def organ_trust(card: Mapping, volumes_ml: Mapping[str, float], cut_off: Mapping[str, bool] | None = None) -> dict[str, OrganTrust]:
    """For each organ found (name -> volume in mL), its held-out DSC and volume check.

    `cut_off[name]` is true for an organ that reaches the first or last axial slice (its volume is not judged).
    """
    figures = held_out_dsc(card)
    result = {}
    for organ, volume in volumes_ml.items():
        dsc = figures.get(organ) if figures is not None else None
        note = volume_note(organ, volume, (cut_off or {}).get(organ, False))
        result[organ] = OrganTrust(organ, dsc, figures is not None and (dsc is None or dsc < CHECK_BELOW), note, figures is not None)
    return result
