"""The label-efficiency benchmark: protocols, budgets, iteration rule, strategies, report (reduced: tiny model, few iterations)."""

from __future__ import annotations

import json
import shlex
from dataclasses import asdict

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DiffusionSegLib.cli import main as diffusionseg
from DiffusionSegLib.errors import InputError
from DiffusionSegLib.finetune import cache_pool_size
from DiffusionSegLib.models import read_card, resolve_model
from DiffusionSegLib.preprocessing import PreprocessingSpec
from Training.benchmarks.label_efficiency import (
    BenchmarkConfig,
    IterationRule,
    Run,
    budget_size,
    budget_slices,
    build_segmentor,
    check_budget,
    ct_names,
    curated_slices,
    labelled_ct,
    load_pretrained,
    parse_budget_seeds,
    parse_timesteps,
    plan_runs,
    plan_tasks,
    slice_pool,
    split_slices,
)
from Training.benchmarks.label_efficiency_report import seeds_line
from Training.benchmarks.phantom import FLIPPED_DIRECTION, make_phantom
from Training.cli import main as train


def test_split_holds_out_every_third_block_with_guards():
    labelled = list(range(10, 40))  # 30 labelled slices, blocks of 5
    split = split_slices(labelled, block=5)
    assert split.test == [*range(15, 20), *range(30, 35)]
    assert not set(split.pool) & set(split.test)
    assert all(min(abs(p - t) for t in split.test) >= 2 for p in split.pool)  # a guard slice between them
    assert split.pool == [10, 11, 12, 13, 21, 22, 23, 24, 25, 26, 27, 28, 36, 37, 38, 39]
    with pytest.raises(InputError, match="at least 15"):
        split_slices(list(range(12)), block=5)


def test_curated_slices_cover_organs_and_keep_apart():
    organs = {0: {1}, 1: {1, 2, 3}, 2: {1, 2, 3}, 10: {4}, 11: {4, 5}, 20: {6}, 30: {1}}
    pixels = dict.fromkeys(organs, 10)
    chosen = curated_slices(organs, pixels, count=4, min_gap=6)
    # 1 covers three organs (ties with 2 go to the earlier slice), 11 adds two, 20 one; 30 is the only one left 6 slices from all
    assert chosen == [1, 11, 20, 30]
    assert len(chosen) == 4 and all(abs(a - b) >= 6 for a in chosen for b in chosen if a != b)
    assert set().union(*(organs[s] for s in chosen)) == {1, 2, 3, 4, 5, 6}
    tight = curated_slices({0: {1}, 1: {2}, 2: {3}}, {0: 1, 1: 1, 2: 1}, count=3, min_gap=6)
    assert tight == [0, 1, 2]  # the gap gives way when the pool is too small


def test_budget_sizes_round_half_up_to_at_least_one_slice_and_say_so():
    one = budget_size("1%", 30)
    assert one.slices == 1 and one.note == "1% of 30 = 0.3 slices, rounded up to 1 (at least one slice)"
    assert budget_size("10%", 55).slices == 6 and "5.5 slices, rounded to 6" in budget_size("10%", 55).note
    assert budget_size("10%", 30).slices == 3 and budget_size("10%", 30).note == "10% of 30 = 3 slices"
    assert budget_size("100%", 55).slices == budget_size("all", 55).slices == 55
    assert budget_size("4", 3).slices == 3 and "whole pool" in budget_size("4", 3).note
    for good in ("4", "1%", "0.5%", "100%", "all"):
        assert check_budget(good) == good
    for bad in ("ten", "0", "0%", "150%", "-1", "x%"):
        with pytest.raises(InputError, match="--budgets"):
            check_budget(bad)


def test_budget_draws_organ_cover_for_every_seed_and_random_draws_per_seed():
    reference = np.zeros((30, 8, 8), dtype=np.uint8)  # array z = SimpleITK axis 2
    for z in range(30):
        reference[z, :2, :2] = 1 + z % 13
    pool = slice_pool(reference, list(range(30)), slice_axis=2)
    assert pool.organs[3] == {4} and pool.pixels[3] == 4
    cover = [budget_slices("4", seed, pool) for seed in (0, 1, 2)]
    assert cover[0] == cover[1] == cover[2] and len(cover[0]) == 4
    draws = [budget_slices("10%", seed, pool) for seed in (0, 1, 2)]
    assert all(len(d) == 3 and set(d) <= set(range(30)) for d in draws) and len({tuple(d) for d in draws}) > 1
    assert budget_slices("1%", 0, pool) == budget_slices("1%", 0, pool) and len(budget_slices("1%", 0, pool)) == 1
    assert budget_slices("100%", 0, pool) == list(range(30))


