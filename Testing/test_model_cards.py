"""Completing the bundled cards: data licences and held-out metrics from Training.benchmarks.model_figures."""

from __future__ import annotations

import json

import torch

from DiffusionSegLib.models import ModelCard, read_card, read_weights, save_model
from DiffusionSegLib.preprocessing import PreprocessingSpec
from DiffusionSegLib.segmentor import Segmentor
from DiffusionSegLib.unet import UNetModel, preset_config
from Training.model_cards import complete_pretrained, complete_segmentor, data_sources, held_out_metrics, source_of

FIGURES = {
    "abdomen-ct-a-all-ft-dec": {
        "trained_on": "abdomen-ct-a",
        "abdomen-ct-a": {"mean_dsc": 0.9, "organs": {"liver": {"dsc": 0.95}}},
        "abdomen-ct-c": {"mean_dsc": 0.6, "organs": {"liver": {"dsc": 0.9}}},
        "within_dsc": 0.9,
    },
    "abdomen-ct-c-4-ft-dec": {
        "trained_on": "abdomen-ct-c",
        "abdomen-ct-a": {"mean_dsc": 0.4, "organs": {"liver": {"dsc": 0.7}}},
        "abdomen-ct-c": {"mean_dsc": 0.5, "organs": {"liver": {"dsc": 0.8}}},
    },
}


def test_sources_and_licences_are_named_by_file():
    assert source_of("/x/shared/data/unlabeled/ircadb-01-ct.nii.gz")[2].startswith("CC BY-NC-ND 4.0 (non-commercial")
    assert source_of("/x/shared/data/abdomen-ct-c/ct.nii.gz")[2] == "MIT"
    assert source_of("/x/unlabeled/crlm-ct-1004-dicom/1-01.dcm#series=1.2.3")[0] == "crlm-ct-1004-dicom"
    assert source_of("/elsewhere/mine.nii.gz")[2].startswith("unknown")
    names = [d["name"] for d in data_sources(["/d/abdomen-ct-a/ct.nii.gz", "/d/unlabeled/crlm-ct-1006.nii.gz", "/e/abdomen-ct-a/ct.nii.gz"])]
    assert names == ["abdomen-ct-a", "crlm-ct-1006"]


def test_held_out_metrics_leave_out_the_training_ct_of_all_slice_models():
    metrics = held_out_metrics(FIGURES)
    assert set(metrics["abdomen-ct-a-all-ft-dec"]) == {"abdomen-ct-c"}
    assert metrics["abdomen-ct-a-all-ft-dec"]["abdomen-ct-c"] == {"held_out": "other patient", "mean_dsc": 0.6, "organ_dsc": {"liver": 0.9}}
    assert metrics["abdomen-ct-c-4-ft-dec"]["abdomen-ct-c"]["held_out"] == "other slices of the same CT"


def test_complete_segmentor_writes_metrics_sources_and_cleanup_but_keeps_the_weights(tmp_path):
    torch.manual_seed(0)
    config = preset_config("tiny")
    segmentor = Segmentor(config, 32)
    card = ModelCard(kind="segmentor", unet=config, preprocessing=PreprocessingSpec.for_size(config.image_size), head={"width": 32, "layers": 2},
                     strategy="ft-dec", preset="tiny", name="s", provenance={"data": [{"image": "/d/abdomen-ct-a/ct.nii.gz"}]})
    folder = save_model(tmp_path / "s", card, segmentor.state_dict())
    before = read_weights(folder)
    complete_segmentor(folder, FIGURES, cleanup=True)
    after = read_card(folder)
    assert after.cleanup and after.provenance["data_sources"][0]["licence"] == "Apache-2.0"
    assert after.provenance["metrics"]["abdomen-ct-a-all-ft-dec"]["abdomen-ct-c"]["mean_dsc"] == 0.6
    assert all(torch.equal(before[k].half().float(), v.float()) for k, v in read_weights(folder).items())
    complete_segmentor(folder, FIGURES, cleanup=False)
    assert not read_card(folder).cleanup and "postprocessing" in json.loads((folder / "model.json").read_text())


