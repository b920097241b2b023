"""One annotate-and-fine-tune round in one process: what a Fine-tune click in 3D Slicer runs (``diffusionseg refine``).

The user paints a few axial slices into a segmentation (Slicer's .seg.nrrd, or a labelmap); one run then
1. reads the CT and the annotation once and takes its annotated slices (`writeback.annotated_labels`: the
   slices painted, those recorded in earlier rounds, and those corrected since the last write-back) and
   the organs they label;
2. fine-tunes with the recipe of ``diffusionseg finetune`` (`recipe.finetune_model`), the annotation as
   partial labels: its annotated slices are annotated for the organs painted on them and no others, so
   an organ segment that exists but is empty (Slicer's annotation has every organ of the set) teaches nothing, and the
   organs not painted are kept from a segmentation model it starts from;
3. segments the CT with the new model (`uncertainty.segment_with_uncertainty`);
4. merges the annotated slices back exactly as painted (`writeback.merged_labels`);
5. writes the model folder, the uncertainty report, the merged result and the merged labels (the next
   round's reference for telling the user's corrections from the model's output), each atomically and
   only at the end, so a cancelled or failed run leaves every earlier output as it was.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk
import torch

from .bridge.painting import WRITTEN_SUFFIX, load_written_labels, save_written_labels
from .devices import resolve_device
from .errors import InputError
from .finetune import FinetuneConfig
from .imageio import check_output_path, check_writable, read_ct, read_labels, write_labelmap
from .inference import segment_ct
from .models import CARD_FILE, finetune_destination, portable_path, save_model
from .organs import FLARE22, LabelSet
from .progress import Progress
from .recipe import Start, TrainingCT, build_segmentor, finetune_model
from .slice_uncertainty import segment_with_uncertainty, write_report
from .training_slices import labelled_organs
from .writeback import annotated_labels, merged_labels


def slice_list(text: str | None, flag: str = "--recorded-slices") -> list[int]:
    """Slice indices from "3,7,11" (None or blank: none); InputError naming `flag` for anything else."""
    if text is None or not text.strip():
        return []
    items = [item.strip() for item in text.split(",") if item.strip()]
    if bad := [item for item in items if not item.isdigit()]:
        raise InputError(f"{flag} {text}: {', '.join(map(repr, bad))} is not a slice index; give 0-based axial slice indices separated by commas, "
                         "e.g. 3,7,11")
    return sorted({int(item) for item in items})


def organ_list(text: str | None, flag: str = "--organs", label_set: LabelSet = FLARE22) -> set[int] | None:
    """Ids of `label_set` from a comma-separated list of names or ids, or "all" (None: not given); InputError naming `flag`."""
    if text is None:
        return None
    try:
        return label_set.parse(text)
    except ValueError as e:
        raise InputError(f"{flag} {e}") from e


@dataclass(frozen=True)
class RefineOutputs:
    """Where a round writes: the model folder, the merged result, and optionally the uncertainty report and the merged
    labels (`bridge.painting.save_written_labels`, the next round's `written`)."""

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
    labels: sitk.Image  # ids of `label_set` on the annotated slices, every other slice cleared; the CT's grid
    slices: list[int]  # annotated slice indices along `slice_axis` (the indices Slicer shows, from 0)
    slice_axis: int  # SimpleITK index axis of the axial slices
    labelled: set[int]  # the organ ids the annotated slices are annotated for
    source: str  # the annotation file, for messages and the model card
    label_set: LabelSet = field(default=FLARE22)  # the model's organs

    @property
    def unlabelled(self) -> list[str]:
        """Organs the annotation leaves unlabelled (names, the label set's order)."""
        return self.label_set.names(set(self.label_set.labels) - self.labelled)

    def describe(self) -> str:
        shown = ", ".join(map(str, self.slices[:20])) + (", ..." if len(self.slices) > 20 else "")
        return (f"{Path(self.source).name}: {len(self.slices)} annotated axial slices ({shown}; counted from 0), annotated for "
                f"{', '.join(self.label_set.names(self.labelled))}")


def read_annotation(image: str | Path, annotation: str | Path, *, recorded: Iterable[int] = (), written: str | Path | None = None,
                    organs: set[int] | None = None, progress: Progress | None = None, label_set: LabelSet = FLARE22) -> PaintedAnnotation:
    """The CT and the annotated slices of `annotation` (a .seg.nrrd or a labelmap on the CT's grid).

    A slice is annotated if it is in `recorded` (earlier rounds), or holds a label and, when `written` (the labels the
    last round wrote back) is given, differs from it. Its organs (`organs`, default: those painted on the annotated
    slices and those erased there since `written`; an empty segment does not count) are what the slices are annotated
    for; the others are left unlabelled. InputError for an annotation with no annotated slice, or whose annotated
    slices hold no organ or an organ `organs` leaves out. The annotation's segments are read as organs of `label_set`.
    """
    ct = read_ct(image)
    current = read_labels(annotation, ct, label_set=label_set)
    previous = None
    if written is not None:
        path = Path(written).expanduser()
        if not path.is_file():
            raise InputError(f"--written {path}: no such file; give the labels the previous round wrote (its --written-output), or leave --written out")
        previous = load_written_labels(path, sitk.GetArrayViewFromImage(current).shape)
        if previous is None and progress is not None:
            progress.message(f"--written {path}: not readable, or written for another CT grid; every slice with a label counts as annotated")
    labels, summary = annotated_labels(ct, current, recorded, previous, annotation, label_set)
    present = labelled_organs(labels)
    if not present:
        raise InputError(f"{annotation}: the annotated slices ({', '.join(map(str, summary['slices'][:20]))}) hold no organ, only background; "
                         "paint at least one organ on one of them")
    if organs is not None and (extra := present - organs):
        raise InputError(f"{annotation}: the annotated slices hold {', '.join(label_set.names(extra))}, which --organs leaves out; add them to --organs "
                         "or erase them from the annotation")
    labelled = set(organs) if organs is not None else {o.label for o in label_set if o.name in summary["organs"]}
    return PaintedAnnotation(ct, labels, summary["slices"], summary["slice_axis"], labelled, str(annotation), label_set)


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
    The annotation is read as organs of the new model's label set (the base's, unless `base` is a `Start` built with another).
    """
    progress = progress or Progress("none")
    device = resolve_device(device) if isinstance(device, str) else device
    if not isinstance(base, Start):
        options = {k: recipe_options.pop(k, None) for k in ("head", "timestep", "preset")}
        base = build_segmentor(base, (config or FinetuneConfig()).strategy, **options)
    painted = read_annotation(image, annotation, recorded=recorded, written=written, organs=organs, progress=progress, label_set=base.label_set)
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
    writes.append((outputs.result, lambda: write_labelmap(merged, outputs.result, all_organs=True, label_set=painted.label_set)))
    if outputs.written is not None:
        writes.append((outputs.written, lambda: save_written_labels(sitk.GetArrayViewFromImage(merged), outputs.written)))
    done = _write_in_turn(writes)
    progress.advance()
    progress.finish()
    progress.message(f"kept the {len(painted.slices)} annotated slices as painted; wrote {', '.join(map(str, done))}")
    return {
        "slices": painted.slices,
        "labelled_organs": painted.label_set.names(painted.labelled),
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