def test_iteration_rule_is_epochs_with_a_floor_and_a_cap():
    rule = IterationRule(epochs=50, min_iterations=200, max_iterations=2000)
    assert rule.iterations(1, 4) == 200 and rule.iterations(4, 4) == 200  # the floor
    assert rule.iterations(55, 4) == 50 * 14 and rule.iterations(125, 4) == 50 * 32
    assert rule.iterations(1000, 4) == 2000  # the cap
    assert "clamp(50 epochs x ceil(slices / 4), 200, 2000)" in rule.describe(4)
    assert IterationRule(1, 7, 7).describe(4) == "7 iterations for every budget"


def test_every_strategy_gets_fresh_augmentation_and_the_same_schedule():
    config = BenchmarkConfig()
    settings = {s: config.finetune_config(s, 123, seed=2) for s in ("ft-dec", "lp", "lp-mlp", "fs")}
    for s in settings.values():
        assert s.cache_copies == 0 and cache_pool_size(s, 4, 1000) == 0  # no fixed pool of augmented copies
        assert s.augment.enabled and s.patience == 0 and s.iterations == 123 and s.seed == 2
    assert [s.strategy for s in settings.values()] == ["ft-dec", "lp", "lp", "fs"]
    assert [s.prior_bias for s in settings.values()] == [False, True, False, False]  # only the linear head starts at the label prior


def test_timesteps_per_strategy():
    assert parse_timesteps(["ft-dec=0,100", "lp=0,100,200"]) == {"ft-dec": [0, 100], "lp": [0, 100, 200]}
    assert parse_timesteps(["0", "100", "ft-dec=100,200"]) == {"ft-dec": [0, 100, 200]}  # bare numbers: FT-dec (the earlier form)
    config = BenchmarkConfig(timesteps={"lp": [0, 200]})
    assert config.timesteps_of("lp") == [0, 200] and config.timesteps_of("fs") == [0]
    for bad in ("xx=0", "lp=", "lp=a", "ft-dec=-1"):
        with pytest.raises(InputError, match="--timesteps"):
            parse_timesteps([bad])


def test_budget_seeds_narrow_a_costly_budget():
    assert parse_budget_seeds(["100%=0", "4=0,1", "4=1,2"], ["4", "10%", "100%"]) == {"100%": [0], "4": [0, 1, 2]}
    for bad in ("50%=0", "100%", "100%=", "100%=x"):
        with pytest.raises(InputError, match="--budget-seeds"):
            parse_budget_seeds([bad], ["4", "100%"])
    config = BenchmarkConfig(budgets=["4", "10%", "100%"], seeds=[0, 1, 2], budget_seeds={"100%": [0], "4": [0, 5]})
    assert config.seeds_of("10%") == [0, 1, 2] and config.seeds_of("100%") == [0] and config.all_seeds() == [0, 5, 1, 2]
    line = seeds_line(asdict(config))
    assert "Per budget: 4 slices: seeds 0, 5; 100%: seed 0." in line and "Fewer than 3 seeds at 4 slices, 100%" in line
    assert "with one seed, a cross-patient cell spreads over directions only" in line
    assert "Fewer" not in seeds_line(asdict(BenchmarkConfig(budgets=["1%"])))


@pytest.fixture(scope="module")
def phantom_cts():
    spec = PreprocessingSpec.for_size(64)
    cts = []
    for name, seed in (("a", 4), ("b", 5)):
        ct, labels = make_phantom(size=(64, 64, 24), spacing=(6.0, 6.0, 8.0), seed=seed, direction=FLIPPED_DIRECTION)
        cts.append(labelled_ct(name, ct, labels, spec))
    return cts


def test_cross_patient_trains_on_each_ct_and_tests_on_the_other(phantom_cts):
    a, b = phantom_cts
    tasks = plan_tasks([a, b], ["cross", "within"], block=4)
    cross = [t for t in tasks if t.protocol == "cross"]
    assert [(t.train.name, [(ct.name, slices) for ct, slices in t.tests]) for t in cross] == [("a", [("b", b.labelled)]), ("b", [("a", a.labelled)])]
    assert cross[0].pool.slices == a.labelled  # the budget comes from all of the training CT's labelled slices
    within = [t for t in tasks if t.protocol == "within"]
    assert [(t.train.name, t.tests[0][0].name) for t in within] == [("a", "a"), ("b", "b")]
    assert not set(within[0].pool.slices) & set(within[0].tests[0][1])
    assert plan_tasks([a], ["cross", "within"], block=4)[0].protocol == "within"  # one CT: no cross-patient task

    config = BenchmarkConfig(budgets=["4", "10%"], strategies=["ft-dec", "lp", "fs"], timesteps={"lp": [0, 100]}, seeds=[0, 1, 2])
    runs = [run for run, _ in plan_runs(config, tasks)]
    assert len(runs) == len(set(runs)) == 2 * 2 * 2 * 3 * (1 + 2 + 1)  # protocols x CTs x budgets x seeds x (strategy, timestep)
    assert Run("cross", "b", "4", 2, "fs", 0) in runs and Run("cross", "a", "10%", 1, "lp", 100) in runs  # every budget, every seed
    assert Run("cross", "a", "4", 0, "fs", 100) not in runs
    assert runs[0].protocol == "cross" and runs[-1].protocol == "within"
    config.budget_seeds = {"10%": [1]}  # one seed for one budget; the others keep all three
    runs = [run for run, _ in plan_runs(config, tasks)]
    assert {r.seed for r in runs if r.budget == "10%"} == {1} and {r.seed for r in runs if r.budget == "4"} == {0, 1, 2}
    assert len(runs) == 2 * 2 * (3 + 1) * (1 + 2 + 1)  # protocols x CTs x (budget, seed) pairs x (strategy, timestep)


