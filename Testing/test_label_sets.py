"""A label set that is data: read from the model card (ids, names, colours, terminology), FLARE22's the default, and a
user's own set (``--label-set``) carried from fine-tuning to loading, segmenting, writing .seg.nrrd and statistics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
from slicer_helpers import random_tiny_segmentor

from DiffusionSegLib.bridge import model_cards
from DiffusionSegLib.bridge.painting import annotation_summary, describe_organ_plan, segment_organ_ids
from DiffusionSegLib.cli import main
from DiffusionSegLib.errors import InputError
from DiffusionSegLib.imageio import read_labels, write_labelmap
from DiffusionSegLib.models import ModelCard, label_table, load_segmentor
from DiffusionSegLib.organs import FLARE22, ORGANS, LabelSet, read_label_set, terminology_string
from DiffusionSegLib.preview import PREVIEW_COLOURS, legend_swatch, preview_colour, render_preview
from DiffusionSegLib.segment_statistics import organ_statistics

WEIGHTS = Path(__file__).resolve().parents[1] / "DiffusionSegLib" / "weights"

TUMOUR_TERMINOLOGY = {"category": ["SCT", "49755003", "Morphologically Altered Structure"], "type": ["SCT", "108369006", "Neoplasm"]}
# Two labels with ids of their own: the liver is 2 here (FLARE22's right kidney id), the tumour 1.
TUMOUR_SET = [
    {"label": 1, "name": "tumour", "display_name": "Liver tumour", "color": [255, 0, 128], "terminology": TUMOUR_TERMINOLOGY,
     "aliases": ["lesion"]},
    {"label": 2, "name": "liver"},
]


# --- the set as data -----------------------------------------------------------------------------------------


def test_flare22_is_the_default_and_its_card_entries_are_unchanged():
    """Cards written before label sets were data hold exactly what FLARE22 writes, and read back as FLARE22."""
    assert label_table() == [{"label": o.label, "name": o.name, "display_name": o.display_name, "color": list(o.color)} for o in ORGANS]
    assert LabelSet.from_card(label_table()) is FLARE22 and FLARE22.num_classes == 14
    for card in WEIGHTS.glob("*/model.json"):  # the bundled models: their cards hold FLARE22's table
        assert ModelCard.from_dict(json.loads(card.read_text())).label_set is FLARE22, card
    assert ModelCard.from_dict({**json.loads((WEIGHTS / "flare22-segmentor" / "model.json").read_text()), "labels": None}).label_set is FLARE22


def test_a_users_set_from_its_entries():
    labels = LabelSet.from_card(TUMOUR_SET)
    assert labels != FLARE22 and labels.num_classes == 3 and labels.labels == (1, 2) and len(labels) == 2
    tumour, liver = labels.organ(1), labels.organ(2)
    assert (tumour.name, tumour.display_name, tumour.color) == ("tumour", "Liver tumour", (255, 0, 128))
    # an entry named like a FLARE22 organ takes its terminology, colour and names
    flare_liver = FLARE22.organ(1)
    assert (liver.display_name, liver.color, liver.type, liver.aliases) == ("Liver", flare_liver.color, flare_liver.type, flare_liver.aliases)
    # matching segments: by terminology first, then by name (aliases, case, trailing numbers)
    assert labels.match(None, terminology_string(tumour)) is tumour
    assert labels.match("Segment_1", {"category": TUMOUR_TERMINOLOGY["category"], "type": TUMOUR_TERMINOLOGY["type"]}) is tumour
    assert labels.match("Lesion 2") is tumour and labels.match("Liver tumour") is tumour and labels.match("hepar") is liver
    assert labels.match("Spleen") is None and labels.match(None, terminology_string(FLARE22.organ(3))) is None
    assert labels.parse("tumour, 2") == {1, 2} and labels.parse("all") == {1, 2}
    with pytest.raises(ValueError, match=r"'spleen': not among the label set's 2 labels \(1 tumour, 2 liver\); give names or ids 1-2"):
        labels.parse("spleen")
    with pytest.raises(KeyError, match="labels are 1-2"):
        labels.organ(3)
    # the card round trip keeps everything, terminology included
    card = labels.to_card()
    assert card[0]["terminology"] == TUMOUR_TERMINOLOGY and card[0]["aliases"] == ["lesion"] and card[1]["terminology"]["type"][1] == "10200004"
    assert LabelSet.from_card(json.loads(json.dumps(card))) == labels
    assert "the label set's 2 labels (1 tumour, 2 liver)" == labels.describe() and FLARE22.describe() == "the 13 FLARE22 organs"


@pytest.mark.parametrize("entries, problem", [
    ([], "non-empty list"),
    ({"label": 1}, "non-empty list"),
    ([{"label": 1, "name": "a"}, {"label": 3, "name": "b"}], "must be 1-2, each once"),
    ([{"label": 1, "name": "a"}, {"label": 1, "name": "b"}], "must be 1-2, each once"),
    ([{"label": 0, "name": "background"}], "not an id 1-255"),
    ([{"label": True, "name": "a"}], "not an id"),
    ([{"label": 1}], "needs a name"),
    ([{"label": 1, "name": "a", "colour": [1, 2, 3]}], "unknown keys 'colour'"),
    ([{"label": 1, "name": "a", "color": [1, 2, 300]}], "color"),
    ([{"label": 1, "name": "a", "terminology": {"category": ["SCT", "1", "x"]}}], "terminology needs a type"),
    ([{"label": 1, "name": "Liver"}, {"label": 2, "name": "liver"}], "both called"),
    ([{"label": 1, "name": "tumour", "aliases": ["x"]}, {"label": 2, "name": "x"}], "both called"),
])
def test_a_broken_set_says_what_is_wrong(entries, problem):
    with pytest.raises(ValueError, match=problem):
        LabelSet.from_card(entries)


def test_label_set_files(tmp_path):
    """A card-like list, an object holding it, or an nnU-Net dataset.json's labels."""
    listing = tmp_path / "labels.json"
    listing.write_text(json.dumps(TUMOUR_SET))
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"labels": TUMOUR_SET}))
    nnunet = tmp_path / "dataset.json"
    nnunet.write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "tumour": 1, "liver": 2}, "numTraining": 3}))
    assert read_label_set(listing) == read_label_set(wrapped) == LabelSet.from_card(TUMOUR_SET)
    assert [o.name for o in read_label_set(nnunet)] == ["tumour", "liver"]
    regions = tmp_path / "regions.json"
    regions.write_text(json.dumps({"labels": {"background": 0, "kidney": [1, 2]}}))
    with pytest.raises(InputError, match="regions.json: labels 'kidney' are not single ids"):
        read_label_set(regions)
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    with pytest.raises(InputError, match="broken.json: cannot read a label set"):
        read_label_set(broken)
    gaps = tmp_path / "gaps.json"
    gaps.write_text(json.dumps([{"label": 2, "name": "liver"}]))
    with pytest.raises(InputError, match=r"gaps.json: label ids 2: they must be 1-1.*docs/label-sets.md"):
        read_label_set(gaps)


