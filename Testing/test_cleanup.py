"""Labelmap cleanup: strays, holes, neighbouring organs, the model's slice planes, model cards and the CLI flag."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import same_geometry

from DiffusionSegLib.cleanup import clean_image, clean_labelmap, slice_array_axis
from DiffusionSegLib.cli import main
from DiffusionSegLib.errors import InputError
from DiffusionSegLib.inference import segment_ct
from DiffusionSegLib.models import ModelCard, load_segmentor, read_card, read_weights, save_model
from DiffusionSegLib.preprocessing import PreprocessingSpec, to_model_space
from DiffusionSegLib.segmentor import Segmentor
from DiffusionSegLib.unet import preset_config
from Training.benchmarks.phantom import make_phantom, oblique_direction

LIVER, RIGHT_KIDNEY, SPLEEN = 1, 2, 3
SPACING = (5.0, 2.0, 2.0)  # z, y, x mm: 4 mm^2 pixels in the axial plane
# Index x along superior, y along patient left, z along posterior: the model's slices run along the array's last axis.
PERMUTED_DIRECTION = (0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0)
BENCHMARK = Path(__file__).resolve().parents[1] / "Training" / "benchmarks" / "cleanup_effect.py"


def ball(shape: tuple[int, int, int], centre: tuple[float, float, float], radii: tuple[float, float, float]) -> np.ndarray:
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return ((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((x - centre[2]) / radii[2]) ** 2 <= 1


def organs() -> np.ndarray:
    """Three clean organs: one component each, no holes."""
    labelmap = np.zeros((20, 64, 64), np.uint8)
    labelmap[ball(labelmap.shape, (10, 24, 24), (7, 14, 14))] = LIVER
    labelmap[ball(labelmap.shape, (10, 46, 46), (5, 8, 8))] = RIGHT_KIDNEY
    labelmap[ball(labelmap.shape, (10, 20, 52), (4, 6, 6))] = SPLEEN
    return labelmap


def test_clean_organs_are_unchanged():
    labelmap = organs()
    cleaned = clean_labelmap(labelmap, SPACING)
    assert np.array_equal(cleaned, labelmap) and cleaned is not labelmap


def test_phantom_reference_needs_no_cleanup():
    _, labels = make_phantom(size=(64, 56, 20), spacing=(6.0, 6.0, 10.0), seed=3)
    assert np.array_equal(sitk.GetArrayFromImage(clean_image(labels)), sitk.GetArrayFromImage(labels))


def test_empty_labelmap():
    assert not clean_labelmap(np.zeros((3, 4, 5), np.uint8), SPACING).any()


def test_stray_blob_far_from_the_organ_is_removed():
    labelmap = organs()
    labelmap[2:4, 58:61, 2:5] = SPLEEN  # 18 voxels, the spleen has ~600
    cleaned = clean_labelmap(labelmap, SPACING)
    assert np.array_equal(cleaned, organs())


def test_second_component_above_the_fraction_is_kept_and_below_it_dropped():
    labelmap = organs()
    second = ball(labelmap.shape, (10, 52, 10), (3, 5, 5))  # a separate liver piece, ~5% of the liver
    labelmap[second] = LIVER
    assert np.array_equal(clean_labelmap(labelmap, SPACING, min_fraction=0.02), labelmap)
    assert np.array_equal(clean_labelmap(labelmap, SPACING, min_fraction=0.1), organs())


def test_pieces_touching_by_a_corner_are_one_component():
    labelmap = np.zeros((10, 10, 10), np.uint8)
    labelmap[0:6, 0:6, 0:6] = LIVER
    labelmap[6:8, 6:8, 6:8] = LIVER  # 8 voxels, under 10% of the 216 above, touching them only at a corner
    assert np.array_equal(clean_labelmap(labelmap, SPACING), labelmap)
    apart = np.zeros_like(labelmap)
    apart[0:6, 0:6, 0:6] = LIVER
    apart[7:9, 7:9, 7:9] = LIVER
    assert np.array_equal(clean_labelmap(apart, SPACING), labelmap * (np.indices(labelmap.shape).max(axis=0) < 6))


def test_hole_inside_an_organ_is_filled():
    labelmap = organs()
    labelmap[8:12, 22:26, 22:26] = 0  # a cavity in the liver, enclosed in every axial slice
    assert np.array_equal(clean_labelmap(labelmap, SPACING), organs())


def test_hole_larger_than_the_limit_is_kept():
    labelmap = organs()
    labelmap[9:11, 18:30, 18:30] = 0  # 144 pixels = 576 mm^2 a slice
    assert np.array_equal(clean_labelmap(labelmap, SPACING, max_hole_mm2=500), labelmap)
    assert np.array_equal(clean_labelmap(labelmap, SPACING, max_hole_mm2=600), organs())
    assert np.array_equal(clean_labelmap(labelmap, SPACING, max_hole_mm2=None), organs())


def test_a_hole_held_by_another_organ_is_not_overwritten():
    labelmap = organs()
    labelmap[labelmap == SPLEEN] = 0
    labelmap[8:12, 20:28, 20:28] = 0  # a cavity in the liver...
    labelmap[8:12, 22:26, 22:26] = SPLEEN  # ...holding the whole spleen, with background around it
    cleaned = clean_labelmap(labelmap, SPACING)
    ring = np.zeros_like(labelmap, bool)
    ring[8:12, 20:28, 20:28] = True
    ring[8:12, 22:26, 22:26] = False
    assert (cleaned[ring] == LIVER).all()  # the background around the spleen joins the liver
    assert np.array_equal(cleaned[~ring], labelmap[~ring])  # the spleen, and everything else, stays


def test_a_stray_inside_another_organ_becomes_that_organ():
    labelmap = organs()
    labelmap[9:11, 23:25, 23:25] = SPLEEN  # a spleen speck inside the liver
    assert np.array_equal(clean_labelmap(labelmap, SPACING), organs())


def pipe(shape: tuple[int, int, int], along: int) -> np.ndarray:
    """A square tube open at both ends running along array axis `along`: its lumen is a hole only in planes across it."""
    labelmap = np.zeros(shape, np.uint8)
    wall = [slice(4, 12)] * 3
    wall[along] = slice(None)
    labelmap[tuple(wall)] = LIVER
    lumen = [slice(6, 10)] * 3
    lumen[along] = slice(None)
    labelmap[tuple(lumen)] = 0
    return labelmap


@pytest.mark.parametrize("along", [0, 1, 2])
def test_holes_are_filled_only_in_planes_across_the_slice_axis(along):
    labelmap = pipe((16, 16, 16), along)
    filled = clean_labelmap(labelmap, (2.0, 2.0, 2.0), slice_axis=along)
    assert (filled[4:12, 4:12, 4:12] == LIVER).all()
    for other in {0, 1, 2} - {along}:
        assert np.array_equal(clean_labelmap(labelmap, (2.0, 2.0, 2.0), slice_axis=other), labelmap)


@pytest.mark.parametrize("direction", [PERMUTED_DIRECTION, oblique_direction((10, 20, 15)), oblique_direction((80, 0, 0))])
def test_slice_axis_is_the_one_preprocessing_uses(direction):
    ct, _ = make_phantom(size=(24, 20, 16), spacing=(8.0, 8.0, 10.0), direction=direction, seed=1)
    volume = to_model_space(ct, PreprocessingSpec.for_size(32))
    assert slice_array_axis(ct) == 2 - volume.slice_axis
    if direction == PERMUTED_DIRECTION:
        assert slice_array_axis(ct) == 2


def test_permuted_grid_fills_holes_in_the_axial_planes():
    # A pipe along superior-inferior (array axis 2 here): its lumen is enclosed in axial planes only.
    image = sitk.GetImageFromArray(pipe((16, 16, 16), along=2))
    image.SetDirection(PERMUTED_DIRECTION)
    image.SetSpacing((5.0, 2.0, 2.0))
    cleaned = clean_image(image)
    assert same_geometry(cleaned, image)
    assert (sitk.GetArrayViewFromImage(cleaned)[4:12, 4:12, 4:12] == LIVER).all()
    # The same voxels on an identity grid are a pipe along left-right: nothing is enclosed in its axial planes.
    image.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    assert np.array_equal(sitk.GetArrayFromImage(clean_image(image)), sitk.GetArrayFromImage(image))


# --- segmentation, model cards and the command line ------------------------------------------------------


@pytest.fixture(scope="module")
def random_segmentor(tmp_path_factory) -> Path:
    """A randomly initialised tiny segmentor: its labelmaps are speckled, so cleanup changes them."""
    torch.manual_seed(1)
    config = preset_config("tiny")
    card = ModelCard(kind="segmentor", unet=config, preprocessing=PreprocessingSpec.for_size(config.image_size),
                     head={"width": 32, "layers": 2}, strategy="fs", preset="tiny")
    return save_model(tmp_path_factory.mktemp("models") / "random-segmentor", card, Segmentor(config, head_width=32).state_dict())


@pytest.fixture(scope="module")
def cleaning_segmentor(random_segmentor, tmp_path_factory) -> Path:
    """The same network with `"postprocessing": {"cleanup": true}` in its card."""
    card = read_card(random_segmentor)
    card.postprocessing = {"cleanup": True}
    return save_model(tmp_path_factory.mktemp("models") / "cleaning-segmentor", card, read_weights(random_segmentor))


@pytest.fixture(scope="module")
def permuted_ct(tmp_path_factory) -> Path:
    # Few slices (the first index axis runs superior): every network pass costs on a loaded CI machine.
    ct, _ = make_phantom(size=(10, 48, 40), spacing=(20.0, 6.0, 6.0), direction=PERMUTED_DIRECTION, seed=4)
    path = tmp_path_factory.mktemp("permuted") / "ct.nii.gz"
    sitk.WriteImage(ct, str(path))
    return path


def test_segment_ct_cleans_in_the_model_planes(random_segmentor):
    segmentor, card = load_segmentor(random_segmentor)
    ct, _ = make_phantom(size=(5, 48, 40), spacing=(40.0, 6.0, 6.0), direction=PERMUTED_DIRECTION, seed=4)
    raw = segment_ct(ct, segmentor, card.preprocessing, torch.device("cpu"))
    cleaned = segment_ct(ct, segmentor, card.preprocessing, torch.device("cpu"), cleanup=True)
    expected = sitk.GetArrayFromImage(clean_image(raw))
    assert not np.array_equal(expected, sitk.GetArrayFromImage(raw)), "the random model's labelmap should need cleaning"
    assert np.array_equal(sitk.GetArrayFromImage(cleaned), expected) and same_geometry(cleaned, ct)


def segment(model: Path, ct: Path, out: Path, *flags: str) -> np.ndarray:
    assert main(["segment", str(ct), "-o", str(out), "--model", str(model), "--progress", "none", *flags]) == 0
    return sitk.GetArrayFromImage(sitk.ReadImage(str(out)))


def test_cli_cleanup_default_comes_from_the_card_and_flags_override_it(random_segmentor, cleaning_segmentor, permuted_ct, tmp_path):
    raw = segment(random_segmentor, permuted_ct, tmp_path / "raw.nii.gz")
    cleaned = segment(cleaning_segmentor, permuted_ct, tmp_path / "cleaned.nii.gz")
    assert not np.array_equal(raw, cleaned)
    reference = sitk.ReadImage(str(tmp_path / "raw.nii.gz"))
    assert np.array_equal(cleaned, sitk.GetArrayFromImage(clean_image(reference)))
    assert np.array_equal(segment(cleaning_segmentor, permuted_ct, tmp_path / "off.nii.gz", "--no-cleanup"), raw)
    # --cleanup on a model whose card says nothing, through the uncertainty path (segment_with_uncertainty).
    with_report = segment(random_segmentor, permuted_ct, tmp_path / "on.nii.gz", "--cleanup", "--uncertainty", str(tmp_path / "u.json"))
    assert np.array_equal(with_report, cleaned) and json.loads((tmp_path / "u.json").read_text())["slices"]


def test_cli_help_states_the_default(capsys):
    with pytest.raises(SystemExit):
        main(["segment", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--cleanup, --no-cleanup" in help_text and "default: as the model's model.json 'postprocessing' says" in help_text


def test_model_card_round_trip_with_and_without_postprocessing(random_segmentor, cleaning_segmentor):
    plain, cleaning = read_card(random_segmentor), read_card(cleaning_segmentor)
    assert plain.postprocessing == {} and not plain.cleanup
    assert cleaning.postprocessing == {"cleanup": True} and cleaning.cleanup
    for card in (plain, cleaning):
        assert ModelCard.from_dict(json.loads(json.dumps(card.to_dict()))) == card
    older = plain.to_dict()
    del older["postprocessing"]  # a card written before the field existed
    assert ModelCard.from_dict(older).postprocessing == {} and not ModelCard.from_dict(older).cleanup
    assert ModelCard.from_dict({**older, "postprocessing": None}).postprocessing == {}


@pytest.mark.parametrize("entry", [{"cleanup": "yes"}, ["cleanup"], {"cleanup": 1}])
def test_model_card_rejects_a_malformed_postprocessing_entry(random_segmentor, tmp_path, entry):
    folder = tmp_path / "bad"
    folder.mkdir()
    card = json.loads((random_segmentor / "model.json").read_text())
    (folder / "model.json").write_text(json.dumps({**card, "postprocessing": entry}))
    with pytest.raises(InputError, match="postprocessing"):
        read_card(folder)


def test_finetune_takes_postprocessing_from_a_segmentor_and_cleans_up_from_pretrained_weights(cleaning_segmentor, tiny_pretrained, tmp_path):
    ct, labels = make_phantom(size=(40, 36, 6), spacing=(10.0, 10.0, 30.0), seed=3)
    painted = sitk.GetArrayFromImage(labels)
    painted[[0, 1, 2, 4, 5]] = 0  # one annotated slice: a 1-iteration run need not see more
    painted_image = sitk.GetImageFromArray(painted)
    painted_image.CopyInformation(labels)
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(painted_image, str(tmp_path / "labels.nii.gz"))
    common = ["--image", str(tmp_path / "ct.nii.gz"), "--labels", str(tmp_path / "labels.nii.gz"), "--iterations", "1", "--batch-size", "1",
              "--progress", "none"]
    assert main(["finetune", *common, "-o", str(tmp_path / "from-segmentor"), "--base", str(cleaning_segmentor)]) == 0
    assert read_card(tmp_path / "from-segmentor").postprocessing == {"cleanup": True}
    # From pretrained weights cleanup is on (it raised held-out DSC: recipe.postprocessing_of); from scratch it is off.
    assert main(["finetune", *common, "-o", str(tmp_path / "from-pretrained"), "--base", str(tiny_pretrained)]) == 0
    assert read_card(tmp_path / "from-pretrained").postprocessing == {"cleanup": True}
    assert main(["finetune", *common, "-o", str(tmp_path / "from-scratch"), "--base", str(tiny_pretrained), "--strategy", "fs"]) == 0
    assert read_card(tmp_path / "from-scratch").postprocessing == {}


def test_cleanup_effect_benchmark_runs(random_segmentor, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("cleanup_effect", BENCHMARK)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    ct, labels = make_phantom(size=(40, 36, 8), spacing=(10.0, 10.0, 25.0), seed=5)
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(labels, str(tmp_path / "labels.nii.gz"))
    out = tmp_path / "effect.json"
    pair = ["--image", str(tmp_path / "ct.nii.gz"), "--labels", str(tmp_path / "labels.nii.gz")]
    assert benchmark.main(["--model", str(random_segmentor), *pair, "--device", "cpu", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "mean DSC" in printed and "without" in printed
    result = json.loads(out.read_text())
    assert len(result["cases"]) == 1 and result["cleanup"] == {"min_fraction": 0.1, "max_hole_mm2": 1000.0}
    mean = result["summary"]["mean_dsc"]
    assert 0 <= mean["without"] <= 1 and 0 <= mean["with"] <= 1
    assert result["cases"][0]["changed_voxels"] > 0
