"""The ``diffusionseg`` command: segment, demo, finetune, refine, evaluate, models.

Errors in the user's input print one line naming the file and the problem and exit with status 2;
Ctrl-C or SIGTERM exits with status 130. Outputs are written atomically at the very end, so neither
leaves a partial or modified output behind.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import Field, fields
from pathlib import Path

import SimpleITK as sitk
import torch

from . import __version__, strategies
from .anatomy_check import anatomy_warnings
from .atomic import atomic_path
from .demo import DEFAULT_OUTPUT_DIR, SAMPLE_CT, demo_outputs
from .devices import DEVICES, configure_cpu, resolve_device
from .errors import EXIT_CANCELLED, EXIT_INPUT_ERROR, Cancelled, InputError
from .finetune import FinetuneConfig
from .imageio import check_output_path, check_writable, read_ct, read_labels, write_labelmap
from .inference import segment_ct
from .metrics import organ_overlap
from .models import (
    CARD_FILE,
    ModelCard,
    finetune_destination,
    list_models,
    load_segmentor,
    portable_path,
    read_card,
    resolve_model,
    save_model,
    user_models_dir,
)
from .organs import FLARE22, LabelSet, read_label_set
from .preview import write_preview
from .progress import MODES, Progress
from .recipe import TrainingCT, build_segmentor, check_adapt, default_base, finetune_model, new_segmentor
from .seg_nrrd import is_slicer_segmentation, segment_organs
from .segment_statistics import add_trust, organ_statistics, statistics_table, write_statistics
from .segmentor import Segmentor
from .slice_uncertainty import segment_with_uncertainty, write_report
from .strategies import DEFAULT_STRATEGY, STRATEGIES
from .strategies import summaries as strategy_summaries
from .training_slices import labelled_organs
from .unet import PRESETS


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, got {text}")
    return value


def _head_width(text: str) -> int:
    """`h128`, `h256` or a plain width."""
    value = text[1:] if text.lower().startswith("h") else text
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"head must look like h128 or h256, got {text}")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffusionseg",
        description="Segment 13 abdominal organs in CT with a DDPM-pretrained U-Net, and fine-tune it from a few annotated slices.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", choices=DEVICES, default="auto", help="compute device (default: auto = CUDA, MPS, then CPU)")
        p.add_argument("--progress", choices=MODES, default="tqdm",
                       help="progress output: a tqdm bar, JSON lines on stdout (for 3D Slicer), or none (default: tqdm)")

    def segment_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", help="model name or folder (default: the bundled segmentation model)")
        p.add_argument("--batch-size", type=_positive_int, help="slices per network batch (default: 8 on a GPU, 2 on the CPU)")
        p.add_argument("--cleanup", action=argparse.BooleanOptionalAction,
                       help="per organ, drop stray islands and fill holes in the model's slice planes "
                            "(default: as the model's model.json 'postprocessing' says; off when it says nothing)")
        common(p)

    seg = sub.add_parser("segment", help="segment a CT with a segmentation model")
    seg.add_argument("image", help="CT: NIfTI, NRRD, MHA file or a DICOM series folder")
    seg.add_argument("-o", "--output", required=True, help="output: .seg.nrrd (Slicer segmentation) or .nii.gz/.nrrd/.mha labelmap (required)")
    seg.add_argument("--statistics", metavar="FILE.json",
                     help="also write per-organ volume (mL), mean and std HU, voxel count and slice range to this JSON file (default: not written)")
    seg.add_argument("--preview", metavar="FILE.png",
                     help="also write a PNG of axial slices and a coronal view with the organs overlaid, with a legend (default: not written)")
    seg.add_argument("--uncertainty", metavar="FILE.json",
                     help="also write per-axial-slice model uncertainty (input slice indices) to this JSON file (default: not written)")
    segment_options(seg)

    demo = sub.add_parser("demo", help="segment the bundled sample CT: writes a .seg.nrrd, a PNG preview and organ statistics")
    demo.add_argument("-o", "--output", default=DEFAULT_OUTPUT_DIR, metavar="FOLDER", help="folder for the three files (default: %(default)s)")
    segment_options(demo)

    ft = sub.add_parser("finetune", help="fine-tune a model on annotated axial slices and save it")
    ft.add_argument("--image", action="append", required=True, help="CT (repeat with --labels for several CTs) (required)")
    ft.add_argument("--labels", action="append", required=True,
                    help="labelmap on the image grid (ids of the label set: FLARE22's by default) or .seg.nrrd (required)")
    ft.add_argument("--organs", action="append", metavar="LIST",
                    help="organs the matching --labels labels (comma-separated names or ids, or 'all'), once per --labels or once for all; "
                         "on its annotated slices an unlabelled voxel is then taken as background or one of the organs not listed, so "
                         "those are kept as the base model knows them (default: the organs with any voxel in the labels, and those "
                         "a .seg.nrrd has a segment for, even an empty one)")
    ft.add_argument("-o", "--output", required=True, metavar="NAME_OR_FOLDER",
                    help="a bare name (no path separator) saves the model in your models folder, listed by 'diffusionseg models' and usable as "
                         "'--model NAME' from anywhere; a path (or an existing folder) is written where given (required)")
    ft.add_argument("--base", help="pretrained or segmentation model name or folder to start from (default: the bundled segmentation "
                    "model, continued; the bundled pretrained model with --strategy fs, --head, --preset or --adapt)")
    ft.add_argument("--strategy", choices=STRATEGIES, default=DEFAULT_STRATEGY, help=f"{strategy_summaries()} (default: %(default)s)")
    ft.add_argument("--preset", choices=sorted(PRESETS), help="architecture for --strategy fs without --base, at its native slice size "
                    "(default: the bundled pretrained model's architecture and preprocessing, so FS and FT-dec see the same pixels)")
    ft.add_argument("--head", type=_head_width, help="head hidden width, e.g. h128 or h256 (default: by preset)")
    ft.add_argument("--label-set", metavar="FILE_OR_MODEL",
                    help="the organs the new model labels: a JSON label set (docs/label-sets.md; an nnU-Net dataset.json's labels also "
                         "work) or a model whose set to take; a segmentation model as base with another set gives its backbone, with a "
                         "new head (default: the base model's set, FLARE22's 13 organs for the bundled models)")
    ft.add_argument("--config", help="JSON file of fine-tuning settings (loss weights, optimiser, augmentation); flags override it (default: none)")
    _add_finetune_flags(ft)
    ft.add_argument("--timestep", type=int, help="diffusion timestep fed to the network (default: 0)")
    adaptable = " and ".join(s for s in STRATEGIES if strategies.get(s).pretrained)
    ft.add_argument("--adapt", type=_seconds, default=0.0, metavar="SECONDS",
                    help="first continue the pretrained base's DDPM training on all slices of the --image CTs (no labels needed) "
                         f"for this many seconds; {adaptable} from a pretrained base only (default: 0, off)")
    ft.add_argument("--no-augment", action="store_true", help="train without affine and intensity augmentation (default: off, augmentation on)")
    ft.add_argument("--name", help="model name recorded in model.json (default: the folder name)")
    ft.add_argument("--half", action="store_true", help="store the weights in float16 (half the size; they are used in float32) (default: off)")
    common(ft)

    rf = sub.add_parser("refine", help="one annotate-and-fine-tune round, as 3D Slicer's Fine-tune runs it: fine-tune on the annotated slices of "
                        "an annotation, segment the CT with the new model and merge the annotated slices back as painted")
    rf.add_argument("--image", required=True, help="CT: NIfTI, NRRD, MHA file or a DICOM series folder (required)")
    rf.add_argument("--annotation", required=True,
                    help="the annotation on the CT's grid: a Slicer .seg.nrrd or a labelmap of the label set's ids (FLARE22's by default) (required)")
    rf.add_argument("-o", "--output", required=True, metavar="NAME_OR_FOLDER",
                    help="the fine-tuned model, as for finetune: a bare name saves it in your models folder, a path where given (required)")
    rf.add_argument("--result", required=True, help="the new model's segmentation of the CT with the annotated slices exactly as painted: "
                    ".seg.nrrd (a segment for every organ of the label set) or a .nii.gz/.nrrd/.mha labelmap (required)")
    rf.add_argument("--uncertainty", metavar="FILE.json",
                    help="also write the new model's per-axial-slice uncertainty to this JSON file (default: not written)")
    rf.add_argument("--recorded-slices", metavar="LIST",
                    help="axial slices (0-based indices, comma-separated) annotated in earlier rounds; they stay annotated (default: none)")
    rf.add_argument("--written", metavar="FILE.npz",
                    help="the labels the previous round wrote back (its --written-output): a slice that still holds them is the model's output, "
                         "not annotated (default: none: every slice with a label is annotated)")
    rf.add_argument("--written-output", metavar="FILE.npz", help="also save the merged labels here, the next round's --written (default: not written)")
    rf.add_argument("--organs", metavar="LIST",
                    help="organs the annotated slices are annotated for (comma-separated names or ids, or 'all'); there an unlabelled voxel may "
                         "be one of the others, which a segmentation model as --base keeps (default: the organs painted on the annotated slices, "
                         "and those erased there since --written; an empty segment labels nothing)")
    for action in ft._actions:  # the fine-tuning settings are finetune's own flags, shared as argparse's parents= shares a parser's
        if action.dest not in ("help", "image", "labels", "organs", "output"):
            rf._add_action(action)

    ev = sub.add_parser("evaluate", help="per-organ DSC and Jaccard of a prediction against a reference")
    ev.add_argument("--pred", required=True, help="predicted labelmap or .seg.nrrd (required)")
    ev.add_argument("--ref", required=True, help="reference labelmap or .seg.nrrd on the same grid (required)")
    ev.add_argument("--json", dest="json_out", help="also write the metrics to this JSON file (default: not written)")
    ev.add_argument("--label-set", metavar="FILE_OR_MODEL",
                    help="the organs the labelmaps' ids stand for: a JSON label set or a model whose set to take (default: FLARE22's 13 organs)")

    ls = sub.add_parser("models", help="list bundled and user models")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table (default: off)")
    return parser


def _raise_cancelled(signum: int, frame: object) -> None:
    raise Cancelled(f"stopped by signal {signum}")


def _check_suffix(path: str | None, suffix: str, flag: str, what: str) -> None:
    if path is not None and not path.lower().endswith(suffix):
        raise InputError(f"{flag} {path}: name the {what} {suffix}")


def cmd_segment(args: argparse.Namespace) -> int:
    # Everything the user gave is checked before the first progress line.
    output = check_output_path(args.output)
    _check_suffix(args.uncertainty, ".json", "--uncertainty", "uncertainty report")
    _check_suffix(args.statistics, ".json", "--statistics", "statistics file")
    _check_suffix(args.preview, ".png", "--preview", "preview image")
    for flag in ("uncertainty", "statistics", "preview"):
        if getattr(args, flag):
            check_writable(getattr(args, flag), f"--{flag}")
    device = resolve_device(args.device)
    segmentor, card = load_segmentor(resolve_model(args.model, "segmentor"))
    ct = read_ct(args.image)
    cleanup = card.cleanup if args.cleanup is None else args.cleanup
    progress = Progress(args.progress)
    if args.uncertainty:
        labelmap, report = segment_with_uncertainty(ct, segmentor, card.preprocessing, device, args.batch_size, progress, cleanup=cleanup)
    else:
        labelmap = segment_ct(ct, segmentor, card.preprocessing, device, args.batch_size, progress, cleanup=cleanup)
    progress.start("write", 1)
    # Computed before anything is written: a failure here leaves no output at all.
    label_set = card.label_set
    statistics = {"image": str(args.image), "model": card.name, **organ_statistics(ct, labelmap, label_set)}
    add_trust(statistics, card.to_dict(), anatomy_warnings(ct, labelmap, label_set))
    table = statistics_table(statistics)
    writes = [(output, lambda: write_labelmap(labelmap, output, label_set=label_set))]
    if args.uncertainty:
        writes.append((Path(args.uncertainty), lambda: write_report(report, args.uncertainty)))
    if args.statistics:
        writes.append((Path(args.statistics), lambda: write_statistics(statistics, args.statistics)))
    if args.preview:
        writes.append((Path(args.preview), lambda: write_preview(ct, labelmap, args.preview, title=Path(args.image).name, label_set=label_set)))
    written = _write_all(writes)
    progress.advance()
    progress.finish()
    for line in table:
        progress.message(line)
    for warning in statistics["warnings"]:
        progress.warning(warning)
    progress.message(f"wrote {', '.join(map(str, written))}")
    return 0


def _write_all(writes: list[tuple[Path, object]]) -> list[Path]:
    """Run each (path, write) in turn; each write is atomic. On a failure say which files were written and which not."""
    written: list[Path] = []
    for number, (path, write) in enumerate(writes):
        try:
            write()
        except OSError as e:
            done = f"written: {', '.join(map(str, written))}" if written else "nothing was written"
            missing = ", ".join(str(p) for p, _ in writes[number + 1 :])
            raise InputError(f"{path}: cannot be written ({e.strerror or e}); it was not written (no partial file); {done}"
                             + (f"; not written either: {missing}" if missing else "")) from e
        written.append(path)
    return written


def cmd_demo(args: argparse.Namespace) -> int:
    """`segment` on the bundled sample CT, writing all three outputs into one folder."""
    if not SAMPLE_CT.is_file():
        raise InputError(f"{SAMPLE_CT}: the bundled sample CT is missing; reinstall DiffusionSeg")
    outputs = demo_outputs(args.output)
    if outputs["segmentation"].parent.exists() and not outputs["segmentation"].parent.is_dir():
        raise InputError(f"{args.output}: exists and is not a folder; choose another output folder with -o")
    args.image, args.output, args.uncertainty = str(SAMPLE_CT), str(outputs["segmentation"]), None
    args.statistics, args.preview = str(outputs["statistics"]), str(outputs["preview"])
    status = cmd_segment(args)
    where = (f"segmented the sample CT {SAMPLE_CT.name}: see the organs in {outputs['preview']}, their volumes in {outputs['statistics']}, "
             f"and load {outputs['segmentation']} with the CT ({SAMPLE_CT}) in 3D Slicer. "
             "Your own CT: diffusionseg segment CT.nii.gz -o CT.seg.nrrd --preview CT.png --statistics CT.json")
    if args.progress == "json":
        Progress("json").message(where)
    else:  # printed even with --progress none: where the files are is the point of the demo
        print(where)
    return status


def _new_segmentor(card: ModelCard, args: argparse.Namespace) -> Segmentor:
    """A new segmentor of `card`'s architecture with --head and --timestep (random weights)."""
    return new_segmentor(card, head=args.head, timestep=args.timestep)