def test_a_card_with_a_broken_set_is_refused():
    card = json.loads((WEIGHTS / "flare22-segmentor" / "model.json").read_text())
    with pytest.raises(ValueError, match="must be 1-1"):
        ModelCard.from_dict({**card, "labels": [{"label": 5, "name": "liver"}]})


def test_the_bridge_reads_a_models_set_without_torch(tmp_path):
    folder = random_tiny_segmentor(tmp_path / "mine")
    card = json.loads((folder / "model.json").read_text())
    card["labels"] = LabelSet.from_card(TUMOUR_SET).to_card()
    (folder / "model.json").write_text(json.dumps(card))
    assert model_cards.label_set(folder) == LabelSet.from_card(TUMOUR_SET)
    assert model_cards.label_set("flare22-segmentor") is FLARE22 and model_cards.label_set(tmp_path / "nothing") is FLARE22
    labels = LabelSet.from_card(TUMOUR_SET)
    assert segment_organ_ids([("Liver", None), ("Liver tumour", None), ("Spleen", None)], labels) == [2, 1, None]
    painted = np.zeros((3, 4, 4), np.uint8)
    painted[1, 0, 0] = 1
    assert annotation_summary(painted, [1], 2, label_set=labels)["organs"] == ["tumour"]
    plan = describe_organ_plan(["tumour"], None, labels)
    assert "Learned from your slices: Liver tumour." in plan and "Liver." in plan and "Spleen" not in plan


def test_the_engine_takes_a_set_not_flare22s_table():
    """Engine modules get the label set passed (FLARE22 only as a default); FLARE22's table and lookups stay in organs.py."""
    import ast

    engine = Path(__file__).resolve().parents[1] / "DiffusionSegLib"
    flare_only = {"ORGANS", "NUM_CLASSES", "match_organ", "parse_organs", "organ_by_label"}
    offenders = []
    for path in sorted(engine.rglob("*.py")):
        if path.name == "organs.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("organs"):
                offenders += [f"{path.relative_to(engine)}: {a.name}" for a in node.names if a.name in flare_only]
    assert offenders == []


