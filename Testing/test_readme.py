"""README.md keeps its promises: its commands run as written, its accuracy table is the model card's.

- The two set-up commands (install and run the demo; install and run the tests) are in README, the test command is
  the line .ci/run runs, and the two differ only where they must (the test extra, the last step).
- Every `diffusionseg ...`, `diffusionseg-train ...`, `python -m Training...` (and `torchrun ... -m Training ...`)
  line in README's code blocks parses against the real argument parsers. The parsers are built, nothing is run.
- The held-out accuracy table is the bundled segmentor's card printed by `accuracy_table` (DSC with 2 decimals);
  the four-slice figures quoted beside it are the pretrained model's card.
- Relative links in README point to files that exist; docs/cli.md names exactly the flags the parsers have.

`python Testing/test_readme.py table` prints the accuracy table from the card, to paste under its marker in README;
`python Testing/test_readme.py cli-doc` rewrites the --help blocks of docs/cli.md from the parsers.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script too (`python Testing/test_readme.py table`)

from test_cli_help import subcommands  # noqa: E402  (one walk over the parsers, shared with the --help checks)

from DiffusionSegLib.cli import build_parser as engine_parser  # noqa: E402
from DiffusionSegLib.organs import ORGANS  # noqa: E402
from Training.cli import build_parser as training_parser  # noqa: E402

README = ROOT / "README.md"
CLI_DOC = ROOT / "docs" / "cli.md"
CI_SCRIPT = ROOT / ".ci" / "run"
WEIGHTS = ROOT / "DiffusionSegLib" / "weights"
SEGMENTOR_CARD = WEIGHTS / "flare22-segmentor" / "model.json"
TABLE_MARKER = "<!-- held-out table: filled from flare22-segmentor's card -->"
FOUR_SLICE_MARKER = "<!-- four-slice figures: flare22-segmentor's card, held_out.four_slices -->"
SETUP_PREFIX = "python3 -m venv .venv && . .venv/bin/activate && pip install torch=="
SHELL_BLOCKS = ("bash", "sh", "shell", "")
MAX_README_LINES = 300  # the issue that split README: 600 lines nobody could find anything in


def readme() -> str:
    return README.read_text(encoding="utf-8")


def card(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


# --- the set-up commands -----------------------------------------------------------------------------


def setup_lines(text: str, ending: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith(SETUP_PREFIX) and line.strip().endswith(ending)]


def test_the_two_setup_commands_are_in_readme_and_ci_runs_the_test_command():
    run_lines, test_lines = setup_lines(readme(), "&& diffusionseg demo"), setup_lines(readme(), "&& python -m pytest Testing")
    assert len(run_lines) == 1, f"README should hold the install-and-demo command once, found {run_lines}"
    assert len(test_lines) == 1, f"README should hold the install-and-test command once, found {test_lines}"
    ci = [line.strip() for line in CI_SCRIPT.read_text().splitlines() if line.strip().startswith("python3 -m venv")]
    assert ci == test_lines, ".ci/run must run README's test command verbatim"
    # The same interpreter, venv and torch pin for both: only the extra and the last step differ.
    expected_run = test_lines[0].replace('pip install -e ".[test]"', "pip install -e .").replace("python -m pytest Testing", "diffusionseg demo")
    assert run_lines[0] == expected_run


# --- every example command parses --------------------------------------------------------------------


class _Parsed(Exception):
    """Raised by the patched parse_args once the arguments are parsed, so a module's main() stops there."""


def _parse_with_main(module_name: str, argv: list[str]) -> None:
    """Parse `argv` with the parser that `python -m module_name` builds. Modules without build_parser() build theirs
    inside main(): run main() with parse_args patched to stop right after parsing, so nothing else runs."""
    module = importlib.import_module(module_name)
    if hasattr(module, "build_parser"):
        module.build_parser().parse_args(argv)
        return
    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        real(self, args, namespace)
        raise _Parsed

    argparse.ArgumentParser.parse_args = parse_then_stop
    try:
        module.main(argv)
    except _Parsed:
        return
    finally:
        argparse.ArgumentParser.parse_args = real
    raise AssertionError(f"{module_name}.main() returned without parsing its arguments")


