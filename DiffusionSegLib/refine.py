"""One annotate-and-fine-tune round in one process: what a Fine-tune click in 3D Slicer runs (``diffusionseg refine``).

The user paints a few axial slices into a segmentation (Slicer's .seg.nrrd, or a labelmap); one run then
1. reads the CT and the annotation once and takes its annotated slices (`writeback.annotated_labels`: the
   slices painted, those recorded in earlier rounds, and those corrected since the last write-back) and
   the organs they label;
2. fine-tunes with the recipe of ``diffusionseg finetune`` (`recipe.finetune_model`), the annotation as
   partial labels: its annotated slices are annotated for the organs painted on them and no others, so
   an organ segment that exists but is empty (Slicer's annotation has all 13) teaches nothing, and the
   organs not painted are kept from a segmentation model it starts from;
3. segments the CT with the new model (`uncertainty.segment_with_uncertainty`);
4. merges the annotated slices back exactly as painted (`writeback.merged_labels`);
5. writes the model folder, the uncertainty report, the merged result and the merged labels (the next
   round's reference for telling the user's corrections from the model's output), each atomically and
   only at the end, so a cancelled or failed run leaves every earlier output as it was.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import SimpleITK as sitk
import torch

from .annotations import labelled_organs
from .bridge.annotation import WRITTEN_SUFFIX, load_written_labels, save_written_labels
from .devices import resolve_device
from .errors import InputError
from .finetune import FinetuneConfig
from .imageio import check_output_path, check_writable, read_ct, read_labels, write_labelmap
from .inference import segment_ct
from .models import CARD_FILE, finetune_destination, portable_path, save_model
from .organs import ORGANS, parse_organs
from .progress import Progress
from .recipe import Start, TrainingCT, finetune_model
from .uncertainty import segment_with_uncertainty, write_report
from .writeback import annotated_labels, merged_labels


def _names(organs: Iterable[int]) -> list[str]:
    chosen = set(organs)
    return [o.name for o in ORGANS if o.label in chosen]


def slice_list(text: str | None, flag: str = "--recorded-slices") -> list[int]:
    """Slice indices from "3,7,11" (None or blank: none); InputError naming `flag` for anything else."""
    if text is None or not text.strip():
        return []
    items = [item.strip() for item in text.split(",") if item.strip()]
    if bad := [item for item in items if not item.isdigit()]:
        raise InputError(f"{flag} {text}: {', '.join(map(repr, bad))} is not a slice index; give 0-based axial slice indices separated by commas, "
                         "e.g. 3,7,11")
    return sorted({int(item) for item in items})


def organ_list(text: str | None, flag: str = "--organs") -> set[int] | None:
    """Organ ids from a comma-separated list of names or ids, or "all" (None: not given); InputError naming `flag`."""
    if text is None:
        return None
    try:
        return parse_organs(text)
    except ValueError as e:
        raise InputError(f"{flag} {e}") from e


@dataclass(frozen=True)
class RefineOutputs:
    """Where a round writes: the model folder, the merged result, and optionally the uncertainty report and the merged
    labels (`bridge.annotation.save_written_labels`, the next round's `written`)."""

    model: Path
    result: Path
    uncertainty: Path | None = None
    written: Path | None = None

    @classmethod
    def checked(cls, model: str | Path, result: str | Path, *, uncertainty: str | Path | None = None,
                written: str | Path | None = None) -> RefineOutputs:
        """The outputs, each checked before any work: a supported name, a folder that takes new files, and a model
        destination that is not something else (a bare model name goes to the per-user models folder, as for finetune)."""
        folder = finetune_destination(model)
        if folder.exists() and not (folder / CARD_FILE).exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise InputError(f"-o {folder}: exists and is not a DiffusionSeg model folder; choose another output path")
        check_writable(folder, "-o", creates_folders=True)
        result_path = check_output_path(result)
        report = written_path = None
        if uncertainty is not None:
            if not str(uncertainty).lower().endswith(".json"):
                raise InputError(f"--uncertainty {uncertainty}: name the uncertainty report .json")
            report = check_writable(uncertainty, "--uncertainty")
        if written is not None:
            if not str(written).lower().endswith(WRITTEN_SUFFIX):
                raise InputError(f"--written-output {written}: name the merged labels file {WRITTEN_SUFFIX} (compressed numpy, as Slicer keeps it)")
            written_path = check_writable(written, "--written-output", creates_folders=True)
        return cls(folder, result_path, report, written_path)


@dataclass
class PaintedAnnotation:
    """The annotated slices of an annotation on its CT, and the organs they label."""

    ct: sitk.Image
    labels: sitk.Image  # FLARE22 ids on the annotated slices, every other slice cleared; the CT's grid
    slices: list[int]  # annotated slice indices along `slice_axis` (the indices Slicer shows, from 0)
    slice_axis: int  # SimpleITK index axis of the axial slices
    labelled: set[int]  # the organ ids the annotated slices are annotated for
    source: str  # the annotation file, for messages and the model card

    @property
    def unlabelled(self) -> list[str]:
        """Organs the annotation leaves unlabelled (FLARE22 names, table order)."""
        return _names({o.label for o in ORGANS} - self.labelled)

    def describe(self) -> str:
        shown = ", ".join(map(str, self.slices[:20])) + (", ..." if len(self.slices) > 20 else "")
        return (f"{Path(self.source).name}: {len(self.slices)} annotated axial slices ({shown}; counted from 0), annotated for "
                f"{', '.join(_names(self.labelled))}")


def read_annotation(image: str | Path, annotation: str | Path, *, recorded: Iterable[int] = (), written: str | Path | None = None,
                    organs: set[int] | None = None, progress: Progress | None = None) -> PaintedAnnotation:
    """The CT and the annotated slices of `annotation` (a .seg.nrrd or a labelmap on the CT's grid).

    A slice is annotated if it is in `recorded` (earlier rounds), or holds a label and, when `written` (the labels the
    last round wrote back) is given, differs from it. Its organs (`organs`, default: those painted on the annotated
    slices and those erased there since `written`; an empty segment does not count) are what the slices are annotated
    for; the others are left unlabelled. InputError for an annotation with no annotated slice, or whose annotated
    slices hold no organ or an organ `organs` leaves out.
    """
    ct = read_ct(image)
    current = read_labels(annotation, ct)
    previous = None
    if written is not None:
        path = Path(written).expanduser()
        if not path.is_file():
            raise InputError(f"--written {path}: no such file; give the labels the previous round wrote (its --written-output), or leave --written out")
        previous = load_written_labels(path, sitk.GetArrayViewFromImage(current).shape)
        if previous is None and progress is not None:
            progress.message(f"--written {path}: not readable, or written for another CT grid; every slice with a label counts as annotated")
    labels, summary = annotated_labels(ct, current, recorded, previous, annotation)
    present = labelled_organs(labels)
    if not present:
        raise InputError(f"{annotation}: the annotated slices ({', '.join(map(str, summary['slices'][:20]))}) hold no organ, only background; "
                         "paint at least one organ on one of them")
    if organs is not None and (extra := present - organs):
        raise InputError(f"{annotation}: the annotated slices hold {', '.join(_names(extra))}, which --organs leaves out; add them to --organs "
                         "or erase them from the annotation")
    labelled = set(organs) if organs is not None else {o.label for o in ORGANS if o.name in summary["organs"]}
    return PaintedAnnotation(ct, labels, summary["slices"], summary["slice_axis"], labelled, str(annotation))


def merge(prediction: sitk.Image, painted: PaintedAnnotation) -> sitk.Image:
    """`prediction` (on the CT's grid) with every annotated slice exactly as painted, background included."""
    return merged_labels(painted.ct, prediction, painted.labels, painted.slices)


def refine(
    image: str | Path,
    annotation: str | Path,
    outputs: RefineOutputs,
    *,
    recorded: Iterable[int] = (),
    written: str | Path | None = None,
    organs: set[int] | None = None,
    base: Start | str | Path | None = None,
    config: FinetuneConfig | None = None,
    name: str | None = None,
    half: bool = False,
    device: torch.device | str = "auto",
    progress: Progress | None = None,
    **recipe_options,
) -> dict:
    """Fine-tune on the annotated slices of `annotation`, segment `image` with the new model, merge the painted slices
    back and write `outputs` (see the module docstring); returns a summary of what was done.

    `recorded`, `written`, `organs`: as `read_annotation`. `base`, `config` and `recipe_options` (head, timestep, preset,
    adapt_seconds, fit_batch_size) are `recipe.finetune_model`'s; `name` is recorded in the model card (default: the
    model folder's name), `half` stores the weights in float16. Nothing is written before everything has been computed.
    """
    progress = progress or Progress("none")
    device = resolve_device(device) if isinstance(device, str) else device
    painted = read_annotation(image, annotation, recorded=recorded, written=written, organs=organs, progress=progress)
    progress.message(painted.describe())
    training = TrainingCT(painted.ct, painted.labels, organs=painted.labelled, source={"image": portable_path(image), "labels": portable_path(annotation)},
                          name=str(annotation))
    segmentor, card = finetune_model([training], base, config, device=device, progress=progress, name=name or outputs.model.name, **recipe_options)

    report = None
    if outputs.uncertainty is not None:
        prediction, report = segment_with_uncertainty(painted.ct, segmentor, card.preprocessing, device, None, progress, cleanup=card.cleanup)
    else:
        prediction = segment_ct(painted.ct, segmentor, card.preprocessing, device, None, progress, cleanup=card.cleanup)
    merged = merge(prediction, painted)

    progress.start("write", 1)
    # The merged labels go last: they tell the next round which slices the user corrected, so they must never exist
    # without the result they describe.
    writes = [(outputs.model, lambda: save_model(outputs.model, card, segmentor.state_dict(), half=half))]
    if outputs.uncertainty is not None:
        writes.append((outputs.uncertainty, lambda: write_report(report, outputs.uncertainty)))
    writes.append((outputs.result, lambda: write_labelmap(merged, outputs.result, all_organs=True)))
    if outputs.written is not None:
        writes.append((outputs.written, lambda: save_written_labels(sitk.GetArrayViewFromImage(merged), outputs.written)))
    done = _write_in_turn(writes)
    progress.advance()
    progress.finish()
    progress.message(f"kept the {len(painted.slices)} annotated slices as painted; wrote {', '.join(map(str, done))}")
    return {
        "slices": painted.slices,
        "labelled_organs": _names(painted.labelled),
        "unlabelled_organs": painted.unlabelled,
        "model": outputs.model,
        "result": outputs.result,
        "uncertainty": outputs.uncertainty,
        "written": outputs.written,
    }


def _write_in_turn(writes: list[tuple[Path, object]]) -> list[Path]:
    """Run each (path, atomic write) in turn; a failure says which outputs were written before it."""
    done: list[Path] = []
    for path, write in writes:
        try:
            write()
        except (OSError, InputError) as e:
            before = f"; written before it: {', '.join(map(str, done))}" if done else "; no other output was written"
            raise InputError(f"{e}{before}" if isinstance(e, InputError) else f"{path}: cannot be written ({e.strerror or e}){before}") from e
        done.append(path)
    return done