def _finetune_config(args: argparse.Namespace) -> FinetuneConfig:
    """Defaults, then the --config file, then explicit flags (those of FinetuneConfig's fields, and --strategy, --no-augment)."""
    settings: dict = {}
    if args.config:
        try:
            settings = json.loads(Path(args.config).expanduser().read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise InputError(f"{args.config}: cannot read fine-tuning settings ({e}); pass a JSON file holding an object of settings") from e
    flags = {f.name: getattr(args, f.name) for f in _flagged_fields()}
    settings.update({k: v for k, v in flags.items() if v is not None}, strategy=args.strategy)
    if args.no_augment:
        settings["augment"] = {**settings.get("augment", {}), "enabled": False}
    try:
        return FinetuneConfig.from_dict(settings)
    except (TypeError, ValueError) as e:
        raise InputError(f"{args.config or 'fine-tuning settings'}: {e}") from e


def _flagged_fields() -> list[Field]:
    """The FinetuneConfig fields that are `finetune` flags (their metadata holds the flag's help)."""
    return [f for f in fields(FinetuneConfig) if "flag" in f.metadata]


def _add_finetune_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per flagged FinetuneConfig field: --name-with-dashes, typed by the field, its default shown from the dataclass."""
    for f in _flagged_fields():
        kind = _positive_int if f.metadata.get("positive") else float if str(f.type).startswith("float") else int
        default = f.metadata.get("none", "none") if f.default is None else f"{f.default:g}" if kind is float else f.default
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, help=f"{f.metadata['flag']} (default: {default})")


def _label_set(text: str | None) -> LabelSet | None:
    """--label-set: a JSON file, or a model (name or folder) whose card's set to take; None when not given."""
    if text is None:
        return None
    path = Path(text).expanduser()
    if path.is_file():
        return read_label_set(path)
    return read_card(resolve_model(text, "segmentor")).label_set


def _declared_organs(args: argparse.Namespace, label_set: LabelSet) -> list[set[int] | None]:
    """--organs, one per --labels (or one for all), as ids of `label_set`, parsed before any CT is read."""
    given = args.organs or []
    if len(given) not in (0, 1, len(args.labels)):
        raise InputError(f"got {len(given)} --organs for {len(args.labels)} --labels; give one --organs per --labels, or one for all")
    try:
        parsed = [label_set.parse(text) for text in given]
    except ValueError as e:
        raise InputError(f"--organs {e}") from e
    return parsed * len(args.labels) if len(parsed) == 1 else parsed or [None] * len(args.labels)


def _organ_set(declared: set[int] | None, labels: sitk.Image, path: str, label_set: LabelSet) -> set[int]:
    """The organs `labels` labels: as declared, else those it holds plus a .seg.nrrd's named (even empty) segments."""
    present = labelled_organs(labels)
    if declared is not None:
        if extra := present - declared:
            names = ", ".join(label_set.names(extra))
            raise InputError(f"{path}: holds {names}, which its --organs leaves out; add them to --organs or erase them from the labels")
        return declared
    source = Path(path).expanduser()
    if source.is_file() and (source.name.lower().endswith(".seg.nrrd") or is_slicer_segmentation(source)):
        present |= segment_organs(source, label_set)
    return present


def cmd_finetune(args: argparse.Namespace) -> int:
    if len(args.image) != len(args.labels):
        raise InputError(f"got {len(args.image)} --image but {len(args.labels)} --labels; give one --labels per --image")
    output = finetune_destination(args.output)
    if output.exists() and not (output / CARD_FILE).exists() and (not output.is_dir() or any(output.iterdir())):
        raise InputError(f"{output}: exists and is not a DiffusionSeg model folder; choose another output path")
    check_writable(output, "-o", creates_folders=True)
    config = _finetune_config(args)
    check_adapt(args.strategy, args.adapt)
    device = resolve_device(args.device)
    base = args.base if args.base is not None else default_base(args.strategy, args.head, args.adapt, args.preset, getattr(args, "label_set", None) is not None)
    start = build_segmentor(base, args.strategy, args.head, args.timestep, args.preset, _label_set(args.label_set))
    label_set = start.label_set
    declared = _declared_organs(args, label_set)
    training = []
    for image_path, labels_path in zip(args.image, args.labels, strict=True):
        ct = read_ct(image_path)
        training.append(TrainingCT(ct, read_labels(labels_path, ct, label_set=label_set),
                                   source={"image": portable_path(image_path), "labels": portable_path(labels_path)}, name=labels_path))
    for t, given in zip(training, declared, strict=True):
        t.organs = _organ_set(given, t.labels, t.name, label_set)

    progress = Progress(args.progress)
    segmentor, card = finetune_model(training, start, config, adapt_seconds=args.adapt, device=device, progress=progress,
                                     fit_batch_size=args.batch_size is None and not args.config, name=args.name or output.name)
    folder = save_model(output, card, segmentor.state_dict(), half=args.half)
    use = f"--model {folder.name}" if folder.parent == user_models_dir().resolve() else f"--model {folder}"
    record = card.provenance
    progress.message(f"wrote {folder} ({record['iterations']} iterations, final loss {record['final_loss']:.4f}, {record['seconds']:.0f} s); "
                     f"segment with it: diffusionseg segment CT.nii.gz -o CT.seg.nrrd {use}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    label_set = _label_set(args.label_set) or FLARE22
    ref = read_labels(args.ref, None, label_set=label_set)
    pred = read_labels(args.pred, ref, label_set=label_set)
    metrics = organ_overlap(sitk.GetArrayViewFromImage(pred), sitk.GetArrayViewFromImage(ref), label_set)
    metrics.update(pred=str(args.pred), ref=str(args.ref))
    for name, m in metrics["organs"].items():
        if m["ref_voxels"]:
            print(f"{name:22s} DSC {m['dsc']:.4f}  Jaccard {m['jaccard']:.4f}")
    if metrics["mean_dsc"] is not None:
        organs = len(metrics["reference_organs"])
        print(f"{'mean':22s} DSC {metrics['mean_dsc']:.4f}  Jaccard {metrics['mean_jaccard']:.4f}  (over the {organs} organs in the reference)")
    if absent := metrics["absent_from_reference"]:
        print(f"not in the reference, so not scored: {', '.join(absent)}"
              + (f" (predicted anyway: {', '.join(metrics['predicted_not_in_reference'])})" if metrics["predicted_not_in_reference"] else ""))
    if args.json_out:
        with atomic_path(args.json_out) as tmp:
            Path(tmp).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    infos = list_models()
    if args.json:
        print(json.dumps([{"name": i.name, "path": str(i.path), "kind": i.kind, "source": i.source, "card": i.card.to_dict()} for i in infos], indent=2))
    else:
        for i in infos:
            print(f"{i.name:30s} {i.kind:10s} {i.source:8s} {i.path}")
        print(f"{len(infos) or 'no'} models; your models folder: {user_models_dir()}")
    return 0


def cmd_refine(args: argparse.Namespace) -> int:
    """finetune's recipe and settings on one annotation, then segment with the new model and merge the annotated slices back."""
    from .refine import RefineOutputs, organ_list, refine, slice_list

    outputs = RefineOutputs.checked(args.output, args.result, uncertainty=args.uncertainty, written=args.written_output)
    recorded = slice_list(args.recorded_slices)
    config = _finetune_config(args)
    check_adapt(args.strategy, args.adapt)
    device = resolve_device(args.device)
    base = args.base if args.base is not None else default_base(args.strategy, args.head, args.adapt, args.preset, getattr(args, "label_set", None) is not None)
    start = build_segmentor(base, args.strategy, args.head, args.timestep, args.preset, _label_set(args.label_set))
    organs = organ_list(args.organs, label_set=start.label_set)
    refine(args.image, args.annotation, outputs, recorded=recorded, written=args.written, organs=organs, base=start, config=config, name=args.name,
           half=args.half, device=device, progress=Progress(args.progress), adapt_seconds=args.adapt,
           fit_batch_size=args.batch_size is None and not args.config)
    return 0


COMMANDS = {"segment": cmd_segment, "demo": cmd_demo, "finetune": cmd_finetune, "evaluate": cmd_evaluate, "models": cmd_models,
            "refine": cmd_refine}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_cpu()
    previous = signal.signal(signal.SIGTERM, _raise_cancelled)
    started = time.monotonic()
    try:
        return COMMANDS[args.command](args)
    except InputError as e:
        print(f"diffusionseg: error: {e}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except (KeyboardInterrupt, Cancelled):
        print(f"diffusionseg: cancelled after {time.monotonic() - started:.0f} s; no output was written", file=sys.stderr)
        return EXIT_CANCELLED
    except torch.cuda.OutOfMemoryError:
        print("diffusionseg: error: the GPU ran out of memory; retry with a smaller --batch-size or --device cpu", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