def parser_for(words: list[str]) -> tuple[Callable[[list[str]], None], list[str]] | None:
    """(parse function, its argv) for a command line this test covers, else None."""
    if words[:1] == ["diffusionseg"]:
        return (lambda argv: engine_parser().parse_args(argv)), words[1:]
    if words[:1] == ["diffusionseg-train"]:
        return (lambda argv: training_parser().parse_args(argv)), words[1:]
    if words[:1] == ["torchrun"] and "-m" in words:
        words = ["python", *words[words.index("-m"):]]
    if words[:3] == ["python", "-m", "Training"]:
        return (lambda argv: training_parser().parse_args(argv)), words[3:]
    if words[:2] == ["python", "-m"] and len(words) > 2 and words[2].startswith("Training."):
        module = words[2]
        return (lambda argv: _parse_with_main(module, argv)), words[3:]
    return None


def code_block_commands(text: str) -> list[tuple[int, str]]:
    """(line number, command) for each command in README's fenced code blocks: continuation lines joined, `&&` and `;`
    split, comments dropped."""
    commands, fence, pending, start = [], None, "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip().startswith("```"):
            fence = line.strip()[3:].strip() if fence is None else None  # the block's language while inside one
            continue
        if fence not in SHELL_BLOCKS:  # outside, or a ```bibtex / ```text block: not commands
            continue
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full, pending = pending + line, ""
        words = shlex.split(full, comments=True)
        command: list[str] = []
        for word in [*words, "&&"]:
            if word in ("&&", ";", "||"):
                if command:
                    commands.append((start, shlex.join(command)))
                command = []
            else:
                command.append(word)
    return commands


def covered_commands(text: str) -> list[tuple[int, str]]:
    return [(number, command) for number, command in code_block_commands(text) if parser_for(shlex.split(command))]


def parse_error(command: str) -> str | None:
    """None when the command parses; otherwise what argparse said."""
    parse, argv = parser_for(shlex.split(command))
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parse(argv)
    except SystemExit as stop:
        if stop.code not in (0, None):  # --help exits 0
            return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit {stop.code}"
    return None


def test_readme_shows_examples_of_every_command_it_checks():
    """The check below means something only if README has such lines: the engine, training and a Training module."""
    commands = [command for _, command in covered_commands(readme())]
    assert any(c.startswith("diffusionseg ") for c in commands)
    assert any(c.startswith("diffusionseg-train ") for c in commands)
    assert any(c.startswith("python -m Training.") for c in commands)


def test_every_example_command_in_readme_parses():
    failures = [f"README line {number}: {command}\n    {error}" for number, command in covered_commands(readme())
                if (error := parse_error(command))]
    assert failures == [], "\n".join(failures)


def test_the_parse_check_rejects_a_wrong_example():
    text = ("```bash\ndiffusionseg segment CT.nii.gz -o CT.seg.nrrd --colours slicer   # no such flag\n"
            "diffusionseg finetune --image CT.nii.gz --labels L.nii.gz -o m \\\n    --iterations many\n"
            "python -m Training.benchmarks.model_figures --pretrained p -o out\n```\n")
    commands = covered_commands(text)
    assert [number for number, _ in commands] == [2, 3, 5]
    assert all(parse_error(command) for _, command in commands)


# --- the accuracy table is the card's ----------------------------------------------------------------