def test_training_data_matches_the_engine(phantom_cts):
    from DiffusionSegLib.training_slices import training_slices

    a = phantom_cts[0]
    keep = a.labelled[3:5]
    images, labels = a.training_data(keep)
    array = sitk.GetArrayFromImage(a.labels)
    along = np.moveaxis(array, 2 - a.slice_axis, 0)  # a view
    along[[i for i in range(along.shape[0]) if i not in keep]] = 0
    painted = sitk.GetImageFromArray(array)
    painted.CopyInformation(a.labels)
    engine = training_slices([(a.ct, painted)], PreprocessingSpec.for_size(64))
    assert torch.equal(images, engine.images) and torch.equal(labels, engine.labels)


def test_lp_is_a_linear_classifier_and_fs_starts_from_random(tiny_pretrained):
    pretrained = load_pretrained(tiny_pretrained)
    lp = build_segmentor(Run("cross", "a", "4", 0, "lp", 0), pretrained)
    convs = [m for m in lp.head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 1 and convs[0].kernel_size == (1, 1) and not any(isinstance(m, torch.nn.GroupNorm) for m in lp.head.modules())
    mlp = build_segmentor(Run("cross", "a", "4", 0, "lp-mlp", 0), pretrained)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in mlp.head.modules()) == 3
    name = "input_blocks.0.0.weight"
    assert torch.equal(lp.unet.state_dict()[name], pretrained.unet_state[name])
    fs = build_segmentor(Run("cross", "a", "4", 1, "fs", 0), pretrained)  # seed 1: the fixture itself is seed 0's random init
    assert not torch.equal(fs.unet.state_dict()[name], pretrained.unet_state[name])
    assert fs.unet.config == lp.unet.config


def test_ct_names_are_short_and_unique(tmp_path):
    for folder in ("abdomen-ct-a", "abdomen-ct-c"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "ct.nii.gz").write_bytes(b"")
    paths = [str(tmp_path / "abdomen-ct-a" / "ct.nii.gz"), str(tmp_path / "abdomen-ct-c" / "ct.nii.gz")]
    assert ct_names(paths) == ["abdomen-ct-a", "abdomen-ct-c"]
    assert ct_names(["/x/patient1.nii.gz", "/y/patient2.nrrd"]) == ["patient1", "patient2"]
    assert ct_names(["/x/p.nii.gz", "/y/p.nii.gz"]) == ["p-1", "p-2"]  # not files here: no folder to name them by


def test_fs_without_base_takes_the_bundled_pretrained_architecture(phantom_files, tmp_path):
    out = tmp_path / "fs"
    assert diffusionseg(["finetune", "--image", str(phantom_files["ct"]), "--labels", str(phantom_files["labels"]), "-o", str(out),
                         "--strategy", "fs", "--iterations", "1", "--progress", "none"]) == 0
    default = read_card(resolve_model(None, "pretrained"))
    card = read_card(out)
    assert card.unet == default.unet and card.preprocessing == default.preprocessing and card.preset == default.preset
    assert card.provenance["base"] is None  # random initialisation: nothing of the pretrained weights


def write_phantoms(folder) -> list[str]:
    args = []
    for name, seed in (("a", 4), ("b", 5)):
        ct, labels = make_phantom(size=(64, 64, 24), spacing=(6.0, 6.0, 8.0), seed=seed, direction=FLIPPED_DIRECTION)
        (folder / name).mkdir()
        sitk.WriteImage(ct, str(folder / name / "ct.nii.gz"))
        sitk.WriteImage(labels, str(folder / name / "labels.nii.gz"))
        args += ["--image", str(folder / name / "ct.nii.gz"), "--labels", str(folder / name / "labels.nii.gz")]
    return args


