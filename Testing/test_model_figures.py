"""Training.benchmarks.model_figures end to end on two phantom "patients": the real commands, resumable, and the continued segmentor."""

from __future__ import annotations

import json

import pytest
import SimpleITK as sitk

from DiffusionSegLib.models import read_card
from Training.benchmarks import model_figures
from Training.benchmarks.phantom import make_phantom


@pytest.mark.slow
def test_segmentor_case_trains_continues_and_resumes_without_retraining(tiny_pretrained, tmp_path):
    cts = []
    for name, seed in (("patient-1", 3), ("patient-2", 4)):
        ct, labels = make_phantom(size=(64, 56, 12), spacing=(6.0, 6.0, 10.0), seed=seed)
        paths = (tmp_path / f"{name}-ct.nii.gz", tmp_path / f"{name}-labels.nii.gz")
        sitk.WriteImage(ct, str(paths[0]))
        sitk.WriteImage(labels, str(paths[1]))
        cts += ["--ct", name, str(paths[0]), str(paths[1])]
    out = tmp_path / "figures"
    argv = ["--pretrained", str(tiny_pretrained), *cts, "-o", str(out), "--cases", "segmentor", "--segmentor-continue", "3", "--quick",
            "--train-on", "patient-1"]
    assert model_figures.main(argv) == 0

    figures = json.loads((out / "figures.json").read_text())
    first, continued = "patient-1-all-ft-dec", "patient-1-all-ft-dec+3"
    assert set(figures) == {first, continued, f"{first}-cleanup", f"{continued}-cleanup"}
    assert figures[continued]["trained_on"] == "patient-1" and 0.0 <= figures[continued]["patient-2"]["mean_dsc"] <= 1.0
    # The continuation starts from the first model, not from the pretrained one.
    assert read_card(out / continued).provenance["base"]["name"] == read_card(out / first).name
    # The bundled segmentor's recipe keeps its own learning rate whatever finetune's default is.
    assert read_card(out / first).provenance["config"]["lr"] == read_card(out / continued).provenance["config"]["lr"] == 1e-4

    # Stopped after training, before scoring: the model folder is scored, not trained again.
    trained = (out / f"{continued}.log").stat().st_mtime_ns
    del figures[continued]
    (out / "figures.json").write_text(json.dumps(figures))
    assert model_figures.main(argv) == 0
    assert (out / f"{continued}.log").stat().st_mtime_ns == trained
    assert continued in json.loads((out / "figures.json").read_text())