def _dsc(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def accuracy_table(held_out: dict) -> list[str]:
    """README's held-out table, one row per FLARE22 organ, from the card's `provenance.metrics.held_out`:
    a column per held-out patient (– where that patient's labels do not label the organ), the card's mean over the
    patients that label it and how many they are; the last row the card's mean DSC per patient and overall."""
    patients = sorted(held_out["patients"])
    lines = [f"| Organ | {' | '.join(patients)} | Mean DSC | Patients |", "|---" * (len(patients) + 3) + "|"]
    for organ in ORGANS:
        cells = [_dsc(held_out["patients"][p]["organ_dsc"].get(organ.name)) for p in patients]
        mean = held_out["organ_dsc"].get(organ.name)
        lines.append(f"| {organ.display_name} | {' | '.join(cells)} | {_dsc(mean)} | {held_out['organ_patients'].get(organ.name, 0)} |")
    means = [_dsc(held_out["patients"][p]["mean_dsc"]) for p in patients]
    lines.append(f"| **Mean over organs** | {' | '.join(means)} | {_dsc(held_out['mean_dsc'])} | |")
    return lines


def readme_table(text: str) -> list[str]:
    """The table lines right under the marker (blank lines between marker and table allowed)."""
    assert TABLE_MARKER in text, f"README lost the marker {TABLE_MARKER}"
    after = text.split(TABLE_MARKER, 1)[1].lstrip("\n").splitlines()
    table = []
    for line in after:
        if not line.startswith("|"):
            break
        table.append(line.rstrip())
    return table


def test_readme_accuracy_table_is_the_segmentor_cards_held_out_figures():
    held_out = card(SEGMENTOR_CARD)["provenance"]["metrics"]["held_out"]
    assert readme_table(readme()) == accuracy_table(held_out), "paste `python Testing/test_readme.py table` under the marker"


def current_held_out() -> dict:
    """The card's held-out figures (leave one patient out)."""
    return card(SEGMENTOR_CARD)["provenance"]["metrics"]["held_out"]


def test_the_table_check_catches_a_changed_figure():
    held_out = current_held_out()
    table = accuracy_table(held_out)
    assert len(table) == 2 + len(ORGANS) + 1
    liver = next(p for p in held_out["patients"] if "liver" in held_out["patients"][p]["organ_dsc"])
    held_out["patients"][liver]["organ_dsc"]["liver"] += 0.05
    assert accuracy_table(held_out) != table


def test_the_table_reads_the_three_patient_field_with_partial_labels():
    """The shape the rebuilt card will carry: a patient whose labels label four organs shows – for the rest."""
    four = {"liver": 0.9, "right kidney": 0.8, "spleen": 0.7, "left kidney": 0.6}
    full = {o.name: 0.5 for o in ORGANS if o.name != "gallbladder"}
    held_out = {"protocol": "leave one patient out", "recipe": "300 iterations",
                "patients": {"abdomen-ct-ircadb01": {"mean_dsc": 0.75, "organ_dsc": four},
                             "abdomen-ct-a": {"mean_dsc": 0.5, "organ_dsc": full}},
                "organ_dsc": {name: (full[name] + four[name]) / 2 if name in four else full[name] for name in full},
                "organ_patients": {o.name: (o.name in full) + (o.name in four) for o in ORGANS}, "mean_dsc": 0.625}
    table = accuracy_table(held_out)
    assert table[0] == "| Organ | abdomen-ct-a | abdomen-ct-ircadb01 | Mean DSC | Patients |"
    rows = {line.split(" | ")[0][2:]: line for line in table[2:]}
    assert rows["Liver"] == "| Liver | 0.50 | 0.90 | 0.70 | 2 |"
    assert rows["Pancreas"] == "| Pancreas | 0.50 | – | 0.50 | 1 |"
    assert rows["Gallbladder"] == "| Gallbladder | – | – | – | 0 |"  # labelled in no held-out patient: not measured
    assert rows["**Mean over organs**"] == "| **Mean over organs** | 0.50 | 0.75 | 0.62 | |"


def test_four_slice_figures_in_readme_are_the_segmentor_cards():
    """README quotes, after its marker, four painted slices of each held-out patient refined from the segmentor trained
    without that patient and from ddpm-pretrained (mean DSC on that CT's other labelled slices), as the card holds them."""
    four = card(SEGMENTOR_CARD)["provenance"]["metrics"]["held_out"]["four_slices"]
    text = readme()
    assert FOUR_SLICE_MARKER in text
    sentence = text.split(FOUR_SLICE_MARKER, 1)[1].split("\n\n", 1)[0]
    for patient, figures in four.items():
        for key in ("from_segmentor_without_it", "from_pretrained"):
            assert _dsc(figures[key]) in sentence, f"README's four-slice sentence should quote {patient}'s {key} {_dsc(figures[key])}"


# --- links and the CLI reference ---------------------------------------------------------------------


def test_relative_links_in_readme_point_to_files_that_exist():
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme())
    local = [t for t in targets if not re.match(r"[a-z]+:", t)]
    assert local, "README links to its docs pages"
    assert [t for t in local if not (ROOT / t).exists()] == []