# --- end to end: fine-tune, save, load, segment, write, statistics --------------------------------------------


@pytest.fixture(scope="module")
def tumour_case(tmp_path_factory, phantom_files) -> dict[str, Path]:
    """The phantom relabelled with the two-label set: its spleen stands in for a tumour (1), its liver is 2."""
    folder = tmp_path_factory.mktemp("tumour-set")
    flare = sitk.ReadImage(str(phantom_files["labels"]))
    array = sitk.GetArrayFromImage(flare)
    relabelled = np.zeros_like(array)
    relabelled[array == 1] = 2
    relabelled[array == 3] = 1
    labels = sitk.GetImageFromArray(relabelled)
    labels.CopyInformation(flare)
    paths = {"ct": phantom_files["ct"], "labels": folder / "labels.nii.gz", "set": folder / "tumour-set.json", "model": folder / "tumour-model"}
    sitk.WriteImage(labels, str(paths["labels"]))
    paths["set"].write_text(json.dumps({"labels": TUMOUR_SET}))
    assert main(["finetune", "--image", str(paths["ct"]), "--labels", str(paths["labels"]), "--label-set", str(paths["set"]),
                 "--organs", "tumour,liver", "-o", str(paths["model"]), "--strategy", "fs", "--preset", "tiny", "--iterations", "2",
                 "--progress", "none"]) == 0
    return paths


def test_finetune_saves_the_set_and_the_model_loads_with_its_class_count(tumour_case):
    card = json.loads((tumour_case["model"] / "model.json").read_text())
    assert card["labels"] == LabelSet.from_card(TUMOUR_SET).to_card()
    assert card["provenance"]["data"][0]["labelled_organs"] == ["tumour", "liver"]
    assert set(card["provenance"]["training_slices"]["organs"]) == {"tumour", "liver"}
    segmentor, loaded = load_segmentor(tumour_case["model"])
    assert segmentor.num_classes == 3 and segmentor.head.layers[-1].out_channels == 3
    assert loaded.label_set == LabelSet.from_card(TUMOUR_SET)


def test_segment_writes_the_sets_segments_and_statistics(tumour_case, tmp_path, capsys):
    out, stats = tmp_path / "result.seg.nrrd", tmp_path / "stats.json"
    code = main(["segment", str(tumour_case["ct"]), "-o", str(out), "--model", str(tumour_case["model"]), "--statistics", str(stats),
                 "--preview", str(tmp_path / "preview.png"), "--device", "cpu", "--progress", "none"])
    assert code == 0, capsys.readouterr().err
    statistics = json.loads(stats.read_text())
    assert list(statistics["organs"]) == ["tumour", "liver"] and statistics["organs"]["liver"]["label"] == 2
    segments = slicerio.read_segmentation(str(out), skip_voxels=True)["segments"]
    assert {s["name"] for s in segments} <= {"Liver tumour", "Liver"}
    assert all(s["labelValue"] in (1, 2) for s in segments)


def test_seg_nrrd_and_statistics_follow_the_set(tumour_case, tmp_path):
    labels_set = LabelSet.from_card(TUMOUR_SET)
    ct = sitk.ReadImage(str(tumour_case["ct"]))
    labels = read_labels(tumour_case["labels"], ct, label_set=labels_set)
    out = tmp_path / "tumour.seg.nrrd"
    write_labelmap(labels, out, label_set=labels_set, all_organs=True)
    segments = slicerio.read_segmentation(str(out), skip_voxels=True)["segments"]
    assert [(s["name"], s["labelValue"]) for s in segments] == [("Liver tumour", 1), ("Liver", 2)]
    assert segments[0]["color"] == pytest.approx([1.0, 0.0, 128 / 255], abs=1e-6)
    assert segments[0]["terminology"]["type"] == TUMOUR_TERMINOLOGY["type"]
    assert segments[0]["terminology"]["category"] == TUMOUR_TERMINOLOGY["category"]
    assert segments[1]["terminology"]["type"][1] == "10200004"  # the liver's SNOMED code, taken from FLARE22's table
    # read back through the segments' names and terminology: the same ids
    assert np.array_equal(sitk.GetArrayFromImage(read_labels(out, ct, label_set=labels_set)), sitk.GetArrayFromImage(labels))
    # the same file read as FLARE22 says which set it does not fit
    with pytest.raises(InputError, match="segments 'Liver tumour' match none of the 13 FLARE22 organs"):
        read_labels(out, ct)
    picture = np.asarray(render_preview(ct, labels, label_set=labels_set).convert("RGB"))
    x, y = legend_swatch(0)
    assert tuple(picture[y + 2, x + 2]) == preview_colour(1) == PREVIEW_COLOURS[1]  # the set's first label, the palette's first colour
    statistics = organ_statistics(ct, labels, labels_set)
    assert list(statistics["organs"]) == ["tumour", "liver"] and statistics["absent"] == []
    assert statistics["organs"]["tumour"]["voxels"] == int((sitk.GetArrayFromImage(labels) == 1).sum())
    with pytest.raises(InputError, match=r"label ids 3 are outside 0-2; the labels must use the label set's ids \(1 tumour, 2 liver\)"):
        bad = sitk.GetImageFromArray(np.full((2, 2, 2), 3, np.uint8))
        path = tmp_path / "bad.nii.gz"
        sitk.WriteImage(bad, str(path))
        read_labels(path, label_set=labels_set)


