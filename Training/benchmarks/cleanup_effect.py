"""What the labelmap cleanup (DiffusionSegLib/cleanup.py) does to DSC: per organ and mean, without and with it.

    python -m Training.benchmarks.cleanup_effect --model MODEL --image CT --labels LABELS [--image CT2 --labels LABELS2 ...]
        [--device auto|cpu|cuda] [--batch-size N] [--min-fraction 0.1] [--max-hole-mm2 1000 | --max-hole-mm2 none] [--json OUT.json]

Each CT is segmented once, without cleanup; the cleanup is then applied to that labelmap, so both columns
come from the same network output and differ only by the cleanup. DSC is computed on the CT's own grid
against the reference labels (`diffusionseg evaluate`'s `organ_overlap`). Per organ the table averages
over the CTs where the organ is in the prediction or the reference; the mean row averages the CTs' mean
DSC. Use it to decide a model card's "postprocessing": {"cleanup": true}. Evaluate on CTs the model was
not trained on: on its training CT a cleanup that removes true structure can hide behind overfitting.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from DiffusionSegLib.cleanup import MAX_HOLE_MM2, MIN_FRACTION, clean_image  # noqa: E402
from DiffusionSegLib.devices import DEVICES, configure_cpu, resolve_device  # noqa: E402
from DiffusionSegLib.imageio import read_ct, read_labels  # noqa: E402
from DiffusionSegLib.inference import segment_ct  # noqa: E402
from DiffusionSegLib.metrics import organ_overlap  # noqa: E402
from DiffusionSegLib.models import load_segmentor, resolve_model  # noqa: E402
from DiffusionSegLib.organs import ORGANS  # noqa: E402


def _hole_limit(text: str) -> float | None:
    if text.lower() == "none":
        return None
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive area in mm^2 or 'none', got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="segmentation model name or folder (default: the bundled segmentation model)")
    parser.add_argument("--image", action="append", required=True, help="CT (repeat, one --labels each)")
    parser.add_argument("--labels", action="append", required=True, help="reference labelmap or .seg.nrrd on the CT grid")
    parser.add_argument("--device", choices=DEVICES, default="auto")
    parser.add_argument("--batch-size", type=int, help="slices per network batch (default by device)")
    parser.add_argument("--min-fraction", type=float, default=MIN_FRACTION,
                        help=f"cleanup: keep components of this fraction of the largest (default {MIN_FRACTION})")
    parser.add_argument("--max-hole-mm2", type=_hole_limit, default=MAX_HOLE_MM2,
                        help=f"cleanup: largest hole filled, mm^2, or 'none' (default {MAX_HOLE_MM2:g})")
    parser.add_argument("--json", dest="json_out", help="also write every figure to this JSON file")
    return parser


def evaluate_case(image: str, labels: str, args: argparse.Namespace, segmentor, card, device) -> dict:
    """One CT: segmented once, DSC of the raw and the cleaned labelmap against the reference."""
    ct = read_ct(image)
    reference = sitk.GetArrayFromImage(read_labels(labels, ct))
    started = time.perf_counter()
    raw = segment_ct(ct, segmentor, card.preprocessing, device, args.batch_size)
    segment_seconds = time.perf_counter() - started
    started = time.perf_counter()
    cleaned = clean_image(raw, min_fraction=args.min_fraction, max_hole_mm2=args.max_hole_mm2)
    cleanup_seconds = time.perf_counter() - started
    raw_array, cleaned_array = sitk.GetArrayViewFromImage(raw), sitk.GetArrayViewFromImage(cleaned)
    return {
        "image": str(image),
        "labels": str(labels),
        "size": list(ct.GetSize()),
        "segment_seconds": round(segment_seconds, 2),
        "cleanup_seconds": round(cleanup_seconds, 3),
        "changed_voxels": int(np.count_nonzero(raw_array != cleaned_array)),
        "without": organ_overlap(raw_array, reference),
        "with": organ_overlap(cleaned_array, reference),
    }


def summarise(cases: list[dict]) -> dict:
    """Per-organ DSC averaged over the CTs that have the organ, and the mean of the CTs' mean DSC."""
    organs = {}
    for organ in ORGANS:
        pairs = [(c["without"]["organs"][organ.name]["dsc"], c["with"]["organs"][organ.name]["dsc"])
                 for c in cases if organ.name in c["without"]["organs"] and organ.name in c["with"]["organs"]]
        if pairs:
            without, with_ = np.mean(pairs, axis=0)
            organs[organ.name] = {"without": float(without), "with": float(with_), "cases": len(pairs)}
    means = [(c["without"]["mean_dsc"], c["with"]["mean_dsc"]) for c in cases if c["without"]["mean_dsc"] is not None]
    mean = {"without": float(np.mean([m[0] for m in means])), "with": float(np.mean([m[1] for m in means]))} if means else None
    return {"organs": organs, "mean_dsc": mean}


def print_table(summary: dict, cases: list[dict]) -> None:
    print(f"\n{'organ':22s} {'without':>8s} {'with':>8s} {'change':>8s}  cases")
    rows = [*summary["organs"].items(), *([("mean DSC", summary["mean_dsc"])] if summary["mean_dsc"] else [])]
    for name, row in rows:
        print(f"{name:22s} {row['without']:8.4f} {row['with']:8.4f} {row['with'] - row['without']:+8.4f}  {row.get('cases', len(cases))}")
    seconds = [c["cleanup_seconds"] for c in cases]
    print(f"\ncleanup: {np.mean(seconds):.2f} s per CT on average (max {max(seconds):.2f} s)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if len(args.image) != len(args.labels):
        print(f"got {len(args.image)} --image but {len(args.labels)} --labels; give one --labels per --image", file=sys.stderr)
        return 2
    configure_cpu()
    device = resolve_device(args.device)
    model = resolve_model(args.model, "segmentor")
    segmentor, card = load_segmentor(model)
    cases = []
    for image, labels in zip(args.image, args.labels, strict=True):
        case = evaluate_case(image, labels, args, segmentor, card, device)
        print(f"{image}: mean DSC {case['without']['mean_dsc']} -> {case['with']['mean_dsc']}, {case['changed_voxels']} voxels changed, "
              f"cleanup {case['cleanup_seconds']:.2f} s", flush=True)
        cases.append(case)
    summary = summarise(cases)
    print_table(summary, cases)
    if args.json_out:
        settings = {"min_fraction": args.min_fraction, "max_hole_mm2": args.max_hole_mm2}
        result = {"model": str(model), "model_card_cleanup": card.cleanup, "cleanup": settings, "summary": summary, "cases": cases}
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