def test_readme_is_short():
    assert len(readme().splitlines()) <= MAX_README_LINES, "README is the front page: move detail to docs/"


def all_subcommands() -> dict[str, argparse.ArgumentParser]:
    return {**subcommands(engine_parser()), **subcommands(training_parser())}


# An option's own line in --help: two spaces, then its flags ("-o OUT, --output OUT", "--cleanup, --no-cleanup") up to
# the gap before the help text. Flags named inside help text ("usable as '--model NAME'") are not the option's.
OPTION_LINE = re.compile(r"^  (-.*?)(?:\s{2,}|$)")
HELP_BLOCK = re.compile(r"<!-- help: (?P<prog>[^>]+?) -->\n```text\n(?P<text>.*?)```\n", re.S)


def help_text(parser: argparse.ArgumentParser) -> str:
    """--help as printed on a 100-column terminal (argparse reads COLUMNS)."""
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        return parser.format_help()
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous


def test_cli_doc_shows_every_command_with_exactly_its_flags():
    """docs/cli.md's --help blocks name the flags each parser has, no more, no fewer. Flags, not the whole text: argparse
    words its help a little differently from one Python version to the next."""
    blocks = {m["prog"]: m["text"] for m in HELP_BLOCK.finditer(CLI_DOC.read_text(encoding="utf-8"))}
    parsers = all_subcommands()
    assert sorted(blocks) == sorted(parsers), "refresh with `python Testing/test_readme.py cli-doc`"
    for prog, parser in parsers.items():
        flags = {flag for action in parser._actions for flag in action.option_strings if flag.startswith("--")}
        shown = {flag for line in blocks[prog].splitlines() if (names := OPTION_LINE.match(line))
                 for flag in re.findall(r"--[a-z][\w-]*", names[1])}
        assert shown == flags, f"{prog}: docs/cli.md differs from the parser; refresh with `python Testing/test_readme.py cli-doc`"


def write_cli_doc() -> None:
    """Rewrite each --help block of docs/cli.md (between `<!-- help: PROG -->` and the end of its code block)."""
    parsers = all_subcommands()
    text = CLI_DOC.read_text(encoding="utf-8")
    missing = sorted(set(parsers) - {m["prog"] for m in HELP_BLOCK.finditer(text)})
    if missing:
        raise SystemExit(f"docs/cli.md has no place for {missing}: add a '<!-- help: PROG -->' line and an empty ```text block")
    text = HELP_BLOCK.sub(lambda m: f"<!-- help: {m['prog']} -->\n```text\n{help_text(parsers[m['prog']])}```\n", text)
    CLI_DOC.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    if sys.argv[1:] == ["table"]:
        print("\n".join(accuracy_table(current_held_out())))
    elif sys.argv[1:] == ["cli-doc"]:
        write_cli_doc()
    else:
        raise SystemExit("usage: python Testing/test_readme.py table | cli-doc")
