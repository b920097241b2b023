"""The ``diffusionseg`` command: segment, demo, finetune, evaluate, models.

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
from pathlib import Path

import SimpleITK as sitk
import torch

from . import __version__
from .adaptation import adapt_backbone
from .annotations import labelled_organs, training_slices
from .atomic import atomic_path
from .demo import DEFAULT_OUTPUT_DIR, SAMPLE_CT, demo_outputs
from .devices import DEVICES, configure_cpu, describe_hardware, resolve_device
from .diffusion import GaussianDiffusion
from .errors import Cancelled, InputError
from .finetune import FinetuneConfig, finetune
from .imageio import check_output_path, check_writable, read_ct, read_labels, write_labelmap
from .inference import segment_ct
from .metrics import organ_overlap
from .models import (
    ModelCard,
    finetune_destination,
    list_models,
    load_segmentor,
    load_unet,
    now_iso,
    portable_path,
    read_card,
    resolve_model,
    save_model,
    user_models_dir,
)
from .organs import ORGANS, parse_organs
from .preprocessing import PreprocessingSpec, to_model_space
from .preview import write_preview
from .progress import MODES, Progress
from .seg_nrrd import is_slicer_segmentation, segment_organs
from .segmentor import DEFAULT_HEAD_WIDTH, STRATEGIES, Segmentor
from .statistics import organ_statistics, statistics_table, write_statistics
from .uncertainty import segment_with_uncertainty, write_report
from .unet import PRESETS, preset_config

EXIT_INPUT_ERROR = 2
EXIT_CANCELLED = 130


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
    ft.add_argument("--labels", action="append", required=True, help="labelmap on the image grid (FLARE22 ids) or .seg.nrrd (required)")
    ft.add_argument("--organs", action="append", metavar="LIST",
                    help="organs the matching --labels labels (comma-separated names or ids, or 'all'), once per --labels or once for all; "
                         "on its annotated slices an unlabelled voxel is then taken as background or one of the organs not listed, so "
                         "those are kept as the base model knows them (default: the organs with any voxel in the labels, and those "
                         "a .seg.nrrd has a segment for, even an empty one)")
    ft.add_argument("-o", "--output", required=True, metavar="NAME_OR_FOLDER",
                    help="a bare name (no path separator) saves the model in your models folder, listed by 'diffusionseg models' and usable as "
                         "'--model NAME' from anywhere; a path (or an existing folder) is written where given (required)")
    ft.add_argument("--base", help="pretrained (or segmentation) model name or folder (default: the bundled pretrained model)")
    ft.add_argument("--strategy", choices=STRATEGIES, default="ft-dec", help="ft-dec: encoder frozen; lp: head only; fs: from scratch (default: %(default)s)")
    ft.add_argument("--preset", choices=sorted(PRESETS), help="architecture for --strategy fs without --base, at its native slice size "
                    "(default: the bundled pretrained model's architecture and preprocessing, so FS and FT-dec see the same pixels)")
    ft.add_argument("--head", type=_head_width, help="head hidden width, e.g. h128 or h256 (default: by preset)")
    ft.add_argument("--config", help="JSON file of fine-tuning settings (loss weights, optimiser, augmentation); flags override it (default: none)")
    ft.add_argument("--iterations", type=_positive_int, help=f"training iterations (default: {FinetuneConfig.iterations})")
    ft.add_argument("--batch-size", type=_positive_int,
                    help=f"slices per iteration; unless given, a smaller one is taken on the CPU when it would not fit in memory "
                         f"(default: {FinetuneConfig.batch_size})")
    ft.add_argument("--lr", type=float, help=f"backbone learning rate; the head uses 10x (default: {FinetuneConfig.lr:g})")
    ft.add_argument("--time-limit", type=float, help="stop after this many seconds of training (default: no limit)")
    ft.add_argument("--patience", type=int,
                    help=f"stop once the loss has not improved for this many iterations; 0 never stops early (default: {FinetuneConfig.patience})")
    ft.add_argument("--timestep", type=int, help="diffusion timestep fed to the network (default: 0)")
    ft.add_argument("--adapt", type=_seconds, default=0.0, metavar="SECONDS",
                    help="first continue the pretrained base's DDPM training on all slices of the --image CTs (no labels needed) "
                         "for this many seconds; ft-dec and lp from a pretrained base only (default: 0, off)")
    ft.add_argument("--seed", type=int, help="random seed (default: 0)")
    ft.add_argument("--no-augment", action="store_true", help="train without affine and intensity augmentation (default: off, augmentation on)")
    ft.add_argument("--name", help="model name recorded in model.json (default: the folder name)")
    ft.add_argument("--half", action="store_true", help="store the weights in float16 (half the size; they are used in float32) (default: off)")
    common(ft)

    ev = sub.add_parser("evaluate", help="per-organ DSC and Jaccard of a prediction against a reference")
    ev.add_argument("--pred", required=True, help="predicted labelmap or .seg.nrrd (required)")
    ev.add_argument("--ref", required=True, help="reference labelmap or .seg.nrrd on the same grid (required)")
    ev.add_argument("--json", dest="json_out", help="also write the metrics to this JSON file (default: not written)")

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
    table: list[str] = []
    statistics = None
    if args.statistics:  # computed before anything is written: a failure here leaves no output at all
        statistics = {"image": str(args.image), **organ_statistics(ct, labelmap)}
        table = statistics_table(statistics)
    writes = [(output, lambda: write_labelmap(labelmap, output))]
    if args.uncertainty:
        writes.append((Path(args.uncertainty), lambda: write_report(report, args.uncertainty)))
    if statistics is not None:
        writes.append((Path(args.statistics), lambda: write_statistics(statistics, args.statistics)))
    if args.preview:
        writes.append((Path(args.preview), lambda: write_preview(ct, labelmap, args.preview, title=Path(args.image).name)))
    written = _write_all(writes)
    progress.advance()
    progress.finish()
    for line in table:
        progress.message(line)
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


def _base_segmentor(args: argparse.Namespace) -> tuple[Segmentor, ModelCard | None, Path | None]:
    """The network to fine-tune: pretrained backbone + new head, a previous segmentor, or a fresh one (fs)."""
    if args.strategy == "fs" and args.base is None:
        if args.preset is None:  # the default base's architecture and pixels: FS compares with FT-dec on equal terms
            card = read_card(resolve_model(None, "pretrained"))
            return _new_segmentor(card, args), card, None
        preset = args.preset
        config = preset_config(preset)
        spec = PreprocessingSpec.for_size(config.image_size)
        card = ModelCard(kind="pretrained", unet=config, preprocessing=spec, preset=preset, name=f"random-{preset}")
        return _new_segmentor(card, args), card, None
    base = resolve_model(args.base, "pretrained")
    card = read_card(base)
    if args.preset and card.preset and args.preset != card.preset:
        raise InputError(f"--preset {args.preset}: the base model {base} is preset {card.preset}; drop --preset or choose another base")
    if card.kind == "segmentor" and args.strategy != "fs":
        segmentor, card = load_segmentor(base)  # keep improving a fine-tuned model, head included
        if args.timestep is not None:
            segmentor.timestep = args.timestep
        return segmentor, card, base
    segmentor = _new_segmentor(card, args)
    if args.strategy != "fs":  # fs keeps only the base's architecture
        unet, _ = load_unet(base)
        segmentor.load_pretrained(unet.state_dict())
    return segmentor, card, base


def _new_segmentor(card: ModelCard, args: argparse.Namespace) -> Segmentor:
    width = args.head or DEFAULT_HEAD_WIDTH.get(card.preset or "", 64)
    timestep = args.timestep if args.timestep is not None else 0
    if not 0 <= timestep < GaussianDiffusion.from_dict(card.schedule).num_timesteps:
        raise InputError(f"--timestep {timestep}: must lie within the model's diffusion steps (0-{card.schedule.get('num_timesteps', 1000) - 1})")
    return Segmentor(card.unet, width, timestep=timestep)


def _check_adapt(args: argparse.Namespace) -> None:
    if args.adapt > 0 and args.strategy == "fs":
        raise InputError("--adapt: fs trains from random weights, so there is no pretrained backbone to adapt; drop --adapt or use --strategy ft-dec or lp")


def _base_record(base_path: Path, base_card: ModelCard) -> dict:
    """What the new card says of its base. A fine-tuned base keeps its own training record (metrics dropped: they
    describe the base, not this model), so a model continued in stages tells its whole recipe."""
    record = {"path": portable_path(base_path), "name": base_card.name, "kind": base_card.kind}
    if base_card.kind == "segmentor":
        record["provenance"] = {k: v for k, v in base_card.provenance.items() if k != "metrics"}
    return record


def _adapt(args: argparse.Namespace, segmentor: Segmentor, base_card: ModelCard, base_path: Path | None, cts: list[sitk.Image], seed: int,
           device: torch.device, progress: Progress) -> dict | None:
    """Continue the base's DDPM training on every slice of the CTs and give `segmentor` the adapted backbone.

    Returns the provenance record, or None when nothing was adapted. A segmentation model as base is
    skipped with a message, not refused: its noise output layer, which the denoising loss trains, was
    replaced by its head, and the Slicer module keeps the setting while the user fine-tunes again.
    """
    if args.adapt <= 0:
        return None
    if base_card.kind != "pretrained" or base_path is None:
        progress.message(f"--adapt skipped: the base {base_card.name} is a segmentation model, which cannot be trained as a denoiser; "
                         "fine-tune from a pretrained model to adapt")
        return None
    unet, _ = load_unet(base_path)  # with its noise output layer, which the loss needs
    slices = torch.cat([torch.from_numpy(to_model_space(ct, base_card.preprocessing).slices) for ct in cts])
    progress.message(f"adapting the pretrained backbone to {len(slices)} unlabelled slices for {args.adapt:g} s")
    progress.start("adapt", math.ceil(args.adapt))  # steps are seconds: the budget is time, not iterations

    def on_step(_: int, loss: float) -> None:
        progress.advance(min(int(progress.elapsed), progress.total) - progress.step, loss=loss)

    result = adapt_backbone(unet, slices, GaussianDiffusion.from_dict(base_card.schedule), args.adapt, device, seed=seed, on_step=on_step)
    progress.finish()
    segmentor.load_pretrained(unet.state_dict())
    progress.message(f"adapted in {result.iterations} iterations, denoising loss {result.loss_first:.4f} -> {result.loss_last:.4f}")
    return result.provenance()


def _finetune_config(args: argparse.Namespace) -> FinetuneConfig:
    """Defaults, then the --config file, then explicit flags."""
    settings: dict = {}
    if args.config:
        try:
            settings = json.loads(Path(args.config).expanduser().read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise InputError(f"{args.config}: cannot read fine-tuning settings ({e}); pass a JSON file holding an object of settings") from e
    flags = {"iterations": args.iterations, "batch_size": args.batch_size, "lr": args.lr, "time_limit": args.time_limit, "seed": args.seed,
             "patience": args.patience}
    settings.update({k: v for k, v in flags.items() if v is not None}, strategy=args.strategy)
    if args.no_augment:
        settings["augment"] = {**settings.get("augment", {}), "enabled": False}
    try:
        return FinetuneConfig.from_dict(settings)
    except (TypeError, ValueError) as e:
        raise InputError(f"{args.config or 'fine-tuning settings'}: {e}") from e


def _declared_organs(args: argparse.Namespace) -> list[set[int] | None]:
    """--organs, one per --labels (or one for all), parsed before any CT is read."""
    given = args.organs or []
    if len(given) not in (0, 1, len(args.labels)):
        raise InputError(f"got {len(given)} --organs for {len(args.labels)} --labels; give one --organs per --labels, or one for all")
    try:
        parsed = [parse_organs(text) for text in given]
    except ValueError as e:
        raise InputError(f"--organs {e}") from e
    return parsed * len(args.labels) if len(parsed) == 1 else parsed or [None] * len(args.labels)


def _organ_set(declared: set[int] | None, labels: sitk.Image, path: str) -> set[int]:
    """The organs `labels` labels: as declared, else those it holds plus a .seg.nrrd's named (even empty) segments."""
    present = labelled_organs(labels)
    if declared is not None:
        if extra := present - declared:
            names = ", ".join(o.name for o in ORGANS if o.label in extra)
            raise InputError(f"{path}: holds {names}, which its --organs leaves out; add them to --organs or erase them from the labels")
        return declared
    source = Path(path).expanduser()
    if source.is_file() and (source.name.lower().endswith(".seg.nrrd") or is_slicer_segmentation(source)):
        present |= segment_organs(source)
    return present