def test_organs_and_labels_are_checked_against_the_set(tumour_case, tmp_path, capsys):
    common = ["finetune", "--image", str(tumour_case["ct"]), "--labels", str(tumour_case["labels"]), "--label-set", str(tumour_case["set"]),
              "-o", str(tmp_path / "m"), "--strategy", "fs", "--preset", "tiny", "--iterations", "1", "--progress", "none"]
    assert main([*common, "--organs", "spleen"]) == 2
    assert "--organs 'spleen': not among the label set's 2 labels (1 tumour, 2 liver)" in capsys.readouterr().err
    # FLARE22 labels (ids up to 13) are not ids of the two-label set
    flare = tmp_path / "flare.nii.gz"
    array = np.zeros(sitk.ReadImage(str(tumour_case["labels"])).GetSize()[::-1], np.uint8)
    array[5, 5, 5] = 13
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(sitk.ReadImage(str(tumour_case["labels"])))
    sitk.WriteImage(image, str(flare))
    assert main([*common[:4], str(flare), *common[5:]]) == 2
    assert "label ids 13 are outside 0-2" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_evaluate_names_the_sets_organs(tumour_case, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    assert main(["evaluate", "--pred", str(tumour_case["labels"]), "--ref", str(tumour_case["labels"]), "--label-set", str(tumour_case["model"]),
                 "--json", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert list(metrics["organs"]) == ["tumour", "liver"] and metrics["mean_dsc"] == 1.0


def test_refine_and_a_segmentation_base_of_another_set(tumour_case, tmp_path, capsys):
    """A FLARE22 segmentation model as base for the two-label set gives its backbone and a new head; refine writes the
    result with every organ of the new model's set."""
    base = random_tiny_segmentor(tmp_path / "flare-base", name="FlareBase")
    labels_set = LabelSet.from_card(TUMOUR_SET)
    ct = sitk.ReadImage(str(tumour_case["ct"]))
    array = sitk.GetArrayFromImage(read_labels(tumour_case["labels"], ct, label_set=labels_set))
    keep = np.zeros_like(array)
    painted_slices = [k for k in range(len(array)) if array[k].any()][:2]
    keep[painted_slices] = array[painted_slices]
    annotation = tmp_path / "annotation.seg.nrrd"
    image = sitk.GetImageFromArray(keep)
    image.CopyInformation(ct)
    write_labelmap(image, annotation, label_set=labels_set, all_organs=True)
    code = main(["refine", "--image", str(tumour_case["ct"]), "--annotation", str(annotation), "-o", str(tmp_path / "refined"),
                 "--result", str(tmp_path / "result.seg.nrrd"), "--base", str(base), "--label-set", str(tumour_case["set"]),
                 "--strategy", "ft-dec", "--iterations", "1", "--device", "cpu", "--progress", "json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "FlareBase labels the 13 FLARE22 organs: its backbone is the start, with a new head for the label set's 2 labels" in captured.out
    card = json.loads((tmp_path / "refined" / "model.json").read_text())
    assert card["labels"] == labels_set.to_card() and card["provenance"]["base"]["name"] == "FlareBase"
    segments = slicerio.read_segmentation(str(tmp_path / "result.seg.nrrd"), skip_voxels=True)["segments"]
    assert [s["name"] for s in segments] == ["Liver tumour", "Liver"]
    assert load_segmentor(tmp_path / "refined")[0].num_classes == 3