def test_each_card_gets_its_own_figures_and_a_grown_model_keeps_its_whole_history(tmp_path):
    """Four-slice figures measure the backbone, leave-one-patient-out ones the segmentor recipe; --init chains stay whole."""
    assert set(held_out_metrics(FIGURES, "-4-")) == {"abdomen-ct-c-4-ft-dec"}
    assert set(held_out_metrics(FIGURES, "-all-")) == {"abdomen-ct-a-all-ft-dec"}
    config = preset_config("tiny")
    card = ModelCard(kind="pretrained", unet=config, preprocessing=PreprocessingSpec.for_size(config.image_size), preset="tiny",
                     name="p", provenance={"iterations": 5})
    folder = save_model(tmp_path / "p", card, UNetModel(config).state_dict())
    earlier = {"name": "p", "unet": {"image_size": 64}, "preprocessing": {"size": 64},
               "provenance": {"iterations": 800, "grown_from": {"image_size": 32, "iterations": 3000}}}
    (tmp_path / "earlier.json").write_text(json.dumps(earlier))
    complete_pretrained(folder, tmp_path / "earlier.json", FIGURES)
    provenance = read_card(folder).provenance
    assert provenance["grown_from"]["iterations"] == 800 and provenance["grown_from"]["grown_from"]["iterations"] == 3000
    assert set(provenance["metrics"]) == {"protocol", "abdomen-ct-c-4-ft-dec"}


def test_a_segmentor_built_from_an_earlier_backbone_says_so(tmp_path):
    config = preset_config("tiny")

    def pretrained(name: str, iterations: int):
        card = ModelCard(kind="pretrained", unet=config, preprocessing=PreprocessingSpec.for_size(config.image_size), preset="tiny",
                         name="p", provenance={"iterations": iterations})
        return save_model(tmp_path / name, card, UNetModel(config).state_dict())

    earlier, later = pretrained("earlier", 800), pretrained("later", 1804)
    card = ModelCard(kind="segmentor", unet=config, preprocessing=PreprocessingSpec.for_size(config.image_size), head={"width": 32, "layers": 2},
                     strategy="ft-dec", preset="tiny", name="s", provenance={"data": []})
    folder = save_model(tmp_path / "s", card, Segmentor(config, 32).state_dict())
    complete_segmentor(folder, FIGURES, cleanup=False, built_from=earlier, pretrained=later)
    note = read_card(folder).provenance["base_note"]
    assert "after 800 iterations" in note and "1804 iterations more" in note
    complete_segmentor(folder, FIGURES, cleanup=False)
    assert "base_note" in read_card(folder).provenance  # a later completion without the flag keeps what was said


def _leave_out_record(held_out: str, trained_on: list[str], dsc: float) -> dict:
    return {"held_out": held_out, "trained_on": trained_on, "iterations": 1,
            held_out: {"mean_dsc": dsc, "organs": {"liver": {"dsc": dsc, "ref_voxels": 10}}}, "held_out_dsc": dsc}


def test_a_continued_segmentor_is_judged_by_its_second_stage(tmp_path):
    """A segmentor continued from another one (its card's base is a segmentor) gets the leave-out figures of the recipe's
    second stage ('+N', N its own iterations); one trained from the pretrained model gets the first stage's."""
    figures = {
        "without-a-cleanup": _leave_out_record("a", ["c"], 0.2),
        "without-c-cleanup": _leave_out_record("c", ["a"], 0.3),
        "without-a+500-cleanup": _leave_out_record("a", ["c"], 0.5),
        "without-c+500-cleanup": _leave_out_record("c", ["a"], 0.6),
    }
    config = preset_config("tiny")
    segmentor = Segmentor(config, 32)
    for kind, iterations, expected in (("pretrained", 300, 0.25), ("segmentor", 500, 0.55)):
        card = ModelCard(kind="segmentor", unet=config, preprocessing=PreprocessingSpec.for_size(config.image_size),
                         head={"width": 32, "layers": 2}, strategy="ft-dec", preset="tiny", name="s",
                         provenance={"data": [], "base": {"name": "b", "kind": kind}, "iterations": iterations})
        folder = save_model(tmp_path / kind, card, segmentor.state_dict())
        complete_segmentor(folder, figures, cleanup=True)
        held_out = read_card(folder).provenance["metrics"]["held_out"]
        assert held_out["mean_dsc"] == expected, kind