@pytest.mark.slow
def test_benchmark_command_reduced(tiny_pretrained, tmp_path, capsys):
    out = tmp_path / "report"
    common = ["benchmark", "--pretrained", str(tiny_pretrained), *write_phantoms(tmp_path), "-o", str(out), "--seeds", "0", "--block", "4",
              "--device", "cpu"]
    args = [*common, "--budgets", "2", "1%", "--strategies", "lp", "fs", "--iterations", "1"]
    assert train(args) == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    cross = [r for r in report["runs"] if r["protocol"] == "cross"]
    within = [r for r in report["runs"] if r["protocol"] == "within"]
    assert len(cross) == len(within) == 2 * 2 * 2  # CTs x budgets x strategies
    assert {(r["train_ct"], *r["tests"]) for r in cross} == {("a", "b"), ("b", "a")}
    held_out = next(t["tests"]["a"] for t in report["tasks"] if t["protocol"] == "within" and t["train_ct"] == "a")
    for run in report["runs"]:
        assert run["iterations"] == 1 and run["settings"]["finetune"]["cache_copies"] == 0
        assert len(run["train_slices"]) == (2 if run["budget"] == "2" else 1)
        assert all(0 <= s["mean_dsc"] <= 1 for s in run["tests"].values())
    assert not {s for r in within if r["train_ct"] == "a" for s in r["train_slices"]} & set(held_out)
    recorded = {k: v for k, v in report.items() if k != "command"}  # the command stays as typed
    assert str(tmp_path) not in json.dumps(recorded)  # no machine paths
    assert report["cts"]["a"]["image"].count("/") == 1 and report["pretrained"]["path"].count("/") == 1
    assert report["budgets"]["cross"]["a"]["1%"]["slices"] == 1 and report["summary"]["cross"]

    md = (out / "report.md").read_text(encoding="utf-8")
    assert md.startswith("# Label efficiency: a, b")
    assert shlex.join(["diffusionseg-train", *args]) in md  # the exact command
    assert "## Cross-patient (headline)" in md and "## Within-CT block split" in md and "### a" in md
    assert "| LP (linear) |" in md and "| FS (from scratch) |" in md
    assert "| 2 slices (organ cover) DSC | 2 slices (organ cover) Jaccard | 1% (1 slice) DSC |" in md
    assert "rounded up to 1 (at least one slice)" in md and "frozen-feature pool is off" in md
    assert "batch 4 (all training slices when fewer)" in md  # a 1-slice budget trains on batches of 1
    assert "Per-organ DSC (%) at the 2 slices (organ cover) budget" in md and "| a -> b |" in md
    assert (out / "overlays-cross-a-to-b-2.png").stat().st_size > 0 and (out / "overlays-within-b-2.png").stat().st_size > 0
    assert "(overlays-cross-b-to-a-2.png)" in md

    # A second call reuses the finished runs instead of training again.
    capsys.readouterr()
    assert train(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("(reused)") == 16
    # Other settings: those runs are redone, not mixed in.
    assert train([*common, "--protocols", "cross", "--budgets", "2", "--strategies", "lp", "--iterations", "2"]) == 0
    assert "(reused)" not in capsys.readouterr().out
    assert {r["iterations"] for r in json.loads((out / "report.json").read_text(encoding="utf-8"))["runs"]} == {2}
    # --report-only trains nothing: FS at 2 iterations has not run, so the report names those runs as missing.
    fs_run = out / "runs" / "cross-a-2-seed0-fs-t0.json"
    before = fs_run.read_text(encoding="utf-8")
    assert train([*common, "--protocols", "cross", "--budgets", "2", "--strategies", "lp", "fs", "--iterations", "2", "--report-only"]) == 0
    assert "2 planned runs are not run yet" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["missing"] == ["cross-a-2-seed0-fs-t0", "cross-b-2-seed0-fs-t0"] and {r["strategy"] for r in report["runs"]} == {"lp"}
    assert "**Interim report**: 2 of 4 planned runs finished" in (out / "report.md").read_text(encoding="utf-8")
    assert fs_run.read_text(encoding="utf-8") == before  # the earlier FS run (other settings) is left as it was


def test_benchmark_rejects_bad_plans(tiny_pretrained, tmp_path, capsys):
    base = ["benchmark", "--pretrained", str(tiny_pretrained), "--image", "x", "--labels", "y", "-o", str(tmp_path)]
    for extra, message in ((["--budgets", "ten"], "--budgets ten"), (["--protocols", "cross"], "two or more"),
                           (["--timesteps", "lp-mlp=0,100"], "not among --strategies"), (["--min-iterations", "9", "--max-iterations", "3"], "at most"),
                           (["--timesteps", "5000"], "diffusion steps"), (["--budget-seeds", "50%=0"], "--budget-seeds 50%=0")):
        assert train([*base, *extra]) == 2
        assert message in capsys.readouterr().err