def _postprocessing_of(base_card: ModelCard, strategy: str) -> dict:
    """A segmentor base passes on its cleanup setting. Fine-tuned from pretrained weights, cleanup is on: held out it raised
    mean DSC for every such model measured (docs/model-figures.md; 0.42 -> 0.48 on a new patient). FS starts from random
    weights, was not measured so, and keeps the plain labelmap."""
    if base_card.kind == "segmentor":
        return dict(base_card.postprocessing)
    return {"cleanup": True} if strategy != "fs" else {}


def cmd_finetune(args: argparse.Namespace) -> int:
    if len(args.image) != len(args.labels):
        raise InputError(f"got {len(args.image)} --image but {len(args.labels)} --labels; give one --labels per --image")
    output = finetune_destination(args.output)
    if output.exists() and not (output / "model.json").exists() and (not output.is_dir() or any(output.iterdir())):
        raise InputError(f"{output}: exists and is not a DiffusionSeg model folder; choose another output path")
    check_writable(output, "-o", creates_folders=True)
    config = _finetune_config(args)
    _check_adapt(args)
    device = resolve_device(args.device)
    segmentor, base_card, base_path = _base_segmentor(args)
    spec = base_card.preprocessing

    declared = _declared_organs(args)
    pairs, data = [], []
    for image_path, labels_path in zip(args.image, args.labels, strict=True):
        ct = read_ct(image_path)
        labels = read_labels(labels_path, ct)
        pairs.append((ct, labels))
        data.append({"image": portable_path(image_path), "labels": portable_path(labels_path)})
    organ_sets = [_organ_set(given, labels, path) for given, (_, labels), path in zip(declared, pairs, args.labels, strict=True)]
    slices = training_slices(pairs, spec, organ_sets)
    for number, entry in enumerate(data):
        entry["annotated_slices"] = [index for n, index in slices.sources if n == number]
        entry["labelled_organs"] = [o.name for o in ORGANS if o.label in slices.organ_sets[number]]
        if not entry["annotated_slices"]:
            raise InputError(f"{args.labels[number]}: no annotated slice (no labelled voxel); paint at least one organ on one axial slice")

    progress = Progress(args.progress)
    adaptation = _adapt(args, segmentor, base_card, base_path, [ct for ct, _ in pairs], config.seed, device, progress)
    organs = ", ".join(slices.summary()["organs"])
    progress.message(f"fine-tuning ({args.strategy}) on {len(slices.sources)} annotated slices, organs: {organs}; device {device}")
    if unlabelled := slices.unlabelled_organs():
        kept = "kept as the base model knows them" if base_card.kind == "segmentor" and args.strategy != "fs" else "not learned"
        progress.message(f"partial labels: {', '.join(unlabelled)} unlabelled in at least one CT; there, unlabelled voxels may be them ({kept})")
    progress.start("finetune", config.iterations)
    result = finetune(segmentor, slices.images, slices.labels, config, device, lambda _, loss: progress.advance(loss=loss),
                      fit_batch_size=args.batch_size is None and not args.config, on_message=progress.message,
                      labelled=slices.labelled(segmentor.num_classes), keep_unlabelled=base_card.kind == "segmentor" and args.strategy != "fs")
    progress.finish()

    card = ModelCard(
        kind="segmentor",
        unet=base_card.unet,
        preprocessing=spec,
        schedule=base_card.schedule,
        head={"width": segmentor.head.hidden, "layers": segmentor.head.num_layers},
        strategy=args.strategy,
        timestep=segmentor.timestep,
        preset=base_card.preset,
        postprocessing=_postprocessing_of(base_card, args.strategy),
        licence=dict(base_card.licence),
        name=args.name or output.name,
        provenance={
            "created": now_iso(),
            "diffusionseg_version": __version__,
            "base": None if base_path is None else _base_record(base_path, base_card),
            "adaptation": adaptation,
            "data": data,
            "training_slices": slices.summary(),
            "iterations": result.iterations,
            "stopped_by": result.stopped_by,
            "final_loss": result.final_loss,
            "seconds": round(result.seconds, 1),
            "device": str(device),
            "hardware": describe_hardware(device),
            "config": config.to_dict(),
            "metrics": {},
        },
    )
    folder = save_model(output, card, segmentor.state_dict(), half=args.half)
    use = f"--model {folder.name}" if folder.parent == user_models_dir().resolve() else f"--model {folder}"
    progress.message(f"wrote {folder} ({result.iterations} iterations, final loss {result.final_loss:.4f}, {result.seconds:.0f} s); "
                     f"segment with it: diffusionseg segment CT.nii.gz -o CT.seg.nrrd {use}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    ref = read_labels(args.ref, None)
    pred = read_labels(args.pred, ref)
    metrics = organ_overlap(sitk.GetArrayViewFromImage(pred), sitk.GetArrayViewFromImage(ref))
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


COMMANDS = {"segment": cmd_segment, "demo": cmd_demo, "finetune": cmd_finetune, "evaluate": cmd_evaluate, "models": cmd_models}


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
